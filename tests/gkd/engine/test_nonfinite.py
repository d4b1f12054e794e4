"""NaN/inf at the step (``training.nonfinite``): an absurd learning rate on a tiny run stops it with
one line and leaves the last good checkpoint; ``skip`` drops the updates, counts them, stops after
``max_skipped_steps``; no non-finite weight reaches a checkpoint or an export; metrics.jsonl stays
strict JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from gkd.cli import cli
from gkd.config import load_run_config
from gkd.engine.checkpoint import find_latest
from gkd.engine.metrics import MetricsLogger, plot_losses, read_records, strict_json
from gkd.engine.sinks import scalars
from gkd.engine.step import NonFiniteError, all_finite, ensure_finite
from gkd.engine.trainer import Trainer, TrainingInterrupted
from gkd.models import ModelConfig, build_model, export_hf
from gkd.plugins import load_plugin_manager

ROWS = [{"text": t, "label": label} for label, texts in {
    "grain": ["wheat and corn exports fell", "grain harvest was large this year"],
    "oil": ["crude oil prices climbed", "oil inventories dropped sharply"],
    "money": ["the central bank cut rates", "the dollar rose against the yen"],
}.items() for t in texts] * 4


@pytest.fixture(scope="module")
def registry():
    return load_plugin_manager().registry


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, minilm_dir) -> Path:
    """A tiny random BERT teacher (hidden 32, 2 layers, 3 classes) and jsonl data."""
    root = tmp_path_factory.mktemp("nonfinite")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=2, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=3)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=minilm_dir)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:6]))
    return root


def write_config(root: Path, name: str, *, lr: float, steps: int = 6, **training) -> Path:
    """One KD stage; ``lr`` sets how soon it diverges (no clipping, so the weights blow up)."""
    cfg = {
        "name": name, "run_dir": str(root / name), "seed": 7,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "test.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 1}},
        "stages": [{"name": "kd", "steps": steps, "methods": [{"name": "kd", "config": {"temperature": 2.0}}]}],
        "optimizer": {"lr": lr},
        "schedule": {"type": "constant"},
        "training": {"batch_size": 4, "eval_batch_size": 8, "max_grad_norm": 0.0} | training,
        "checkpoint": {"every_steps": 1, "keep_last": 100},
        "logging": {"progress": False},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, registry) -> dict:
    return Trainer(load_run_config(config, registry=registry), registry, progress=False,
                   echo=lambda _: None).execute()


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())


def assert_all_finite(path: Path) -> None:
    for name, tensor in load_file(str(path)).items():
        assert torch.isfinite(tensor).all(), (path, name)


def strict_lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON (Python's parser accepts NaN unless told not to)."""
    def refuse(token: str) -> float:
        raise AssertionError(f"non-JSON number {token} in metrics.jsonl")
    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_absurd_lr_stops_at_the_step_with_the_last_good_checkpoint(workspace, registry):
    """lr 1e6: the loss goes non-finite within a few steps; the run stops there (exit 1 from the
    CLI, one line), every checkpoint on disk is finite, no export, metrics strict JSON."""
    config = write_config(workspace, "stop", lr=1e6)
    result = CliRunner().invoke(cli, ["distill", str(config), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "stages[0] 'kd' step" in errors[0] and "non-finite loss=nan" in errors[0], errors[0]
    print(errors[0])
    run_dir = workspace / "stop"
    records = strict_lines(run_dir)
    bad = [r for r in records if r.get("nonfinite")]
    assert len(bad) == 1 and bad[0]["loss"] is None and bad[0]["skipped"] is False
    stopped_at = bad[0]["global_step"]
    assert 1 < stopped_at <= 6
    saved = checkpoints(run_dir)
    assert [int(p.name.split("-")[1]) for p in saved] == list(range(1, stopped_at))  # every good step, nothing after
    for path in saved:
        assert_all_finite(path / "model.safetensors")
        assert_all_finite(path / "optimizer.safetensors")
    assert find_latest(run_dir) == saved[-1]
    assert not (run_dir / "export").exists() and not (run_dir / "summary.json").exists()


def test_skip_drops_the_updates_counts_them_and_stops_after_max(workspace, registry):
    """lr 1e6 with skip: a loss that is non-finite on every later step; the updates are skipped
    (weights and LR unchanged), each counted in metrics.jsonl, and the (N+1)-th stops the run."""
    config = write_config(workspace, "skip", lr=1e6, steps=12, nonfinite="skip", max_skipped_steps=2)
    with pytest.raises(NonFiniteError, match=r"\(3 steps skipped, more than training.max_skipped_steps: 2\); stopped without saving it"):
        train(config, registry)
    run_dir = workspace / "skip"
    records = [r for r in strict_lines(run_dir) if r["kind"] == "train"]
    skipped = [r for r in records if r.get("skipped")]
    assert [r["skipped_steps"] for r in skipped] == [1, 2, 3]
    first_bad = skipped[0]["global_step"]
    # The weights stayed those of the last good step, so every following step is bad too.
    assert [r["global_step"] for r in skipped] == [first_bad, first_bad + 1, first_bad + 2]
    saved = checkpoints(run_dir)
    good = load_file(str(run_dir / "checkpoints" / f"step-{first_bad - 1:08d}" / "model.safetensors"))
    for path in saved:
        assert_all_finite(path / "model.safetensors")
    # Checkpoints of skipped steps hold the last good weights and count the skips.
    for step in (first_bad, first_bad + 1):
        kept = load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))
        assert all(torch.equal(kept[k], good[k]) for k in good)
        state = json.loads((run_dir / "checkpoints" / f"step-{step:08d}" / "state.json").read_text())
        assert state["extra"]["skipped_steps"] == step - first_bad + 1
    assert not (run_dir / "export").exists()


def test_skip_of_a_transient_nan_finishes_and_resumes_bitwise(workspace, registry, monkeypatch):
    """One poisoned step (its loss NaN on purpose) with skip: the run finishes, exports finite weights,
    and a run stopped right after the skip and resumed ends bitwise equal to the uninterrupted one."""
    import gkd.engine.loop as loop

    real = loop.distill_step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the third micro-batch of a run: step 3
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(loop, "distill_step", poisoned)
    summary = train(write_config(workspace, "transient", lr=1e-3, steps=5, nonfinite="skip", max_skipped_steps=1),
                    registry)
    run_dir = workspace / "transient"
    records = [r for r in strict_lines(run_dir) if r["kind"] == "train"]
    assert [r.get("skipped", False) for r in records] == [False, False, True, False, False]
    assert records[2]["lr"] == records[3]["lr"] and summary["global_step"] == 5
    assert_all_finite(run_dir / "export" / "model.safetensors")

    calls["n"] = 0
    split = write_config(workspace, "transient-split", lr=1e-3, steps=5, nonfinite="skip", max_skipped_steps=1)
    with pytest.raises(TrainingInterrupted):
        Trainer(load_run_config(split, registry=registry), registry, progress=False, stop_after=3,
                echo=lambda _: None).execute()
    train(split, registry)  # resumes after the skipped step, which stays counted
    final = load_file(str(find_latest(run_dir) / "model.safetensors"))
    again = load_file(str(find_latest(workspace / "transient-split") / "model.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in final)
    resumed = [r for r in strict_lines(workspace / "transient-split") if r["kind"] == "train"]
    assert [r["global_step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert [r.get("skipped_steps") for r in resumed] == [None, None, 1, None, None]
    state = json.loads((find_latest(workspace / "transient-split") / "state.json").read_text())
    assert state["extra"]["skipped_steps"] == 1


def test_skip_needs_a_plain_optimizer(workspace, registry):
    config = write_config(workspace, "skip-zero", lr=1e-3, nonfinite="skip")
    cfg = yaml.safe_load(config.read_text()) | {"parallel": {"zero": {"stage": 1}}}
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(Exception, match=r"stages\[0\].training.nonfinite: 'skip' needs parallel.zero.stage 0"):
        train(config, registry)


def test_weights_guard_refuses_non_finite_modules():
    model = torch.nn.Linear(3, 2)
    assert all_finite(model)
    ensure_finite(model, "checkpoint")
    with torch.no_grad():
        model.weight[0, 1] = float("inf")
    assert not all_finite(model)
    with pytest.raises(NonFiniteError, match=r"^checkpoint: the weights hold NaN or infinite values; not written"):
        ensure_finite(model, "checkpoint")


def test_metrics_are_strict_json_and_readers_take_null(tmp_path):
    logger = MetricsLogger(tmp_path)
    record = logger.log_train(stage="s", step=1, global_step=1, loss=float("nan"),
                              terms={"kd.soft": torch.tensor(float("inf")), "kd.hard": 0.5}, lr=1e-3)
    assert record["loss"] is None and record["terms"] == {"kd.soft": None, "kd.hard": 0.5}
    logger.log_eval(stage="s", step=1, global_step=1, metrics={"accuracy": 0.5, "loss": float("-inf")})
    lines = strict_lines(tmp_path)
    assert lines[0]["loss"] is None and lines[1]["metrics"]["loss"] is None
    assert read_records(tmp_path) == lines
    assert scalars(lines[0]) == {"train/kd.hard": 0.5, "train/lr": 1e-3}
    assert scalars(lines[1]) == {"eval/accuracy": 0.5}
    assert strict_json({"a": [math.nan, 1.0, (math.inf,)]}) == {"a": [None, 1.0, [None]]}
    logger.log_train(stage="s", step=2, global_step=2, loss=0.4, terms={"kd.soft": 0.1, "kd.hard": 0.3}, lr=1e-3)
    assert plot_losses(tmp_path) is not None
