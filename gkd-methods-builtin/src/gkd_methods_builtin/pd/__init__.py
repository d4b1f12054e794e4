"""PD (pre-trained distillation) method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.pd.method import PD

SPEC = MethodSpec(
    name="pd",
    summary="Pre-trained distillation: a student pre-trained with plain MLM, then soft CE on teacher logits at τ=1, no hard loss.",
    citation="Turc, Chang, Lee, Toutanova. Well-Read Students Learn Better: On the Importance of Pre-training "
             "Compact Models. arXiv:1908.08962, 2019.",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(teacher=("logits",), student=("logits",)),
    config_schema=load_schema(__name__),
    factory=PD,
    notes="Two runs: stage 1 is plain masked-LM pre-training of the compact student (a stage without methods in a "
          "task.type: masked_lm run, examples/methods/pd-pretrain.yaml); stage 2 is this method in a task run whose "
          "student starts from that run (student.init: {strategy: run, path: runs/methods/pd-pretrain}). "
          "examples/methods/pd.yaml truncates the teacher instead so that it runs on its own; the full recipe is "
          "`gkd distill examples/methods/pd-pretrain.yaml` then `gkd distill examples/methods/pd.yaml "
          "--set student.init.strategy=run --set student.init.path=runs/methods/pd-pretrain`. The loss is kd's "
          "(same code) with PD's defaults: soft cross-entropy at τ=1 without τ² and hard_weight 0, as the "
          "reference's `kd --distill_ft_soft --distill_temperature=1`. Like kd, padding is excluded from "
          "token-level means (the reference divided by all positions) and validation rejects a teacher without "
          "a task head or with logits of another width. The paper pre-trains the student from scratch; the "
          "example starts it truncated from the teacher to keep the run short.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
