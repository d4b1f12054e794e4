"""The optional packages deployment needs, and the one-line errors when they are missing.

``transformers`` checks Hugging Face exports and is what ONNX exports are traced through;
``onnx`` and ``onnxruntime`` write, quantise and run ONNX models. All three come with the
extra ``gkd-core[onnx]``; nothing here imports them before a command needs them.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from gkd.errors import GkdError

ONNX_EXTRA = "onnx"
ONNX_PACKAGES: tuple[str, ...] = ("onnx", "onnxruntime", "transformers")
"""What ``gkd-core[onnx]`` installs (import names)."""


def missing(packages: tuple[str, ...] = ONNX_PACKAGES) -> list[str]:
    """The packages of ``packages`` that cannot be imported (found without importing them)."""
    out = []
    for name in packages:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def install_hint(what: str, packages: list[str]) -> str:
    """``<what> needs <packages>, not installed: pip install 'gkd-core[onnx]'``."""
    return (f"{what} needs {', '.join(packages)}, which {'is' if len(packages) == 1 else 'are'} not installed; "
            f"install the optional extra: pip install 'gkd-core[{ONNX_EXTRA}]'")


def require(name: str, what: str) -> ModuleType:
    """Import ``name`` or raise a :class:`GkdError` naming the extra that provides it.

    Args:
        name: An import name of :data:`ONNX_PACKAGES`.
        what: What needs it, for the message (``"gkd export --format onnx"``).
    """
    try:
        return importlib.import_module(name)
    except ImportError:
        raise GkdError(install_hint(what, [name])) from None


__all__ = ["ONNX_EXTRA", "ONNX_PACKAGES", "install_hint", "missing", "require"]
