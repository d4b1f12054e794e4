"""RL-KD method plugin (multi-teacher, with a learned teacher-selection agent)."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_multiteacher.rl_kd.method import RLKD

SPEC = MethodSpec(
    name="rl-kd",
    summary="RL-KD: an agent picks, per example, the teachers to distil from (Bernoulli actions on a state from a "
            "semantic teacher and the teachers' logits and losses) and learns by REINFORCE from the student's loss; "
            "an average-teacher warm-up stage comes first.",
    citation="Yuan, Shou, Pei, Lin, Gong, Fu, Jiang. Reinforced Multi-Teacher Selection for Knowledge Distillation. "
             "AAAI 2021.",
    kind="multi-teacher",
    stages=("task",),
    features=FeatureUse(teacher=("logits", "layers.{i}.output"), student=("logits",)),
    has_parameters=True,
    config_schema=load_schema(__name__),
    factory=RLKD,
    notes="Two stages, as in the paper and the reference: mode average (the warm-up, soft_weight·mean over teachers "
          "of the per-example soft loss + hard_weight·hard; the reference's --rl_kd_only_avg) then mode select. "
          "Defaults are the reference's used settings: soft CE at τ=10, α=0.5 (soft_weight 0.5, hard_weight 0.5). "
          "Teachers: the entry lists the distilled teachers plus, for select, the semantic teacher named by "
          "semantic_teacher, which gives the state and is not distilled from (it needs no task head). "
          "State, as in the paper (sentence representation, the teachers' predictions, the teachers' loss on the gold "
          "label) and the reference: the semantic teacher's last hidden state (layers.{L-1}.output) at the first token "
          "for encoders ([CLS], the reference's token 0) or at the last real token for decoders, or its mean over "
          "real tokens (semantic_pooling: mean) — not the pooler output: a spec's features are checked against "
          "every teacher and decoders have none; each teacher's per-example gold CE; each teacher's logits, for "
          "token-level tasks averaged over the real tokens. Policy as in the reference, one joint linear map over "
          "all teachers' features, π = σ(state1([semantic ; CE]) + state2([logits])) with one output per teacher "
          "(the paper's per-teacher linear policy σ(W·F(s_k)+b) is the special case of zero cross-teacher weights). "
          "Actions a ~ Bernoulli(π) per (example, teacher), drawn with the step generator. Terms: select = "
          "soft_weight·mean_{b,i}(L_{b,i}·a_{b,i}) (mean over all example-teacher pairs, as in the reference; the "
          "actions are samples, so no gradient reaches the agent), agent = agent_weight·REINFORCE on the previous "
          "step's state and actions, hard. Training, within the engine's one optimizer: the agent is a module of "
          "the auxiliary model, trained with the student by the agent term, whose gradient reaches only the agent "
          "(state, actions and reward detached). As in the reference, the reward of the actions taken at step t is "
          "measured at step t+1 (the student's loss after the update those actions shaped, on the next batch): a "
          "delayed batch-level reward. The paper instead stores (state, action, reward) over an episode and updates "
          "the policy once per episode, after pre-training the student on the teachers' average (mode average) and "
          "pre-training the policy with the student fixed; the episodic update and the separate policy pre-training "
          "are not implemented. The previous state and actions are module buffers (prev_semantic, prev_teacher_ce, "
          "prev_teacher_logits, prev_action; plain tensors in auxiliary.safetensors), the JSON state holds "
          "has_previous; the agent term is absent on the first step of a select stage. With gradient accumulation "
          "the previous step is the previous micro-batch. Rewards: student_ce R = −H_student (reference type 1); "
          "student_ce_and_distill R = −(H_student + mean over teachers of the mean soft loss) (reference type 2). "
          "Reference bugs fixed: the policy gradient uses log-probabilities, −mean[(a·log π + (1−a)·log(1−π))·R] "
          "(the reference multiplied the probabilities π·a + (1−π)(1−a)); reward type 2 subtracts the mean over "
          "all teachers (the reference used the loss of whichever teacher came last in its loop); no hard-coded "
          "class counts (C is the student's num_labels, or the vocabulary for token-level tasks). Added: an "
          "optional moving-average reward baseline (baseline: moving_average, kept in the JSON state; off by "
          "default, as in the paper and the reference). For token-level tasks L_{b,i} is each example's mean over "
          "its real tokens and the terms average over examples, so average mode equals select mode with every "
          "action 1. Validation rejects a semantic teacher that is not one of the entry's teachers, mode select "
          "without one, an entry whose only teacher is the semantic one, and distilled teachers without a task "
          "head or with logits of another width than the student's.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
