"""DGKD method plugin (multi-teacher, the end of a teacher-assistant chain)."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_multiteacher.dgkd.method import DGKD

SPEC = MethodSpec(
    name="dgkd",
    summary="DGKD: every earlier teacher and assistant of a chain guides the student; each is dropped at random "
            "per step and dropped teachers are not run.",
    citation="Son, Na, Choi, Hwang. Densely Guided Knowledge Distillation using Multiple Teacher Assistants. "
             "ICCV 2021.",
    kind="multi-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(teacher=("logits",), student=("logits",)),
    config_schema=load_schema(__name__),
    factory=DGKD,
    notes="The entry's teachers are every earlier teacher and assistant (a stage without a 'teachers' list gets all "
          "teachers defined or published before it). In every forward each teacher survives independently with "
          "probability 'survival' (0.75, the GLMKD reference's --avgmt_teacher_survival_p), drawn from the step "
          "generator; drop: count instead drops exactly drop_count teachers chosen uniformly, as the authors' code "
          "does (its default: one). Only the survivors are in the plan, so the engine does not run the dropped "
          "teachers (the reference ran every teacher and discarded terms afterwards). Loss: "
          "soft_weight·Σ_survivors soft_i + hard_weight·hard, a sum over the survivors as in the authors' code and "
          "the reference (reduction: mean averages instead); when none survives the soft term is 0 and only the "
          "hard term trains. Defaults: τ²·KL (the authors' code's KD loss; the GLMKD reference used soft CE without "
          "τ², soft_loss: ce) at τ 10 with soft and hard weights 0.5 each, the reference's runs (the authors' code "
          "defaults to τ 5 and λ 1, no hard term). KL is the per-example (per real token) mean; the authors' code "
          "used nn.KLDivLoss's element mean, which also divides by the number of classes. The draws come from the "
          "generator, so a resumed run drops the same teachers; with gradient accumulation each micro-batch draws "
          "its own survivors. The hard term is added once, not per teacher.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
