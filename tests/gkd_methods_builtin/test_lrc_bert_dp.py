"""LRC-BERT under data parallelism: with the negatives gathered over two DP ranks (gloo, TP=1),
the mean over ranks of the step's loss and terms, and the ranks' averaged gradients (what
DDP/DeepSpeed apply), equal one process's step on the concatenated batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gkd import parallel
from gkd.testing import build_method, run_step, tiny_batch, tiny_models

pytestmark = pytest.mark.distributed

CONFIGS = {
    "plain": {"perturb": False, "soft_weight": 1.0, "hard_weight": 1.0},
    # Per-example normalisation keeps the perturbation independent of the batch's split.
    "perturbed": {"perturb": True, "perturb_norm": "example", "epsilon": 0.5},
}
TOL = 1e-5


def _full_batch() -> dict[str, torch.Tensor]:
    batch = tiny_batch("encoder", batch=4, seq=9, generator=torch.Generator().manual_seed(3))
    batch["attention_mask"][1, 6:] = 0  # rank 0: lengths 9, 6
    batch["attention_mask"][2, 5:] = 0  # rank 1: lengths 5, 6 (its own batch is cut to 6 positions)
    batch["attention_mask"][3, 6:] = 0
    batch["input_ids"] = batch["input_ids"] * batch["attention_mask"]
    return batch


def _rank_batch(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """This rank's two examples, right-padded to their own longest one as the data loader does."""
    rows = slice(2 * rank, 2 * rank + 2)
    length = int(batch["attention_mask"][rows].sum(-1).max())
    return {k: v[rows, :length] if v.dim() == 2 else v[rows] for k, v in batch.items()}


def _step(config: dict[str, Any], batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    models = tiny_models("encoder", student_hidden_size=16)
    method = build_method("lrc-bert", config, models=models, seed=0)
    result = run_step(method, models, batch)
    result.loss.backward()
    grads = {n: p.grad for n, p in models["student"].named_parameters() if p.grad is not None}
    grads |= {f"lrc-bert.{n}": p.grad for n, p in method.named_parameters()}
    return {"loss": result.loss.detach(), "terms": {k: v.detach() for k, v in result.terms.items()}, "grads": grads}


def dp_worker() -> dict[str, Any]:
    """Module level: the launcher imports it. Returns, per config, the single-process reference on
    the whole batch (computed on every rank, gather_dp off), this rank's step with gather_dp on, and
    this rank's loss without it."""
    import torch.distributed as dist

    rank, full = parallel.dp_rank(), _full_batch()
    out: dict[str, Any] = {"dp": parallel.dp_world_size(), "tp": parallel.tp_world_size()}
    for name, config in CONFIGS.items():
        reference = _step(config | {"gather_dp": False}, full)
        local = _step(config, _rank_batch(full, rank))
        for g in local["grads"].values():  # the data-parallel average of the gradients
            dist.all_reduce(g)
            g /= dist.get_world_size()
        alone = _step(config | {"gather_dp": False}, _rank_batch(full, rank))
        out[name] = {"reference": reference, "local": local, "alone": alone["loss"]}
    return out


def test_gathered_negatives_give_the_single_process_step():
    ranks = parallel.run_distributed(dp_worker, 2, tp=1, timeout_s=240)
    assert [(r["dp"], r["tp"]) for r in ranks] == [(2, 1), (2, 1)]
    for name in CONFIGS:
        ref = ranks[0][name]["reference"]
        mean_loss = sum(r[name]["local"]["loss"] for r in ranks) / 2
        assert abs(mean_loss.item() - ref["loss"].item()) <= TOL * max(1.0, abs(ref["loss"].item())), name
        for term, value in ref["terms"].items():
            mean = sum(r[name]["local"]["terms"][term] for r in ranks) / 2
            assert abs(mean.item() - value.item()) <= TOL * max(1.0, abs(value.item())), (name, term)
        for r in ranks:
            got = r[name]["local"]["grads"]
            assert got.keys() == ref["grads"].keys() and "lrc-bert.proj.weight" in got
            for param, g in ref["grads"].items():
                diff = (got[param] - g).abs().max().item()
                assert diff <= TOL * max(1.0, g.abs().max().item()), f"{name} {param}: {diff}"
        # Without the gather each rank contrasts against its own two examples only: another loss.
        alone = sum(r[name]["alone"] for r in ranks) / 2
        assert abs(alone.item() - ref["loss"].item()) > 1e-3, name
