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

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from gkd.config.run import DatasetConfig, TaskConfig, TaskType
from gkd.engine.labels import LabelVocab
from gkd.engine.readers import IGNORE_INDEX, DataError, Example, read_split
from gkd.models.tokenizer import Tokenizer, pad_rows
from gkd.parallel.rng import seeded_generator, seeded_permutation


class TaskDataset:
    """Examples tokenised once and kept in memory, collated into batches on demand.

    Args:
        examples: The raw examples.
        tokenizer: Tokenizer of the student (and of its teachers: they share a vocabulary).
        task: ``sequence_classification``, ``masked_lm`` or ``causal_lm``.
        labels: Label vocabulary; required for sequence classification (build it from the
            training split and reuse it for eval/test).
        mlm_probability: Share of maskable tokens masked per batch (``masked_lm``).
        label_field: The label field's name (for messages).

    Raises:
        UnknownLabelError: An example's label is not in ``labels``.
        DataError: The tokenizer cannot serve the task (no mask token for ``masked_lm``).
    """

    def __init__(self, examples: Sequence[Example], tokenizer: Tokenizer, task: TaskType, *,
                 labels: LabelVocab | None = None, mlm_probability: float = 0.15,
                 label_field: str = "label") -> None:
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
        self.blank = 0
        """Blank lines skipped when the split was read (:func:`build_dataset` sets it)."""
        self._labels: torch.Tensor | None = None
        if labels is not None and task == "sequence_classification":
            # Labels before tokens: an unseen label fails at once, not after tokenising the split.
            ids = []
            for ex in examples:
                if ex.label is None:
                    raise DataError(f"{ex.where}: missing field '{label_field}'")
                ids.append(labels.encode(ex.label, ex.where, label_field))
            self._labels = torch.tensor(ids, dtype=torch.long)
        self._ids: list[torch.Tensor] = []
        self._maskable: list[torch.Tensor] = []
        special = torch.tensor(sorted(tokenizer.special_ids), dtype=torch.long)
        for ids, special_mask in tokenizer.token_lists([ex.text for ex in examples]):
            t = torch.tensor(ids, dtype=torch.long)
            self._ids.append(t)
            if task == "masked_lm":
                # Never mask what the post-processor added ([CLS], [SEP]) nor any special token.
                self._maskable.append(~torch.tensor(special_mask, dtype=torch.bool) & ~torch.isin(t, special))

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def lengths(self) -> list[int]:
        """Token count per example after truncation."""
        return [len(t) for t in self._ids]

    @property
    def at_max_length(self) -> int:
        """Examples that fill ``max_length`` tokens (a longer text was cut there)."""
        return sum(len(t) >= self.tokenizer.max_length for t in self._ids)

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


def build_dataset(ds: DatasetConfig, tokenizer: Tokenizer, task: TaskConfig, *, seed: int,
                  labels: LabelVocab | None = None) -> tuple[TaskDataset, LabelVocab | None]:
    """Read and tokenise one split for the run's ``task`` section.

    Args:
        ds: The split's dataset config.
        tokenizer: The run's tokenizer.
        task: The run's ``task`` section.
        seed: Run seed (subset selection).
        labels: The training vocabulary; None for the training split of a classification
            task, which builds it.

    Returns:
        The dataset and the label vocabulary it used (None for LM tasks).
    """
    kind: TaskType = task.type
    classify = kind == "sequence_classification"
    split = read_split(ds, seed=seed, needs_labels=classify)
    if classify and labels is None:
        labels = LabelVocab.from_examples(split.examples, ds.label_field)
    dataset = TaskDataset(split.examples, tokenizer, kind, labels=labels if classify else None,
                          mlm_probability=task.mlm_probability, label_field=ds.label_field)
    dataset.blank = split.blank
    return dataset, labels if classify else None


def describe_split(role: str, ds: DatasetConfig, dataset: TaskDataset) -> str:
    """One log line on a split as read: its examples and what was skipped or cut."""
    notes = [f"{len(dataset)} examples"]
    if dataset.blank:
        notes.append(f"{dataset.blank} blank line{'s' * (dataset.blank != 1)} skipped")
    cut = dataset.at_max_length
    if cut:
        notes.append(f"{cut} at task.max_length ({dataset.tokenizer.max_length} tokens; longer texts are cut there)")
    return f"data {role}: {ds.path.name}: {', '.join(notes)}"


def _epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    order = seeded_permutation(n, seed, "epoch", epoch) if shuffle else list(range(n))
    if world_size > 1:
        # Like DistributedSampler: wrap around so every rank gets the same number of examples.
        total = math.ceil(n / world_size) * world_size
        order = (order * math.ceil(total / n))[:total][rank::world_size]
    return order


def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def epoch_batches(num_examples: int, batch_size: int, *, world_size: int = 1, drop_last: bool = False) -> int:
    """Micro-batches per epoch on each data-parallel rank (what :class:`BatchIterator` yields)."""
    return _num_batches(math.ceil(num_examples / world_size), batch_size, drop_last)


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
        self.batches_per_epoch = epoch_batches(len(dataset), batch_size, world_size=world_size, drop_last=drop_last)
        if self.batches_per_epoch == 0:
            raise DataError(f"{len(dataset)} training examples are fewer than one batch of {batch_size}"
                            f"{f' on each of {world_size} ranks' if world_size > 1 else ''}")
        self.epoch = 0
        self.index = 0
        """Position of the next batch: epoch and batch index within it."""
        self._order: list[int] | None = None

    @property
    def next_epoch(self) -> int:
        """The epoch the next batch belongs to (the position rolls over on the next ``next()``)."""
        return self.epoch + 1 if self.index >= self.batches_per_epoch else self.epoch

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
