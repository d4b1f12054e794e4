"""The label vocabulary of a classification run: label strings <-> class ids."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gkd.atomic import atomic_write_json
from gkd.engine.readers import DataError, Example, UnknownLabelError


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

