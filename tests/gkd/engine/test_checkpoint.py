"""Checkpoints: exact resume, atomicity under crashes, pruning, no unpickling, teacher hashes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gkd.atomic import atomic_write_json
from gkd.config.run import ScheduleConfig
from gkd.engine import fingerprint
from gkd.engine.checkpoint import (
    CheckpointState,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from gkd.engine.fingerprint import sha256_of_checkpoint, teacher_references, verify_teachers
from gkd.engine.schedule import build_scheduler
from gkd.engine.serialize import (
    CheckpointError,
    atomic_save_safetensors,
    flatten_optimizer_state,
    load_tensors,
    unflatten_optimizer_state,
)


class Tiny(nn.Module):
    """Embedding tied to the output layer, with dropout so that training depends on the RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.hidden = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.tanh(self.hidden(self.emb(ids)))))


def make(seed: int) -> tuple[Tiny, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return model, opt, build_scheduler(opt, ScheduleConfig(type="cosine", warmup_ratio=0.25), total_steps=8)


def train(model: Tiny, opt: torch.optim.Optimizer, sched, steps: int) -> None:
    for _ in range(steps):
        ids = torch.randint(0, 11, (4, 5))  # data from the global RNG too: it must be restored
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def save(run_dir: Path, step: int, model: nn.Module, opt=None, sched=None, **kw) -> Path:
    state = CheckpointState(global_step=step, stage_index=1, stage_iteration=step, data_position={"epoch": 0, "index": step},
                            method_states={"tinybert": {"phase": "hidden", "seen": [1, 2]}}, metrics={"loss": 0.5})
    return save_checkpoint(run_dir, state, model=model, auxiliary={"w_h": torch.ones(2, 3)}, optimizer=opt,
                           scheduler=sched, **kw)


def test_resumed_training_is_bitwise_identical(tmp_path: Path) -> None:
    model, opt, sched = make(0)
    train(model, opt, sched, 3)
    path = save(tmp_path, 3, model, opt, sched, config={"name": "t"})
    train(model, opt, sched, 4)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)
    np.random.seed(1)
    random.seed(1)
    fresh, fopt, fsched = make(99)
    aux = nn.Module()
    aux.w_h = nn.Parameter(torch.zeros(2, 3))
    state = load_checkpoint(path, model=fresh, auxiliary=aux, optimizer=fopt, scheduler=fsched)
    assert state.global_step == 3 and state.method_states["tinybert"] == {"phase": "hidden", "seen": [1, 2]}
    assert state.data_position == {"epoch": 0, "index": 3} and torch.equal(aux.w_h, torch.ones(2, 3))
    assert fresh.out.weight is fresh.emb.weight and fsched.last_epoch == 3
    assert json.loads((path / "config.json").read_text()) == {"name": "t"}
    train(fresh, fopt, fsched, 4)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_rng_states_are_restored(tmp_path: Path) -> None:
    model, _, _ = make(0)
    path = save(tmp_path, 1, model)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    load_checkpoint(path, restore_rng=True)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_flatten_optimizer_state_round_trip() -> None:
    model, opt, sched = make(0)
    train(model, opt, sched, 2)
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= set(tensors)
    assert tensors["state.0.step"].item() == 2  # AdamW keeps step as a tensor
    json.dumps(meta)  # the non-tensor rest is plain JSON
    back = unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
    original = opt.state_dict()
    assert back["param_groups"] == original["param_groups"] and isinstance(back["param_groups"][0]["betas"], tuple)
    assert set(back["state"]) == set(original["state"])
    for pid, entry in original["state"].items():
        assert all(torch.equal(back["state"][pid][k], v) for k, v in entry.items())


def test_crash_before_rename_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt, sched = make(0)
    first = save(tmp_path, 1, model, opt, sched)
    train(model, opt, sched, 1)

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save(tmp_path, 2, model, opt, sched)
    monkeypatch.undo()
    assert find_latest(tmp_path) == first
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == first.name
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-")] == [first.name]
    fresh, fopt, fsched = make(5)
    assert load_checkpoint(first, model=fresh, optimizer=fopt, scheduler=fsched).global_step == 1


def test_leftovers_of_a_killed_writer_are_ignored_then_cleaned(tmp_path: Path) -> None:
    model, _, _ = make(0)
    first = save(tmp_path, 1, model)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = tmp_path / "checkpoints"
    (root / f"step-00000002.tmp-{dead.pid}").mkdir()
    (root / f"step-00000002.tmp-{dead.pid}" / "model.safetensors").write_bytes(b"half")
    unfinished = root / "step-00000003"
    unfinished.mkdir()
    (unfinished / "state.json").write_text("{}")  # no COMPLETE marker
    assert find_latest(tmp_path) == first
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(unfinished)
    save(tmp_path, 4, model)
    assert not (root / f"step-00000002.tmp-{dead.pid}").exists()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 4]


def test_keep_last_n_and_resave_of_a_step(tmp_path: Path) -> None:
    model, _, _ = make(0)
    for step in range(1, 6):
        save(tmp_path, step, model, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000005\n"
    with torch.no_grad():
        model.hidden.bias.fill_(7.0)
    path = save(tmp_path, 5, model, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert torch.equal(load_tensors(path / "model.safetensors")[0]["hidden.bias"], torch.full((6,), 7.0))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000004", "step-00000005"]


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt, sched = make(0)
    train(model, opt, sched, 2)
    path = save(tmp_path, 2, model, opt, sched)

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint load tried to unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    fresh, fopt, fsched = make(1)
    state = load_checkpoint(path, model=fresh, optimizer=fopt, scheduler=fsched)
    assert state.global_step == 2 and torch.equal(fresh.hidden.weight, model.hidden.weight)
    assert fopt.state_dict()["state"][0]["step"].item() == 2


def test_damaged_or_mismatched_checkpoints_are_refused(tmp_path: Path) -> None:
    model, _, _ = make(0)
    path = save(tmp_path, 1, model)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_checkpoint(path, model=nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_checkpoint(path, optimizer=make(0)[1])
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=r"damaged: model.safetensors has 100 bytes"):
        load_checkpoint(path, model=make(0)[0])
    marker = json.loads((path / "COMPLETE").read_text())
    (path / "COMPLETE").write_text(json.dumps({**marker, "format": 99}))
    with pytest.raises(CheckpointError, match="written by a newer gkd"):
        load_checkpoint(path)


def test_non_json_method_state_fails_cleanly(tmp_path: Path) -> None:
    model, _, _ = make(0)
    first = save(tmp_path, 1, model)
    bad = CheckpointState(global_step=2, method_states={"m": {"tensor": torch.ones(1)}})
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path, bad, model=model)
    assert find_latest(tmp_path) == first and not list((tmp_path / "checkpoints").glob("*.tmp-*"))


def test_atomic_helpers(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2} and [p.name for p in tmp_path.iterdir()] == ["x.json"]
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"a": base, "tied": base, "col": base[:, 1], "part": base[1]}  # tied, strided and partial views
    atomic_save_safetensors(tmp_path / "t.safetensors", tensors, {"note": "hi"})
    back, meta = load_tensors(tmp_path / "t.safetensors")
    assert meta == {"note": "hi"} and back["tied"] is back["a"]
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_teacher_hash_is_cached_and_detects_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model.safetensors").write_bytes(b"weights-v1")
    (teacher / "config.json").write_text("{}")
    assert sha256_of_checkpoint(teacher) == hashlib.sha256(b"weights-v1").hexdigest()

    calls = []
    real = hashlib.file_digest
    monkeypatch.setattr(fingerprint.hashlib, "file_digest", lambda f, name: calls.append(1) or real(f, name))
    refs = teacher_references({"bert": teacher})
    refs_again = teacher_references({"bert": teacher})
    assert refs == refs_again and calls == []  # served from the in-memory cache

    (teacher / "model.safetensors").write_bytes(b"weights-v2!")
    changed = teacher_references({"bert": teacher})
    assert calls == [1] and changed["bert"]["sha256"] != refs["bert"]["sha256"]
    verify_teachers(refs, refs_again)
    with pytest.raises(CheckpointError, match="teacher 'bert' changed since the checkpoint"):
        verify_teachers(refs, changed)
    with pytest.raises(CheckpointError, match="teacher 'bert' is no longer configured"):
        verify_teachers(refs, {})

    (teacher / "model-2.safetensors").write_bytes(b"shard")
    (tmp_path / "config-only").mkdir()
    manifest = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n"
                       for n, d in (("model-2.safetensors", b"shard"), ("model.safetensors", b"weights-v2!")))
    assert sha256_of_checkpoint(teacher) == hashlib.sha256(manifest.encode()).hexdigest()
    with pytest.raises(CheckpointError, match="no weight files"):
        sha256_of_checkpoint(tmp_path / "config-only")


@pytest.mark.real_model
def test_sha256_of_the_real_minilm_teacher(minilm_dir: Path) -> None:
    # sha256sum of all-MiniLM-L6-v2's model.safetensors, its only weight file (the data notes list 53aa5117…).
    assert sha256_of_checkpoint(minilm_dir) == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
