"""The run directory before and during training: unwritable places are one line before any step,
a full disk at a checkpoint leaves the previous one intact, and one run directory has one writer
(a second run fails at once naming the holder; a killed holder leaves nothing stuck)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gkd.cli import cli
from gkd.config import load_run_config
from gkd.engine.checkpoint import find_latest
from gkd.engine.rundir import LOCK_FILE, RunDirError, lock_run_dir, probe_dir, write_failure
from gkd.engine.trainer import Trainer, TrainingInterrupted
from gkd.errors import GkdError
from gkd.models import ModelConfig, build_model, export_hf
from gkd.plugins import load_plugin_manager

ROWS = [{"text": t, "label": label} for label, texts in {
    "grain": ["wheat and corn exports fell", "grain harvest was large this year"],
    "oil": ["crude oil prices climbed", "oil inventories dropped sharply"],
    "money": ["the central bank cut rates", "the dollar rose against the yen"],
}.items() for t in texts] * 4
GKD = str(Path(sys.executable).with_name("gkd"))
HOLD = """
import sys, time
from pathlib import Path
from gkd.engine.rundir import lock_run_dir
with lock_run_dir(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture(scope="module")
def registry():
    return load_plugin_manager().registry


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, minilm_dir) -> Path:
    """A tiny random BERT teacher (hidden 32, 2 layers, 3 classes) and jsonl data."""
    root = tmp_path_factory.mktemp("rundir")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=2, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=3)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=minilm_dir)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:6]))
    return root


def write_config(root: Path, name: str, run_dir: str, *, steps: int = 3, **changes) -> Path:
    cfg = {
        "name": name, "run_dir": run_dir, "seed": 7,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "test.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 1}},
        "stages": [{"name": "kd", "steps": steps, "methods": [{"name": "kd", "config": {"temperature": 2.0}}]}],
        "training": {"batch_size": 4, "eval_batch_size": 8},
        "checkpoint": {"every_steps": 1, "keep_last": 10},
        "logging": {"progress": False},
    } | changes
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, registry) -> dict:
    return Trainer(load_run_config(config, registry=registry), registry, progress=False,
                   echo=lambda _: None).execute()


# ------------------------------------------------------------------------------------- unwritable places

def unwritable_cases(root: Path) -> dict[str, tuple[dict, str]]:
    """name -> (config changes, expected start of the one-line error)."""
    (root / "a-file").write_text("x")
    return {
        "run_dir is a file": ({"run_dir": str(root / "a-file")}, f"run_dir: {root / 'a-file'} cannot be a directory: "
                                                                  f"{root / 'a-file'} is a file"),
        "run_dir under a file": ({"run_dir": str(root / "a-file" / "deep" / "run")},
                                 f"run_dir: {root / 'a-file' / 'deep' / 'run'} cannot be a directory: "
                                 f"{root / 'a-file'} is a file"),
        "run_dir under /proc": ({"run_dir": "/proc/gkd-run"}, "run_dir: cannot create /proc/gkd-run: "),
        "run_dir under /sys": ({"run_dir": "/sys/gkd-run/x"}, "run_dir: cannot create /sys/gkd-run/x: "),
        "export dir under a file": ({"run_dir": str(root / "ok-run"), "export": {"dir": str(root / "a-file" / "out")}},
                                    f"export.dir: {root / 'a-file' / 'out'} cannot be a directory: "
                                    f"{root / 'a-file'} is a file"),
        "export dir under /proc": ({"run_dir": str(root / "ok-run2"), "export": {"dir": "/proc/self/gkd-export"}},
                                   "export.dir: /proc/self is not writable: "),
    }


def test_unwritable_places_fail_before_training_with_one_line(workspace, registry):
    cases = unwritable_cases(workspace)
    for name, (changes, expected) in cases.items():
        run_dir, others = changes["run_dir"], {k: v for k, v in changes.items() if k != "run_dir"}
        config = write_config(workspace, "bad", run_dir, **others)
        started = time.monotonic()
        result = CliRunner().invoke(cli, ["distill", str(config), "--no-progress"])
        assert result.exit_code == 2, (name, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and errors[0].startswith(f"Error: {expected}"), (name, result.output)
        assert "Traceback" not in result.output, name
        assert time.monotonic() - started < 30, name
        assert not (Path(run_dir) / "metrics.jsonl").exists() and not (Path(run_dir) / "checkpoints").exists(), name
    assert (workspace / "a-file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any mode bits")
def test_read_only_run_dir_is_one_line(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(RunDirError, match=rf"^run_dir: {locked} is not writable: Permission denied$"):
            probe_dir(locked, "run_dir", create=True)
        with pytest.raises(RunDirError, match=rf"^run_dir: cannot create {locked / 'sub'}: Permission denied$"):
            probe_dir(locked / "sub", "run_dir", create=True)
    finally:
        locked.chmod(0o700)


def test_probe_leaves_nothing_behind(tmp_path):
    probe_dir(tmp_path / "run", "run_dir", create=True)
    probe_dir(tmp_path / "export" / "deep", "export.dir", create=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and not any((tmp_path / "run").iterdir())


def test_empty_run_dir_is_refused(workspace, registry):
    config = write_config(workspace, "empty", "")
    result = CliRunner().invoke(cli, ["distill", str(config), "--no-progress"])
    assert result.exit_code == 2 and "run_dir" in result.output and "Traceback" not in result.output, result.output
    assert not (Path.cwd() / "metrics.jsonl").exists()


def test_full_disk_at_a_checkpoint_keeps_the_previous_one(workspace, registry, monkeypatch):
    """The writer fails with ENOSPC at the second checkpoint: one line naming the cause, the first
    checkpoint stays the latest and loads, no temporary directory is left."""
    import gkd.engine.checkpoint as ckpt

    real = ckpt.write_safetensors
    calls = {"n": 0}

    def full(path, *args, **kwargs):
        if path.name == "model.safetensors":
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "write_safetensors", full)
    run_dir = workspace / "full-disk"
    with pytest.raises(GkdError) as info:
        train(write_config(workspace, "full-disk", str(run_dir)), registry)
    assert str(info.value) == (f"checkpoint at global step 2: cannot write under {run_dir / 'checkpoints'}: "
                               "No space left on device; the previous checkpoint is kept")
    assert find_latest(run_dir) == run_dir / "checkpoints" / "step-00000001"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-00000001"]
    assert not (run_dir / "export").exists()


def test_write_failure_reads_os_and_safetensors_errors():
    assert write_failure(OSError(errno.ENOSPC, "x")) == "No space left on device"
    try:
        try:
            raise OSError(errno.EROFS, "ro")
        except OSError as inner:
            raise RuntimeError("while saving") from inner
    except RuntimeError as outer:
        assert write_failure(outer) == "Read-only file system"
    SafetensorError = type("SafetensorError", (Exception,), {})
    assert write_failure(SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                         "message: \"No space left on device\" }) (os error 28)")) is not None
    assert write_failure(ValueError("shape")) is None


# ------------------------------------------------------------------------------------------- one writer

def test_lock_is_exclusive_and_released_by_a_killed_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(RunDirError, match=rf"^run_dir: {tmp_path} is in use by another gkd run "
                                              rf"\(pid {holder.pid} on [^)]+\); wait for it to end"):
            with lock_run_dir(tmp_path):
                pass
        assert time.monotonic() - started < 1.0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with lock_run_dir(tmp_path) as path:  # the kernel dropped the dead holder's lock
        assert path == tmp_path / LOCK_FILE and path.read_text().split()[0] == str(os.getpid())
    with lock_run_dir(tmp_path):  # and this process released its own on leaving
        pass


def test_second_distill_on_a_busy_run_dir_fails_at_once(workspace, registry):
    """Two ``gkd distill`` on one run directory: the second exits 2 naming the first's pid while the
    first trains; after a SIGKILL of the holder the next run resumes (the lock is not stuck)."""
    run_dir = workspace / "shared"
    # Far more steps than the test lets it run: the holder must still be training when it is killed,
    # however fast the machine (400 steps once finished within the 7.5 s the second run took on CI).
    long = write_config(workspace, "shared", str(run_dir), steps=1_000_000, checkpoint={"every_steps": 50, "keep_last": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([GKD, "distill", str(long)], cwd=workspace, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        started = time.monotonic()
        second = subprocess.run([GKD, "distill", str(long)], cwd=workspace, env=env, capture_output=True, text=True,
                                timeout=120)
        refused_after = time.monotonic() - started
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines()[-1].startswith(
            f"Error: run_dir: {run_dir} is in use by another gkd run (pid {first.pid} on "), second.stderr
        assert "Traceback" not in second.stderr and first.poll() is None
        print(f"second run refused {refused_after:.1f} s after its start (interpreter and imports included)")
        first.send_signal(signal.SIGKILL)  # the holder dies mid-run, holding the lock
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    latest = find_latest(run_dir)
    resume_at = int(latest.name.split("-")[1]) if latest is not None else 0
    assert resume_at < 1_000_000
    with pytest.raises(TrainingInterrupted):  # the same command again: resumes, the dead holder's lock is gone
        Trainer(load_run_config(long, registry=registry), registry, progress=False, stop_after=resume_at + 2,
                echo=lambda _: None).execute()
    steps = [json.loads(x)["global_step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == list(range(1, resume_at + 3))
