"""``gkd eval`` refuses bad arguments with one line and exit code 2. Its numbers are tested in
tests/gkd/deploy/test_evaluate.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gkd.cli import cli

CONFIG = {"architectures": ["BertForSequenceClassification"], "model_type": "bert", "vocab_size": 100,
          "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
          "max_position_embeddings": 64, "id2label": {"0": "a", "1": "b"}}


def model_dir(root: Path, config: dict | None = None, onnx: bool = False) -> Path:
    """A model directory with only a config.json (and optionally a model.onnx placeholder): enough
    for the arguments to be checked, which happens before anything is loaded."""
    out = root / "model"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config or CONFIG))
    if onnx:
        (out / "model.onnx").write_bytes(b"")
    return out


def evaluate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["eval", *args])
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, *fragments: str) -> None:
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_model_directory(tmp_path):
    assert_one_line_error(*evaluate(str(tmp_path / "nope"), "--data", "x.jsonl"), "not a model directory")


def test_onnx_runtime_without_model_onnx(tmp_path):
    out = model_dir(tmp_path)
    assert_one_line_error(*evaluate(str(out), "--data", "x.jsonl", "--runtime", "onnx"), "no model.onnx",
                          "gkd export --format onnx")


def test_missing_onnx_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out = model_dir(tmp_path, onnx=True)
    assert_one_line_error(*evaluate(str(out), "--data", "x.jsonl"), "gkd eval --runtime both needs onnxruntime",
                          "pip install 'gkd-core[onnx]'")


def test_model_without_a_task_head(tmp_path):
    out = model_dir(tmp_path, {**CONFIG, "architectures": ["BertModel"]})
    assert_one_line_error(*evaluate(str(out), "--data", "x.jsonl", "--runtime", "torch"), "no task head")


@pytest.mark.parametrize(("data", "fragment"), [
    ("pkg:no_such_package_xyz/data.tab", "--data: package 'no_such_package_xyz' is not installed"),
    ("missing.jsonl", "missing.jsonl: file not found"),
])
def test_bad_data(tmp_path, monkeypatch, data, fragment):
    out = model_dir(tmp_path)
    (out / "tokenizer.json").write_text("{}")  # never read: the data fails first
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(*evaluate(str(out), "--data", data, "--runtime", "torch"), fragment)
