"""``gkd.distill`` with callbacks on a tiny random teacher: every event in order, the step
records equal to ``metrics.jsonl``, a failing callback named in the error."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

import gkd
from gkd.config import ConfigError
from gkd.engine.checkpoint import checkpoint_dir
from gkd.errors import GkdError
from gkd.models import ModelConfig, build_model, export_hf

ROWS = [{"text": t, "label": label} for label, texts in {
    "grain": ["wheat and corn exports fell", "grain harvest was large this year", "corn prices rose on demand"],
    "oil": ["crude oil prices climbed", "oil inventories dropped sharply", "the refinery raised oil output"],
    "money": ["the central bank cut rates", "interest rates were left unchanged", "the dollar rose against the yen"],
}.items() for t in texts] * 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, minilm_dir) -> Path:
    """A tiny random BERT teacher with a 3-class head (MiniLM's tokenizer) and jsonl data."""
    root = tmp_path_factory.mktemp("callbacks")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=4, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=3)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=minilm_dir)
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    (root / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:9]) + "\n")
    return root


def config(run_dir: Path) -> dict[str, Any]:
    """Two stages (3 + 3 steps), evaluation every 2 steps, a checkpoint every 2 global steps;
    data and teacher paths relative to the current directory."""
    return {
        "name": "callbacks", "run_dir": str(run_dir), "seed": 7,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}, "eval": {"path": "eval.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}},
        "stages": [
            {"name": "tinybert", "steps": 3, "methods": [{"name": "tinybert", "config": {"layer_mapping": "uniform"}}]},
            {"name": "kd", "steps": 3, "methods": [{"name": "kd", "weight": 0.5, "config": {"temperature": 2.0}}]},
        ],
        "training": {"batch_size": 4, "eval_batch_size": 8, "eval_every_steps": 2},
        "checkpoint": {"every_steps": 2, "keep_last": 10},
        "logging": {"progress": False, "plot": False},
        "export": {"enabled": False},
    }


class Recorder(gkd.Callback):
    """Records every event, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.steps: list[gkd.StepInfo] = []

    def on_stage_start(self, stage):
        self.events.append(("start", stage.name))

    def on_step_end(self, info):
        self.steps.append(info)
        self.events.append(("step", info.stage, info.global_step))

    def on_evaluate(self, stage, step, metrics):
        self.events.append(("eval", stage, step, sorted(metrics)))

    def on_checkpoint(self, path, global_step):
        self.events.append(("checkpoint", Path(path), global_step))

    def on_stage_end(self, stage, evaluation):
        self.events.append(("end", stage.name, evaluation.metric if evaluation is not None else None))


def test_distill_from_a_dict_calls_back_every_event(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    run_dir = workspace / "run"
    raw = config(run_dir)
    kept = copy.deepcopy(raw)
    recorder = Recorder()
    summary = gkd.distill(raw, ["stages[1].steps=2"], [recorder], echo=None)
    assert raw == kept  # the caller's dict is not modified by the overrides
    assert summary["global_step"] == 5 and summary["run_dir"] == str(run_dir)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [{"stage": s.stage, "step": s.step, "global_step": s.global_step, "loss": s.loss, "terms": dict(s.terms),
             "lr": s.lr} for s in recorder.steps] == [
        {k: r[k] for k in ("stage", "step", "global_step", "loss", "terms", "lr")} for r in train]
    assert [sorted(k for k in s.terms if "/" not in k) for s in recorder.steps] == [["tinybert.attention", "tinybert.hidden"]] * 3 + [
        ["kd.hard", "kd.soft"]] * 2

    ckpt = lambda g: ("checkpoint", checkpoint_dir(run_dir, g), g)  # noqa: E731
    evals = [r for r in records if r["kind"] == "eval"]
    assert [(r["stage"], r["step"]) for r in evals] == [("tinybert", 2), ("tinybert", 3), ("kd", 2)]
    metric = sorted(evals[0]["metrics"])
    assert recorder.events == [
        ("start", "tinybert"),
        ("step", "tinybert", 1),
        ("step", "tinybert", 2), ("eval", "tinybert", 2, metric), ckpt(2),
        ("step", "tinybert", 3), ckpt(3), ("eval", "tinybert", 3, metric), ("end", "tinybert", "accuracy"),
        ("start", "kd"),
        ("step", "kd", 4), ckpt(4),
        ("step", "kd", 5), ckpt(5), ("eval", "kd", 2, metric), ("end", "kd", "accuracy"),
    ]
    assert all(event[1].is_dir() for event in recorder.events if event[0] == "checkpoint")


class Failing(gkd.Callback):
    def on_step_end(self, info):
        raise ValueError(f"no step {info.global_step}\nsecond line")


def test_a_failing_callback_is_named_with_its_event(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    with pytest.raises(gkd.CallbackError, match=r"^callback Failing\.on_step_end failed: ValueError: no step 1$") as info:
        gkd.distill(config(workspace / "failing"), callbacks=[Recorder(), Failing()], echo=None)
    assert isinstance(info.value, GkdError) and isinstance(info.value.__cause__, ValueError)


def test_callbacks_must_be_callback_instances_and_dict_overrides_are_checked(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    with pytest.raises(GkdError, match=r"callbacks: expected gkd\.Callback instances, got function"):
        gkd.distill(config(workspace / "bad"), callbacks=[lambda info: None], echo=None)
    with pytest.raises(ConfigError, match=r"stages\[5\]: index out of range"):
        gkd.distill(config(workspace / "bad"), ["stages[5].steps=1"], echo=None)
