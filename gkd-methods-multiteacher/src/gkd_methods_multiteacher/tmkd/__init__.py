"""TMKD method plugin (multi-teacher)."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_multiteacher.tmkd.method import TMKD

SPEC = MethodSpec(
    name="tmkd",
    summary="TMKD: the student matches the logits of several teachers, soft losses averaged over teachers.",
    citation="Yang et al. Model Compression with Two-stage Multi-teacher Knowledge Distillation for Web Question "
             "Answering System. WSDM 2020.",
    kind="multi-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(teacher=("logits",), student=("logits",)),
    config_schema=load_schema(__name__),
    factory=TMKD,
    notes="As in the GKD reference, the original multi-header student is not built; the hard loss is added once. "
          "The hard term is the engine's task loss (gkd.methods.losses.task_loss): for token-level tasks one mean "
          "over all labelled tokens of the batch (earlier versions averaged per-example means). Validation rejects a "
          "teacher without a task head or with logits of another width than the student's.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
