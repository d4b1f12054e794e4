"""KD under tensor parallelism with vocabulary heads: at TP=2 it reads ``logits.vocab_shard`` and
computes soft and hard terms with a distributed softmax — no rank gathers the ``[b, s, V]``
logits of the student or the teacher — and one step gives the loss, terms and student gradients
of TP=1 (which uses the gathered logits), for an encoder MLM and a decoder LM pair with an odd
vocabulary (one padding entry at TP=2), for every soft loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from gkd import parallel
from gkd.methods.api import STUDENT, teacher_key
from gkd.models import build_model, export_hf, from_pretrained
from gkd.testing import build_method, full_gradients, run_step, tiny_batch, tiny_config

pytestmark = pytest.mark.distributed

TOL = 1e-5
VOCAB = 97
CASES = (("encoder", "masked_lm", "kl"), ("encoder", "masked_lm", "mse"), ("decoder", "causal_lm", "ce"),
         ("decoder", "causal_lm", "kl"))


def _kd_step(root: str, family: str, task: str, soft: str) -> dict[str, Any]:
    # from checkpoints: the same weights at every TP size (the padded vocabulary differs)
    models = {STUDENT: from_pretrained(Path(root) / f"{family}-student").train(),
              teacher_key("t"): from_pretrained(Path(root) / f"{family}-teacher").eval().requires_grad_(False)}
    gathered: list[bool] = []
    for model in models.values():  # did the forward pass build full-vocabulary logits?
        model.register_forward_hook(lambda _m, _i, out: gathered.append(out.logits is not None))
    kd = build_method("kd", {"soft_loss": soft, "temperature": 2.0, "soft_weight": 0.7, "hard_weight": 0.3},
                      models=models, task=task, stage_kind="pretrain", tensor_parallel=parallel.tp_world_size())
    batch = tiny_batch(family, task, batch=3, seq=10, vocab_size=VOCAB, generator=torch.Generator().manual_seed(2))
    result = run_step(kd, models, batch)
    result.loss.backward()
    return {"loss": float(result.loss.detach()), "terms": {k: float(v.detach()) for k, v in result.terms.items()},
            "grads": full_gradients(models[STUDENT]), "gathered": gathered}


def _all_cases(root: str) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Every case on one rank (module level: the launcher imports it)."""
    return {case: _kd_step(root, *case) for case in CASES}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("kd-tp")
    for family, task in {(f, t) for f, t, _ in CASES}:
        export_hf(build_model(tiny_config(family, 4, task=task, vocab_size=VOCAB), seed=1), root / f"{family}-teacher")
        export_hf(build_model(tiny_config(family, 2, task=task, vocab_size=VOCAB), seed=0), root / f"{family}-student")
    return str(root)


def test_kd_tp2_with_vocabulary_shards_equals_tp1(checkpoints):
    reference = _all_cases(checkpoints)  # TP=1 in this process: the gathered logits
    ranks = parallel.run_distributed(_all_cases, 2, checkpoints, tp=2, timeout_s=240)
    for case, ref in reference.items():
        assert set(ref["terms"]) == {"kd.soft", "kd.hard"}, case
        assert ref["gathered"] == [True, True], case  # TP=1: KD keeps the plain logits path
        for rank in ranks:
            got = rank[case]
            assert got["gathered"] == [False, False], case  # TP=2: no [b, s, V] logits on any rank
            assert abs(got["loss"] - ref["loss"]) <= TOL * max(1.0, abs(ref["loss"])), (case, got["loss"], ref["loss"])
            for k, v in ref["terms"].items():
                assert abs(got["terms"][k] - v) <= TOL * max(1.0, abs(v)), (case, k, got["terms"][k], v)
            assert got["grads"].keys() == ref["grads"].keys(), case
            for name, g in ref["grads"].items():
                diff = (got["grads"][name] - g).abs().max().item()
                assert diff <= TOL * max(1.0, g.abs().max().item()), f"{case} {name}: {diff}"
