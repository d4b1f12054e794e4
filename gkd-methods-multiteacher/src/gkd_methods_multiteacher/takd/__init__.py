"""TAKD method plugin (teacher-assistant chains)."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_multiteacher.takd.method import TAKD

SPEC = MethodSpec(
    name="takd",
    summary="TAKD: a chain teacher → assistant(s) → student, each link distilled from the previous one "
            "((1−λ)·hard + λ·τ²·KL at τ 10).",
    citation="Mirzadeh, Farajtabar, Li, Levine, Matsukawa, Ghasemzadeh. Improved Knowledge Distillation via Teacher "
             "Assistant. AAAI 2020.",
    kind="teacher-assistant",
    stages=("pretrain", "task"),
    features=FeatureUse(teacher=("logits",), student=("logits",)),
    config_schema=load_schema(__name__),
    factory=TAKD,
    notes="Each link is a stage: the link's student distils from its one teacher, the previous link, and the stage "
          "sets publish_as_teacher so that the next link (a stage with a fresh, smaller student_init, e.g. truncated "
          "from the published assistant) distils from it. Without a 'teachers' list on the entry or the stage, takd "
          "reads the teacher published last before its stage (or the last configured teacher): the previous link. "
          "The trainer fingerprints every finished link and reuses it on a re-run whose inputs are unchanged. "
          "Loss: the paper's (1−λ)·hard + λ·τ²·KL(teacher‖student). The paper tuned λ and τ per experiment "
          "(λ in [0.05, 1], τ in {1, 2, 5, 10, 15, 20}); the defaults λ = soft_weight = 0.5, hard_weight = 1−λ = 0.5 "
          "and τ = 10 follow the GLMKD reference's runs (KD, τ 10, soft and hard weights 1 and 1: the same ratio at "
          "twice the scale). KL is the per-example (per real token) mean; the authors' code used nn.KLDivLoss's "
          "element mean, which also divides by the number of classes. Padding positions are "
          "excluded; the hard term is the engine's task loss.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
