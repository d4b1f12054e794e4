"""Reading a run config file (YAML or JSON) and applying ``--set key=value`` overrides."""

from __future__ import annotations

import codecs
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from gkd.config.errors import ConfigError, ConfigIssue
from gkd.config.schema import format_path

_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*)((?:\[\d{1,9}\])*)")


MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""A run config is a few kilobytes; anything this large is not one (and is not read whole)."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML (``.yaml``/``.yml``) or JSON file into a mapping.

    Every way a file can fail to be a config (unreadable, binary, not UTF-8, a syntax error, a
    key given twice, nesting too deep for the parser, a number too long to read, not a mapping)
    is a :class:`ConfigError` naming the file, and the line where there is one.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read config: {exc.strerror or exc}")], str(p)) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise _file_error(p, f"larger than {MAX_CONFIG_BYTES // 2**20} MiB; not a run config")
    text = _decode(p, data)
    if not text.strip():
        raise _file_error(p, "the file is empty; a run config is a mapping with task, data, student and stages")
    try:
        if p.suffix.lower() == ".json":
            parsed = _load_json(text)
        else:
            parsed = _load_yaml(text)
    except json.JSONDecodeError as exc:
        raise _file_error(p, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except _DuplicateKey as exc:
        raise ConfigError([ConfigIssue(exc.path, exc.message)], str(p)) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise _file_error(p, f"invalid YAML{where}: {exc.problem or exc.context or 'syntax error'}") from None
    except yaml.reader.ReaderError as exc:
        line, column = _line_column(text, exc.position)
        char = chr(exc.character) if isinstance(exc.character, int) else str(exc.character)
        raise _file_error(p, f"invalid YAML at line {line}, column {column}: character {char!r} "
                             "is not allowed in YAML text") from None
    except yaml.YAMLError as exc:
        raise _file_error(p, f"invalid YAML: {exc}") from None
    except RecursionError:
        raise _file_error(p, "nested too deeply to read (a run config is a few levels deep)") from None
    except ValueError as exc:  # an integer of thousands of digits (Python's int-from-string limit)
        raise _file_error(p, f"a value cannot be read: {_value_error(exc)}") from None
    if parsed is None:
        raise _file_error(p, "the top level is empty (null or only comments); a run config is a mapping with "
                             "task, data, student and stages")
    if not isinstance(parsed, dict):
        raise _file_error(p, f"the top level must be a mapping, got {type(parsed).__name__}")
    return parsed


def _value_error(exc: ValueError) -> str:
    if "digits" in str(exc):  # Python refuses to read integers longer than sys.get_int_max_str_digits()
        return f"an integer longer than {sys.get_int_max_str_digits()} digits"
    return str(exc)


def _file_error(path: Path, message: str) -> ConfigError:
    return ConfigError([ConfigIssue("", message)], str(path))


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text (a byte-order mark is dropped), or a one-line error saying what the bytes are."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise _file_error(path, "the file is UTF-16/UTF-32 text (it starts with a byte-order mark); save it as UTF-8")
    nul = data.find(b"\0")
    if nul >= 0:
        raise _file_error(path, f"not a text file (a NUL byte at offset {nul}); a run config is UTF-8 YAML or JSON")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _file_error(path, f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} cannot be decoded; "
                                "save the file as UTF-8") from None


def _line_column(text: str, position: int) -> tuple[int, int]:
    before = text[:position]
    return before.count("\n") + 1, position - (before.rfind("\n") + 1) + 1


class _DuplicateKey(Exception):
    """A mapping names a key twice (YAML and ``json`` would silently keep the last)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path, self.message = path, message


class _JsonObject(dict):  # type: ignore[type-arg]
    """A JSON object that remembers the keys it was given more than once."""

    duplicates: tuple[str, ...] = ()


def _unique_json_keys(pairs: list[tuple[str, Any]]) -> _JsonObject:
    out = _JsonObject(pairs)
    if len(out) < len(pairs):
        seen: set[str] = set()
        out.duplicates = tuple(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
    return out


def _load_json(text: str) -> Any:
    """``json.loads`` that refuses a key given twice in one object, naming its path."""
    parsed = json.loads(text, object_pairs_hook=_unique_json_keys)
    stack: list[tuple[Any, list[str | int]]] = [(parsed, [])]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            for key in getattr(node, "duplicates", ()):
                raise _DuplicateKey(format_path([*path, key]),
                                    f"key {key!r} is given twice in one object; JSON readers would keep only the last")
            stack.extend((v, [*path, k]) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, [*path, i]) for i, v in enumerate(node))
    return _plain(parsed)


def _plain(node: Any) -> Any:
    """The parsed JSON with plain dicts (nothing downstream sees :class:`_JsonObject`)."""
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping, naming its path and lines."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, [], set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_duplicate_keys(node: yaml.Node, path: list[str | int], seen: set[int]) -> None:
    if id(node) in seen:  # an alias: already checked where its anchor is
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if (key.tag, key.value) in first:
                    raise _DuplicateKey(format_path([*path, key.value]),
                                        f"key {key.value!r} is given twice (lines {first[key.tag, key.value]} and "
                                        f"{line}); YAML would keep only the last")
                first[key.tag, key.value] = line
                _check_duplicate_keys(value, [*path, key.value], seen)
            else:
                _check_duplicate_keys(value, path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, [*path, i], seen)


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
            value = _load_yaml(raw) if raw.strip() else ""
        except _DuplicateKey as exc:
            issues.append(ConfigIssue("--set", f"{key.strip()}: {exc.message}"))
            continue
        except yaml.YAMLError:
            value = raw  # not YAML: the text itself (a string field gets it; any other is told its type)
        except (RecursionError, ValueError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else _value_error(exc)
            issues.append(ConfigIssue("--set", f"the value of {key.strip()} cannot be read: {reason}"))
            continue
        node: Any = config
        shown = ""
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            shown = f"{shown}[{part}]" if isinstance(part, int) else (f"{shown}.{part}" if shown else part)
            if isinstance(part, int):
                if not isinstance(node, list):
                    issues.append(ConfigIssue(shown, f"cannot index a {type(node).__name__} (--set {key})"))
                    break
                if part >= len(node):
                    issues.append(ConfigIssue(shown, f"index out of range in --set {key} (the list has {len(node)} item(s))"))
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
