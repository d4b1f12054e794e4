"""Finding gkd plugins through :mod:`importlib.metadata` without importing them.

Kept free of pluggy and jsonschema so that ``gkd env`` can list what is installed cheaply,
and can still do so when a plugin cannot even be imported.
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass

ENTRY_POINT_GROUP = "gkd.methods"
BUILTIN_DISTRIBUTIONS = ("gkd-methods-builtin", "gkd-methods-multiteacher")
"""Loaded first, so a third-party plugin can never take a built-in method's name."""


@dataclass(frozen=True)
class InstalledPlugin:
    """One ``gkd.methods`` entry point as the metadata describes it (nothing imported)."""

    entry_point: str
    value: str
    """What the entry point loads, e.g. ``"my_method"`` or ``"pkg.mod:obj"``."""
    distribution: str
    version: str


def entry_points() -> list[md.EntryPoint]:
    """Every ``gkd.methods`` entry point once, built-in distributions first."""
    seen: set[tuple[str, str]] = set()
    result = []
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        # An editable install can expose the same distribution twice on sys.path.
        key = (ep.name, ep.value)
        if key not in seen:
            seen.add(key)
            result.append(ep)

    def order(ep: md.EntryPoint) -> tuple[int, str, str]:
        dist = ep.dist.name if ep.dist else ""
        return (0 if dist in BUILTIN_DISTRIBUTIONS else 1, dist, ep.name)

    return sorted(result, key=order)


def installed_plugins() -> list[InstalledPlugin]:
    """:func:`entry_points` as plain records, for listing."""
    return [
        InstalledPlugin(ep.name, ep.value, ep.dist.name if ep.dist else "(unknown)", ep.dist.version if ep.dist else "?")
        for ep in entry_points()
    ]


__all__ = ["BUILTIN_DISTRIBUTIONS", "ENTRY_POINT_GROUP", "InstalledPlugin", "entry_points", "installed_plugins"]
