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
    def from_examples(cls, examples: Sequence[Example], field: str = "label") -> LabelVocab:
        """Build the vocabulary of a training split (sorted; integer labels numerically).

        Args:
            examples: The training examples.
            field: The label field's name (for messages).

        Raises:
            DataError: An example has no label, or there are fewer than two classes.
        """
        missing = next((ex for ex in examples if ex.label is None), None)
        if missing is not None:
            raise DataError(f"{missing.where}: missing field '{field}'")
        names = _sorted_labels({ex.label for ex in examples if ex.label is not None})
        if len(names) < 2:
            source = examples[0].source if examples else "training data"
            found = f"the one value {names[0]!r} in all {len(examples)} examples" if names else "no values"
            raise DataError(f"{source}: field '{field}' has {found}; sequence classification needs at least 2 labels")
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

    def encode(self, label: str, where: str = "", field: str = "label") -> int:
        """Class id of ``label``; ``where`` (file and line) and ``field`` name it in the error.

        Raises:
            UnknownLabelError: ``label`` is not in the vocabulary.
        """
        try:
            return self._ids[label]
        except KeyError:
            prefix = f"{where}: " if where else ""
            known = ", ".join(self._labels[:20]) + (f", … ({len(self._labels)} in all)" if len(self._labels) > 20 else "")
            raise UnknownLabelError(f"{prefix}label '{label}' does not occur in the training data "
                                    f"(field '{field}'; known: {known})") from None

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

