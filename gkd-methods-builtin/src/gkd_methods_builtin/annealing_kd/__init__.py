"""Annealing-KD method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.annealing_kd.method import AnnealingKD

SPEC = MethodSpec(
    name="annealing-kd",
    summary="Annealing-KD: MSE between the student's logits and the teacher's logits scaled by φ, annealed "
            "from 1/τ_max to 1.",
    citation="Jafari, Rezagholizadeh, Sharma, Ghodsi. Annealing Knowledge Distillation. EACL 2021.",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(teacher=("logits",), student=("logits",)),
    config_schema=load_schema(__name__),
    factory=AnnealingKD,
    notes="Phase 1 of the paper: the term annealing = MSE(z, φ·ẑ) with φ = 1 − (T − 1)/τ_max. Phase 2 (the hard "
          "loss alone) is a plain stage without methods after this one (examples/methods/annealing-kd.yaml); the "
          "paper and the reference start the student from a PD (pre-trained) checkpoint "
          "(student.init: {strategy: run, …}). Schedule, read from the step context only (no state): anneal_by "
          "iteration (default, the reference) uses T = max(1, ⌈(1 − progress)·τ_max⌉), computed in integers; over a "
          "stage of exactly τ_max epochs it is the paper's one-temperature-per-epoch schedule, over any other length "
          "the same τ_max steps spread evenly. anneal_by epoch is the paper's T = max(1, τ_max − epoch). The MSE is the "
          "mean over the logits' elements (the paper writes a squared L2 norm: the same up to the number of classes); "
          "token-level logits average over real tokens only (the reference's fine-tuning MSE ignored its mask through "
          "the 'maks=' typo). hard_weight (default 0) adds the gold-label term in the same stage and then claims the "
          "hard loss. Validation rejects a teacher without a task head and logits of another width than the student's.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
