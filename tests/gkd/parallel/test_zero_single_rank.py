"""On one data-parallel rank without ZeRO, gkd replaces DeepSpeed's gradient reduction (flatten,
all-reduce over one process, copy back) with its only effect there; training must not change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gkd.parallel.zero as zero
from gkd import parallel
from gkd.config.run import OptimizerConfig, ZeroConfig
from gkd.engine.loop import Trainable
from gkd.models import build_model
from gkd.testing import tiny_config


def _train(*, grad_accum: int, precision_stage: int = 0) -> tuple[object, torch.Tensor, dict[str, torch.Tensor]]:
    student = build_model(tiny_config("encoder", head="classification", num_labels=3), seed=0).train()
    # A method's parameter that takes no part in the steps: it must still get a (zero) gradient,
    # so that AdamW's weight decay moves it as DeepSpeed's own reduction would.
    torch.manual_seed(0)
    auxiliary = nn.ModuleDict({"unused": nn.Linear(4, 4)})
    module = Trainable(student, auxiliary)
    unused_before = auxiliary["unused"].weight.detach().clone()
    ds = zero.deepspeed_config(micro_batch=2, grad_accum=grad_accum, max_grad_norm=1.0, precision="fp32",
                               zero=ZeroConfig(stage=precision_stage), data_parallel=1)
    engine, _, _ = zero.initialize_engine(module, OptimizerConfig(lr=1e-2, weight_decay=0.1),
                                          lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), ds)
    g = torch.Generator().manual_seed(0)
    for _ in range(3 * grad_accum):
        ids = torch.randint(5, 90, (2, 8), generator=g)
        logits = student(ids, attention_mask=torch.ones_like(ids)).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 2]))
        engine.backward(loss)
        engine.step()
    return engine, unused_before, {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_single_rank_training_is_bitwise_deepspeeds_own(monkeypatch: pytest.MonkeyPatch, grad_accum: int) -> None:
    parallel.ensure_initialized(1)
    engine, unused_before, ours = _train(grad_accum=grad_accum)
    assert engine.allreduce_gradients.__name__ == "reduce_gradients"  # gkd's replacement is in place
    with monkeypatch.context() as patch:
        patch.setattr(zero, "_skip_single_rank_reduction", lambda engine, module: None)
        stock_engine, _, stock = _train(grad_accum=grad_accum)
    assert stock_engine.allreduce_gradients.__name__ != "reduce_gradients"  # DeepSpeed's own (wrapped) method
    assert ours.keys() == stock.keys()
    assert all(torch.equal(ours[k], stock[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], stock[k])]
    # The unused parameter got zero gradients, and AdamW's weight decay moved it (lr 1e-2, decay 0.1).
    moved = ours["auxiliary.unused.weight"]
    assert torch.allclose(moved, unused_before * (1 - 1e-3) ** 3, rtol=1e-6) and not torch.equal(moved, unused_before)


def test_zero_stages_keep_deepspeeds_reduction() -> None:
    parallel.ensure_initialized(1)
    engine, _, _ = _train(grad_accum=1, precision_stage=1)
    assert engine.allreduce_gradients.__name__ != "reduce_gradients"
