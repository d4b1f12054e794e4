"""Reading a run config file (YAML or JSON) and applying ``--set key=value`` overrides."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from gkd.config.errors import ConfigError, ConfigIssue

_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*)((?:\[\d+\])*)")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML (``.yaml``/``.yml``) or JSON file; syntax errors name the line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read config: {exc.strerror or exc}")], str(p)) from None
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([ConfigIssue("", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")], str(p)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue("", f"invalid YAML{where}: {problem}")], str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue("", f"the top level must be a mapping, got {type(data).__name__}")], str(p))
    return data


def _parse_key(key: str) -> list[str | int] | None:
    parts: list[str | int] = []
    for raw in key.split("."):
        m = _SEGMENT.fullmatch(raw)
        if not m:
            return None
        parts.append(m.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return parts


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> list[ConfigIssue]:
    """Apply ``a.b[0].c=value`` assignments in place; values are parsed as YAML scalars/flow.

    Intermediate objects are created when missing; unknown keys are left for schema
    validation to reject (with a 'did you mean'), so the message format stays uniform.
    Returns the problems that make an override impossible to apply.
    """
    issues = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = _parse_key(key.strip()) if sep else None
        if not parts:
            issues.append(ConfigIssue("--set", f"{item!r} is not of the form key.path=value (e.g. stages[0].steps=100)"))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node: Any = config
        shown = ""
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            shown = f"{shown}[{part}]" if isinstance(part, int) else (f"{shown}.{part}" if shown else part)
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    size = len(node) if isinstance(node, list) else 0
                    issues.append(ConfigIssue(shown, f"index out of range in --set {key} (the list has {size} item(s))"))
                    break
            elif not isinstance(node, dict):
                issues.append(ConfigIssue(shown, f"cannot set a key inside a {type(node).__name__} (--set {key})"))
                break
            if last:
                node[part] = value
            else:
                if isinstance(part, str) and part not in node:
                    node[part] = [] if isinstance(parts[i + 1], int) else {}
                node = node[part]
    return issues
