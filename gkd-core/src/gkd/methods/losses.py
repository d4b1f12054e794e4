"""Loss primitives shared by methods, and the task (hard) loss the engine computes.

**Masks select.** A ``mask`` argument (1/True = keep) chooses the positions that are averaged
over; masked positions count neither in the sum nor in the count. The reference implementation
multiplied inputs by the mask and still divided by the count of all positions, so padding
diluted every loss (and masked cosine rows counted as distance 1).

**Broadcasting rule.** Every helper first reduces what belongs to one position (the class or
vocabulary dimension for :func:`kl_divergence`, :func:`soft_cross_entropy`,
:func:`kl_between_distributions`, the feature dimension for :func:`cosine_distance`; nothing
for :func:`mse`). The mask is then aligned with the **leading** dimensions of those
per-position values: trailing singleton dimensions are appended until it has as many
dimensions, and size-1 dimensions are expanded. Hence:

* hidden states ``[b, s, h]`` with ``attention_mask`` ``[b, s]``: :func:`mse` averages every
  element of the real tokens, :func:`cosine_distance` averages over the real tokens;
* token logits ``[b, s, V]`` with ``attention_mask`` ``[b, s]``: the mean over real tokens
  (:func:`logits_mask` picks the mask);
* class logits ``[b, C]`` with ``mask=None``: the mean over examples;
* attention scores or probs ``[b, heads, s, s]`` with :func:`attention_valid_mask`
  ``[b, 1, s, s]``: the mean over the valid (query, key) pairs of every head.

A ``[b, s]`` mask never fits ``[b, heads, s, s]`` values (it would align ``s`` with ``heads``):
build the pair mask with :func:`attention_valid_mask`.

**Task loss.** :func:`task_loss` is the one hard loss of gkd: cross-entropy with a single mean
over all labelled positions of the batch (classification: over examples; token-level tasks:
over every token whose label is not ``ignore_index``, the HF/Megatron convention), so training
and evaluation report the same quantity. :func:`task_loss_per_example` keeps one value per
example (the mean over that example's labelled tokens), for methods that weight examples
(MT-BERT). Both are what ``ModelView.task_loss`` / ``ModelView.task_loss_per_example`` hold.

**Vocabulary-parallel variants.** Under tensor parallelism an LM / MLM head leaves each rank
with a shard of the vocabulary, the feature ``logits.vocab_shard`` ``[b, s, w]`` (see
:data:`gkd.models.taps.VOCAB_SHARD`). :func:`vocab_parallel_soft_loss`,
:func:`vocab_parallel_soft_cross_entropy`, :func:`vocab_parallel_kl_divergence`,
:func:`vocab_parallel_task_loss` and :func:`vocab_parallel_task_loss_per_example` take those
shards and give, on every rank, the value of the function of the same name on the gathered
logits (softmax over the whole vocabulary through three small all-reduces, padding entries
``>= vocab_size`` excluded), so the ``[b, s, V]`` logits are never materialised. With one
shard (TP=1, or no parallel state) they equal the plain losses on ``logits[..., :vocab_size]``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from gkd.parallel.comm import vocab_parallel_cross_entropy, vocab_parallel_soft_per_position

SoftLoss = Literal["kl", "ce", "mse"]
"""The prediction-layer soft losses of :func:`soft_loss`."""


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Logits in the precision their softmax runs in: fp32, or fp64 when given fp64 (reference checks)."""
    return t if t.dtype == torch.float64 else t.float()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is true (mask aligned from the left)."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    while m.dim() < values.dim():
        m = m.unsqueeze(-1)
    m = m.expand_as(values)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over every element of the unmasked positions.

    ``mask`` aligns with the leading dims of the inputs and broadcasts over the rest: ``[b, s]``
    on hidden states ``[b, s, h]`` averages all ``h`` elements of the real tokens; ``[b, 1, s, s]``
    (:func:`attention_valid_mask`) on ``[b, heads, s, s]`` the valid pairs of every head.
    ``None``: every element.
    """
    return _masked_mean((student - teacher.to(student.dtype)) ** 2, mask)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """``−Σ softmax(t/τ)·log_softmax(s/τ)`` over the last dim, averaged over positions (no τ²).

    ``mask`` selects positions of the logits without their last dim: ``[b, s]`` for ``[b, s, V]``
    (:func:`logits_mask`), ``None`` for ``[b, C]`` (the mean over examples).
    """
    target = F.softmax(_wide(teacher_logits) / temperature, dim=-1)
    per_pos = -(target * F.log_softmax(_wide(student_logits) / temperature, dim=-1)).sum(-1)
    return _masked_mean(per_pos, mask)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  mask: torch.Tensor | None = None, scale_by_t2: bool = True) -> torch.Tensor:
    """``τ²·KL(softmax(t/τ) ‖ softmax(s/τ))`` over the last dim, averaged over positions.

    ``mask`` as in :func:`soft_cross_entropy`: ``[b, s]`` for token logits, ``None`` for class
    logits; ``scale_by_t2=False`` drops the τ².
    """
    t_log = F.log_softmax(_wide(teacher_logits) / temperature, dim=-1)
    s_log = F.log_softmax(_wide(student_logits) / temperature, dim=-1)
    per_pos = (t_log.exp() * (t_log - s_log)).sum(-1)
    loss = _masked_mean(per_pos, mask)
    return loss * temperature**2 if scale_by_t2 else loss


def kl_between_distributions(student_probs: torch.Tensor, teacher_probs: torch.Tensor,
                             mask: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """KL between two tensors that already are probabilities (e.g. attention probs), summed over
    the last dim and averaged over the positions ``mask`` selects.

    ``mask`` aligns with the leading dims of the per-position values (the inputs without their
    last dim), size-1 dims broadcasting: ``[b, 1, s]`` or ``[b, heads, s]`` query rows of
    ``[b, heads, s, s]`` probs (e.g. ``attention_valid_mask(...).any(-1)``). It does not mask
    keys: use :func:`attention_kl` with the pair mask for that.
    """
    t = teacher_probs.float()
    per_pos = (t * (torch.log(t + eps) - torch.log(student_probs.float() + eps))).sum(-1)
    return _masked_mean(per_pos, mask)


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``1 − cos`` along the last dim, averaged over unmasked positions.

    ``mask`` selects positions of the inputs without their last dim: ``[b, s]`` for hidden
    states ``[b, s, h]`` (the mean over real tokens), ``None`` for ``[b, h]`` or every position.
    """
    per_pos = 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    return _masked_mean(per_pos, mask)


def soft_loss(kind: SoftLoss, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The prediction-layer soft loss of KD-style methods (KD, TMKD, …).

    Args:
        kind: ``"kl"`` — ``τ²·KL(teacher ‖ student)`` at temperature τ (:func:`kl_divergence`);
            ``"ce"`` — soft cross-entropy at τ, no τ² (:func:`soft_cross_entropy`);
            ``"mse"`` — MSE of the raw logits, τ unused (:func:`mse`).
        student_logits, teacher_logits: ``[b, C]`` or ``[b, s, V]``.
        temperature: τ.
        mask: ``[b, s]`` for token logits (see :func:`logits_mask`), ``None`` for class logits.
    """
    if kind == "kl":
        return kl_divergence(student_logits, teacher_logits, temperature, mask)
    if kind == "ce":
        return soft_cross_entropy(student_logits, teacher_logits, temperature, mask)
    if kind == "mse":
        return mse(student_logits, teacher_logits, mask)
    raise ValueError(f"unknown soft loss {kind!r}; use 'kl', 'ce' or 'mse'")


def logits_mask(logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask to average logits losses with: ``attention_mask`` for token logits ``[b, s, V]``
    (real tokens only), ``None`` for classification logits ``[b, C]`` (every example)."""
    return attention_mask if logits.dim() == 3 else None


def attention_valid_mask(attention_mask: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """The (query, key) pairs an attention loss may compare: ``[b, 1, s, s]`` bool.

    True where both the query and the key are real tokens and, when ``causal`` (decoders), the
    key is not after the query. Attention features (``layers.{i}.attention.scores`` and
    ``.probs``, ``[b, heads, s, s]``) hold a fill value or zero elsewhere; pass this mask to a
    loss helper, or ``torch.where`` on it, so those entries never enter the arithmetic. The
    singleton head dimension broadcasts over every head (and over this rank's heads under TP).

    Args:
        attention_mask: ``[b, s]``, 1 = real token, 0 = padding.
        causal: Also drop future keys (decoder models).
    """
    keep = attention_mask.bool()
    valid = keep[:, None, :, None] & keep[:, None, None, :]
    if causal:
        s = attention_mask.shape[1]
        valid = valid & torch.ones(s, s, dtype=torch.bool, device=keep.device).tril()
    return valid


def _token_losses(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy ``[b, s]`` (0 at ignored positions) and the labelled-token mask."""
    per_tok = F.cross_entropy(_wide(logits).transpose(1, 2), labels, reduction="none", ignore_index=ignore_index)
    return per_tok, (labels != ignore_index).to(per_tok.dtype)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The task (hard) loss: cross-entropy with one mean over every labelled position of the batch.

    Classification logits ``[b, C]`` with labels ``[b]``: the mean over examples. Token-level
    logits ``[b, s, V]`` with labels ``[b, s]`` (masked or causal LM; causal labels already
    shifted): the sum over all tokens whose label is not ``ignore_index`` divided by their
    count, so an example counts in proportion to its labelled tokens (HF and Megatron do the
    same). A batch without any labelled token gives 0. Training (the engine's
    ``ModelView.task_loss``) and evaluation use this function.
    """
    if logits.dim() == 2:
        return F.cross_entropy(_wide(logits), labels)
    per_tok, valid = _token_losses(logits, labels, ignore_index)
    return (per_tok * valid).sum() / valid.sum().clamp_min(1.0)


def task_loss_per_example(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy per example, ``[b]``: classification ``[b, C]``, or the mean over that
    example's labelled tokens for token-level logits ``[b, s, V]`` (0 for an example without
    any). For per-example weighting (MT-BERT); its mean is *not* :func:`task_loss` when examples
    have different numbers of labelled tokens."""
    if logits.dim() == 2:
        return F.cross_entropy(_wide(logits), labels, reduction="none")
    per_tok, valid = _token_losses(logits, labels, ignore_index)
    return (per_tok * valid).sum(-1) / valid.sum(-1).clamp_min(1.0)


def masked_log_softmax(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``log_softmax`` over the last dim among the ``valid`` entries only, in fp32.

    Entries outside ``valid`` (broadcast to ``scores``, e.g. :func:`attention_valid_mask`
    ``[b, 1, s, s]``) are filled with the most negative fp32 value first, so every row is
    renormalised over its valid entries and stays finite: a padding or causal mask on an
    attention or relation matrix, without ``-inf`` (a row with no valid entry comes out
    uniform). The masked entries and rows are not meaningful; :func:`attention_kl` drops them.
    Attention scores (``layers.{i}.attention.scores``) already hold a fill value at the
    model's own masked keys; this gives the log of the attention probabilities, without
    ``log(0)``.
    """
    x = scores.float()
    if valid is None:
        return F.log_softmax(x, dim=-1)
    return F.log_softmax(x.masked_fill(~valid.bool(), torch.finfo(torch.float32).min), dim=-1)


def relation_log_softmax(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Log of the self-relation distribution of a per-head tensor: ``log softmax(x·xᵀ/√d)``.

    MiniLM's value relation and MiniLMv2's query/key/value relations.

    Args:
        x: ``[b, heads, s, d]`` (``layers.{i}.attention.query|key|value``, or relation heads
            re-split from them); ``d`` is the head size used for the scaling.
        valid: The keys each query may relate to (:func:`attention_valid_mask`, ``[b, 1, s, s]``);
            ``None`` keeps all. Rows are renormalised over them (:func:`masked_log_softmax`).

    Returns:
        ``[b, heads, s, s]`` fp32 log-probabilities over the keys (last dim), ready for
        :func:`attention_kl` with ``log_probs=True``.
    """
    x = x.float()
    return masked_log_softmax(x @ x.transpose(-1, -2) / x.shape[-1] ** 0.5, valid)


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None = None, *,
                 log_probs: bool = False) -> torch.Tensor:
    """``KL(teacher ‖ student)`` of attention-like distributions over the keys, averaged over
    heads and valid query rows (MiniLM's ``1/(A_h·|x|) Σ_a Σ_t KL``).

    Args:
        student, teacher: ``[b, heads, s, s]`` (same head count) distributions over the last
            dim: probabilities (``layers.{i}.attention.probs``) or, with ``log_probs=True``,
            log-probabilities (:func:`masked_log_softmax` of scores, :func:`relation_log_softmax`;
            more accurate: no ``log(0)``, no clamping).
        valid: :func:`attention_valid_mask` (``[b, 1, s, s]``, or per head). Keys outside it
            never enter a row's sum, and a query row with no valid key (a padded query) is left
            out of the mean, which is over (head, valid query row) pairs. Probabilities must
            already be zero outside it (the model's masks do this for padding and, in decoders,
            the future); log-probabilities from :func:`masked_log_softmax` are renormalised
            over it. ``None``: every key and row.
        log_probs: The inputs are log-probabilities.

    Tensor parallelism: compute it on this rank's heads and pass the result to
    ``all_reduce_mean_over_tp`` — heads are sharded in equal shares and every head has the
    same valid rows, so the mean of the ranks' means is the full-head mean.
    """
    if log_probs:
        t_log, s_log = teacher.float(), student.float()
        t = t_log.exp()
        per_key = torch.where(t > 0, t * (t_log - s_log), torch.zeros((), device=t.device))
    else:
        t = teacher.float()
        s_log = torch.log(student.float().clamp_min(torch.finfo(torch.float32).tiny))
        per_key = torch.xlogy(t, t) - t * s_log
    if valid is None:
        return per_key.sum(-1).mean()
    valid = valid.bool()
    per_key = torch.where(valid, per_key, torch.zeros((), device=per_key.device))
    return _masked_mean(per_key.sum(-1), valid.any(-1))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``hidden`` ``[b, s, h]`` over each example's real tokens: ``[b, h]``.

    Padding never enters the mean (an example without any real token gives 0). With
    ``attention_mask=None`` every position counts. Hidden states are replicated over
    tensor-parallel ranks, so the result needs no communication.
    """
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _soft_per_position(kind: SoftLoss, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """The soft loss of :func:`soft_loss` at every position: ``[b]`` or ``[b, s]``, fp32."""
    if kind == "mse":
        return ((_wide(student_logits) - _wide(teacher_logits)) ** 2).mean(-1)
    s_log = F.log_softmax(_wide(student_logits) / temperature, dim=-1)
    t_log = F.log_softmax(_wide(teacher_logits) / temperature, dim=-1)
    if kind == "kl":
        return (t_log.exp() * (t_log - s_log)).sum(-1) * temperature**2
    if kind == "ce":
        return -(t_log.exp() * s_log).sum(-1)
    raise ValueError(f"unknown soft loss {kind!r}; use 'kl', 'ce' or 'mse'")


def soft_loss_per_example(kind: SoftLoss, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`soft_loss` kept per example, ``[b]``, for methods that weight examples (MT-BERT's
    teacher-loss weighting, Uncertainty's routing).

    Class logits ``[b, C]``: one value per example, so the mean over the batch is
    :func:`soft_loss`. Token logits ``[b, s, V]``: the mean over that example's positions
    selected by ``mask`` (``[b, s]``, see :func:`logits_mask`; 0 for an example without any),
    as :func:`task_loss_per_example` does for the hard loss — its batch mean differs from
    :func:`soft_loss` (one mean over all tokens) when examples have different lengths.
    ``mse`` averages over the class or vocabulary dimension.
    """
    per_pos = _soft_per_position(kind, student_logits, teacher_logits, temperature)
    if per_pos.dim() == 1:
        return per_pos
    if mask is None:
        return per_pos.mean(-1)
    m = mask.to(per_pos.dtype)
    return (per_pos * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def summary_token(hidden: torch.Tensor, attention_mask: torch.Tensor, family: str) -> torch.Tensor:
    """One summary vector per sequence, ``[b, h]``, from hidden states ``[b, s, h]``.

    Encoders: token 0 ([CLS]). Decoders: the last real token of each sequence (padding on
    either side), the only position that has seen the whole sequence under the causal mask;
    the reference always took token 0, a GLM assumption.
    """
    if family != "decoder":
        return hidden[:, 0]
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.bool() * positions).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def vocab_parallel_soft_loss(kind: SoftLoss, student_shard: torch.Tensor, teacher_shard: torch.Tensor,
                             vocab_size: int, temperature: float = 1.0,
                             mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`soft_loss` from vocabulary shards (``logits.vocab_shard`` of student and teacher).

    Args:
        kind: ``"kl"`` (``τ²·KL``), ``"ce"`` or ``"mse"``, as in :func:`soft_loss`.
        student_shard, teacher_shard: ``[b, s, w]`` this rank's shards (equal layouts: same
            vocabulary, same TP size).
        vocab_size: The real vocabulary size (``ModelShape.vocab_size``); entries from it on
            are padding and ignored.
        temperature: τ.
        mask: ``[b, s]`` positions to average over (e.g. ``attention_mask``).

    A collective over the TP group (every rank calls it); the result is replicated.
    """
    per_pos = vocab_parallel_soft_per_position(kind, student_shard, teacher_shard, vocab_size, temperature)
    if kind == "kl":
        per_pos = per_pos * temperature**2
    return _masked_mean(per_pos, mask)


def vocab_parallel_soft_cross_entropy(student_shard: torch.Tensor, teacher_shard: torch.Tensor, vocab_size: int,
                                      temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`soft_cross_entropy` from vocabulary shards (see :func:`vocab_parallel_soft_loss`);
    ``mask`` ``[b, s]`` as there."""
    return _masked_mean(vocab_parallel_soft_per_position("ce", student_shard, teacher_shard, vocab_size,
                                                         temperature), mask)


def vocab_parallel_kl_divergence(student_shard: torch.Tensor, teacher_shard: torch.Tensor, vocab_size: int,
                                 temperature: float = 1.0, mask: torch.Tensor | None = None,
                                 scale_by_t2: bool = True) -> torch.Tensor:
    """:func:`kl_divergence` from vocabulary shards (see :func:`vocab_parallel_soft_loss`);
    ``mask`` ``[b, s]`` as there."""
    loss = _masked_mean(vocab_parallel_soft_per_position("kl", student_shard, teacher_shard, vocab_size,
                                                         temperature), mask)
    return loss * temperature**2 if scale_by_t2 else loss


def vocab_parallel_task_loss(logits_shard: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                             ignore_index: int = -100) -> torch.Tensor:
    """:func:`task_loss` of token logits from this rank's vocabulary shard ``[b, s, w]`` (one
    mean over the labelled tokens of the batch). A collective; the result is replicated."""
    per_tok = vocab_parallel_cross_entropy(logits_shard, labels, vocab_size, ignore_index)
    valid = (labels != ignore_index).to(per_tok.dtype)
    return per_tok.sum() / valid.sum().clamp_min(1.0)


def vocab_parallel_task_loss_per_example(logits_shard: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                                         ignore_index: int = -100) -> torch.Tensor:
    """:func:`task_loss_per_example` from this rank's vocabulary shard: ``[b]``."""
    per_tok = vocab_parallel_cross_entropy(logits_shard, labels, vocab_size, ignore_index)
    valid = (labels != ignore_index).to(per_tok.dtype)
    return per_tok.sum(-1) / valid.sum(-1).clamp_min(1.0)


__all__ = [
    "SoftLoss",
    "attention_kl",
    "attention_valid_mask",
    "cosine_distance",
    "kl_between_distributions",
    "kl_divergence",
    "logits_mask",
    "masked_log_softmax",
    "mean_pool",
    "mse",
    "relation_log_softmax",
    "soft_cross_entropy",
    "soft_loss",
    "soft_loss_per_example",
    "summary_token",
    "task_loss",
    "task_loss_per_example",
    "vocab_parallel_kl_divergence",
    "vocab_parallel_soft_cross_entropy",
    "vocab_parallel_soft_loss",
    "vocab_parallel_task_loss",
    "vocab_parallel_task_loss_per_example",
]
