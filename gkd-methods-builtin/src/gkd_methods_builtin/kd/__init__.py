"""KD method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.kd.method import KD

SPEC = MethodSpec(
    name="kd",
    summary="Hinton KD: soft loss on teacher logits (τ²·KL, soft CE or MSE) plus the hard loss.",
    citation="Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. arXiv:1503.02531, 2015.",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(teacher=("logits", "logits.vocab_shard"), student=("logits", "logits.vocab_shard")),
    config_schema=load_schema(__name__),
    factory=KD,
    notes="With hard_weight=0 and temperature=1 this is the task stage of PD (pre-trained distillation). "
          "Padding positions are excluded from token-level means (the reference divided by all positions). "
          "The hard term is the engine's task loss (gkd.methods.losses.task_loss): for token-level tasks one mean "
          "over all labelled tokens of the batch, as Hugging Face and Megatron compute it (earlier versions averaged "
          "per-example means). Under tensor parallelism with LM / MLM heads both terms are computed from the "
          "local vocabulary shards (logits.vocab_shard) with a distributed softmax: the full logits are never "
          "gathered. Validation rejects soft_weight > 0 with a teacher without a task head or with "
          "logits of another width than the student's.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
