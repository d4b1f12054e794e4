"""Checks every value of a config must pass whatever its field: finite numbers, integers a
64-bit float holds exactly, string keys, and a tree (no YAML alias cycles) of bounded depth.

A JSON Schema cannot say "no NaN anywhere" (``NaN > 0`` is simply false, ``.inf`` satisfies
every ``minimum``), and a method's own schema may not think of it; these hold for every field,
method options included. :func:`sanitize` also returns a copy with each offending value
replaced by ``None``, so the schema and the cross-field checks never see one (a huge integer
cannot even be printed in a schema message).
"""

from __future__ import annotations

import math
from typing import Any

from gkd.config.errors import ConfigIssue
from gkd.config.schema import format_path

MAX_INT = 2**53
"""Largest integer magnitude accepted anywhere (exactly representable as a JSON/float number);
fields with a natural bound have a smaller ``maximum`` in the schema."""

MAX_DEPTH = 32
"""Nesting depth accepted; a run config is about six levels deep."""

MAX_VALUES = 100_000
"""Values (after YAML aliases are expanded) accepted in one config."""


class ConfigTooLarge(Exception):
    """The config holds more than :data:`MAX_VALUES` values."""


def sanitize(raw: Any, prefix: str = "") -> tuple[Any, list[ConfigIssue]]:
    """``raw`` with every non-finite number, out-of-range integer, non-string key, alias cycle
    or too-deep subtree replaced by ``None``, and one issue per replacement.

    Raises:
        ConfigTooLarge: More than :data:`MAX_VALUES` values (e.g. a YAML alias bomb).
    """
    issues: list[ConfigIssue] = []
    budget = [MAX_VALUES]

    def walk(node: Any, path: list[str | int], open_nodes: set[int]) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise ConfigTooLarge(f"more than {MAX_VALUES} values (YAML aliases included); not a run config")
        where = format_path(path, prefix)
        if isinstance(node, bool) or node is None or isinstance(node, str):
            return node
        if isinstance(node, float):
            if math.isfinite(node):
                return node
            issues.append(ConfigIssue(where, f"{node} is not a finite number"))
            return None
        if isinstance(node, int):
            if -MAX_INT <= node <= MAX_INT:
                return node
            size = str(node) if node.bit_length() < 256 else f"an integer of {node.bit_length()} bits"
            issues.append(ConfigIssue(where, f"{size} is out of range (integers must be within ±2**53)"))
            return None
        if not isinstance(node, (dict, list)):
            return node  # dates, bytes, sets: the schema names the type expected
        if id(node) in open_nodes:
            issues.append(ConfigIssue(where, "contains itself (a YAML alias to an enclosing node)"))
            return None
        if len(path) >= MAX_DEPTH:
            issues.append(ConfigIssue(where, f"nested deeper than {MAX_DEPTH} levels"))
            return None
        open_nodes.add(id(node))
        try:
            if isinstance(node, list):
                return [walk(v, [*path, i], open_nodes) for i, v in enumerate(node)]
            out = {}
            for key, value in node.items():
                if not isinstance(key, str):
                    issues.append(ConfigIssue(format_path([*path, str(key)], prefix),
                                              f"key {key!r} is a {type(key).__name__}; keys must be strings "
                                              "(quote it)"))
                    continue
                out[key] = walk(value, [*path, key], open_nodes)
            return out
        finally:
            open_nodes.discard(id(node))

    return walk(raw, [], set()), issues


__all__ = ["MAX_DEPTH", "MAX_INT", "MAX_VALUES", "ConfigTooLarge", "sanitize"]
