"""The data checks of ``gkd validate`` (and so of every ``gkd distill``): a classification run's
splits are read — not tokenised — and their labels checked against each other, against
``task.num_labels`` and against every teacher whose checkpoint has a classification head.

Without torch: it reads the files as :mod:`gkd.engine.readers` does and each teacher's
``config.json`` only. LM tasks need no label set, so their files are read (and checked) by the
engine, before the first step (:meth:`gkd.engine.assets.RunAssets.read_all_data`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from gkd.config.errors import ConfigIssue
from gkd.config.paths import PathResolutionError, resolve_path
from gkd.config.run import DatasetConfig
from gkd.engine.labels import LabelVocab
from gkd.engine.readers import DataError, read_split


def _dataset(raw: Any, base_dir: Path) -> DatasetConfig | None:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("path"), str):
        return None
    try:
        path = resolve_path(raw["path"], base_dir)
    except PathResolutionError:
        return None  # reported with the data paths
    limit = raw.get("limit")
    return DatasetConfig(path, str(raw.get("format", "auto")), str(raw.get("text_field", "text")),
                         str(raw.get("label_field", "label")), limit if isinstance(limit, int) else None)


def _splits(raw: Mapping[str, Any], base_dir: Path) -> Iterator[tuple[str, DatasetConfig]]:
    """``(config path, dataset)`` of every split the run reads, ``data.train`` first, each file once."""
    data = raw.get("data") if isinstance(raw.get("data"), Mapping) else {}
    entries = [(f"data.{s}", data.get(s)) for s in ("train", "eval", "test")]
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    for i, stage in enumerate(stages):
        sdata = stage.get("data") if isinstance(stage, Mapping) and isinstance(stage.get("data"), Mapping) else {}
        entries += [(f"stages[{i}].data.{s}", sdata.get(s)) for s in ("train", "eval")]
    seen: set[DatasetConfig] = set()
    for where, entry in entries:
        ds = _dataset(entry, base_dir)
        if ds is not None and ds not in seen:
            seen.add(ds)
            yield where, ds


def _touches_data(path: str) -> bool:
    return path.startswith(("data", "seed", "task", "teachers")) or ".data" in path


def _teacher_head(path: Path) -> tuple[int, list[str] | None] | None:
    """``(labels, names or None)`` of the classification head of the checkpoint in ``path``; None
    without one (or without a readable ``config.json``: reported with the teacher paths)."""
    try:
        hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(hf, dict):
        return None
    from gkd.models.config import ModelConfig  # the engine's own reading of the head (imports torch)

    try:
        cfg = ModelConfig.from_hf_config(hf)
    except (ValueError, TypeError, KeyError):
        return None
    if cfg.head != "classification":
        return None
    names = [str(cfg.id2label[i]) for i in sorted(cfg.id2label)] if cfg.id2label else None
    return cfg.num_labels, names


def data_issues(raw: Mapping[str, Any], base_dir: Path, known: list[ConfigIssue]) -> list[ConfigIssue]:
    """Problems of a ``sequence_classification`` run's data, one line each.

    Every split is read; ``data.train`` must have at least two labels, every other split only
    labels of ``data.train``; ``task.num_labels`` (when given) and each ``teachers[]`` checkpoint
    with a classification head must have as many labels as ``data.train``, and a head naming
    the same labels must name them in the same order (the engine maps class ids by position).

    Args:
        raw: The defaulted run config.
        base_dir: Directory relative paths are resolved against.
        known: Issues found so far; with one about data, task, seed or teachers nothing is read
            (the files or fields it would read are already reported).
    """
    task = raw.get("task")
    if not isinstance(task, Mapping) or task.get("type") != "sequence_classification":
        return []
    if any(_touches_data(i.path) for i in known):
        return []
    seed = raw.get("seed") if isinstance(raw.get("seed"), int) else 0
    issues: list[ConfigIssue] = []
    vocab: LabelVocab | None = None
    train_name = ""
    for where, ds in _splits(raw, base_dir):
        try:
            examples = read_split(ds, seed=seed, needs_labels=True).examples
            if vocab is None:  # data.train, read first: the label set
                vocab, train_name = LabelVocab.from_examples(examples, ds.label_field), ds.path.name
            else:
                for ex in examples:
                    vocab.encode(ex.label or "", ex.where, ds.label_field)
        except DataError as exc:
            issues.append(ConfigIssue(f"{where}.path", str(exc)))
            if vocab is None:
                return issues  # without the training labels nothing else can be checked
    if vocab is None:
        return issues
    n = len(vocab)
    declared = task.get("num_labels")
    if isinstance(declared, int) and declared != n:
        issues.append(ConfigIssue("task.num_labels", f"{declared}, but the training data ({train_name}) has {n} labels "
                                                     f"({', '.join(vocab.labels[:20])})"))
    teachers = raw.get("teachers") if isinstance(raw.get("teachers"), list) else []
    for i, t in enumerate(teachers):
        if not isinstance(t, Mapping) or not isinstance(t.get("path"), str):
            continue
        try:
            head = _teacher_head(resolve_path(t["path"], base_dir))
        except PathResolutionError:
            continue
        if head is None:
            continue
        count, names = head
        who = f"teacher '{t.get('name')}'"
        if count != n:
            issues.append(ConfigIssue(f"teachers[{i}].path",
                                      f"{who} has a classification head for {count} labels, but the task has {n} "
                                      f"(labels of {train_name}); use a teacher fine-tuned on these {n} labels, or "
                                      "its base checkpoint without the classification head"))
        elif names is not None and names != vocab.labels and sorted(names) == sorted(vocab.labels):
            # Only a permutation of the same names is known to be wrong; other names (NEGATIVE
            # for "0") cannot be matched, and position is all the engine has.
            issues.append(ConfigIssue(f"teachers[{i}].path",
                                      f"{who} has a classification head for labels {', '.join(names[:20])}, but the "
                                      f"task's labels (of {train_name}, sorted) are {', '.join(vocab.labels[:20])}; "
                                      "class ids are matched by position, so the head would predict the wrong labels"))
    return issues


__all__ = ["data_issues"]
