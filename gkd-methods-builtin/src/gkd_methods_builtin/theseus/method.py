"""BERT-of-Theseus (Xu et al., 2020): progressive module replacing.

The teacher's layers are grouped into S contiguous blocks (``uniform_map``); student layer j is
the *successor* of teacher block j. Every training forward pass runs a hybrid stack: student layer
j with probability r (the replacement rate), teacher block j otherwise, and the only loss is the
task loss of that hybrid model. r grows from r0 to 1 over the first κ of the stage, after which
the student trains alone. Evaluation always runs the pure student.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from gkd.methods import (
    STUDENT,
    FeatureIssue,
    ForwardRequest,
    GkdError,
    Method,
    MethodContext,
    PassPlan,
    PassView,
    StepContext,
    depth_issues,
    raise_issues,
    swap_layers,
    teacher_key,
    uniform_map,
)


def replacement_rate(config: Mapping[str, Any], progress: float) -> float:
    """The probability r that a student layer replaces its teacher block at ``progress`` ∈ [0, 1).

    ``linear`` (the paper's curriculum): ``r = min(1, r0 + (1 − r0)·progress/κ)``; ``constant``:
    ``r0`` while ``progress < κ``, then 1 (successor fine-tuning). Always in [r0, 1].
    """
    r0, kappa = float(config["replacing_rate"]), float(config["not_replaced_fraction"])
    if progress >= kappa:  # exactly 1 from κ on (no rounding below 1, so nothing is drawn)
        return 1.0
    if config["schedule"] == "constant":
        return r0
    return min(1.0, max(0.0, r0 + (1.0 - r0) * progress / kappa))


def draw_student_layers(num_layers: int, rate: float, generator: torch.Generator,
                        require_one: bool = True) -> tuple[bool, ...]:
    """Which student layers run (True) and which are replaced by their teacher block (False).

    Each layer is an independent Bernoulli(``rate``) draw, ``u_j < rate`` with ``u`` uniform from
    ``generator``; with ``require_one`` the whole draw is repeated until some layer is True. At
    ``rate >= 1`` every layer runs and nothing is drawn.
    """
    if rate >= 1.0:
        return (True,) * num_layers
    while True:
        kept = tuple(bool(u < rate) for u in torch.rand(num_layers, generator=generator))
        if any(kept) or not require_one:
            return kept


def _a(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


class FrozenLayer(nn.Module):
    """A teacher layer that runs inside the student's forward pass without becoming trainable.

    The layer is called with *detached* parameters (``torch.func.functional_call``), so autograd
    flows through it to the student layers below, but never into the teacher's parameters, even
    when something left ``requires_grad=True`` on them. It runs in the teacher's mode (eval: no
    dropout) and dtype; the hidden states are cast to that dtype and back. The layer is held in a
    tuple, not as a sub-module, so this wrapper owns no parameters.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self._layer = (layer,)

    @property
    def layer(self) -> nn.Module:
        return self._layer[0]

    @property
    def config(self) -> Any:
        """The layer's megatron config (the model checks ``config.hidden_size`` of swapped-in layers)."""
        return self.layer.config

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The layer's forward (``hidden_states`` ``[s, b, h]``, the rest as the model passes it)."""
        params = {name: p.detach() for name, p in self.layer.named_parameters()}
        dtype = next(iter(params.values())).dtype if params else hidden_states.dtype
        out = functional_call(self.layer, params, (hidden_states.to(dtype), *args), kwargs)
        return out.to(hidden_states.dtype)


class LayerSwap:
    """The ``layers`` operation of one forward pass: student layer j if ``kept[j]``, else teacher block j.

    Attributes:
        kept: The draw, one flag per student layer (for logging and tests).
        rate: The replacement rate it was drawn with.
    """

    def __init__(self, kept: Sequence[bool], rate: float, blocks: Sequence[Sequence[nn.Module]]) -> None:
        self.kept = tuple(kept)
        self.rate = rate
        self._swap = swap_layers({j: list(blocks[j]) for j, keep in enumerate(self.kept) if not keep})

    def __call__(self, layers: list[nn.Module]) -> list[nn.Module]:
        if len(layers) != len(self.kept):
            raise GkdError(f"theseus: drew {len(self.kept)} student layers, but the student's stack has {len(layers)}; "
                           "another operation changed the layer stack (do not combine theseus with one)")
        return self._swap(layers)


class Theseus(Method):
    name = "theseus"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        """Teacher layers must run in the student's stack: one family, one hidden size, a teacher
        at least as deep as the student (one non-empty block per student layer); the hard loss
        needs the student's task head."""
        s = context.student
        issues: list[FeatureIssue] = []
        for name, t in context.teachers.items():
            label = f"teacher '{name}'"
            if t.family != s.family:
                issues.append(FeatureIssue(label, None, (
                    f"theseus: runs {label}'s layers inside the student's stack, so both must be of one family, but "
                    f"the student is {_a(s.family)} and {label} {_a(t.family)}; truncate the student from the teacher "
                    "(student.init.strategy: truncate)")))
            if t.hidden_size != s.hidden_size:
                issues.append(FeatureIssue(label, None, (
                    f"theseus: runs {label}'s layers on the student's hidden states, so the widths must be equal, but "
                    f"the student has hidden_size {s.hidden_size} and {label} {t.hidden_size}; truncate the student "
                    "from the teacher (student.init.strategy: truncate)")))
            issues += depth_issues(cls.name, context, mapping="replaces each student layer by a block of teacher layers",
                                   teachers=[name])
        if config["hard_weight"] > 0 and s.has_logits is False:
            issues.append(FeatureIssue("student", "hard_weight", (
                "theseus: trains on the task loss of the hybrid model, but the student has no task head; give the "
                "student the task's head")))
        return issues

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        claims = {"forward:layers": "replacing_rate"}
        if config["hard_weight"] > 0:
            claims["hard_loss"] = "hard_weight"
        return claims

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))
        self.boundaries = uniform_map(self.teacher_shape.num_layers, context.student.num_layers)
        self._blocks: list[list[FrozenLayer]] = []  # a plain list: the teacher stays out of the auxiliary model

    def setup(self, models: Mapping[str, nn.Module]) -> None:
        teacher = models[teacher_key(self.teacher_name)]
        layers = list(teacher.layers)  # type: ignore[union-attr]
        if len(layers) != self.boundaries[-1]:
            raise GkdError(f"theseus: teacher '{self.teacher_name}' has {len(layers)} layers, its shape said "
                           f"{self.boundaries[-1]}")
        m = self.boundaries
        self._blocks = [[FrozenLayer(layer) for layer in layers[m[j]:m[j + 1]]] for j in range(len(m) - 1)]

    def rate(self, step: StepContext) -> float:
        """The replacement rate of this step (a function of ``step.progress`` only)."""
        return replacement_rate(self.config, step.progress)

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        if not self._blocks:
            raise GkdError("theseus: setup(models) was not called; the teacher blocks are unknown")
        rate = self.rate(step)
        kept = draw_student_layers(len(self._blocks), rate, step.generator, self.config["require_student_layer"])
        # The teacher is not run on its own: its blocks run inside the student's forward pass. When
        # every student layer is kept the operation returns the student's own stack unchanged.
        return PassPlan({STUDENT: ForwardRequest(operations={"layers": LayerSwap(kept, rate, self._blocks)})})

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        weight = self.config["hard_weight"]
        if weight <= 0:
            return {}
        task = outputs.student.task_loss
        if task is None:
            raise GkdError("theseus: trains on the task loss of the hybrid model, but the batch has no labels")
        return {"hard": weight * task}
