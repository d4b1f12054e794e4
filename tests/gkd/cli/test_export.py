"""``gkd export`` refuses bad arguments with one line and exit code 2: a missing run directory, a stage
that does not exist (or trains a teacher, or was pruned, or has not finished), contradictory options,
and a missing ONNX extra (simulated by hiding the import). The exports themselves are tested in
tests/gkd/deploy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gkd.cli import cli

STAGES = [{"name": "ft", "train": "teacher:t"}, {"name": "tinybert", "train": "student"},
          {"name": "kd", "train": "student"}]


def fake_run(root: Path, checkpoints: dict[int, int], *, finished: bool = True) -> Path:
    """A run directory whose complete checkpoints are ``{global_step: stage_index}`` (no weights:
    the run is refused before any are read)."""
    run_dir = root / "run"
    for step, stage in checkpoints.items():
        ckpt = run_dir / "checkpoints" / f"step-{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "COMPLETE").write_text(json.dumps({"format": 2, "global_step": step, "files": {}}))
        (ckpt / "state.json").write_text(json.dumps({"global_step": step, "stage_index": stage, "stage_iteration": 3}))
        (ckpt / "config.json").write_text(json.dumps({"name": "fake", "stages": STAGES,
                                                      "checkpoint": {"keep_last": 2}}))
    if finished:
        (run_dir / "summary.json").write_text(json.dumps({"models": []}))
    return run_dir


def export(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["export", *args])
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, *fragments: str) -> None:
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_run_directory(tmp_path):
    assert_one_line_error(*export(str(tmp_path / "nope"), "--to", str(tmp_path / "out")), "no such run directory")


def test_directory_without_checkpoints(tmp_path):
    assert_one_line_error(*export(str(tmp_path), "--to", str(tmp_path / "out")), "not a gkd run directory")


def test_stage_that_does_not_exist(tmp_path):
    run_dir = fake_run(tmp_path, {5: 1, 8: 2})
    assert_one_line_error(*export(str(run_dir), "--stage", "distil", "--to", str(tmp_path / "out")),
                          "--stage: no stage 'distil'", "its stages: ft, tinybert, kd")


def test_stage_that_trains_a_teacher(tmp_path):
    run_dir = fake_run(tmp_path, {5: 1, 8: 2})
    assert_one_line_error(*export(str(run_dir), "--stage", "ft", "--to", str(tmp_path / "out")),
                          "fine-tunes teacher 't'", str(run_dir / "teachers" / "t"))


def test_stage_whose_checkpoints_were_pruned(tmp_path):
    run_dir = fake_run(tmp_path, {7: 2, 8: 2})
    assert_one_line_error(*export(str(run_dir), "--stage", "tinybert", "--to", str(tmp_path / "out")),
                          "no checkpoint of stage 'tinybert' is left", "checkpoint.keep_last")


def test_stage_that_has_not_finished(tmp_path):
    run_dir = fake_run(tmp_path, {4: 1}, finished=False)
    assert_one_line_error(*export(str(run_dir), "--to", str(tmp_path / "out")), "stage 'kd'", "not been trained yet")
    assert_one_line_error(*export(str(run_dir), "--stage", "tinybert", "--to", str(tmp_path / "out")),
                          "stage 'tinybert'", "has not finished")


@pytest.mark.parametrize(("options", "fragment"), [
    (["--quantize", "int8"], "--quantize int8 applies to ONNX exports; add --format onnx"),
    (["--format", "onnx", "--dtype", "bf16"], "--dtype bf16: ONNX exports are fp32"),
])
def test_contradictory_options(tmp_path, options, fragment):
    run_dir = fake_run(tmp_path, {5: 1, 8: 2})
    assert_one_line_error(*export(str(run_dir), "--to", str(tmp_path / "out"), *options), fragment)


def test_unknown_format_is_refused_by_click(tmp_path):
    code, output = export(str(tmp_path), "--to", str(tmp_path / "out"), "--format", "tflite")
    assert code == 2 and "Invalid value for '--format'" in output


@pytest.mark.parametrize("hidden", ["onnxruntime", "onnx", "transformers"])
def test_missing_onnx_extra(tmp_path, monkeypatch, hidden):
    monkeypatch.setitem(sys.modules, hidden, None)  # find_spec → None, import → ImportError
    run_dir = fake_run(tmp_path, {5: 1, 8: 2})
    assert_one_line_error(*export(str(run_dir), "--to", str(tmp_path / "out"), "--format", "onnx"),
                          "gkd export --format onnx needs", hidden, "pip install 'gkd-core[onnx]'")
    assert not (tmp_path / "out").exists()


def test_missing_transformers_for_the_hf_check(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    run_dir = fake_run(tmp_path, {5: 1, 8: 2})
    assert_one_line_error(*export(str(run_dir), "--to", str(tmp_path / "out")), "transformers",
                          "gkd-core[onnx]")


def test_run_config_export_onnx_needs_the_extra_at_validation(tmp_path, monkeypatch):
    data = Path(__file__)  # any existing file; other problems are reported on their own lines
    config = {"run_dir": str(tmp_path / "run"), "task": {"type": "sequence_classification"},
              "data": {"train": {"path": str(data)}}, "teachers": [{"name": "t", "path": str(tmp_path)}],
              "student": {"init": {"strategy": "truncate", "teacher": "t"}},
              "stages": [{"name": "kd", "methods": [{"name": "kd"}]}], "export": {"onnx": "int8"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    line = next(x for x in result.output.splitlines() if "export.onnx" in x)
    assert "'int8' needs onnxruntime" in line and "pip install 'gkd-core[onnx]'" in line
