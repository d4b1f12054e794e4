"""Continuation-KD method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.continuation_kd.method import ContinuationKD

SPEC = MethodSpec(
    name="continuation-kd",
    summary="Continuation-KD: per example ψ·hard + (1 − ψ)·MSE(z, φ·ẑ), the MSE kept only above a margin; ψ and φ "
            "grow over the stage.",
    citation="Jafari, Kobyzev, Rezagholizadeh, Poupart, Ghodsi. Continuation KD: Improved Knowledge Distillation "
             "through the Lens of Continuation Optimization. Findings of EMNLP 2022.",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(teacher=("logits",), student=("logits",)),
    config_schema=load_schema(__name__),
    factory=ContinuationKD,
    notes="Loss, as the reference (GLMKD) computes it: mean over the batch of ψ·H_b + (1 − ψ)·MSE_b(z, φ·ẑ)·[MSE_b > "
          "margin·φ], logged as two terms: hard = hard_weight·ψ·mean_b H_b (H_b = the view's task_loss_per_example) "
          "and soft = (1 − ψ)·mean_b(MSE_b·gate_b). Their sum is the formula; the gate is computed on detached "
          "values and a gated-out example still counts in the batch mean. Schedules come from the step context only "
          "(no state): φ as in annealing-kd (T = max(1, ⌈(1 − progress)·τ_max⌉), φ = 1 − (T − 1)/τ_max, τ_max 10); "
          "ψ = progress/psi_denominator (1.333), set to 1 once progress > psi_switch (0.666), so the last third of "
          "the stage is the hard loss alone. These constants, the margin and the per-example gate are the "
          "reference's (its used command line); the paper's text could not be consulted offline to confirm them, so "
          "all three are config fields. MSE_b is the mean over the example's logits (classification: its classes; "
          "token-level tasks: the vocabulary entries of its real tokens, padding excluded; the reference's "
          "fine-tuning MSE ignored its mask through the 'maks=' typo); H_b is the mean over the example's labelled "
          "tokens. Fixed: the schedules read the step context, not the global args.iteration. The student should "
          "start from a PD checkpoint (student.init: {strategy: run, …}), as in the reference. Validation rejects a "
          "teacher without a task head and logits of another width than the student's.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
