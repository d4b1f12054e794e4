"""DIITO (Wu et al., 2022): distillation with the interchange intervention training objective.

Every step runs two forward passes of the student and the teacher on the same batch:

* **pass 0** — the plain pass: ``ce`` (τ²·KL on the logits), ``mlm`` (the student's hard loss) and
  ``cos`` (cosine distance between the last hidden states). It also records the *aligned*
  hidden states: one student hidden state and the teacher hidden states aligned with it.
* **pass 1** — the interchange intervention: the *dual* of example ``i`` is example ``i+1`` (the
  batch rolled by one). At every aligned hidden state, in the student and in the teacher, some
  positions of example ``i`` are overwritten with the pass-0 values of its dual at other
  positions. ``causal_ce`` pulls the intervened student's logits towards the intervened
  teacher's, so the student learns to react to the counterfactual the way the teacher does.

Nothing is kept on ``self`` between the passes: the drawn layer is read back from the features
pass 0 recorded (``previous``), and the positions are drawn in pass 1 from the same step
generator, whose draws depend only on (run seed, stage, iteration, method).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gkd.methods import (
    STUDENT,
    FeatureIssue,
    ForwardRequest,
    GkdError,
    Method,
    MethodContext,
    Operation,
    PassPlan,
    PassView,
    StepContext,
    depth_issues,
    hidden_tap,
    logits_issues,
    losses,
    raise_issues,
    stride_map,
    teacher_key,
    teacher_logits,
    uniform_map,
    write_positions,
)

WEIGHTS = ("ce_weight", "mlm_weight", "cos_weight", "causal_ce_weight", "causal_cos_weight")


def hidden_index(tap: str) -> int:
    """Inverse of :func:`hidden_tap`: ``embeddings`` → 0, ``layers.{i}.output`` → ``i + 1``."""
    if tap == "embeddings":
        return 0
    parts = tap.split(".")
    if len(parts) != 3 or parts[0] != "layers" or parts[2] != "output":
        raise ValueError(f"not a hidden-state tap: {tap!r}")
    return int(parts[1]) + 1


def aligned_layers(config: Mapping[str, Any], student_layers: int, teacher_layers: int,
                   layer: int | None = None) -> tuple[list[int], list[int]]:
    """The interchanged hidden states: (student indices, teacher indices), 1 = output of layer 1.

    ``full``: student hidden state ``layer`` (1..S, drawn per step) with the teacher block
    ``m[layer-1]+1 .. m[layer]`` of ``stride_map`` (or ``uniform_map``); ``middle``: student
    ``⌊S/2⌋+1`` with teacher ``⌊T/2⌋+1``; ``late``: the last two hidden states of each model
    (the last one only for a one-layer model).
    """
    s, t = student_layers, teacher_layers
    alignment = config["alignment"]
    if alignment == "full":
        if layer is None or not 1 <= layer <= s:
            raise ValueError(f"full alignment needs a student layer in 1..{s}, got {layer}")
        m = (uniform_map if config["layer_map"] == "uniform" else stride_map)(t, s)
        return [layer], list(range(m[layer - 1] + 1, m[layer] + 1))
    if alignment == "middle":
        return [s // 2 + 1], [t // 2 + 1]
    if alignment == "late":
        return [i for i in (s - 1, s) if i >= 1], [i for i in (t - 1, t) if i >= 1]
    raise ValueError(f"unknown alignment {alignment!r}")


@dataclass(frozen=True)
class Interchange:
    """Which positions of each example take which positions of its dual (the next example).

    Attributes:
        positions: ``[b, s]`` bool, the positions of example ``i`` that are overwritten.
        source: ``[b, s]`` long, at those positions the position of the dual example ``i+1``
            whose value is written there (0 elsewhere).
    """

    positions: torch.Tensor
    source: torch.Tensor

    def dual_values(self, recorded: torch.Tensor) -> torch.Tensor:
        """``[b, s, ...]``: at every overwritten position of example ``i``, the value ``recorded``
        holds for its dual ``i+1`` at the paired position (``recorded.roll(-1, 0)`` gathered).
        Differentiable in ``recorded``: a student source keeps its pass-0 graph."""
        dual = recorded.roll(-1, 0)
        index = self.source.to(dual.device)
        index = index.reshape(*index.shape, *([1] * (dual.dim() - 2))).expand_as(dual)
        return torch.gather(dual, 1, index)

    def operation(self, recorded: torch.Tensor) -> Operation:
        """The operation that writes the dual's ``recorded`` values into the interchanged
        positions of the same hidden state (``write_span(recorded.roll(-1, 0), start, length,
        src_start=dual_start)`` for a consecutive span, with one length per example)."""
        return write_positions(self.dual_values(recorded), self.positions)


def _real_tokens(attention_mask: torch.Tensor, skip_ends: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """First position and count of each example's real tokens (contiguous: right or left
    padding); with ``skip_ends`` without the first and the last real token."""
    mask = attention_mask.bool()
    count = mask.sum(-1)
    first = mask.long().argmax(-1)  # 0 for an empty row, whose count is 0 anyway
    if skip_ends:
        first, count = first + 1, (count - 2).clamp_min(0)
    return first, count


def _uniform_int(high: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One integer in ``[0, high[b]]`` per example, drawn from ``generator``."""
    draw = torch.rand(high.shape, generator=generator, dtype=torch.float64)
    return torch.minimum((draw * (high + 1)).floor().long(), high)


def _sorted_sample(first: int, count: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct positions among ``first .. first+count-1``, in increasing order."""
    return (torch.randperm(count, generator=generator)[:k] + first).sort().values


def draw_interchange(way: str, attention_mask: torch.Tensor, generator: torch.Generator, *, ratio: float = 0.3,
                     max_tokens: int = 0, skip_ends: bool = False,
                     labels: torch.Tensor | None = None) -> Interchange:
    """Draw the interchanged positions of a batch and of its dual (the batch rolled by one).

    Args:
        way: ``consecutive`` — one span of ``⌊ratio·min(len_i, len_{i+1})⌋`` tokens at a random
            start in example ``i`` and at another random start in its dual ``i+1``; ``random`` —
            that many random real tokens in each, paired in increasing order; ``masked`` — the
            labelled (masked) tokens of example ``i``, paired in order with as many random real
            tokens of its dual (at most the dual's length).
        attention_mask: ``[b, s]``, 1 = real token (contiguous per example).
        generator: The step generator (CPU); every draw comes from it, in a fixed order.
        ratio: Share of the shorter real length interchanged (consecutive, random).
        max_tokens: At most this many positions per example; 0 = no limit.
        skip_ends: Never touch an example's first or last real token ([CLS], [SEP], BOS).
        labels: ``[b, s]`` token labels (``-100`` = none); needed for ``masked``.

    Every position lies inside the real tokens of its example (and of the dual for the source).
    """
    mask = attention_mask.detach().cpu()
    b, s = mask.shape
    first, count = _real_tokens(mask, skip_ends)
    dual_first, dual_count = first.roll(-1), count.roll(-1)
    n = (ratio * torch.minimum(count, dual_count).double()).floor().long()
    if max_tokens > 0:
        n = n.clamp_max(max_tokens)
    positions = torch.zeros(b, s, dtype=torch.bool)
    source = torch.zeros(b, s, dtype=torch.long)
    if way == "consecutive":
        start = first + _uniform_int(count - n, generator)
        dual_start = dual_first + _uniform_int(dual_count - n, generator)
        pos = torch.arange(s)[None, :]
        positions = (pos >= start[:, None]) & (pos < (start + n)[:, None])
        source = torch.where(positions, pos - start[:, None] + dual_start[:, None], 0)
        return Interchange(positions, source)
    if way == "masked":
        if labels is None or labels.dim() != 2:
            raise GkdError("diito: interchange 'masked' needs token labels (a masked_lm batch); use consecutive "
                           "or random")
        labelled = (labels.detach().cpu() != -100) & mask.bool()
    elif way != "random":
        raise ValueError(f"unknown interchange way {way!r}")
    for i in range(b):
        f, c, df, dc = int(first[i]), int(count[i]), int(dual_first[i]), int(dual_count[i])
        if way == "random":
            k = int(n[i])
            base = _sorted_sample(f, c, k, generator)
        else:
            candidates = torch.nonzero(labelled[i, f:f + c]).flatten() + f
            k = min(len(candidates), dc, max_tokens or len(candidates))
            base = candidates[torch.randperm(len(candidates), generator=generator)[:k]].sort().values
        if k == 0:
            continue
        positions[i, base] = True
        source[i, base] = _sorted_sample(df, dc, k, generator)
    return Interchange(positions, source)


def position_mask(kind: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[b, s]`` positions a token-logits term averages over: ``tokens`` = real tokens;
    ``labelled`` = positions with a token label (real tokens when labels are per example)."""
    attention = batch["attention_mask"].bool()
    labels = batch.get("labels")
    if kind == "labelled" and labels is not None and labels.dim() == 2:
        return (labels != -100) & attention
    return attention


class DIITO(Method):
    name = "diito"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """A teacher as deep as the student for the full alignment; equal widths for the cosine
        terms; teacher logits for the KL terms; token labels for the masked interchange."""
        s = context.student
        issues: list[FeatureIssue] = []
        if all(config[w] <= 0 for w in WEIGHTS):
            issues.append(FeatureIssue("student", None, "diito: every weight is 0, so the method adds no term; set "
                                                        "one of " + ", ".join(WEIGHTS) + " above 0"))
        intervenes = config["causal_ce_weight"] > 0 or config["causal_cos_weight"] > 0
        for name, t in context.teachers.items():
            label = f"teacher '{name}'"
            if intervenes and config["alignment"] == "full":
                issues += depth_issues(
                    cls.name, context, field="alignment", fix=", or alignment: middle or late", teachers=[name],
                    mapping="the full alignment maps every student layer onto a block of teacher layers")
            if (config["cos_weight"] > 0 or config["causal_cos_weight"] > 0) and s.hidden_size != t.hidden_size:
                field = "cos_weight" if config["cos_weight"] > 0 else "causal_cos_weight"
                issues.append(FeatureIssue(label, field, (
                    f"diito: the cosine terms compare hidden states of equal width, but the student has hidden_size "
                    f"{s.hidden_size} and {label} {t.hidden_size}; give the student the teacher's width or set "
                    "cos_weight and causal_cos_weight to 0")))
        if config["ce_weight"] > 0 or config["causal_ce_weight"] > 0:
            field = "ce_weight" if config["ce_weight"] > 0 else "causal_ce_weight"
            issues += logits_issues(cls.name, context, field=field, fix="or set ce_weight and causal_ce_weight to 0")
        if intervenes and config["interchange"] == "masked" and context.task != "masked_lm":
            issues.append(FeatureIssue("student", "interchange", (
                f"diito: interchange 'masked' swaps the masked tokens of a masked_lm batch, but the task is "
                f"{context.task}; use interchange: consecutive or random")))
        return issues

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return {"hard_loss": "mlm_weight"} if config["mlm_weight"] > 0 else {}

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))
        cfg = self.config
        self.student_layers = context.student.num_layers
        self.teacher_layers = self.teacher_shape.num_layers
        self.student_last = hidden_tap(self.student_layers)
        self.teacher_last = hidden_tap(self.teacher_layers)
        self.intervenes = cfg["causal_ce_weight"] > 0 or cfg["causal_cos_weight"] > 0

    # ------------------------------------------------------------------ plan

    def aligned_taps(self, layer: int | None) -> tuple[list[str], list[str]]:
        """Tap names of the interchanged hidden states (student, teacher) for student ``layer``
        (the full alignment's draw; ignored by middle and late)."""
        s_idx, t_idx = aligned_layers(self.config, self.student_layers, self.teacher_layers, layer)
        return [hidden_tap(i) for i in s_idx], [hidden_tap(i) for i in t_idx]

    @staticmethod
    def drawn_layer(previous: PassView) -> int:
        """The full alignment's student layer of this step, read back from pass 0's features:
        pass 0 records student hidden state ℓ and possibly the last one (S ≥ ℓ), so ℓ is the
        smallest recorded index."""
        return min(hidden_index(tap) for tap in previous.student.features)

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int,
             previous: PassView | None) -> PassPlan | None:
        cfg = self.config
        teacher = teacher_key(self.teacher_name)
        if pass_index == 0:
            s_feats: set[str] = set()
            t_feats: set[str] = set()
            if self.intervenes:  # record what pass 1 writes into the dual examples
                layer = None
                if cfg["alignment"] == "full":
                    layer = int(torch.randint(1, self.student_layers + 1, (1,), generator=step.generator))
                s_taps, t_taps = self.aligned_taps(layer)
                s_feats.update(s_taps)
                t_feats.update(t_taps)
            if cfg["cos_weight"] > 0:
                s_feats.add(self.student_last)
                t_feats.add(self.teacher_last)
            models = {STUDENT: ForwardRequest(features=frozenset(s_feats))}
            if t_feats or cfg["ce_weight"] > 0:
                models[teacher] = ForwardRequest(features=frozenset(t_feats))
            return PassPlan(models)
        if pass_index > 1 or not self.intervenes or previous is None:
            return None
        s_taps, t_taps = self.aligned_taps(self.drawn_layer(previous) if cfg["alignment"] == "full" else None)
        batch = previous.batch
        change = draw_interchange(cfg["interchange"], batch["attention_mask"], step.generator,
                                  ratio=cfg["interchange_ratio"], max_tokens=cfg["max_interchange_tokens"],
                                  skip_ends=cfg["skip_ends"], labels=batch.get("labels"))
        # Student sources keep their pass-0 graph (pass 0 contributes, so it lives until the
        # backward); the teacher's come from its no-grad pass-0 run.
        s_ops = {tap: change.operation(previous.student.features[tap]) for tap in s_taps}
        t_view = previous.teacher(self.teacher_name)
        t_ops = {tap: change.operation(t_view.features[tap]) for tap in t_taps}
        cos = cfg["causal_cos_weight"] > 0
        return PassPlan({
            STUDENT: ForwardRequest(features=frozenset({self.student_last} if cos else ()), operations=s_ops),
            teacher: ForwardRequest(features=frozenset({self.teacher_last} if cos else ()), operations=t_ops),
        })

    # ------------------------------------------------------------------ loss

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int,
             outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        s_out = outputs.student
        prefix, ce_w, cos_w = (("", cfg["ce_weight"], cfg["cos_weight"]) if pass_index == 0 else
                               ("causal_", cfg["causal_ce_weight"], cfg["causal_cos_weight"]))
        terms: dict[str, torch.Tensor] = {}
        if ce_w > 0:
            z, zt = s_out.logits, teacher_logits(outputs, self.teacher_name, self.name)
            mask = position_mask(cfg["ce_mask"], outputs.batch) if z.dim() == 3 else None
            terms[prefix + "ce"] = ce_w * losses.kl_divergence(z, zt, cfg["temperature"], mask)
        if pass_index == 0 and cfg["mlm_weight"] > 0 and s_out.task_loss is not None:
            terms["mlm"] = cfg["mlm_weight"] * s_out.task_loss
        if cos_w > 0:
            t_hidden = outputs.teacher(self.teacher_name).features[self.teacher_last]
            terms[prefix + "cos"] = cos_w * losses.cosine_distance(
                s_out.features[self.student_last], t_hidden, outputs.batch["attention_mask"])
        return terms
