"""RL-KD (Yuan et al., 2021): a learned agent chooses, for every example, the teachers the student
distils from, and learns by REINFORCE from the student's loss.

Two stages, as in the paper and the reference: ``mode: average`` warms the student up on the mean
of the teachers' soft losses; ``mode: select`` trains the student on the teachers the agent picks
and the agent on the reward those picks earned.

The agent (``state1``, ``state2``; module attributes, so the engine's one optimizer trains them
with the student) maps a state to one logit per distilled teacher, ``π = σ(z)``::

    z = state1([semantic representation ; per-teacher gold CE]) + state2([teacher logits, concatenated])

Its ``agent`` term is REINFORCE on the *previous* step's state and actions, kept in module buffers
(saved with the auxiliary model), with the reward measured now, after the update those actions
shaped: ``−mean[(a·log π + (1−a)·log(1−π))·A]``, ``A = R`` (or ``R − baseline``). Its gradient
reaches only the agent: the state, the actions and the reward are detached. The ``select`` term
``soft_weight·mean_{b,i}(L_{b,i}·a_{b,i})`` reaches only the student: the actions are samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
    hard_loss_claim,
    hidden_tap,
    logits_issues,
    losses,
    raise_issues,
    teacher_key,
    teacher_logits,
)

BUFFERS = ("prev_semantic", "prev_teacher_ce", "prev_teacher_logits", "prev_action")
"""The previous step's state features and actions (module buffers, checkpointed with the auxiliary model)."""


def reinforce_loss(policy_logits: torch.Tensor, actions: torch.Tensor, advantage: torch.Tensor | float) -> torch.Tensor:
    """``−mean[(a·log π + (1−a)·log(1−π))·A]`` with ``π = σ(z)``: REINFORCE on log-probabilities
    (the reference multiplied the probabilities themselves). ``log π = logsigmoid(z)`` and
    ``log(1−π) = logsigmoid(−z)`` stay finite for any z."""
    a = actions.to(policy_logits.dtype)
    log_prob = a * F.logsigmoid(policy_logits) + (1 - a) * F.logsigmoid(-policy_logits)
    return -(log_prob * advantage).mean()


def token_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-example mean over the real tokens of ``[b, s, d]`` values (``[b, d]`` passes through)."""
    return values if values.dim() == 2 else losses.mean_pool(values, mask)


class RLKD(Method):
    name = "rl-kd"

    @classmethod
    def check(cls, config: Mapping[str, Any], context: MethodContext) -> list[FeatureIssue]:
        names = context.teacher_names
        semantic = config["semantic_teacher"]
        issues: list[FeatureIssue] = []
        if semantic is not None and semantic not in context.teachers:
            issues.append(FeatureIssue(
                f"teacher '{semantic}'", "semantic_teacher",
                f"{cls.name}: semantic_teacher '{semantic}' is not one of the entry's teachers ({', '.join(names)}); "
                "add it to the entry's teachers or name one of them"))
            return issues
        if config["mode"] == "select" and semantic is None:
            issues.append(FeatureIssue(
                "student", "semantic_teacher",
                f"{cls.name}: mode 'select' needs a semantic teacher for the agent's state; set semantic_teacher to "
                f"one of the entry's teachers ({', '.join(names)}), e.g. a pre-trained base model listed as an "
                "extra teacher"))
        distilled = [t for t in names if t != semantic]
        if not distilled:
            issues.append(FeatureIssue(
                f"teacher '{semantic}'", "semantic_teacher",
                f"{cls.name}: the only teacher, '{semantic}', is the semantic teacher, which is not distilled from; "
                "list at least one more teacher"))
            return issues
        return issues + logits_issues(cls.name, context, teachers=distilled)

    @classmethod
    def exclusive(cls, config: Mapping[str, Any]) -> dict[str, str]:
        return hard_loss_claim(config)

    def __init__(self, config: Mapping[str, Any], context: MethodContext) -> None:
        super().__init__(config, context)
        raise_issues(self.check(self.config, context))
        self.semantic: str | None = self.config["semantic_teacher"]
        self.distilled = [t for t in context.teacher_names if t != self.semantic]
        n = len(self.distilled)
        s = context.student
        classes = s.num_labels if (s.head == "classification" or context.task == "sequence_classification") \
            else s.vocab_size
        if not classes:
            raise GkdError(f"{self.name}: the student's number of classes is unknown; give it a classification head")
        self.num_classes = int(classes)
        sem_shape = context.teachers[self.semantic] if self.semantic is not None else None
        sem_width = sem_shape.hidden_size if sem_shape is not None else 0
        self.semantic_tap = hidden_tap(sem_shape.num_layers) if sem_shape is not None else None
        self.semantic_family = sem_shape.family if sem_shape is not None else None
        # The agent. Built in both modes (so has_parameters holds); average mode leaves it unused.
        self.state1 = nn.Linear(sem_width + n, n)
        self.state2 = nn.Linear(self.num_classes * n, n)
        for buffer, width in zip(BUFFERS, (sem_width, n, self.num_classes * n, n), strict=True):
            self.register_buffer(buffer, torch.zeros(0, width))

    # ------------------------------------------------------------------ state

    def initial_state(self) -> dict[str, Any]:
        if self.config["mode"] != "select":
            return {}
        state: dict[str, Any] = {"has_previous": False}
        if self.config["baseline"] == "moving_average":
            state["baseline"] = None
        return state

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The buffers' batch dimension is that of the step that wrote them: take the saved shape.
        for buffer in BUFFERS:
            saved = state_dict.get(prefix + buffer)
            current = self._buffers[buffer]
            if isinstance(saved, torch.Tensor) and current is not None and saved.shape != current.shape:
                self._buffers[buffer] = torch.zeros(saved.shape, dtype=current.dtype, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ plan

    def plan(self, step: StepContext, state: dict[str, Any], pass_index: int, previous: PassView | None) -> PassPlan | None:
        if pass_index > 0:
            return None
        models = {STUDENT: ForwardRequest()}
        models.update({teacher_key(t): ForwardRequest() for t in self.distilled})
        if self.config["mode"] == "select":
            assert self.semantic is not None and self.semantic_tap is not None
            models[teacher_key(self.semantic)] = ForwardRequest(features=frozenset({self.semantic_tap}))
        return PassPlan(models)

    # ------------------------------------------------------------------ agent

    def state_features(self, outputs: PassView) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The agent's state of this batch, detached, in the agent's dtype:
        the semantic representation ``[b, h_sem]``, the teachers' gold CE ``[b, n]`` and their
        logits (token tasks: mean over real tokens), concatenated ``[b, C·n]``."""
        assert self.semantic is not None and self.semantic_tap is not None
        mask = outputs.batch.get("attention_mask")
        hidden = outputs.teacher(self.semantic).features[self.semantic_tap].detach().float()
        if self.config["semantic_pooling"] == "mean":
            semantic = losses.mean_pool(hidden, mask)
        elif mask is None:
            semantic = hidden[:, -1] if self.semantic_family == "decoder" else hidden[:, 0]
        else:  # encoders: the first token ([CLS]); decoders: the last real token
            semantic = losses.summary_token(hidden, mask, self.semantic_family or "encoder")
        ce, logits = [], []
        for t in self.distilled:
            view = outputs.teacher(t)
            if view.task_loss_per_example is None:
                raise GkdError(f"{self.name}: mode 'select' needs gold labels: the agent's state holds each teacher's "
                               "loss on them and the reward is the student's")
            ce.append(view.task_loss_per_example.detach().float())
            logits.append(token_mean(teacher_logits(outputs, t, self.name).detach().float(), mask))
        dtype = self.state2.weight.dtype
        return semantic.to(dtype), torch.stack(ce, dim=1).to(dtype), torch.cat(logits, dim=1).to(dtype)

    def policy_logits(self, semantic: torch.Tensor, teacher_ce: torch.Tensor, teacher_state: torch.Tensor) -> torch.Tensor:
        """``z`` ``[b, n]``, with ``π = σ(z)`` the probability of distilling from each teacher."""
        return self.state1(torch.cat([semantic, teacher_ce], dim=-1)) + self.state2(teacher_state)

    def reward(self, outputs: PassView, per_example: torch.Tensor) -> torch.Tensor:
        """The reward of this step, a detached scalar: ``−H_student`` (``student_ce``), or
        ``−(H_student + mean_i mean_b L_{b,i})`` (``student_ce_and_distill``; the mean over all
        distilled teachers, where the reference took the last teacher's loss)."""
        h = outputs.student.task_loss
        if h is None:
            raise GkdError(f"{self.name}: mode 'select' needs gold labels: the reward is the student's loss on them")
        r = -h.detach().float()
        if self.config["reward"] == "student_ce_and_distill":
            r = r - per_example.detach().float().mean()
        return r

    # ------------------------------------------------------------------ loss

    def loss(self, step: StepContext, state: dict[str, Any], pass_index: int, outputs: PassView) -> dict[str, torch.Tensor]:
        cfg = self.config
        s_logits = outputs.student.logits
        mask = losses.logits_mask(s_logits, outputs.batch.get("attention_mask"))
        per_example = torch.stack([
            losses.soft_loss_per_example(cfg["soft_loss"], s_logits, teacher_logits(outputs, t, self.name),
                                         cfg["temperature"], mask)
            for t in self.distilled
        ], dim=1)  # [b, n]: L_{b,i}
        terms: dict[str, torch.Tensor] = {}
        if cfg["mode"] == "average":
            terms["soft"] = cfg["soft_weight"] * per_example.mean()
        else:
            terms.update(self._select_terms(step, state, outputs, per_example))
        if cfg["hard_weight"] > 0 and outputs.student.task_loss is not None:
            terms["hard"] = cfg["hard_weight"] * outputs.student.task_loss
        return terms

    def _select_terms(self, step: StepContext, state: dict[str, Any], outputs: PassView,
                      per_example: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        semantic, teacher_ce, teacher_state = self.state_features(outputs)
        reward = self.reward(outputs, per_example)
        advantage = reward
        if cfg["baseline"] == "moving_average":
            baseline = state.get("baseline")
            advantage = reward - (reward if baseline is None else baseline)
            m, value = cfg["baseline_momentum"], float(reward)
            state["baseline"] = value if baseline is None else m * baseline + (1 - m) * value
        terms: dict[str, torch.Tensor] = {}
        if state.get("has_previous") and cfg["agent_weight"] > 0 and self.prev_action.shape[0] > 0:
            z = self.policy_logits(self.prev_semantic, self.prev_teacher_ce, self.prev_teacher_logits)
            terms["agent"] = cfg["agent_weight"] * reinforce_loss(z, self.prev_action, advantage.to(z.dtype))
        with torch.no_grad():
            probs = torch.sigmoid(self.policy_logits(semantic, teacher_ce, teacher_state)).float()
        draw = torch.rand(tuple(probs.shape), generator=step.generator, dtype=torch.float32)
        action = (draw.to(probs.device) < probs).to(per_example.dtype)
        terms["select"] = cfg["soft_weight"] * (per_example * action).mean()
        # What the next step's agent term reinforces (it then sees the reward these actions earned).
        self.prev_semantic, self.prev_teacher_ce, self.prev_teacher_logits = semantic, teacher_ce, teacher_state
        self.prev_action = action.detach().to(self.state2.weight.dtype)
        state["has_previous"] = True
        return terms
