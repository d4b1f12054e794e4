"""The teacher-output cache (gkd.engine.teacher_cache, gkd.engine.cache_store): every method
cached = uncached through the step, whole runs bit for bit, damaged shards, ``cache: required``,
compressed logits and ``gkd cache info|prune``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from gkd.cli import cli
from gkd.config import load_run_config
from gkd.config.run import CacheConfig
from gkd.engine.cache_store import ShardStore, write_shard
from gkd.engine.teacher_cache import CacheRequiredError, TeacherCache, _compress_logits, _expand_logits
from gkd.engine.trainer import Trainer
from gkd.methods.api import ForwardRequest, Method, PassPlan, teacher_key
from gkd.plugins import load_plugin_manager
from gkd.testing import check_cache, run_step, tiny_batch, tiny_models

# (method, config, family, teachers): the cases of the methods' own conformance tests where the
# defaults do not fit the tiny models.
CASES = [
    ("alp-kd", None, "encoder", None), ("annealing-kd", None, "encoder", None), ("ckd", None, "encoder", None),
    ("continuation-kd", None, "encoder", None), ("dgkd", None, "encoder", None), ("diito", None, "encoder", None),
    ("distilbert", None, "encoder", None), ("kd", None, "encoder", None), ("kd", None, "decoder", None),
    ("lrc-bert", None, "encoder", None), ("mgskd", {"relation_heads": 4}, "encoder", None),
    ("minilm", None, "encoder", None), ("minilmv2", {"teacher_layer": 4, "relation_heads": 4}, "encoder", None),
    ("mobilebert", None, "encoder", None), ("mt-bert", None, "encoder", None), ("pd", None, "encoder", None),
    ("pkd", None, "encoder", None), ("rail-kd", None, "encoder", None),
    ("rl-kd", {"semantic_teacher": "sem"}, "encoder", {"deep": 4, "shallow": 3, "sem": 2}),
    ("sid", None, "encoder", None), ("takd", None, "encoder", None), ("theseus", None, "encoder", None),
    ("tinybert", None, "encoder", None), ("tinybert", None, "decoder", None), ("tmkd", None, "encoder", None),
    ("uncertainty", None, "encoder", None), ("universal-kd", None, "encoder", None),
]
# Methods whose every teacher request can be served (the others: see the asserts below).
NOT_SERVED = {"theseus": "runs teacher layers inside the student's forward, never the teacher's own",
              "diito": "puts interchange operations on the teacher in its second pass"}


def test_the_cases_cover_every_registered_method():
    assert {c[0] for c in CASES} == set(load_plugin_manager().registry.names())


@pytest.mark.parametrize(("name", "config", "family", "teachers"), CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_every_method_gives_the_same_terms_with_the_cache(name, config, family, teachers):
    """Repeated batches bit for bit, reshuffled and re-padded ones within 1e-4 (check_cache)."""
    report = check_cache(name, config, family=family, teachers=teachers)
    if name == "theseus":
        assert report.served == report.computed == 0
    elif name == "diito":
        assert "put an operation on teacher 't'" in report.reason
        assert report.served > 0  # its first pass, without operations, is served
    else:
        assert report.reason is None and report.served >= report.computed > 0, report


def test_compressed_terms_stay_close():
    report = check_cache("tinybert", precision="compressed", rtol=2e-2)
    assert report.served > 0


class _Intervene(Method):
    """Puts an operation on its teacher: its outputs depend on more than the input."""

    name = "intervene"

    def plan(self, step, state, pass_index, previous):
        if pass_index:
            return None
        return PassPlan.of(student=ForwardRequest(),
                           **{teacher_key("t"): ForwardRequest(operations={"layers.0.output": lambda h: 2 * h})})

    def loss(self, step, state, pass_index, outputs):
        return {"soft": ((outputs.student.logits - outputs.teacher("t").logits) ** 2).mean()}


def test_a_method_that_modifies_the_teacher_never_uses_the_cache(tmp_path):
    models = tiny_models()
    batch = tiny_batch()
    method = _Intervene({}, None)  # type: ignore[arg-type]
    cache = TeacherCache.for_models(CacheConfig("auto"), tmp_path, models)
    first = run_step(method, models, batch)
    for _ in range(2):
        assert torch.equal(run_step(method, models, batch, cache=cache).loss, first.loss)
    assert cache.stats.batches_served == cache.stats.batches_computed == 0
    assert not list(tmp_path.rglob("*.safetensors"))
    required = TeacherCache.for_models(CacheConfig("required"), tmp_path, models, stage="kd")
    with pytest.raises(CacheRequiredError, match=r"^stage 'kd': cache: required, but method\(s\) intervene put an "
                                                 r"operation on teacher 't' \(layers.0.output\)"):
        run_step(method, models, batch, cache=required)


def test_compressed_logits_keep_the_top_k_and_the_remaining_mass():
    z = torch.randn(3, 5, 1000, generator=torch.Generator().manual_seed(0)) * 4
    parts = _compress_logits(z, 32, torch.float16)
    assert parts["@topk.indices"].dtype == torch.int16
    bytes_per_position = sum(p.numel() * p.element_size() for p in parts.values()) / 15
    assert bytes_per_position == 32 * 2 + 32 * 2 + 2
    back = _expand_logits(parts, 1000, torch.float32)
    p, q = z.softmax(-1), back.softmax(-1)
    top = z.topk(32, -1).indices
    assert torch.allclose(q.gather(-1, top), p.gather(-1, top), atol=2e-3)
    assert torch.allclose(q.sum(-1), torch.ones(3, 5), atol=1e-5)  # the rest's mass is kept, spread evenly
    # Only how the rest's mass spreads is lost: KL(p || q) = R · KL(p_rest / R || uniform) ≤ R · log(V − k).
    kl = (p * (p.log() - q.log())).sum(-1)
    rest = 1 - p.gather(-1, top).sum(-1)
    assert (kl <= rest * math.log(1000 - 32) + 1e-3).all(), (kl, rest)


# ------------------------------------------------------------------------------------ the store

def test_a_damaged_shard_is_detected_deleted_and_its_entries_missing(tmp_path):
    path = write_shard(tmp_path, {"a" * 64 + "/x": torch.arange(1000.0)})
    store = ShardStore(tmp_path)
    assert store.has("a" * 64, {"x"}) and store.verify(["a" * 64], {"x"})
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0xFF  # one bit of data, not the header
    path.write_bytes(bytes(raw))
    store = ShardStore(tmp_path)
    assert store.has("a" * 64, {"x"})  # the header still lists it ...
    assert not store.verify(["a" * 64], {"x"})  # ... but its hash fails: dropped, never read
    assert not store.has("a" * 64, {"x"}) and not path.exists()
    assert store.dropped == [f"teacher cache: {path} is damaged (its data does not match the sha256 in its header); "
                             "deleted, its entries are recomputed"]
    (tmp_path / "half.safetensors").write_bytes(b"\x05")
    assert "shorter than a safetensors header" in ShardStore(tmp_path).dropped[0]


# ------------------------------------------------------------------------------------ whole runs

@pytest.fixture(scope="module")
def workspace(cache_workspace: Path) -> Path:
    return cache_workspace


def write_config(root: Path, name: str, *, method: dict, epochs: float = 1, cache="off", **changes) -> Path:
    cfg = {
        "name": name, "run_dir": str(root / name), "seed": 7,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}},
        "stages": [{"name": "kd", "epochs": epochs, "methods": [method]}],
        "training": {"batch_size": 4},
        "checkpoint": {"every_steps": 0, "keep_last": 1},
        "logging": {"progress": False, "plot": False},
        "export": {"enabled": False},
        "cache": cache,
    } | changes
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, lines: list[str] | None = None) -> dict[str, torch.Tensor]:
    registry = load_plugin_manager().registry
    run = load_run_config(config, registry=registry)
    Trainer(run, registry, progress=False, echo=(lines.append if lines is not None else lambda _: None)).execute()
    checkpoint = sorted((run.run_dir / "checkpoints").iterdir())[-1]
    return load_file(next(checkpoint.glob("model*.safetensors")))


KD = {"name": "kd", "config": {"temperature": 2.0}}
TINYBERT = {"name": "tinybert", "config": {"prediction_weight": 1.0}}


@pytest.mark.parametrize("method", [KD, TINYBERT], ids=["kd", "tinybert"])
def test_a_run_served_from_the_cache_is_bitwise_the_uncached_run(workspace, tmp_path, method):
    """Run 1 fills the cache; run 2 (same data and seed, so the same batches) is served every teacher
    batch and trains the same student bit for bit as a run without the cache."""
    cache = {"mode": "required", "dir": str(tmp_path / "cache")}
    name = method["name"]
    plain = train(write_config(workspace, f"{name}-plain", method=method))
    lines: list[str] = []
    filled = train(write_config(workspace, f"{name}-fill", method=method, cache=cache), lines)
    assert any("teacher cache: 0 of 4 teacher batches served" in line for line in lines), lines
    lines.clear()
    served = train(write_config(workspace, f"{name}-served", method=method, cache=cache), lines)
    assert any("teacher cache: 4 of 4 teacher batches served (100% of examples)" in line for line in lines), lines
    for weights in (filled, served):
        assert weights.keys() == plain.keys()
        assert all(torch.equal(weights[k], plain[k]) for k in plain)


def test_epochs_after_the_first_are_served_and_stay_close(workspace, tmp_path):
    cache = {"mode": "auto", "dir": str(tmp_path / "cache")}
    plain = train(write_config(workspace, "epochs-plain", method=TINYBERT, epochs=3))
    lines: list[str] = []
    cached = train(write_config(workspace, "epochs-cached", method=TINYBERT, epochs=3, cache=cache), lines)
    assert any("teacher cache: 8 of 12 teacher batches served (67% of examples)" in line for line in lines), lines
    worst = max(float((cached[k] - plain[k]).abs().max() / plain[k].abs().max().clamp(min=1e-12)) for k in plain)
    assert worst < 1e-4, worst  # reshuffled batches: served outputs differ from recomputed ones by rounding only


def test_a_corrupted_shard_is_recomputed_and_the_run_unchanged(workspace, tmp_path):
    cache = {"mode": "auto", "dir": str(tmp_path / "cache")}
    plain = train(write_config(workspace, "corrupt-plain", method=KD))
    train(write_config(workspace, "corrupt-fill", method=KD, cache=cache))
    shards = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert shards
    raw = bytearray(shards[0].read_bytes())
    raw[-3] ^= 0x01
    shards[0].write_bytes(bytes(raw))
    lines: list[str] = []
    again = train(write_config(workspace, "corrupt-again", method=KD, cache=cache), lines)
    assert any(f"teacher cache: {shards[0]} is damaged" in line for line in lines), lines
    # The stage's entries were one shard: none is served, all are recomputed and written again.
    assert any("teacher cache: 0 of 4 teacher batches served" in line for line in lines), lines
    assert all(torch.equal(again[k], plain[k]) for k in plain)
    lines.clear()
    train(write_config(workspace, "corrupt-healed", method=KD, cache=cache), lines)
    assert any("teacher cache: 4 of 4 teacher batches served" in line for line in lines), lines


def test_cache_required_on_a_stage_that_cannot_be_cached_exits_2(workspace):
    config = write_config(workspace, "required-theseus", method={"name": "theseus"}, cache="required",
                          student={"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}})
    result = CliRunner().invoke(cli, ["distill", str(config)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: stage 'kd': cache: required, but its methods ran no forward pass of t that the cache could serve "
        "(e.g. a method that runs teacher layers inside the student's forward); use cache: auto")


def test_cache_info_and_prune(workspace, tmp_path):
    root = tmp_path / "cache"
    train(write_config(workspace, "info", method=KD, cache={"mode": "auto", "dir": str(root)}))
    result = CliRunner().invoke(cli, ["cache", "info", "--dir", str(root)])
    assert result.exit_code == 0, result.output
    assert "16 entries" in result.output and "teacher" in result.output
    result = CliRunner().invoke(cli, ["cache", "prune", "--dir", str(root), "--all"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("removed ")
    assert not list(root.rglob("*.safetensors"))


def test_a_second_run_with_another_student_reuses_the_entries(workspace, tmp_path):
    cache = {"mode": "auto", "dir": str(tmp_path / "cache")}
    train(write_config(workspace, "student-a", method=KD, cache=cache))
    lines: list[str] = []
    other = {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 1}}
    train(write_config(workspace, "student-b", method=KD, cache=cache, student=other), lines)
    assert any("teacher cache: 4 of 4 teacher batches served" in line for line in lines), lines


def test_yaml_off_and_on_are_modes(workspace):
    """YAML reads a bare ``off``/``on`` as false/true: both are accepted as the modes they name."""
    config = write_config(workspace, "yaml-modes", method=KD)
    text = config.read_text().replace("cache: 'off'", "cache: off")
    text = text.replace("- epochs: 1", "- cache: on\n  epochs: 1")
    config.write_text(text)
    assert "cache: off" in text and "cache: on" in text
    run = load_run_config(config, registry=load_plugin_manager().registry)
    assert run.cache.mode == "off" and run.cache_mode(run.stages[0]) == "auto"
    result = CliRunner().invoke(cli, ["validate", str(config), "--set", "cache=sometimes"])
    assert result.exit_code == 2 and "cache: 'sometimes' is not valid" in result.output, result.output
