"""Vocabulary-parallel losses (distributed softmax over the shards of an LM / MLM head) against
the same losses on the gathered logits: values and gradients wrt. this rank's logits, with
position masks and the padded vocabulary tail; and the engine's rule that skips the all-gather
when every method planning a model reads only ``logits.vocab_shard``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gkd import parallel
from gkd.engine.plan import merge_plans
from gkd.engine.step import run_pass
from gkd.methods import STUDENT, VOCAB_SHARD, ForwardRequest, ModelView, PassPlan, losses, teacher_key
from gkd.methods.prediction import prediction_terms
from gkd.models import build_model
from gkd.parallel.comm import vocab_parallel_cross_entropy, vocab_parallel_soft_per_position
from gkd.testing import build_method, outputs, shape, step, tiny_batch, tiny_config

KINDS = ("ce", "kl", "mse")
T = 2.0
REL = 1e-6
"""fp64: values and gradients agree within this, relative to the largest entry (in fact ~1e-14)."""
FP32_REL = 1e-5
"""fp32, as trained: the same relative bound with a floor of 1 for loss values. Both paths round
the probabilities to ~1e-7 of ``p``; a gradient ``p_s - p_t`` or a KL ``CE - H`` much smaller than
the terms it is the difference of (tiny random models: nearly uniform distributions) shows it —
the gathered fp32 path is itself ~3e-6 off the fp64 gradient there."""
DTYPES = (torch.float64, torch.float32)
# (vocab_size, shard width at TP=2): one padding entry on rank 1; rank 1 nothing but padding
SHAPES = ((11, 6), (5, 6))


def _close(got: torch.Tensor, ref: torch.Tensor, what: str, dtype: torch.dtype = torch.float64,
           value: bool = False) -> None:
    scale = ref.abs().max().item()
    rel = REL if dtype == torch.float64 else FP32_REL
    floor = 1.0 if value and dtype != torch.float64 else 1e-12
    diff = (got - ref).abs().max().item()
    assert diff <= rel * max(scale, floor), f"{what} ({dtype}): max diff {diff:.3g} (scale {scale:.3g})"


# --------------------------------------------------------------------------- hand-made shards
def _padded(vocab: int, width: int, tp: int, seed: int,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher logits ``[3, 4, tp*width]`` whose padding columns hold large junk (a
    loss that let them in would be far off), a position mask with holes, and labels."""
    g = torch.Generator().manual_seed(seed)
    s, t = (3.0 * torch.randn(3, 4, tp * width, generator=g, dtype=dtype) for _ in range(2))
    s[..., vocab:], t[..., vocab:] = 40.0, -25.0
    mask = torch.ones(3, 4, dtype=torch.long)
    mask[1, 2:] = 0
    mask[2, 0] = 0
    labels = torch.randint(0, vocab, (3, 4), generator=g).masked_fill(mask == 0, -100)
    return s, t, mask, labels


def _reference(vocab: int, width: int, tp: int, seed: int, dtype: torch.dtype) -> dict[str, Any]:
    """The gathered computation: plain losses on ``logits[..., :vocab]`` and their gradients
    (zero on the padding columns)."""
    s, t, mask, labels = _padded(vocab, width, tp, seed, dtype)
    out: dict[str, Any] = {}
    for kind in KINDS:
        sp, tpd = s.clone().requires_grad_(), t.clone().requires_grad_()
        loss = losses.soft_loss(kind, sp[..., :vocab], tpd[..., :vocab], T, mask)
        out[kind] = (loss.detach(), *torch.autograd.grad(loss, (sp, tpd)))
    sp = s.clone().requires_grad_()
    hard = losses.task_loss(sp[..., :vocab], labels)
    out["task"] = (hard.detach(), torch.autograd.grad(hard, sp)[0])
    out["task_each"] = losses.task_loss_per_example(s[..., :vocab], labels)
    out["ce_plain"] = losses.soft_cross_entropy(s[..., :vocab], t[..., :vocab], T, mask)
    out["kl_plain"] = losses.kl_divergence(s[..., :vocab], t[..., :vocab], T, mask, scale_by_t2=False)
    return out


def _sharded(vocab: int, width: int, seed: int, dtype: torch.dtype) -> dict[str, Any]:
    """The same quantities from this rank's shards (also runs with one shard, TP=1)."""
    rank, tp = (parallel.tp_rank(), parallel.tp_world_size()) if parallel.is_initialized() else (0, 1)
    padded = _padded(vocab, width, tp, seed, dtype)
    s, t, mask, labels = (x.chunk(tp, -1)[rank] if x.dim() == 3 else x for x in padded)
    out: dict[str, Any] = {}
    for kind in KINDS:
        sl, tl = s.clone().requires_grad_(), t.clone().requires_grad_()
        loss = losses.vocab_parallel_soft_loss(kind, sl, tl, vocab, T, mask)
        out[kind] = (loss.detach(), *torch.autograd.grad(loss, (sl, tl)))
    sl = s.clone().requires_grad_()
    hard = losses.vocab_parallel_task_loss(sl, labels, vocab)
    out["task"] = (hard.detach(), torch.autograd.grad(hard, sl)[0])
    out["task_each"] = losses.vocab_parallel_task_loss_per_example(s, labels, vocab)
    out["ce_plain"] = losses.vocab_parallel_soft_cross_entropy(s, t, vocab, T, mask)
    out["kl_plain"] = losses.vocab_parallel_kl_divergence(s, t, vocab, T, mask, scale_by_t2=False)
    return out


def _compare_shapes(got: dict[str, Any], ref: dict[str, Any], rank: int, tp: int, what: str,
                    dtype: torch.dtype) -> None:
    for kind in KINDS:
        _close(got[kind][0], ref[kind][0], f"{what} {kind} value", dtype, value=True)
        _close(got[kind][1], ref[kind][1].chunk(tp, -1)[rank], f"{what} {kind} student grad", dtype)
        _close(got[kind][2], ref[kind][2].chunk(tp, -1)[rank], f"{what} {kind} teacher grad", dtype)
    _close(got["task"][0], ref["task"][0], f"{what} task value", dtype, value=True)
    _close(got["task"][1], ref["task"][1].chunk(tp, -1)[rank], f"{what} task grad", dtype)
    for key in ("task_each", "ce_plain", "kl_plain"):
        _close(got[key], ref[key], f"{what} {key}", dtype, value=True)


# --------------------------------------------------------------------------- real heads
def _both_paths(kind: str, f: dict[str, torch.Tensor], ft: dict[str, torch.Tensor], vocab: int,
                mask: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(gathered value, sharded value, gathered grad, sharded grad) wrt. the student's shard,
    with the losses computed in ``dtype`` from the same fp32 forward pass."""
    shard, logits = f[VOCAB_SHARD], f["logits"]
    s_shard, s_logits = shard.to(dtype), logits.to(dtype)
    t_shard, t_logits = ft[VOCAB_SHARD].to(dtype), ft["logits"].to(dtype)
    if kind == "task":
        gathered = losses.task_loss(s_logits, labels)
        sharded = losses.vocab_parallel_task_loss(s_shard, labels, vocab)
    else:
        gathered = losses.soft_loss(kind, s_logits, t_logits, T, mask)  # type: ignore[arg-type]
        sharded = losses.vocab_parallel_soft_loss(kind, s_shard, t_shard, vocab, T, mask)  # type: ignore[arg-type]
    return (gathered.detach(), sharded.detach(), torch.autograd.grad(gathered, shard, retain_graph=True)[0],
            torch.autograd.grad(sharded, shard, retain_graph=True)[0])


def _heads() -> dict[str, Any]:
    """Encoder MLM and decoder LM heads of tiny models (odd vocabulary: one padding entry at TP=2):
    each loss from this rank's ``logits.vocab_shard`` and from the gathered ``logits`` of the
    same forward pass, with the gradients wrt. the shard of both, in fp32 and fp64."""
    out: dict[str, Any] = {}
    for family, task in (("encoder", "masked_lm"), ("decoder", "causal_lm")):
        cfg = tiny_config(family, 2, task=task, vocab_size=97)
        student, teacher = build_model(cfg, seed=1), build_model(cfg, seed=2).requires_grad_(False)
        batch = tiny_batch(family, task, batch=3, seq=8, vocab_size=97)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with student.capture({"logits", VOCAB_SHARD}) as f:
            student(**inputs)
        with teacher.capture({"logits", VOCAB_SHARD}) as ft:
            teacher(**inputs)
        with teacher.capture({VOCAB_SHARD}) as alone:
            skipped = teacher(**inputs)
        res: dict[str, Any] = {"skipped": skipped.logits is None,
                               "alone_equal": bool(torch.equal(alone[VOCAB_SHARD], ft[VOCAB_SHARD])),
                               "width": f[VOCAB_SHARD].shape[-1]}
        for kind in (*KINDS, "task"):
            res[kind] = {dtype: _both_paths(kind, f, ft, cfg.vocab_size, batch["attention_mask"], batch["labels"],
                                            dtype) for dtype in DTYPES}
        out[family] = res
    return out


def _compare_heads(res: dict[str, Any], tp: int) -> None:
    for family, r in res.items():
        assert r["skipped"], f"{family}: asking for the shard alone must skip the all-gather"
        assert r["alone_equal"], family
        assert r["width"] == -(-97 // tp) * tp // tp, family
        for key in (*KINDS, "task"):
            for dtype, (gathered, sharded, g_gathered, g_sharded) in r[key].items():
                _close(sharded, gathered, f"{family} {key} value", dtype, value=True)
                _close(g_sharded, g_gathered, f"{family} {key} grad wrt. the local shard", dtype)


def _worker() -> dict[str, Any]:
    """One rank of TP=2 (module level for the launcher)."""
    return {"rank": parallel.tp_rank(), "tp": parallel.tp_world_size(),
            "shapes": {(*shape_, dtype): _sharded(*shape_, seed=i, dtype=dtype)
                       for i, shape_ in enumerate(SHAPES) for dtype in DTYPES},
            "heads": _heads()}


@pytest.mark.distributed
def test_tp2_vocab_parallel_losses_equal_the_gathered_computation() -> None:
    results = parallel.run_distributed(_worker, 2, timeout_s=240)
    for res in results:
        rank, tp = res["rank"], res["tp"]
        assert tp == 2
        for i, (vocab, width) in enumerate(SHAPES):
            for dtype in DTYPES:
                _compare_shapes(res["shapes"][(vocab, width, dtype)], _reference(vocab, width, tp, i, dtype), rank,
                                tp, f"rank {rank} V={vocab} w={width}", dtype)
        _compare_heads(res["heads"], tp)
    # the replicated results really are the same on both ranks
    for kind in KINDS:
        values = [r["heads"]["encoder"][kind][torch.float32][1] for r in results]
        assert torch.equal(values[0], values[1])


# --------------------------------------------------------------------------- one shard (TP=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("vocab", "width"), [(11, 11), (11, 14)])
def test_tp1_equals_the_plain_losses(vocab: int, width: int, dtype: torch.dtype) -> None:
    """One shard holding the whole (possibly padded) vocabulary: the plain losses of ``[..., :vocab]``."""
    _compare_shapes(_sharded(vocab, width, 3, dtype), _reference(vocab, width, 1, 3, dtype), 0, 1, "tp=1", dtype)


def test_tp1_heads_equal_the_gathered_logits() -> None:
    _compare_heads(_heads(), 1)


@pytest.mark.parametrize("kind", KINDS)
def test_analytic_backward_passes_gradcheck(kind: str) -> None:
    g = torch.Generator().manual_seed(5)
    s, t = (torch.randn(2, 3, 9, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b: vocab_parallel_soft_per_position(kind, a, b, 7, 1.7), (s, t))
    # without a teacher gradient only p_s - p_t is kept: the student gradient must not change
    assert torch.autograd.gradcheck(lambda a: vocab_parallel_soft_per_position(kind, a, t.detach(), 7, 1.7), (s,))
    labels = torch.tensor([[1, 6, -100], [0, -100, 2]])
    assert torch.autograd.gradcheck(lambda a: vocab_parallel_cross_entropy(a, labels, 7), (s,))


def test_bad_inputs_raise_one_line_errors() -> None:
    s = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="differ in shape"):
        vocab_parallel_soft_per_position("ce", s, torch.zeros(2, 3, 7), 8)
    with pytest.raises(ValueError, match="does not fit"):
        vocab_parallel_soft_per_position("kl", s, s, 9)
    with pytest.raises(ValueError, match="unknown soft loss"):
        vocab_parallel_soft_per_position("js", s, s, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 6\)"):
        vocab_parallel_cross_entropy(s, torch.full((2, 3), 6), 6)


# --------------------------------------------------------------------------- engine and KD
def test_the_gather_runs_only_when_some_method_reads_the_full_logits() -> None:
    shard_only = PassPlan.of(student=ForwardRequest(frozenset({VOCAB_SHARD})))
    full = PassPlan.of(student=ForwardRequest())
    alone = merge_plans({"a": shard_only}).requests[STUDENT]
    assert not alone.full_logits and alone.capture_features() == {VOCAB_SHARD}
    mixed = merge_plans({"a": shard_only, "b": full}).requests[STUDENT]
    assert mixed.full_logits and mixed.capture_features() == {VOCAB_SHARD, "logits"}
    assert merge_plans({"b": full}).requests[STUDENT].capture_features() == set()


@pytest.mark.parametrize(("family", "task"), [("encoder", "masked_lm"), ("decoder", "causal_lm")])
def test_run_pass_without_the_gather_gives_the_same_task_loss(family: str, task: str) -> None:
    cfg = tiny_config(family, 2, task=task, vocab_size=97)
    model = build_model(cfg, seed=1)
    batch = tiny_batch(family, task, batch=3, seq=8, vocab_size=97)
    shard_only = PassPlan.of(student=ForwardRequest(frozenset({VOCAB_SHARD})))
    views = {}
    for name, plans in (("shard", {"a": shard_only}), ("mixed", {"a": shard_only, "b": PassPlan.of(student=ForwardRequest())})):
        views[name] = run_pass({STUDENT: model}, merge_plans(plans), batch)[STUDENT]
    assert views["shard"].logits is None and views["mixed"].logits is not None
    ref = losses.task_loss(views["mixed"].logits, batch["labels"])
    _close(views["shard"].task_loss, ref, "task loss", torch.float32, value=True)
    _close(views["shard"].task_loss_per_example, losses.task_loss_per_example(views["mixed"].logits, batch["labels"]),
           "task loss per example", torch.float32, value=True)


def test_kd_reads_shards_for_vocabulary_heads_under_tp_only() -> None:
    lm = {"student": shape("decoder", 2), "teachers": {"t": shape("decoder")}}
    for tp, heads, expected in ((2, lm, frozenset({VOCAB_SHARD})), (1, lm, frozenset()),
                                (2, {}, frozenset())):  # default shapes: classification heads
        kd = build_method("kd", {"temperature": 2.0}, tensor_parallel=tp, **heads)
        plan = kd.plan(step(), {}, 0, None)
        assert plan.models[STUDENT].features == expected == plan.models[teacher_key("t")].features, (tp, heads)


@pytest.mark.parametrize("kind", KINDS)
def test_prediction_terms_from_shards_equal_the_logits_terms(kind: str) -> None:
    s, t, mask, labels = _padded(11, 7, 2, seed=4)  # one shard of the padded vocabulary (no process group)
    config = {"soft_weight": 0.5, "soft_loss": kind, "temperature": T, "hard_weight": 0.25}
    batch = {"attention_mask": mask, "labels": labels}
    hard = losses.task_loss(s[..., :11], labels)
    shards = outputs(batch, ModelView({VOCAB_SHARD: s}, None, hard), {"t": ModelView({VOCAB_SHARD: t}, None)})
    gathered = outputs(batch, ModelView({}, s[..., :11]), {"t": ModelView({}, t[..., :11])})
    got = prediction_terms("kd", config, shards, "t", vocab_size=11)
    ref = prediction_terms("kd", config, gathered, "t")
    assert got.keys() == ref.keys() == {"soft", "hard"}
    for term in ref:
        _close(got[term], ref[term], term, torch.float32, value=True)
    with pytest.raises(ValueError, match="needs vocab_size"):
        prediction_terms("kd", config, shards, "t")
