"""``kill -9`` at any moment: real ``gkd distill`` subprocesses killed with SIGKILL, then the same
command again. The final student must be bitwise equal to an uninterrupted run's, and a resumed run
must only ever continue from a checkpoint that was complete and intact when its writer died."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gkd.engine.checkpoint import CHECKPOINTS, list_checkpoints, verify_checkpoint
from gkd.engine.serialize import CheckpointError
from gkd.models import ModelConfig, build_model, export_hf

TEXTS = {
    "grain": ["wheat and corn exports fell", "grain harvest was large this year", "corn prices rose on demand"],
    "oil": ["crude oil prices climbed", "oil inventories dropped sharply", "the refinery raised oil output"],
    "money": ["the central bank cut rates", "interest rates were left unchanged", "the dollar rose against the yen"],
}
STAGE_STEPS = (5, 5)
"""Two stages; checkpoints every 2 global steps and at each stage's end: 2, 4, 5, 6, 8, 10."""
GKD = Path(sys.executable).parent / "gkd"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
"""Same thread count in every process: bitwise equality across processes needs the same reductions."""
_RESUMED = re.compile(r"resuming from (\S+) \(global step (\d+)\)")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A tiny random BERT teacher (dropout on, so resuming depends on every RNG stream) and its data."""
    root = tmp_path_factory.mktemp("kill")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=4, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=3)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=minilm_dir)
    rows = [{"text": t, "label": label} for label, texts in TEXTS.items() for t in texts] * 4
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:9]) + "\n")
    return root


def write_config(root: Path, name: str) -> Path:
    cfg = {
        "name": "kill", "run_dir": str(root / name), "seed": 7,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "test.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}},
        "stages": [
            {"name": "tinybert", "steps": STAGE_STEPS[0],
             "methods": [{"name": "tinybert", "config": {"layer_mapping": "random", "random_every_steps": 2}}]},
            {"name": "kd", "steps": STAGE_STEPS[1], "methods": [{"name": "kd", "config": {"temperature": 2.0}}]},
        ],
        "training": {"batch_size": 4, "eval_batch_size": 8},
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "logging": {"progress": False},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def distill(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([str(GKD), "distill", str(config), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "export" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(workspace: Path) -> dict[str, torch.Tensor]:
    """The exported student of one uninterrupted run (shared by every test of the module)."""
    proc = distill(write_config(workspace, "reference"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return final_weights(workspace / "reference")


# ---------------------------------------------------------------------------------------- moments


@dataclass(frozen=True)
class Moment:
    """When to send SIGKILL: as soon as ``seen(run_dir, pid, started_ns)`` holds, plus ``delay_s``
    (only what the process ``pid`` itself writes counts: a killed run's leftovers are still there)."""

    name: str
    seen: Callable[[Path, int, int], bool]
    delay_s: float = 0.0


def _entries(path: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(path)]
    except OSError:
        return []


def writing(step: int) -> Moment:
    """While the checkpoint of ``step`` is being written (the process's temporary directory exists)."""
    return Moment(f"writing the checkpoint of step {step}",
                  lambda d, pid, _: f"step-{step:08d}.tmp-{pid}" in _entries(d / CHECKPOINTS))


def written(step: int, delay_s: float = 0.0) -> Moment:
    """Right after the checkpoint of ``step`` got its final name (plus ``delay_s``: mid-stage)."""
    name = f"step-{step:08d}"
    return Moment(f"{delay_s * 1e3:.0f} ms after the checkpoint of step {step}",
                  lambda d, pid, _: name in _entries(d / CHECKPOINTS), delay_s)


def exporting() -> Moment:
    """While the student is exported (its weights being written, or just written, by this process; a
    run may probe the export directory with other files at its start)."""
    names = ("model.safetensors", ".model.safetensors.tmp-")

    def seen(run_dir: Path, pid: int, started_ns: int) -> bool:
        try:
            return any(e.name.startswith(names) and e.stat().st_mtime_ns >= started_ns
                       for e in os.scandir(run_dir / "export"))
        except OSError:
            return False
    return Moment("during the export", seen)


def intact_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints that verify (sha256 of every file), oldest first."""
    good = []
    for step, path in list_checkpoints(run_dir):
        try:
            verify_checkpoint(path)
        except CheckpointError:
            continue
        good.append(step)
    return good


def check_resumed_from(output: str, expected: int | None) -> None:
    """The run resumed from the newest checkpoint that was intact when it started, and from no other."""
    found = _RESUMED.findall(output)
    steps = [int(step) for _, step in found]
    assert steps == ([expected] if expected is not None else []), \
        f"expected to resume from step {expected}, got {steps}:\n{output}"


def kill_at(config: Path, moment: Moment, run_dir: Path) -> None:
    """Start the run, SIGKILL it at ``moment``; it must have resumed from the newest intact checkpoint."""
    good = intact_checkpoints(run_dir)
    started = time.time_ns()  # the killed runs' files are all older
    proc = distill(config)
    while proc.poll() is None and not moment.seen(run_dir, proc.pid, started):
        time.sleep(0.0005)
    if proc.poll() is not None:
        out = proc.stdout.read() if proc.stdout else ""
        raise AssertionError(f"the run ended (exit {proc.returncode}) before the moment '{moment.name}':\n{out}")
    if moment.delay_s:
        time.sleep(moment.delay_s)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    check_resumed_from(out, good[-1] if good else None)


def max_difference(reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    assert reference.keys() == got.keys()
    return max(float((reference[k].double() - got[k].double()).abs().max()) for k in reference)


def survive(workspace: Path, name: str, kills: int, choose: Callable[[int, int], Moment],
            reference: dict[str, torch.Tensor]) -> list[str]:
    """Kill one run ``kills`` times at ``choose(i, newest intact step)`` (each time the same command
    again), then let it finish: its student must equal the reference bitwise, and no incomplete
    checkpoint directory may be left. Returns the moments' names."""
    config = write_config(workspace, name)
    run_dir = workspace / name
    names = []
    for i in range(kills):
        good = intact_checkpoints(run_dir)
        moment = choose(i, good[-1] if good else 0)
        kill_at(config, moment, run_dir)
        names.append(moment.name)
        print(f"kill {i + 1}: {moment.name}; intact checkpoints then: {intact_checkpoints(run_dir)}")
    good = intact_checkpoints(run_dir)
    proc = distill(config)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    check_resumed_from(out, good[-1] if good else None)
    left = [n for n in _entries(run_dir / CHECKPOINTS) if not re.match(r"^(step-\d{8}|latest)$", n)]
    assert not left, f"incomplete checkpoint directories left: {left}"
    worst = max_difference(reference, final_weights(run_dir))
    assert worst == 0.0 and all(torch.equal(reference[k], v) for k, v in final_weights(run_dir).items()), \
        f"after kills at {names}: the student differs by up to {worst:g}"
    return names


def test_kill_at_five_moments_resumes_bitwise(workspace: Path, reference: dict[str, torch.Tensor]) -> None:
    """One run killed five times: during the first checkpoint write (nothing complete yet), mid-stage,
    right after the first stage's last checkpoint, during a checkpoint write of the second stage, and
    during the export."""
    moments = [writing(2), written(2, 0.04), written(STAGE_STEPS[0]), writing(8), exporting()]
    names = survive(workspace, "five", len(moments), lambda i, _: moments[i], reference)
    assert len(names) == 5


@pytest.mark.slow
def test_kill_at_twenty_random_moments_resumes_bitwise(workspace: Path, reference: dict[str, torch.Tensor]) -> None:
    """Twenty kills at moments drawn at random (seed printed; GKD_KILL_SEED repeats one), five in each
    of four runs: a checkpoint being written, or 0-80 ms after one was (mid-stage), or the export."""
    seed = int(os.environ.get("GKD_KILL_SEED", random.randrange(2**32)))
    print(f"GKD_KILL_SEED={seed}")
    rng = random.Random(seed)
    total = sum(STAGE_STEPS)
    saves = sorted(set(range(2, total + 1, 2)) | {STAGE_STEPS[0], total})

    def choose(_: int, newest: int) -> Moment:
        later = [s for s in saves if s > newest]
        if not later or rng.random() < 0.1:
            return exporting()
        step = rng.choice(later[:3])
        return writing(step) if rng.random() < 0.4 else written(step, rng.choice([0.0, rng.uniform(0, 0.08)]))

    for round_ in range(4):  # five kills per run: spread over the whole run, not piled up at its end
        survive(workspace, f"random-{seed}-{round_}", 5, choose, reference)


def test_resume_restores_the_writers_cpu_thread_count(tmp_path: Path) -> None:
    """CPU kernels split reductions by thread count, so a run resumed with another OMP_NUM_THREADS
    would not be bitwise: the count is saved with the RNG streams and restored with them."""
    from gkd.engine.checkpoint import CheckpointState, load_checkpoint, save_checkpoint

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        path = save_checkpoint(tmp_path, CheckpointState(global_step=1), model={"w": torch.ones(2)})
        torch.set_num_threads(2)
        load_checkpoint(path, restore_rng=True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
