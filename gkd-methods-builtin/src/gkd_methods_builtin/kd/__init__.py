"""KD method plugin."""

from __future__ import annotations

from gkd import FeatureUse, MethodRegistrar, MethodSpec, hookimpl
from gkd.methods import load_schema
from gkd_methods_builtin.kd.method import KD

SPEC = MethodSpec(
    name="kd",
    summary="Hinton KD: soft loss on teacher logits (τ²·KL, soft CE or MSE) plus the hard loss.",
    citation="Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. arXiv:1503.02531, 2015.",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(teacher=("logits",), student=("logits",)),
    config_schema=load_schema(__name__),
    factory=KD,
    notes="With hard_weight=0 and temperature=1 this is the task stage of PD (pre-trained distillation). "
          "Padding positions are excluded from token-level means (the reference divided by all positions).",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
