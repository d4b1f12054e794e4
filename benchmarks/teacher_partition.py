"""Per-rank teacher memory and step time with and without ``teachers[].partition: data_parallel``.

One 2-process gloo job (DP=2, TP=1, :func:`gkd.parallel.run_distributed`). Every rank builds the
same random BERT-shaped teacher twice (default 8 layers × hidden 256, 4 heads, FFN 1024, a
30,522-token vocabulary and a 3-class head; ``--vocab`` changes the vocabulary), keeps one copy whole and partitions the other over
the two ranks, and trains a small student (2 layers × hidden 128) with KD through the engine's
``distill_step`` (student gradients all-reduced over the ranks, AdamW). Rounds alternate the two
teachers (resident first in even rounds, partitioned first in odd ones), so a busy spell of a
shared machine hits both; every figure is a median over the measured steps of all rounds (the
first step of each round is a warm-up and not counted).

Reported per rank: the teacher's parameter bytes held between forward passes, the most held
during one (measured by forward pre-hooks on every module of the teacher: distinct parameter
storages plus the resident slices), the step time and the teacher's forward time, and the KD
losses of the two teachers (equal).

    python benchmarks/teacher_partition.py [--layers 8] [--hidden 256] [--vocab 30522] [--rounds 6]
                                           [--steps 6] [--batch-size 8] [--seq 64] [--threads 1]

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any


def _parameter_bytes(model: Any) -> int:
    """Bytes of the distinct storages behind ``model``'s registered parameters (meta: none)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for p in model.parameters() if not p.is_meta and p.numel()}
    return sum(storages.values())


def worker(cfg: dict[str, int]) -> dict[str, Any]:
    """One rank of the job: both teachers, alternating rounds, medians."""
    import torch
    import torch.distributed as dist

    from gkd import parallel
    from gkd.engine.step import distill_step, step_context
    from gkd.methods.api import STUDENT, teacher_key
    from gkd.models import ModelConfig, build_model
    from gkd.parallel.teacher_partition import partition
    from gkd.testing import build_method, selected

    torch.set_num_threads(cfg["threads"])
    rank = dist.get_rank()
    hidden = cfg["hidden"]
    teacher_cfg = ModelConfig(family="encoder", vocab_size=cfg["vocab"], hidden_size=hidden, num_layers=cfg["layers"],
                              num_attention_heads=4, ffn_hidden_size=4 * hidden, max_position_embeddings=512,
                              head="classification", num_labels=3, hidden_dropout=0.0, attention_dropout=0.0)
    student_cfg = ModelConfig(family="encoder", vocab_size=cfg["vocab"], hidden_size=128, num_layers=2,
                              num_attention_heads=4, ffn_hidden_size=512, max_position_embeddings=512,
                              head="classification", num_labels=3, hidden_dropout=0.0, attention_dropout=0.0)
    resident = build_model(teacher_cfg, seed=1, device="cpu").eval().requires_grad_(False)
    partitioned = build_model(teacher_cfg, seed=1, device="cpu").eval().requires_grad_(False)
    full_bytes = _parameter_bytes(resident)
    part = partition(partitioned, torch.device("cpu"), label="teacher 't' (partition: data_parallel)")
    assert part is not None
    held: dict[str, list[int]] = {"resident": [], "partitioned": []}
    forward_seconds: dict[str, list[float]] = {"resident": [], "partitioned": []}
    for name, model in (("resident", resident), ("partitioned", partitioned)):
        extra = part.resident_bytes if model is partitioned else 0
        for module in model.modules():  # after the partition's hooks: they see the gathered unit
            module.register_forward_pre_hook(lambda *_, m=model, n=name, e=extra: held[n].append(_parameter_bytes(m) + e))
        started: list[float] = []
        model.register_forward_pre_hook(lambda *_, s=started: s.append(time.perf_counter()), prepend=True)
        model.register_forward_hook(lambda *_, s=started, n=name: forward_seconds[n].append(time.perf_counter() - s.pop()))

    students, methods, optimizers = {}, {}, {}
    for name, teacher in (("resident", resident), ("partitioned", partitioned)):
        student = build_model(student_cfg, seed=2, device="cpu").train()
        models = {STUDENT: student, teacher_key("t"): teacher}
        students[name] = models
        methods[name] = {"kd": selected(build_method("kd", {"temperature": 2.0}, models=models, teachers=["t"]))}
        optimizers[name] = torch.optim.AdamW(student.parameters(), lr=1e-4)

    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as data parallelism gives it
    batches = []
    for _ in range(cfg["steps"]):
        ids = torch.randint(5, cfg["vocab"], (cfg["batch_size"], cfg["seq"]), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
                        "labels": torch.randint(0, 3, (cfg["batch_size"],), generator=g)})

    step_seconds: dict[str, list[float]] = {"resident": [], "partitioned": []}
    losses: dict[str, list[float]] = {"resident": [], "partitioned": []}
    for r in range(cfg["rounds"]):
        order = ("resident", "partitioned") if r % 2 == 0 else ("partitioned", "resident")
        for name in order:
            models, selected, optimizer = students[name], methods[name], optimizers[name]
            for i, batch in enumerate(batches):
                dist.barrier()  # both ranks start the step together: the time is the step's, not a wait
                t0 = time.perf_counter()
                contexts = {"kd": step_context(0, "bench", 0, 0, i, cfg["steps"], "kd")}
                result = distill_step(models, selected, contexts, batch)
                result.loss.backward()
                for p in models[STUDENT].parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
                optimizer.step()
                optimizer.zero_grad()
                elapsed = time.perf_counter() - t0
                if i > 0:
                    step_seconds[name].append(elapsed)
                if r == 0:
                    losses[name].append(float(result.loss.detach()))
    return {
        "rank": rank, "full_bytes": full_bytes, "partitioned_resident_bytes": part.resident_bytes,
        "resident_peak_bytes": max(held["resident"]), "partitioned_peak_bytes": max(held["partitioned"]),
        "largest_unit_bytes": part.largest_gathered_bytes(), "units": len(part.units),
        "step_seconds": {k: statistics.median(v) for k, v in step_seconds.items()},
        "teacher_forward_seconds": {k: statistics.median(v) for k, v in forward_seconds.items()},
        "measured_steps": {k: len(v) for k, v in step_seconds.items()},
        "losses_equal": losses["resident"] == losses["partitioned"], "first_losses": losses["resident"][:3],
        "gathers_per_forward": part.gathers / max(part.forwards, 1), "parallel_dp": parallel.dp_world_size(),
    }


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=30522, help="vocabulary size (BERT's by default)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=6, help="steps per teacher per round (the first is a warm-up)")
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each rank")
    args = parser.parse_args()
    from gkd.parallel import run_distributed

    cfg = {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab, "rounds": args.rounds, "steps": args.steps,
           "batch_size": args.batch_size, "seq": args.seq, "threads": args.threads}
    started = time.perf_counter()
    results = run_distributed(worker, 2, cfg, tp=1, threads_per_rank=args.threads, timeout_s=3600)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, 2 gloo ranks (DP=2, TP=1), "
          f"{args.threads} thread(s) each; teacher {args.layers} layers × hidden {args.hidden}, vocab {args.vocab}; "
          f"{args.rounds} alternating rounds × {args.steps} steps, batch {args.batch_size} × {args.seq} tokens per rank; "
          f"{time.perf_counter() - started:.0f} s in all")
    for r in results:
        ratio = r["partitioned_resident_bytes"] / r["full_bytes"]
        slow = r["step_seconds"]["partitioned"] / r["step_seconds"]["resident"]
        fwd = r["teacher_forward_seconds"]["partitioned"] / r["teacher_forward_seconds"]["resident"]
        print(f"rank {r['rank']}: teacher bytes between forwards {mib(r['full_bytes'])} -> "
              f"{mib(r['partitioned_resident_bytes'])} ({ratio:.3f}x); peak in a forward {mib(r['resident_peak_bytes'])} "
              f"-> {mib(r['partitioned_peak_bytes'])} ({r['partitioned_peak_bytes'] / r['resident_peak_bytes']:.3f}x, "
              f"largest unit {mib(r['largest_unit_bytes'])}); step {r['step_seconds']['resident'] * 1e3:.1f} -> "
              f"{r['step_seconds']['partitioned'] * 1e3:.1f} ms ({slow:.2f}x); teacher forward "
              f"{r['teacher_forward_seconds']['resident'] * 1e3:.1f} -> "
              f"{r['teacher_forward_seconds']['partitioned'] * 1e3:.1f} ms ({fwd:.2f}x); "
              f"{r['gathers_per_forward']:.0f} all-gathers per forward; losses equal: {r['losses_equal']}")
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
