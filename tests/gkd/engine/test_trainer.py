"""End-to-end runs of the trainer on a tiny random teacher: stages, per-term logging,
checkpoints, bitwise resume, teacher reuse, export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from gkd.cli import cli
from gkd.config import load_run_config
from gkd.config.errors import ConfigError
from gkd.engine.checkpoint import find_latest
from gkd.engine.report import format_timings
from gkd.engine.trainer import Trainer, TrainingInterrupted
from gkd.models import ModelConfig, build_model, export_hf
from gkd.plugins import load_plugin_manager

TEXTS = {
    "grain": ["wheat and corn exports fell", "grain harvest was large this year", "corn prices rose on demand"],
    "oil": ["crude oil prices climbed", "oil inventories dropped sharply", "the refinery raised oil output"],
    "money": ["the central bank cut rates", "interest rates were left unchanged", "the dollar rose against the yen"],
}


@pytest.fixture(scope="module")
def registry():
    return load_plugin_manager().registry


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, minilm_dir) -> Path:
    """A tiny random BERT teacher with a 3-class head (MiniLM's tokenizer) and jsonl data."""
    root = tmp_path_factory.mktemp("trainer")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=4, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=3)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=minilm_dir)
    rows = [{"text": t, "label": label} for label, texts in TEXTS.items() for t in texts] * 4
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:9]) + "\n")
    return root


def write_config(root: Path, run_dir: Path, **changes) -> Path:
    cfg = {
        "name": "tiny", "run_dir": str(run_dir), "seed": 7,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "test.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}},
        "stages": [
            {"name": "tinybert", "steps": 3, "methods": [{"name": "tinybert", "config": {"layer_mapping": "random",
                                                                                      "random_every_steps": 2}}]},
            {"name": "kd", "steps": 3, "methods": [{"name": "kd", "weight": 0.5, "config": {"temperature": 2.0}}]},
        ],
        "training": {"batch_size": 4, "eval_batch_size": 8},
        "checkpoint": {"every_steps": 2, "keep_last": 10},
        "logging": {"progress": False, "plot": True},
    } | changes
    path = root / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(config: Path, registry, stop_after=None) -> dict:
    return Trainer(load_run_config(config, registry=registry), registry, progress=False, stop_after=stop_after,
                   echo=lambda _: None).execute()


def test_full_run_logs_every_term_and_exports(workspace, registry):
    run_dir = workspace / "full"
    summary = run(write_config(workspace, run_dir), registry)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["global_step"] for r in train] == [1, 2, 3, 4, 5, 6]
    whole = [{k: v for k, v in r["terms"].items() if "/" not in k} for r in train]
    assert set(whole[0]) == {"tinybert.hidden", "tinybert.attention"}
    assert set(whole[-1]) == {"kd.soft", "kd.hard"}
    # Each layer pair's part of a TinyBERT term is logged too (2 student layers; the random map
    # picks the teacher's) and sums to the term: hidden states 0 (embeddings), 1, 2; attention 0, 1.
    parts = {k: v for k, v in train[0]["terms"].items() if "/" in k}
    pairs = sorted((k.split("/")[0], *map(int, k.split("/")[1].split("-"))) for k in parts)
    assert [(term, s) for term, s, _ in pairs] == [("tinybert.attention", 0), ("tinybert.attention", 1),
                                                   ("tinybert.hidden", 0), ("tinybert.hidden", 1), ("tinybert.hidden", 2)]
    assert ("tinybert.hidden", 0, 0) in pairs and all(0 <= t <= 4 for _, _, t in pairs)
    for term in ("tinybert.hidden", "tinybert.attention"):
        assert sum(v for k, v in parts.items() if k.startswith(term + "/")) == pytest.approx(whole[0][term], rel=1e-5)
    for r, w in zip(train, whole, strict=True):
        assert r["loss"] == pytest.approx(sum(w.values()), rel=1e-5)  # parts are never added to the loss
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    rows = {r["model"]: r for r in summary["models"]}
    assert rows["student"]["layers"] == 2 and 0.0 <= rows["student"]["accuracy"] <= 1.0
    assert rows["teacher:t"]["parameters"] > rows["student"]["parameters"]
    exported = load_file(str(run_dir / "export" / "model.safetensors"))
    assert "classifier.weight" in exported and (run_dir / "export" / "tokenizer.json").is_file()
    state = json.loads((find_latest(run_dir) / "state.json").read_text())
    assert state["method_states"]["kd"] == {} and state["global_step"] == 6
    # Where the time went: per stage its steps, examples (3 steps of 4) and what was not training.
    timings = summary["timings"]
    assert [t["stage"] for t in timings["stages"]] == ["tinybert", "kd"]
    for t in timings["stages"]:
        assert (t["steps"], t["examples"]) == (3, 12)
        outside = sum(v for k, v in t.items() if k.endswith("_seconds") and k != "training_seconds")
        assert t["training_seconds"] == pytest.approx(t["seconds"] - outside, abs=0.02)
        assert t["examples_per_s"] == pytest.approx(12 / t["training_seconds"], rel=0.1)  # seconds rounded to 0.01
        assert t["checkpoints_seconds"] > 0 and t["evaluation_seconds"] < 0.05 and t["setup_seconds"] > 0  # no eval split
    assert timings["startup_seconds"] > 0 and timings["finish_seconds"] > 0
    line = format_timings(summary)
    assert line.startswith("time: start-up ") and "tinybert " in line and "(3 steps in " in line
    assert line.endswith("s (test evaluation, export)")


def test_resume_is_bitwise_identical(workspace, registry):
    full_dir, split_dir = workspace / "ref", workspace / "split"
    run(write_config(workspace, full_dir), registry)
    config = write_config(workspace, split_dir)
    with pytest.raises(TrainingInterrupted):
        run(config, registry, stop_after=2)  # inside the TinyBERT stage, random layers drawn
    with pytest.raises(TrainingInterrupted):
        run(config, registry, stop_after=4)  # crosses the stage boundary
    run(config, registry)
    ref = load_file(str(find_latest(full_dir) / "model.safetensors"))
    got = load_file(str(find_latest(split_dir) / "model.safetensors"))
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    steps = [json.loads(x)["global_step"] for x in (split_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_teacher_finetune_stage_is_reused(workspace, registry):
    """A re-run reuses the fine-tuned teacher, and its student is bitwise the first run's: the
    student stage draws from its own seed (dropout is on), not from what fine-tuning consumed."""
    run_dir = workspace / "ft"
    stages = [{"name": "ft", "train": "teacher:t", "steps": 2},
              {"name": "kd", "steps": 2, "methods": [{"name": "kd"}]}]
    config = write_config(workspace, run_dir, stages=stages)
    run(config, registry)
    teacher = run_dir / "teachers" / "t" / "model.safetensors"
    first = teacher.stat().st_mtime_ns
    before = load_file(str(workspace / "teacher" / "model.safetensors"))["classifier.weight"]
    after = load_file(str(teacher))["classifier.weight"]
    assert not torch.equal(before, after)  # it was trained
    student = load_file(str(find_latest(run_dir) / "model.safetensors"))
    shutil.rmtree(run_dir / "checkpoints")
    messages = []
    Trainer(load_run_config(config, registry=registry), registry, progress=False, echo=messages.append).execute()
    assert teacher.stat().st_mtime_ns == first
    assert any("reusing the fine-tuned teacher 't'" in m for m in messages)
    again = load_file(str(find_latest(run_dir) / "model.safetensors"))
    assert student.keys() == again.keys() and all(torch.equal(student[k], again[k]) for k in student)
    assert find_latest(run_dir).name == "step-00000004"  # the reused teacher's 2 steps still count
    steps = [json.loads(x)["global_step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 4]  # the re-run logs its own (student) steps only


def test_distill_cli_rejects_bad_set_keys(workspace):
    config = write_config(workspace, workspace / "cli")
    result = CliRunner().invoke(cli, ["distill", str(config), "--set", "stages[0].stepz=3", "--set", "seed=-1"])
    assert result.exit_code == 2
    assert "stages[0].stepz: unknown key; did you mean 'steps'?" in result.output
    assert "seed: -1 is less than the minimum of 0" in result.output
    assert "Traceback" not in result.output
    assert not (workspace / "cli").exists()


def test_causal_lm_plain_stage_and_teacher_assistant_chain(tmp_path, registry, llama_tokenizer_dir):
    """Decoder family: plain training, KD that publishes a teacher assistant, then a fresh
    student distilled from that assistant (TAKD's shape); perplexity is evaluated."""
    from gkd.models import Tokenizer

    vocab = Tokenizer.from_dir(llama_tokenizer_dir, 16).vocab_size
    cfg = ModelConfig(family="decoder", vocab_size=vocab, hidden_size=32, num_layers=4, num_attention_heads=4,
                      num_kv_heads=2, ffn_hidden_size=64, hidden_act="silu", norm_eps=1e-6, head="lm",
                      tie_word_embeddings=True)
    export_hf(build_model(cfg, seed=5), tmp_path / "teacher", tokenizer_dir=llama_tokenizer_dir)
    lines = [t for texts in TEXTS.values() for t in texts] * 3
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    config = {
        "run_dir": str(tmp_path / "run"), "task": {"type": "causal_lm", "max_length": 12},
        "data": {"train": {"path": "train.txt"}, "test": {"path": "train.txt", "limit": 6}},
        "teachers": [{"name": "big", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "big", "layers": "bottom", "num_layers": 2}},
        "stages": [
            {"name": "plain", "steps": 2},
            {"name": "kd", "steps": 2, "methods": [{"name": "kd", "config": {"hard_weight": 0.0}}],
             "publish_as_teacher": "ta"},
            {"name": "ta-kd", "steps": 2, "teachers": ["ta"], "methods": [{"name": "kd"}],
             "student_init": {"strategy": "truncate", "teacher": "ta", "layers": "bottom", "num_layers": 1}},
        ],
        "training": {"batch_size": 4},
        "logging": {"progress": False, "plot": False},
    }
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(config))
    summary = run(path, registry)
    rows = {r["model"]: r for r in summary["models"]}
    assert rows["student"]["layers"] == 1
    assert 1.0 < rows["student"]["perplexity"] < 10 * vocab
    assert (tmp_path / "run" / "teachers" / "ta" / "model.safetensors").is_file()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [set(r["terms"]) for r in records if r["kind"] == "train"] == [{"task"}] * 2 + [{"kd.soft"}] * 2 + [{"kd.soft", "kd.hard"}] * 2


def test_changed_config_refuses_to_resume_and_resume_false_starts_over(workspace, registry):
    run_dir = workspace / "changed"
    config = write_config(workspace, run_dir)
    with pytest.raises(TrainingInterrupted):
        run(config, registry, stop_after=2)
    changed = write_config(workspace, run_dir, seed=8)
    from gkd.errors import GkdError

    with pytest.raises(GkdError, match=r"different config \(changed: seed\)"):
        run(changed, registry)
    fresh = write_config(workspace, run_dir, seed=8, checkpoint={"every_steps": 2, "keep_last": 10, "resume": False})
    summary = run(fresh, registry)
    assert summary["global_step"] == 6
    steps = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert steps == [2, 3, 4, 6]  # every 2 global steps, plus the end of each stage
    assert json.loads((run_dir / "checkpoints" / "step-00000002" / "config.json").read_text())["seed"] == 8


def test_zero_stage_1_trains_checkpoints_and_resumes(workspace, registry):
    """ZeRO 1 checkpoints hold the Adam moments (full tensors, by name): a resumed run equals an
    uninterrupted one."""
    ref_dir, run_dir = workspace / "zero1-ref", workspace / "zero1"
    run(write_config(workspace, ref_dir, parallel={"zero": {"stage": 1}}), registry)
    config = write_config(workspace, run_dir, parallel={"zero": {"stage": 1}})
    with pytest.raises(TrainingInterrupted):
        run(config, registry, stop_after=2)
    moments = load_file(str(find_latest(run_dir) / "optimizer.safetensors"))
    assert {"exp_avg.model.classifier.weight", "exp_avg_sq.model.classifier.weight"} <= set(moments)
    summary = run(config, registry)
    assert summary["global_step"] == 6
    ref = load_file(str(find_latest(ref_dir) / "model.safetensors"))
    got = load_file(str(find_latest(run_dir) / "model.safetensors"))
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_teacher_without_task_head_serves_features_and_kd_says_why_not(workspace, registry, minilm_dir):
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=4, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="none")
    export_hf(build_model(cfg, seed=4), workspace / "headless", tokenizer_dir=minilm_dir)
    stages = [{"name": "tinybert", "steps": 2, "methods": [{"name": "tinybert"}]}]
    config = write_config(workspace, workspace / "headless-run", stages=stages,
                          teachers=[{"name": "t", "path": "headless"}])
    summary = run(config, registry)
    rows = {r["model"]: r for r in summary["models"]}
    assert "accuracy" in rows["student"] and "error" in rows["teacher:t"]  # the teacher has no classifier
    stages.append({"name": "kd", "steps": 1, "methods": [{"name": "kd"}]})
    config = write_config(workspace, workspace / "headless-kd", stages=stages, teachers=[{"name": "t", "path": "headless"}])
    from gkd.errors import GkdError

    with pytest.raises(GkdError, match="teacher 't' has no task head"):
        run(config, registry)


def test_stop_at_a_stage_end_says_so_and_resumes_bitwise(workspace, registry):
    """Stopping exactly at the end of a stage: the message names that step, and the resumed run
    (which restores the finished stage, megatron's RNG streams included) equals an uninterrupted one."""
    full_dir, split_dir = workspace / "ref-end", workspace / "split-end"
    run(write_config(workspace, full_dir), registry)
    config = write_config(workspace, split_dir)
    with pytest.raises(TrainingInterrupted, match="stopped after global step 3 "):
        run(config, registry, stop_after=3)
    run(config, registry)
    ref = load_file(str(find_latest(full_dir) / "model.safetensors"))
    got = load_file(str(find_latest(split_dir) / "model.safetensors"))
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_bf16_teacher_and_progress_lines(workspace, registry):
    """A teacher in bf16 (its configured dtype) distils an fp32 student; without a terminal the
    loop prints a progress line every logging.every_steps steps."""
    teachers = [{"name": "t", "path": "teacher", "dtype": "bf16"}]
    config = write_config(workspace, workspace / "bf16", teachers=teachers,
                          logging={"progress": False, "plot": False, "every_steps": 2})
    messages: list[str] = []
    summary = Trainer(load_run_config(config, registry=registry), registry, echo=messages.append).execute()
    assert summary["global_step"] == 6
    records = [json.loads(line) for line in (workspace / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["kind"] == "train")
    assert [m.split(" loss")[0] for m in messages if " step " in m and "loss" in m] == [
        "[1/2] tinybert step 2/3 (66%)", "[1/2] tinybert step 3/3 (100%)", "[2/2] kd step 2/3 (66%)",
        "[2/2] kd step 3/3 (100%)"]


# ---------------------------------------------------------------- early stopping

EARLY = [{"name": "kd", "steps": 8, "methods": [{"name": "kd"}],
          "training": {"eval_every_steps": 1, "early_stopping": {"patience": 2, "metric": "accuracy", "min_delta": 1.0}}},
         {"name": "kd2", "steps": 2, "methods": [{"name": "kd"}]}]
"""min_delta 1.0: no evaluation after the first can improve accuracy, so the stage ends at step 3 of 8."""


def early_config(workspace: Path, run_dir: Path) -> Path:
    return write_config(workspace, run_dir, stages=EARLY,
                        data={"train": {"path": "train.jsonl"}, "eval": {"path": "test.jsonl"}})


def test_early_stopping_ends_the_stage_and_the_run_goes_on(workspace, registry):
    run_dir = workspace / "early"
    messages: list[str] = []
    summary = Trainer(load_run_config(early_config(workspace, run_dir), registry=registry), registry, progress=False,
                      echo=messages.append).execute()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["stage"], r["step"]) for r in records if r["kind"] == "train"]
    assert steps == [("kd", 1), ("kd", 2), ("kd", 3), ("kd2", 1), ("kd2", 2)]
    assert summary["global_step"] == 5
    assert any(m.startswith("[kd] early stopping at step 3/8: accuracy has not improved on") for m in messages)
    evals = [r["step"] for r in records if r["kind"] == "eval" and r["stage"] == "kd"]
    assert evals == [1, 2, 3, 3]  # the periodic ones, then the stage's end evaluation at its last step
    marker = json.loads((find_latest(run_dir).parent / "step-00000003" / "state.json").read_text())
    assert marker["extra"]["early_stopping"]["stopped"] is True and marker["stage_iteration"] == 3


def test_early_stopping_resumes_to_the_same_stop(workspace, registry):
    full, split = workspace / "early-full", workspace / "early-split"
    run(early_config(workspace, full), registry)
    config = early_config(workspace, split)
    with pytest.raises(TrainingInterrupted):
        run(config, registry, stop_after=2)  # one evaluation without improvement is in the checkpoint
    run(config, registry)
    ref = load_file(str(find_latest(full) / "model.safetensors"))
    got = load_file(str(find_latest(split) / "model.safetensors"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    steps = [(json.loads(x)["stage"], json.loads(x)["step"]) for x in (split / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [("kd", 1), ("kd", 2), ("kd", 3), ("kd2", 1), ("kd2", 2)]


def test_early_stopping_needs_periodic_evaluation_on_an_eval_split(workspace, registry):
    no_eval = write_config(workspace, workspace / "early-bad", stages=EARLY)
    with pytest.raises(ConfigError) as raised:
        load_run_config(no_eval, registry=registry)
    assert "stages[0].training.early_stopping: stage 'kd' has no eval split to judge" in str(raised.value)
    stages = [dict(EARLY[0], training={"early_stopping": {"patience": 1}}), EARLY[1]]
    no_every = write_config(workspace, workspace / "early-bad2", stages=stages,
                            data={"train": {"path": "train.jsonl"}, "eval": {"path": "test.jsonl"}})
    with pytest.raises(ConfigError) as raised:
        load_run_config(no_every, registry=registry)
    assert "evaluates only at its end; set training.eval_every_steps" in str(raised.value)
