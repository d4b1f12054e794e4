"""Malformed data through ``gkd distill``: every fault is one line naming file, line and field
(exit 2, nothing trained: no metrics record, no checkpoint), or a stated handling that the run
logs. Every split is read before the first step, so a bad test file fails before training too;
a teacher whose classification head does not fit the data's labels is refused by validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gkd.cli import cli
from gkd.config.run import DatasetConfig
from gkd.engine.readers import read_split
from gkd.models import ModelConfig, build_model, export_hf

ROWS = [{"text": t, "label": lab} for lab, texts in {
    "grain": ["wheat and corn exports fell", "grain harvest was large"],
    "oil": ["crude oil prices climbed", "oil inventories dropped"],
}.items() for t in texts] * 3
GOOD = "".join(json.dumps(r) + "\n" for r in ROWS)


def jsonl(*rows: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _teacher(root: Path, name: str, minilm_dir: Path, **head: object) -> None:
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=2, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, **head)
    export_hf(build_model(cfg, seed=3), root / name, tokenizer_dir=minilm_dir)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """Tiny BERT checkpoints (MiniLM's tokenizer): a 2-class, an 8-class and a 2-class head
    naming the labels in reverse order, one without a task head (for masked_lm), and one whose
    embedding table is smaller than its tokenizer."""
    root = tmp_path_factory.mktemp("fault-teachers")
    _teacher(root, "two", minilm_dir, head="classification", num_labels=2)
    _teacher(root, "eight", minilm_dir, head="classification", num_labels=8)
    _teacher(root, "reversed", minilm_dir, head="classification", num_labels=2, id2label={0: "oil", 1: "grain"})
    _teacher(root, "mlm", minilm_dir, head="mlm")
    # MiniLM's 30522-token tokenizer on a 1000-row embedding table.
    export_hf(build_model(ModelConfig(family="encoder", vocab_size=1000, hidden_size=32, num_layers=2,
                                      num_attention_heads=4, ffn_hidden_size=64, max_position_embeddings=64,
                                      head="classification", num_labels=2), seed=3),
              root / "small-vocab", tokenizer_dir=minilm_dir)
    return root


def distill(root: Path, teachers: Path, files: dict[str, str | bytes], *, task_type: str = "sequence_classification",
            teacher: str = "two", **changes: object):
    """Write ``files`` and a one-stage run config under ``root``; run ``gkd distill`` in-process."""
    for name, content in files.items():
        path = root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    cfg = {
        "name": "faults", "run_dir": str(root / "run"), "seed": 1,
        "task": {"type": task_type, "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "test.jsonl"}},
        "teachers": [{"name": "t", "path": str(teachers / teacher)}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 1}},
        "stages": [{"name": "plain", "steps": 1}],
        "training": {"batch_size": 4, "eval_batch_size": 8},
        "checkpoint": {"every_steps": 1},
        "logging": {"progress": False, "plot": False},
        "export": {"enabled": False},
    } | changes
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return CliRunner().invoke(cli, ["distill", str(config)])


# (id, files, expected message part, extra distill arguments). Every file not named is GOOD.
FAULTS: list[tuple[str, dict[str, str | bytes], str, dict[str, object]]] = [
    ("empty-file", {"train.jsonl": ""}, "train.jsonl: empty file, no examples", {}),
    ("only-blank-lines", {"train.jsonl": "\n  \n\n"}, "train.jsonl: only blank lines, no examples", {}),
    ("missing-text", {"train.jsonl": GOOD + jsonl({"txt": "a", "label": "oil"})},
     "train.jsonl line 13: missing field 'text'", {}),
    ("missing-label", {"train.jsonl": jsonl({"text": "a"}) + GOOD}, "train.jsonl line 1: missing field 'label'", {}),
    ("null-label", {"train.jsonl": GOOD + jsonl({"text": "a", "label": None})},
     "train.jsonl line 13: missing field 'label'", {}),
    ("empty-text", {"train.jsonl": GOOD + jsonl({"text": "  ", "label": "oil"})},
     "train.jsonl line 13: field 'text' is empty", {}),
    ("empty-label", {"train.jsonl": GOOD + jsonl({"text": "a", "label": ""})},
     "train.jsonl line 13: field 'label' is empty", {}),
    ("text-not-string", {"train.jsonl": GOOD + jsonl({"text": 3, "label": "oil"})},
     "train.jsonl line 13: field 'text' must be a string, got int", {}),
    ("label-a-list", {"train.jsonl": GOOD + jsonl({"text": "a", "label": ["oil"]})},
     "train.jsonl line 13: field 'label' must be a string or an integer", {}),
    ("not-an-object", {"train.jsonl": GOOD + jsonl('["a", "oil"]')},
     "train.jsonl line 13: expected a JSON object, got an array", {}),
    ("non-utf8", {"train.jsonl": GOOD.encode() + b'{"text": "caf\xe9", "label": "oil"}\n'},
     "train.jsonl line 13: not valid UTF-8 (invalid continuation byte, byte 0xe9 at column 14)", {}),
    ("utf16", {"train.jsonl": GOOD.encode("utf-16")}, "train.jsonl line 1: UTF-16 text", {}),
    ("nul-character", {"train.jsonl": GOOD + jsonl({"text": "a\u0000b", "label": "oil"}).replace("\\u0000", "\0")},
     "train.jsonl line 13: NUL character", {}),
    ("single-class", {"train.jsonl": jsonl(*[r for r in ROWS if r["label"] == "oil"])},
     "train.jsonl: field 'label' has the one value 'oil' in all 6 examples; sequence classification needs at least 2",
     {}),
    ("test-unseen-label", {"test.jsonl": jsonl({"text": "a", "label": "oil"}, {"text": "b", "label": "ship"})},
     "test.jsonl line 2: label 'ship' does not occur in the training data (field 'label'; known: grain, oil)", {}),
    ("test-missing-label", {"test.jsonl": jsonl({"text": "a", "label": "oil"}, {"text": "b"})},
     "test.jsonl line 2: missing field 'label'", {}),
    ("test-non-utf8", {"test.jsonl": b'{"text": "a", "label": "oil"}\n{"text": "\xff", "label": "oil"}\n'},
     "test.jsonl line 2: not valid UTF-8", {}),
    ("eval-unseen-label", {"eval.jsonl": jsonl({"text": "a", "label": "gold"})},
     "eval.jsonl line 1: label 'gold' does not occur in the training data",
     {"data": {"train": {"path": "train.jsonl"}, "eval": {"path": "eval.jsonl"}}}),
    ("csv-in-jsonl", {"train.jsonl": "text,label\nwheat fell,grain\n"},
     "train.jsonl line 1: invalid JSON (Expecting value at column 1); a .jsonl file holds one JSON object per line",
     {}),
    ("jsonl-in-csv", {"train.csv": GOOD}, "train.csv line 1: no column 'text'",
     {"data": {"train": {"path": "train.csv"}}}),
    ("tsv-in-csv", {"train.csv": "text\tlabel\nwheat fell\tgrain\n"},
     "the file looks tab-separated, a .csv file is comma-separated", {"data": {"train": {"path": "train.csv"}}}),
    ("json-in-tsv", {"train.tsv": GOOD}, "train.tsv: cannot tell the format from the extension '.tsv'",
     {"data": {"train": {"path": "train.tsv"}}}),
    ("csv-open-quote", {"train.csv": 'text,label\nwheat fell,grain\n"oil rose,oil\nmore,oil\n'},
     "train.csv line 4: unexpected end of data", {"data": {"train": {"path": "train.csv"}}}),
    ("csv-extra-field", {"train.csv": "text,label\nwheat fell,grain,x\n"},
     "train.csv line 2: 3 fields, but the header has 2", {"data": {"train": {"path": "train.csv"}}}),
    ("txt-for-classification", {"train.txt": "wheat fell\n"}, "the 'text' format has no labels",
     {"data": {"train": {"path": "train.txt"}}}),
    ("directory", {}, "cannot read (Is a directory)", {"data": {"train": {"path": ".", "format": "jsonl"}}}),
    ("num-labels", {}, "task.num_labels: 5, but the training data (train.jsonl) has 2 labels (grain, oil)",
     {"task": {"type": "sequence_classification", "max_length": 16, "num_labels": 5}}),
    ("teacher-head-8-vs-2", {}, "teacher 't' has a classification head for 8 labels, but the task has 2",
     {"teacher": "eight"}),
    ("teacher-head-permuted", {}, "teacher 't' has a classification head for labels oil, grain, but the task's labels",
     {"teacher": "reversed"}),
    ("tokenizer-past-embeddings", {}, "teachers[0].path: the run's tokenizer (teacher 't': tokenizer.json) has "
     "token ids up to 30521, but its config.json has vocab_size 1000", {"teacher": "small-vocab"}),
    ("mlm-test-non-utf8", {"train.txt": "wheat fell\noil rose\n" * 4, "test.txt": b"fine\nbad \xff byte\n"},
     "test.txt line 2: not valid UTF-8",
     {"task_type": "masked_lm", "teacher": "mlm",
      "data": {"train": {"path": "train.txt"}, "test": {"path": "test.txt"}}}),
    ("mlm-empty-eval", {"train.txt": "wheat fell\noil rose\n" * 4, "eval.txt": ""}, "eval.txt: empty file",
     {"task_type": "masked_lm", "teacher": "mlm",
      "data": {"train": {"path": "train.txt"}, "eval": {"path": "eval.txt"}}}),
]


def test_the_table_has_at_least_15_faults() -> None:
    assert len(FAULTS) >= 15 and len({f[0] for f in FAULTS}) == len(FAULTS)


@pytest.mark.parametrize(("files", "message", "extra"), [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
def test_data_fault_is_one_line_before_training(tmp_path, teachers, files, message, extra) -> None:
    files = {"train.jsonl": GOOD, "test.jsonl": GOOD} | files
    result = distill(tmp_path, teachers, files, **extra)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    named = [line for line in result.output.splitlines() if message in line]
    assert len(named) == 1, result.output
    run_dir = tmp_path / "run"
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def test_blank_lines_and_long_texts_are_handled_and_logged(tmp_path, teachers) -> None:
    long = " ".join(["wheat corn oil"] * 200_000)  # a 3 MB line: cut at max_length tokens
    train = "\n" + GOOD.replace("\n", "\r\n", 2) + "\n  \n" + jsonl({"text": long, "label": "oil"})
    test = "\ufeff" + GOOD  # a UTF-8 byte-order mark is read as UTF-8
    result = distill(tmp_path, teachers, {"train.jsonl": train, "test.jsonl": test})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "data train: train.jsonl: 13 examples, 3 blank lines skipped, 1 at task.max_length (16 tokens; " \
           "longer texts are cut there)" in lines
    assert "data test: test.jsonl: 12 examples" in lines
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records if r["kind"] == "train"] == [1]


def test_validate_refuses_the_teacher_head_with_both_numbers(tmp_path, teachers) -> None:
    (tmp_path / "train.jsonl").write_text(GOOD)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "task": {"type": "sequence_classification"}, "data": {"train": {"path": "train.jsonl"}},
        "teachers": [{"name": "big", "path": str(teachers / "eight")}],
        "student": {"init": {"strategy": "truncate", "teacher": "big", "num_layers": 1}},
        "stages": [{"name": "s", "steps": 1}]}))
    result = CliRunner().invoke(cli, ["validate", str(config)])
    assert result.exit_code == 2
    line = (f"{config}: teachers[0].path: teacher 'big' has a classification head for 8 labels, but the task has 2 "
            "(labels of train.jsonl); use a teacher fine-tuned on these 2 labels, or its base checkpoint without the "
            "classification head")
    assert line in result.output.splitlines()


@pytest.mark.parametrize(("name", "content", "blank"), [
    ("a.jsonl", '\n{"text": "x", "label": "a"}\r\n\r\n  \n{"text": "y", "label": "b"}', 3),
    ("a.csv", 'text,label\n\n"two\n\nlines",a\n,\ny,b\n', 2),  # the blank line inside the quotes is text
    ("a.txt", "one\n\n \ntwo\n", 2),
    ("a.tab", "Category\tText\nd\tstring\nclass\t\n\nx\tone doc\n\t\ny\ttwo doc\n", 2),
])
def test_blank_lines_are_counted_per_format(write_file, name, content, blank) -> None:
    split = read_split(DatasetConfig(write_file(name, content)), seed=0, needs_labels=not name.endswith(".txt"))
    assert (len(split.examples), split.blank) == (2, blank)
