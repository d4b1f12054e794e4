"""Where a distillation step's time goes: gkd's engine against a hand loop, and the trainer's extras.

Two profiles of the ``step_suite.py`` configurations (same models, batches and losses):

``ops`` (torch.profiler): ``hand-gkd`` and ``gkd-step`` in one process, alternating rounds; per
step, the wall time under the profiler, the time inside ATen operators (the math, forward and
backward), the rest (Python: the engine, autograd's bookkeeping, the optimizer's loop), and the
operators whose time differs most between the two loops.

``trainer`` (cProfile): ``gkd distill`` on the ``gkd-trainer`` run config in a subprocess, and
``gkd-step`` with a plain AdamW in another, and ``gkd distill`` once more with DeepSpeed's own
gradient reduction on one data-parallel rank (which gkd replaces, see ``gkd.parallel.zero``); per
step, the cumulative time in the step (``distill_step``), autograd's backward, DeepSpeed's backward
around it, the optimizer step, DeepSpeed's step around it, the data iterator and the metrics line.

    python benchmarks/step_profile.py ops --config bert-kd-hidden --rounds 3 --steps 4
    python benchmarks/step_profile.py trainer --config bert-kd-hidden --steps 12

Not part of the test suite; each part prints a Markdown table.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import step_suite as suite
import torch
from scratch import scratch_dir
from torch.profiler import ProfilerActivity, profile

# (label, path suffix of the function's file, function name): cumulative time per step.
TRAINER_PARTS = (
    ("distill_step (forward + loss)", "gkd/engine/step.py", "distill_step"),
    ("autograd backward", "torch/autograd/__init__.py", "backward"),
    ("DeepSpeed backward (all)", "deepspeed/runtime/engine.py", "backward"),
    ("optimizer step (AdamW)", "torch/optim/optimizer.py", "wrapper"),
    ("DeepSpeed step (all)", "deepspeed/runtime/engine.py", "step"),
    ("next batch", "gkd/engine/data.py", "__next__"),
    ("metrics line", "gkd/engine/metrics.py", "log_train"),
)


def ops_part(pair: suite.Pair, rounds: int, steps: int) -> None:
    data = suite.batches(pair, suite.WARMUP + steps)
    loops = {name: suite.IN_PROCESS[name](pair) for name in ("hand-gkd", "gkd-step")}
    for loop in loops.values():
        loop.run(data[:suite.WARMUP])
    wall: dict[str, list[float]] = defaultdict(list)
    op_time: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in loops}
    names = list(loops)
    for r in range(rounds):
        for name in names[r % 2:] + names[:r % 2]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                times = loops[name].run(data[suite.WARMUP:])
            wall[name].append(sum(times) / len(times))
            per_op: dict[str, float] = defaultdict(float)
            for event in prof.key_averages():
                per_op[event.key] += event.self_cpu_time_total / 1e6 / len(times)
            for key, seconds in per_op.items():
                op_time[name][key].append(seconds)
    ms = {name: {k: statistics.median(v) * 1000 for k, v in op_time[name].items()} for name in names}
    total = {name: sum(v for k, v in ms[name].items() if k.startswith("aten::")) for name in names}
    steps_ms = {name: statistics.median(wall[name]) * 1000 for name in names}
    suite.header(f"ops: {pair.name}")
    print(f"torch.profiler (CPU), {rounds} alternating rounds of {steps} steps after {suite.WARMUP} warm-up steps; "
          f"medians per step\n")
    print("| loop | step (under the profiler) | in ATen operators | outside them (Python, autograd, optimizer loop) |")
    print("|---|---|---|---|")
    for name in names:
        print(f"| {name} | {steps_ms[name]:.0f} ms | {total[name]:.0f} ms | {steps_ms[name] - total[name]:.0f} ms |")
    keys = set(ms["hand-gkd"]) | set(ms["gkd-step"])
    diffs = sorted(keys, key=lambda k: -abs(ms["gkd-step"].get(k, 0) - ms["hand-gkd"].get(k, 0)))[:12]
    print("\n| operator (self time per step) | hand-gkd | gkd-step | difference |")
    print("|---|---|---|---|")
    for key in diffs:
        a, b = ms["hand-gkd"].get(key, 0.0), ms["gkd-step"].get(key, 0.0)
        print(f"| `{key}` | {a:.2f} ms | {b:.2f} ms | {b - a:+.2f} ms |")


def _cumulative(stats: pstats.Stats, suffix: str, function: str) -> float:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    return sum(ct for (path, _, name), (_, _, _, ct, _) in raw.items()
               if name == function and path.replace("\\", "/").endswith(suffix))


def _profiled(run: Callable[[], list[float]]) -> dict[str, Any]:
    """``run()`` (returning its step times) under cProfile: per step, the whole step and each of
    ``TRAINER_PARTS``."""
    profiler = cProfile.Profile()
    profiler.enable()
    times = run()
    profiler.disable()
    stats = pstats.Stats(profiler)
    parts = {label: _cumulative(stats, suffix, name) / len(times) for label, suffix, name in TRAINER_PARTS}
    return {"step": sum(times) / len(times), "parts": parts}


def trainer_child(pair: suite.Pair, workdir: Path, steps: int, stock_reduction: bool) -> dict[str, Any]:
    import gkd
    import gkd.parallel.zero

    if stock_reduction:  # DeepSpeed's own gradient reduction, also on one data-parallel rank
        gkd.parallel.zero._skip_single_rank_reduction = lambda engine, module: None  # type: ignore[assignment]
    clock = suite.StepClock()
    config = suite.trainer_config(pair, workdir, steps - suite.WARMUP)

    def run() -> list[float]:
        gkd.distill(config, callbacks=[clock], progress=False, echo=None)
        return clock.times

    return _profiled(run)


def step_child(pair: suite.Pair, steps: int) -> dict[str, Any]:
    loop = suite.GkdStep(pair)
    data = suite.batches(pair, steps)
    return _profiled(lambda: loop.run(data))


def trainer_part(pair: suite.Pair, steps: int) -> None:
    workdir = scratch_dir("gkd-step-profile-")
    suite.prepare_trainer(pair, workdir, steps - suite.WARMUP)
    common = ["--pair", suite.pair_json(pair), "--steps", str(steps)]
    trainer = ["_trainer", *common, "--workdir", str(workdir)]
    script = Path(__file__)
    rows = {"gkd-step + torch AdamW": suite.child(["_step", *common], script),
            "gkd distill (DeepSpeed engine)": suite.child(trainer, script),
            "gkd distill, DeepSpeed's own reduction on 1 rank": suite.child([*trainer, "--stock-reduction"], script)}
    suite.header(f"trainer: {pair.name}")
    print(f"cProfile, cumulative time per step over {steps} steps (warm-up included), each loop in its own "
          f"subprocess; cProfile's own cost inflates Python-heavy parts\n")
    print("| part | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    print("| whole step | " + " | ".join(f"{r['step'] * 1000:.0f} ms" for r in rows.values()) + " |")
    for label, _, _ in TRAINER_PARTS:
        print(f"| {label} | " + " | ".join(f"{r['parts'][label] * 1000:.1f} ms" for r in rows.values()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["ops", "trainer", "_trainer", "_step"])
    parser.add_argument("--config", choices=list(suite.CONFIGS), default="bert-kd-hidden")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="ops: 4 per round; trainer: 12")
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke test")
    parser.add_argument("--pair", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stock-reduction", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    pair = suite.pair_from_json(args.pair) if args.pair else suite.pair_of(args.config, args.quick)
    torch.manual_seed(0)
    if args.part == "ops":
        ops_part(pair, args.rounds, args.steps or 4)
    elif args.part == "trainer":
        trainer_part(pair, args.steps or 12)
    elif args.part == "_trainer":
        print(suite.RESULT + json.dumps(trainer_child(pair, args.workdir, args.steps, args.stock_reduction)), flush=True)
    else:
        print(suite.RESULT + json.dumps(step_child(pair, args.steps)), flush=True)


if __name__ == "__main__":
    main()
