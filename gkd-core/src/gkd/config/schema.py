"""JSON Schema helpers: error messages with field paths, 'did you mean', and defaults."""

from __future__ import annotations

import copy
import difflib
import json
import reprlib
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from gkd.config.errors import ConfigIssue


@cache
def run_schema() -> dict[str, Any]:
    """The JSON Schema of a run config (``gkd/config/run.schema.json``)."""
    return json.loads(resources.files("gkd.config").joinpath("run.schema.json").read_text())


def format_path(parts: Iterable[Any], prefix: str = "") -> str:
    """``['stages', 0, 'methods']`` -> ``stages[0].methods``."""
    out = prefix
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _unknown_key_issues(error: ValidationError, prefix: str) -> list[ConfigIssue]:
    allowed = list(error.schema.get("properties", {}))
    issues = []
    for key in error.instance:
        if key in allowed:
            continue
        match = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hint = f"; did you mean '{match[0]}'?" if match else f"; allowed keys: {', '.join(allowed)}"
        issues.append(ConfigIssue(format_path([*error.absolute_path, key], prefix), f"unknown key{hint}"))
    return issues


def _best_message(error: ValidationError) -> str:
    if error.validator == "oneOf" and error.context:
        # Report the alternative that got furthest rather than "is not valid under any".
        options = "; or ".join(sorted({e.message for e in error.context}))
        return f"{_short(error.instance)} is not valid: {options}"
    full = repr(error.instance)
    if len(full) > 80 and error.message.startswith(full):  # a pasted blob: its start says which value it is
        return _short(error.instance) + error.message[len(full):]
    return error.message


def _short(value: Any) -> str:
    short = reprlib.Repr()  # attributes, not keywords: Python 3.11
    short.maxstring = short.maxother = 60
    short.maxlist = short.maxdict = 4
    short.maxlevel = 2
    return short.repr(value)


def schema_issues(schema: Mapping[str, Any], instance: Any, prefix: str = "") -> list[ConfigIssue]:
    """All violations of ``schema`` by ``instance``, one issue per problem, sorted by path."""
    validator = Draft202012Validator(schema)
    issues: list[ConfigIssue] = []
    for error in sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path]):
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            issues.extend(_unknown_key_issues(error, prefix))
        elif error.validator == "required" and isinstance(error.instance, dict):
            # At the missing key's own path, so every line names a field (not the enclosing object).
            missing = [k for k in error.validator_value if k not in error.instance and repr(k) in error.message]
            path = [*error.absolute_path, missing[0]] if missing else error.absolute_path
            issues.append(ConfigIssue(format_path(path, prefix), "required, but missing" if missing else error.message))
        else:
            issues.append(ConfigIssue(format_path(error.absolute_path, prefix), _best_message(error)))
    return issues


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        node: Any = root
        for part in ref[2:].split("/"):
            node = node[part]
        merged = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
        return _resolve(merged, root) if "$ref" in node else merged
    return schema


def apply_defaults(schema: Mapping[str, Any], instance: Any, root: Mapping[str, Any] | None = None) -> Any:
    """Return a copy of ``instance`` with every missing ``default`` of ``schema`` filled in.

    Only object properties and array items are followed (with local ``$ref``); that is all
    gkd's schemas and method schemas need. Run it on an instance that already validates.
    """
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if isinstance(instance, dict):
        out = dict(instance)
        for key, sub in schema.get("properties", {}).items():
            sub_r = _resolve(sub, root)
            if key not in out and "default" in sub_r:
                out[key] = copy.deepcopy(sub_r["default"])
            if key in out:
                out[key] = apply_defaults(sub_r, out[key], root)
        return out
    if isinstance(instance, list) and isinstance(schema.get("items"), Mapping):
        return [apply_defaults(schema["items"], item, root) for item in instance]
    return instance


def defaults_of(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The config a method gets when the user gives none."""
    result = apply_defaults(schema, {})
    return result if isinstance(result, dict) else {}


def closest(name: str, candidates: Sequence[str]) -> str | None:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return match[0] if match else None
