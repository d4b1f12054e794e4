"""Lazy package exports (PEP 562), so that ``import gkd`` and the CLI's start stay light.

A package lists ``name -> module`` and gets a module ``__getattr__`` that imports the
module on first access. torch and megatron-core are then imported only by code that uses
a model or a tensor, never by ``gkd --help``, ``gkd env`` or a config check.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, table: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, resolving ``table[name]`` on first use."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals_ = importlib.import_module(package).__dict__
        globals_[name] = value  # later look-ups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(table)

    return __getattr__, __dir__
