"""Errors raised by the plugin layer; each one names the method, distribution and cause."""

from __future__ import annotations

from collections.abc import Iterable

from gkd.errors import GkdError


class MethodNotFound(GkdError):
    """A config names a method that no installed distribution provides."""

    def __init__(self, name: str, installed: Iterable[str], suggestion: str | None = None) -> None:
        names = ", ".join(sorted(installed)) or "(none)"
        hint = f"; did you mean '{suggestion}'?" if suggestion else ""
        super().__init__(f"unknown method '{name}'{hint} (installed: {names})")
        self.name = name


class MethodLoadError(GkdError):
    """A config selects a method whose plugin is broken."""

    def __init__(self, name: str, distribution: str, version: str, reason: str) -> None:
        super().__init__(f'Error loading method "{name}" from {distribution} {version}: {reason}')
        self.name = name
