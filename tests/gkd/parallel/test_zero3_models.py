"""ZeRO-3 trains every head layout of gkd's models as ZeRO 0 does: tied output embeddings
(encoder MLM, decoder LM) and MobileBERT's assembled decoder read parameters outside their own
sub-module, which ZeRO-3 must be told to gather (``GkdModel.external_parameters``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from gkd import parallel
from gkd.config.run import OptimizerConfig, ZeroConfig
from gkd.engine.loop import Trainable
from gkd.models import ModelConfig, build_model
from gkd.parallel.fullstate import gather_module
from gkd.parallel.zero import deepspeed_config, initialize_engine
from gkd.testing import tiny_config

MOBILEBERT = dict(family="encoder", variant="mobilebert", vocab_size=100, hidden_size=32, embedding_size=8,
                  intra_bottleneck_size=16, num_layers=2, num_attention_heads=4, ffn_hidden_size=24,
                  num_feedforward_networks=2, max_position_embeddings=32, hidden_act="relu", hidden_dropout=0.0,
                  attention_dropout=0.0, head="mlm")
CONFIGS = {
    "decoder-lm-tied": lambda: tiny_config("decoder", head="lm", tie_word_embeddings=True),
    "encoder-mlm-tied": lambda: tiny_config("encoder", head="mlm", tie_word_embeddings=True),
    "mobilebert-mlm": lambda: ModelConfig(**MOBILEBERT),
}


def _train(cfg: ModelConfig, stage: int, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    student = build_model(cfg, seed=0).train()
    ds = deepspeed_config(micro_batch=2, grad_accum=1, max_grad_norm=1.0, precision="fp32",
                          zero=ZeroConfig(stage=stage), data_parallel=1)
    engine, _, _ = initialize_engine(Trainable(student, nn.ModuleDict()), OptimizerConfig(lr=1e-2),
                                     lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), ds)
    ids = torch.randint(5, 90, (2, 8), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        logits = student(ids, attention_mask=torch.ones_like(ids)).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    # The checkpoint's gather: whole tensors (DeepSpeed's fp32 masters) under ZeRO-3.
    return losses, gather_module(student, keep=True, partitioned=stage > 0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_zero3_trains_models_whose_heads_read_other_modules_parameters(name: str) -> None:
    parallel.ensure_initialized(1)
    cfg = CONFIGS[name]()
    ref_losses, ref_weights = _train(cfg, 0)
    losses, weights = _train(cfg, 3)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    assert ref_losses[-1] < ref_losses[0]  # the steps trained
    assert weights.keys() == ref_weights.keys()
    worst: dict[str, Any] = {k: float((weights[k] - ref_weights[k]).abs().max()) for k in ref_weights}
    assert max(worst.values()) <= 2e-5, worst  # Adam steps of 1e-2; reduction order differs
