"""Memory and time of KD's prediction-layer losses at TP=2: gathered logits vs vocabulary shards.

One 2-process gloo job (TP=2, :func:`gkd.parallel.run_distributed`). Every rank holds its shard
``[b, s, V/2]`` (fp32) of a student's and a teacher's LM logits and computes KD's terms — soft
loss ``τ²·KL`` at τ=2 over the real tokens plus the hard cross-entropy — in two ways:

* **gathered** (what every method got before ``logits.vocab_shard``): megatron's all-gather to
  ``[b, s, V]`` on every rank, then :func:`gkd.methods.losses.soft_loss` and ``task_loss``;
* **sharded**: :func:`gkd.methods.losses.vocab_parallel_soft_loss` and ``vocab_parallel_task_loss``
  on the local shards (three small all-reduces per loss, no ``[b, s, V]`` tensor).

Memory (shape ``--mem-batch × --mem-seq × --vocab``): the bytes autograd keeps for the backward
(distinct storages seen by ``saved_tensors_hooks``) and the rise of the process's peak resident
memory (``ru_maxrss``; the sharded path runs first, so the gathered path's figure is its own
peak above the same baseline). Time (``--batch × --seq × --vocab-small``): median of forward +
backward over ``--reps`` alternating repetitions.

    python benchmarks/vocab_parallel.py [--mem-batch 2] [--mem-seq 512] [--vocab 32000]
                                        [--batch 4] [--seq 128] [--vocab-small 8000] [--reps 20]

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

T = 2.0


def _inputs(b: int, s: int, vocab: int, seed: int) -> tuple[torch.Tensor, ...]:
    from gkd import parallel

    tp, rank = parallel.tp_world_size(), parallel.tp_rank()
    g = torch.Generator().manual_seed(seed)
    width = -(-vocab // tp)
    student, teacher = (torch.randn(b, s, width * tp, generator=g)[..., rank * width:(rank + 1) * width]
                        .contiguous() for _ in range(2))
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s // 2:] = 0
    labels = torch.randint(0, vocab, (b, s), generator=g).masked_fill(mask == 0, -100)
    return student, teacher, mask, labels


def _gathered(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
              vocab: int) -> torch.Tensor:
    from megatron.core import tensor_parallel

    from gkd.methods import losses

    full_s = tensor_parallel.gather_from_tensor_model_parallel_region(student)[..., :vocab]
    full_t = tensor_parallel.gather_from_tensor_model_parallel_region(teacher)[..., :vocab]
    return losses.soft_loss("kl", full_s, full_t, T, mask) + losses.task_loss(full_s, labels)


def _sharded(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
             vocab: int) -> torch.Tensor:
    from gkd.methods import losses

    return (losses.vocab_parallel_soft_loss("kl", student, teacher, vocab, T, mask)
            + losses.vocab_parallel_task_loss(student, labels, vocab))


PATHS: dict[str, Callable[..., torch.Tensor]] = {"sharded": _sharded, "gathered": _gathered}


def _saved_bytes(fn: Callable[..., torch.Tensor], student: torch.Tensor, *rest: Any) -> tuple[int, float]:
    """(bytes of distinct storages saved for the backward, loss value)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    leaf = student.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(leaf, *rest)
    loss.backward()
    storages.pop(leaf.untyped_storage().data_ptr(), None)  # the input shard itself is not extra
    return sum(storages.values()), float(loss.detach())


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(cfg: dict[str, int]) -> dict[str, Any]:
    from gkd import parallel

    out: dict[str, Any] = {"rank": parallel.tp_rank(), "tp": parallel.tp_world_size()}
    vocab = cfg["vocab"]
    inputs = _inputs(cfg["mem_batch"], cfg["mem_seq"], vocab, seed=0)
    base = _rss_mib()
    for name in ("sharded", "gathered"):  # the smaller peak first: ru_maxrss only grows
        saved, loss = _saved_bytes(PATHS[name], *inputs, vocab)
        out[name] = {"saved_bytes": saved, "loss": loss, "peak_rss_rise_mib": _rss_mib() - base}
    small = _inputs(cfg["batch"], cfg["seq"], cfg["vocab_small"], seed=1)
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    for rep in range(cfg["reps"] + 2):
        for name in (("sharded", "gathered") if rep % 2 else ("gathered", "sharded")):
            leaf = small[0].clone().requires_grad_()
            parallel.barrier()
            start = time.perf_counter()
            PATHS[name](leaf, *small[1:], cfg["vocab_small"]).backward()
            if rep >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        out[name]["step_ms"] = 1000 * statistics.median(ts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mem-batch", type=int, default=2)
    ap.add_argument("--mem-seq", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab-small", type=int, default=8000)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    from gkd import parallel

    cfg = {k: int(v) for k, v in vars(args).items()}
    results = parallel.run_distributed(worker, 2, cfg, tp=2, timeout_s=1200)
    full_mib = args.mem_batch * args.mem_seq * args.vocab * 4 / 2**20
    print(json.dumps({"config": cfg, "full_logits_mib": full_mib, "ranks": results}, indent=1))
    for r in results:
        g, s = r["gathered"], r["sharded"]
        print(f"rank {r['rank']}: saved for backward {g['saved_bytes'] / 2**20:.1f} MiB gathered vs "
              f"{s['saved_bytes'] / 2**20:.1f} MiB sharded; peak RSS rise {g['peak_rss_rise_mib']:.0f} vs "
              f"{s['peak_rss_rise_mib']:.0f} MiB; loss {g['loss']:.6f} vs {s['loss']:.6f}; "
              f"time {g['step_ms']:.2f} vs {s['step_ms']:.2f} ms "
              f"({args.batch}x{args.seq}x{args.vocab_small})")


if __name__ == "__main__":
    main()
