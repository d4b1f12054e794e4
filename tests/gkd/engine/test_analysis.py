"""Recording feature distances during training (gkd.engine.analysis): the recorded values against a
direct computation, the schedule, resume, and that recording changes nothing the run trains."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from gkd import parallel
from gkd.analysis.records import ANALYSIS_CSV, ANALYSIS_FILE, read_points
from gkd.atomic import atomic_write_bytes
from gkd.config import load_run_config
from gkd.engine.analysis import analysis_features, default_layer_map, measure
from gkd.engine.checkpoint import find_latest
from gkd.engine.trainer import Trainer, TrainingInterrupted
from gkd.errors import GkdError
from gkd.models import GkdModel, ModelConfig, build_model, export_hf, from_pretrained
from gkd.parallel.rng import megatron_rng_states
from gkd.plugins import load_plugin_manager
from gkd.testing import tiny_config

TEMPERATURES = (1.0, 5.0, 20.0)
LENGTHS = (8, 5, 8, 3, 6)


def test_default_layer_map():
    assert default_layer_map(6, 3) == [1, 3, 5]  # the main job: student layer i <-> teacher layer 2i+1
    assert default_layer_map(4, 2) == [1, 3]
    assert default_layer_map(12, 5) == [1, 4, 6, 9, 11]  # 2.4, 4.8, 7.2, 9.6, 12 rounded, minus one
    assert default_layer_map(3, 3) == [0, 1, 2]


# ---------------------------------------------------------------------------------- direct computation


def _batch(family: str, labels: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    n, s = len(LENGTHS), max(LENGTHS)
    mask = torch.tensor([[1] * k + [0] * (s - k) for k in LENGTHS])
    batch = {"input_ids": torch.randint(5, 100, (n, s), generator=g) * mask, "attention_mask": mask}
    if family == "encoder":
        batch["token_type_ids"] = torch.zeros_like(mask)
    return batch


def _capture(model: GkdModel, batch: dict[str, torch.Tensor], layers: list[int]) -> tuple[dict, torch.Tensor]:
    with torch.no_grad(), model.capture(analysis_features(layers)) as feats:
        out = model(**batch)
    return {k: v.double() for k, v in feats.items()}, out.logits.double()


class _Mean:
    def __init__(self) -> None:
        self.sum, self.count = 0.0, 0

    def add(self, values: torch.Tensor) -> None:
        self.sum += float(values.sum())
        self.count += values.numel()


def _kl_rows(t_log: torch.Tensor, s_log: torch.Tensor) -> torch.Tensor:
    """Σ_k p_t (log p_t − log p_s) per row, p_t = 0 terms dropped."""
    p = t_log.exp()
    return torch.where(p > 0, p * (t_log - s_log), torch.zeros(())).sum(-1)


def _relation(x: torch.Tensor, causal: bool) -> torch.Tensor:
    """log softmax(x·xᵀ/√d) over keys, ``x`` [n, L, d]."""
    r = x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1])
    if causal:
        r = r.masked_fill(torch.ones_like(r, dtype=torch.bool).triu(1), -math.inf)
    return torch.log_softmax(r, -1)


def _direct(student: GkdModel, teacher: GkdModel, batch: dict[str, torch.Tensor], layer_map: list[int]) -> dict:
    """The distances by their definitions, one example at a time (sliced to its real tokens, so no
    mask enters), in fp64."""
    causal = student.model_config.family == "decoder"
    s_feats, s_logits = _capture(student, batch, list(range(len(layer_map))))
    t_feats, t_logits = _capture(teacher, batch, layer_map)
    sums: dict[str, _Mean] = {}

    def add(key: str, values: torch.Tensor) -> None:
        sums.setdefault(key, _Mean()).add(values)

    def hidden(tag: str, s: torch.Tensor, t: torch.Tensor) -> None:
        if s.shape == t.shape:
            add(f"t:{tag}:hidden.mse", (s - t) ** 2)
            add(f"t:{tag}:hidden.cos", 1 - F.cosine_similarity(s, t, dim=-1))
        add(f"t:{tag}:hidden.rel_kl", _kl_rows(_relation(t[None], causal), _relation(s[None], causal)))

    for b, length in enumerate(LENGTHS):
        keep = torch.ones(length, length, dtype=torch.bool)
        if causal:
            keep = keep.tril()
        hidden("emb", s_feats["embeddings"][b, :length], t_feats["embeddings"][b, :length])
        for i, j in enumerate(layer_map):
            tag = f"L{i + 1}"
            hidden(tag, s_feats[f"layers.{i}.output"][b, :length], t_feats[f"layers.{j}.output"][b, :length])
            for role in ("query", "key", "value"):
                s = s_feats[f"layers.{i}.attention.{role}"][b, :, :length]
                t = t_feats[f"layers.{j}.attention.{role}"][b, :, :length]
                if s.shape == t.shape:
                    add(f"t:{tag}:{role}.mse", (s - t) ** 2)
                if s.shape[0] != t.shape[0]:  # one relation of all heads side by side
                    s, t = (x.transpose(0, 1).reshape(1, length, -1) for x in (s, t))
                add(f"t:{tag}:{role}.rel_kl", _kl_rows(_relation(t, causal), _relation(s, causal)))
            maps = {}
            for kind in ("scores", "probs"):
                s = s_feats[f"layers.{i}.attention.{kind}"][b, :, :length, :length]
                t = t_feats[f"layers.{j}.attention.{kind}"][b, :, :length, :length]
                if s.shape[0] != t.shape[0]:
                    s, t = torch.where(keep, s, 0).mean(0, keepdim=True), torch.where(keep, t, 0).mean(0, keepdim=True)
                add(f"t:{tag}:{kind}.mse", ((s - t) ** 2)[:, keep])
                maps[kind] = (s, t)
            sp, tp = maps["probs"]
            add(f"t:{tag}:probs.kl", torch.where(keep, torch.xlogy(tp, tp) - tp * torch.log(sp), 0).sum(-1))
        for tau in TEMPERATURES:
            s, t = ((x[b, :length] if causal else x[b]) for x in (s_logits, t_logits))
            add(f"t:out:logits.kl_T{tau:g}", _kl_rows(torch.log_softmax(t / tau, -1), torch.log_softmax(s / tau, -1)))
    return {k: m.sum / m.count for k, m in sums.items()}


def _compare(recorded: dict[str, float], direct: dict[str, float]) -> None:
    assert set(recorded) == set(direct)
    for key, value in direct.items():
        assert recorded[key] == pytest.approx(value, rel=2e-4, abs=1e-7), key


def _chunks(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """The probe as the recorder feeds it: chunks, each cut to its own longest example."""
    out = []
    for start in range(0, len(LENGTHS), size):
        chunk = {k: v[start:start + size] for k, v in batch.items()}
        width = int(chunk["attention_mask"].sum(1).max())
        out.append({k: v[:, :width] for k, v in chunk.items()})
    return out


def test_distances_equal_direct_computation_equal_shapes():
    teacher = build_model(tiny_config("encoder", 4), seed=1).eval()
    student = build_model(tiny_config("encoder", 2), seed=2).train()
    batch = _batch("encoder")
    recorded = measure(student, {"t": teacher}, _chunks(batch, 2), {"t": [1, 3]}, TEMPERATURES)
    direct = _direct(student, teacher, batch, [1, 3])
    assert "t:L2:hidden.mse" in direct and "t:L1:query.mse" in direct and "t:out:logits.kl_T20" in direct
    _compare(recorded, direct)
    assert student.training  # its mode is restored


def test_distances_equal_direct_computation_other_widths_and_heads():
    # A causal LM student of half the width with half the query heads (same key/value heads and
    # head size): only width-free measures, head-averaged attention maps, concatenated query heads.
    teacher = build_model(tiny_config("decoder", 3), seed=1).eval()
    student = build_model(tiny_config("decoder", 2, hidden_size=16, num_attention_heads=2), seed=2).eval()
    batch = _batch("decoder")
    recorded = measure(student, {"t": teacher}, _chunks(batch, 3), {"t": [2, 0]}, TEMPERATURES)
    direct = _direct(student, teacher, batch, [2, 0])
    assert not any(k.endswith(("hidden.mse", "hidden.cos", "query.mse")) for k in direct)
    assert "t:L1:key.mse" in direct  # 2 key/value heads of size 8 on both sides
    _compare(recorded, direct)


def test_measure_leaves_every_rng_stream_alone():
    teacher = build_model(tiny_config("encoder", 4, hidden_dropout=0.1, attention_dropout=0.1), seed=1).eval()
    student = build_model(tiny_config("encoder", 2, hidden_dropout=0.1, attention_dropout=0.1), seed=2).train()
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), megatron_rng_states())
    measure(student, {"t": teacher}, _chunks(_batch("encoder"), 5), {"t": [1, 3]}, TEMPERATURES)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2]) and megatron_rng_states() == before[3]


def _measure_at(teacher_dir: str, student_dir: str) -> dict[str, float]:
    teacher = from_pretrained(teacher_dir).eval()
    student = from_pretrained(student_dir).train()
    batch = _batch("encoder")
    return measure(student, {"t": teacher}, _chunks(batch, 2), {"t": [1, 3]}, TEMPERATURES)


@pytest.mark.distributed
def test_distances_under_tensor_parallelism_equal_one_process(tmp_path):
    export_hf(build_model(tiny_config("encoder", 4), seed=1), tmp_path / "teacher")
    export_hf(build_model(tiny_config("encoder", 2), seed=2), tmp_path / "student")
    (ref,) = parallel.run_distributed(_measure_at, 1, str(tmp_path / "teacher"), str(tmp_path / "student"))
    for rank in parallel.run_distributed(_measure_at, 2, str(tmp_path / "teacher"), str(tmp_path / "student")):
        assert set(rank) == set(ref)
        for key, value in ref.items():
            assert rank[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


# ---------------------------------------------------------------------------------- in the trainer

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
    """A tiny random BERT teacher (with dropout, so training draws random numbers) and jsonl data."""
    root = tmp_path_factory.mktemp("analysis")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=4, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=3)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=minilm_dir)
    rows = [{"text": t, "label": label} for label, texts in TEXTS.items() for t in texts] * 4
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:9]) + "\n")
    return root


def write_config(root: Path, name: str, **changes) -> Path:
    cfg = {
        "name": "tiny", "run_dir": str(root / name), "seed": 7,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "test.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}},
        "stages": [
            {"name": "tinybert", "steps": 3, "methods": [{"name": "tinybert", "config": {"layer_mapping": "random",
                                                                                      "random_every_steps": 2}}]},
            {"name": "kd", "steps": 4, "methods": [{"name": "kd", "config": {"temperature": 2.0}}]},
        ],
        "training": {"batch_size": 4, "eval_batch_size": 8},
        "checkpoint": {"every_steps": 2, "keep_last": 10},
        "logging": {"progress": False, "plot": False},
        "export": {"enabled": False},
    } | changes
    path = root / f"{name}.yaml"
    atomic_write_bytes(path, yaml.safe_dump(cfg).encode())
    return path


def train(config: Path, registry, stop_after: int | None = None) -> None:
    Trainer(load_run_config(config, registry=registry), registry, progress=False, stop_after=stop_after,
            echo=lambda _: None).execute()


ANALYSIS = {"every": 2, "probe_examples": 6, "batch_size": 4}


def test_analysis_trains_bitwise_like_a_run_without_it(workspace, registry):
    train(write_config(workspace, "plain"), registry)
    train(write_config(workspace, "probed", analysis=ANALYSIS), registry)
    plain = load_file(str(find_latest(workspace / "plain") / "model.safetensors"))
    probed = load_file(str(find_latest(workspace / "probed") / "model.safetensors"))
    assert plain.keys() == probed.keys()
    assert all(torch.equal(plain[k], probed[k]) for k in plain)

    def losses(run: str) -> list[tuple[int, float, dict]]:
        records = (json.loads(x) for x in (workspace / run / "metrics.jsonl").read_text().splitlines())
        return [(r["global_step"], r["loss"], r["terms"]) for r in records if r["kind"] == "train"]

    assert losses("plain") == losses("probed")
    assert not (workspace / "plain" / ANALYSIS_FILE).exists()


def test_points_follow_the_schedule_and_the_logged_losses(workspace, registry):
    run_dir = workspace / "schedule"
    train(write_config(workspace, "schedule", analysis=ANALYSIS), registry)
    points = read_points(run_dir)
    # tinybert: global steps 1-3, kd: 4-7; every 2 global steps, plus each stage's start and end
    assert [(p["stage"], p["step"], p["global_step"], p["at"]) for p in points] == [
        ("tinybert", 0, 0, "start"), ("tinybert", 2, 2, "step"), ("tinybert", 3, 3, "end"),
        ("kd", 0, 3, "start"), ("kd", 1, 4, "step"), ("kd", 3, 6, "step"), ("kd", 4, 7, "end")]
    logged = {r["global_step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"}
    for p in points:
        if p["at"] == "start":
            assert p["loss"] is None and p["terms"] is None
        else:
            assert p["loss"] == logged[p["global_step"]]["loss"] and p["terms"] == logged[p["global_step"]]["terms"]
        assert p["metric"]["name"] == "accuracy" and p["metric"]["on"] == "test" and p["metric"]["examples"] == 9
        assert p["probe"] == {"split": "test", "examples": 6} and p["layer_maps"] == {"t": [1, 3]}
        assert len(p["distances"]) == 32 and all(math.isfinite(v) for v in p["distances"].values())
    # the truncated student starts with the teacher's embeddings: distance 0, which TinyBERT then moves
    assert points[0]["distances"]["t:emb:hidden.mse"] == 0.0 < points[2]["distances"]["t:emb:hidden.mse"]
    header = (run_dir / ANALYSIS_CSV).read_text().splitlines()[0].split(",")
    assert header[:8] == ["stage", "stage_index", "step", "global_step", "at", "loss", "metric", "metric_value"]
    assert "term:kd.soft" in header and "t:L2:probs.kl" in header
    assert len((run_dir / ANALYSIS_CSV).read_text().splitlines()) == len(points) + 1


def test_training_steps_capture_only_what_methods_request(workspace, registry, monkeypatch):
    captured: list[frozenset[str]] = []
    original = GkdModel.capture

    def counting(self, features=(), operations=None):
        features = frozenset(features)
        captured.append(features)
        return original(self, features, operations)

    monkeypatch.setattr(GkdModel, "capture", counting)
    stages = [{"name": "kd", "steps": 3, "methods": [{"name": "kd"}]}]  # KD reads logits only
    train(write_config(workspace, "kd-off", stages=stages), registry)
    off = list(captured)
    captured.clear()
    train(write_config(workspace, "kd-on", stages=stages, analysis=ANALYSIS), registry)
    on = list(captured)
    assert off and all(f == frozenset() for f in off)  # one student and one teacher capture per step
    student = frozenset(analysis_features([0, 1]))
    teacher = frozenset(analysis_features([1, 3]))
    # points at steps 0, 2, 3; the 6 probe examples in chunks of 4 and 2; student and teacher each
    assert sorted(on, key=len)[:len(off)] == off and on.count(student) == 3 * 2 and on.count(teacher) == 3 * 2
    assert len(on) == len(off) + 12


def test_resumed_run_records_each_point_once(workspace, registry):
    train(write_config(workspace, "whole", analysis=ANALYSIS), registry)
    config = write_config(workspace, "pieces", analysis=ANALYSIS)
    for stop in (2, 3, 5):  # mid-stage, at the stage boundary, mid-stage again
        with pytest.raises(TrainingInterrupted):
            train(config, registry, stop_after=stop)
    train(config, registry)
    whole, pieces = read_points(workspace / "whole"), read_points(workspace / "pieces")
    assert [(p["stage"], p["step"]) for p in pieces] == [(p["stage"], p["step"]) for p in whole]
    for a, b in zip(whole, pieces, strict=True):
        assert a["distances"] == b["distances"] and a["loss"] == b["loss"] and a["metric"] == b["metric"]


def test_a_fresh_run_without_analysis_removes_old_points(workspace, registry):
    train(write_config(workspace, "again", analysis=ANALYSIS), registry)
    assert read_points(workspace / "again")
    train(write_config(workspace, "again", checkpoint={"resume": False}), registry)
    assert not (workspace / "again" / ANALYSIS_FILE).exists() and not (workspace / "again" / ANALYSIS_CSV).exists()


@pytest.mark.parametrize(("analysis", "message"), [
    ({"every": 1, "teachers": ["tt"]}, "analysis.teachers: unknown teacher(s) tt (teachers: t)"),
    ({"every": 1, "probe_split": "eval"}, "analysis.probe_split: 'eval', but the config has no data.eval"),
    ({"every": 1, "layer_map": [1, 2, 3]},
     "analysis.layer_map: 3 entries, but the student of stage 'tinybert' has 2 layers"),
    ({"every": 1, "layer_map": {"t": [0, 4]}},
     "analysis.layer_map.t: teacher layers [4] are out of range for the 4-layer teacher 't' (0..3)"),
])
def test_bad_analysis_settings_are_one_line_errors(workspace, registry, analysis, message):
    with pytest.raises(GkdError) as err:
        train(write_config(workspace, "bad", analysis=analysis), registry)
    assert message in str(err.value) and "\n" not in str(err.value)
