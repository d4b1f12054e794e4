"""Path resolution for config values: relative to the config file, or inside a package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PKG_PREFIX = "pkg:"


class PathResolutionError(ValueError):
    pass


def resolve_path(value: str, base_dir: Path) -> Path:
    """Resolve ``value`` against ``base_dir``; ``pkg:module/sub`` points into an installed package."""
    if value.startswith(PKG_PREFIX):
        module, _, sub = value[len(PKG_PREFIX):].partition("/")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise PathResolutionError(f"package {module!r} is not installed (from {value!r})")
        return Path(next(iter(spec.submodule_search_locations))) / sub
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path)
