"""gkd eval: its numbers are the run's own evaluation (PyTorch) and match under onnxruntime (fp32);
the run's results table has the ONNX row when ``export.onnx`` is set."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gkd.cli import cli
from gkd.config.run import DatasetConfig
from gkd.deploy.evaluate import evaluate_export
from gkd.deploy.export import export_run
from gkd.engine.report import format_table


def by_runtime(results):
    return {r.runtime: r for r in results}


def test_classifier_accuracy_equals_the_runs_evaluation_under_both_runtimes(classifier_run, tmp_path):
    out = tmp_path / "fp32"
    export_run(classifier_run.run_dir, out, fmt="onnx")
    results = by_runtime(evaluate_export(out, DatasetConfig(path=classifier_run.test_data), batch_size=4,
                                         latency_examples=5))
    student = next(r for r in classifier_run.summary["models"] if r["model"] == "student")
    torch_result, onnx_result = results["torch (fp32)"], results["onnx (fp32)"]
    assert torch_result.value == student["accuracy"] and torch_result.loss == pytest.approx(student["eval_loss"])
    assert onnx_result.value == student["accuracy"]  # fp32 ONNX: the same predictions
    assert onnx_result.loss == pytest.approx(student["eval_loss"], abs=1e-5)
    for r in results.values():
        assert r.examples == 9 and r.throughput > 0 and 0 < r.p50_ms <= r.p95_ms and r.latency_examples == 5


def test_run_table_has_the_onnx_int8_row(classifier_run):
    rows = {r["model"]: r for r in classifier_run.summary["models"]}
    row, student = rows["student (onnx int8)"], rows["student"]
    assert row["layers"] == student["layers"] == 2 and row["parameters"] == student["parameters"]
    assert 0.0 <= row["accuracy"] <= 1.0 and row["throughput"] > 0 and "— OK" in row["onnx_check"]
    table = format_table(classifier_run.summary)
    assert "student (onnx int8)  2       " in table
    # The run's export now holds the int8 graph; gkd eval on it gives the row's accuracy.
    export = classifier_run.run_dir / "export"
    assert json.loads((export / "gkd-export.json").read_text())["quantize"] == "int8"
    results = by_runtime(evaluate_export(export, DatasetConfig(path=classifier_run.test_data), runtime="onnx",
                                         batch_size=8, latency_examples=2))
    assert results["onnx (int8)"].value == row["accuracy"]


@pytest.mark.parametrize("fixture", ["lm_run", "mlm_run"])
def test_perplexity_equals_the_runs_evaluation(fixture, request, tmp_path):
    finished = request.getfixturevalue(fixture)
    out = tmp_path / fixture
    export_run(finished.run_dir, out, fmt="onnx")
    data = DatasetConfig(path=finished.test_data, limit=6 if fixture == "lm_run" else 8)
    # The run's batch size (its training.eval_batch_size default, 64): MLM masks depend on batches.
    results = by_runtime(evaluate_export(out, data, batch_size=64, latency_examples=2))
    student = next(r for r in finished.summary["models"] if r["model"] == "student")
    assert results["torch (fp32)"].metric == "perplexity"
    assert results["torch (fp32)"].value == pytest.approx(student["perplexity"], rel=1e-6)
    assert results["onnx (fp32)"].value == pytest.approx(student["perplexity"], rel=1e-4)


def test_gkd_eval_command_prints_the_table_and_the_speed_up(classifier_run, tmp_path):
    out = tmp_path / "cli"
    runner = CliRunner()
    exported = runner.invoke(cli, ["export", str(classifier_run.run_dir), "--to", str(out), "--format", "onnx",
                                   "--quantize", "int8"])
    assert exported.exit_code == 0, exported.output
    assert "onnxruntime (int8) vs gkd:" in exported.output and f"to {out}" in exported.output
    result = runner.invoke(cli, ["eval", str(out), "--data", str(classifier_run.test_data), "--batch-size", "4",
                                 "--latency-examples", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("9 examples from ") and "seed 7" in lines[0]
    assert any(line.startswith("runtime ") and "examples/s (batch 4)" in line for line in lines)
    assert any(line.startswith("onnx (int8) vs torch (fp32): ") and "x examples/s" in line for line in lines)
    as_json = runner.invoke(cli, ["eval", str(out), "--data", str(classifier_run.test_data), "--runtime", "torch",
                                  "--json", "--latency-examples", "2"])
    assert as_json.exit_code == 0, as_json.output
    [row] = json.loads(as_json.output)
    assert row["runtime"] == "torch (fp32)" and 0 <= row["accuracy"] <= 1 and row["examples"] == 9


def test_a_runs_own_export_is_evaluated_with_the_runs_task_settings(lm_run):
    """The run's export/ has no gkd-export.json: max_length and seed come from the run's config."""
    export = lm_run.run_dir / "export"
    assert not (export / "gkd-export.json").exists()
    [result] = evaluate_export(export, DatasetConfig(path=lm_run.test_data, limit=6), runtime="torch",
                               latency_examples=1)
    student = next(r for r in lm_run.summary["models"] if r["model"] == "student")
    assert result.value == pytest.approx(student["perplexity"], rel=1e-6)
