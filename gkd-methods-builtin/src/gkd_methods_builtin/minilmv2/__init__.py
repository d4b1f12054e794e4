"""MiniLMv2 method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.minilmv2.method import MiniLMv2

SPEC = MethodSpec(
    name="minilmv2",
    summary="MiniLMv2: KL of Q-Q, K-K and V-V self-attention relations over R relation heads.",
    citation="Wang et al. MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing Pretrained "
             "Transformers. Findings of ACL 2021.",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(
        teacher=("layers.{i}.attention.query", "layers.{i}.attention.key", "layers.{i}.attention.value"),
        student=("layers.{i}.attention.query", "layers.{i}.attention.key", "layers.{i}.attention.value"),
    ),
    has_parameters=False,
    config_schema=load_schema(__name__),
    factory=MiniLMv2,
    notes="Terms query, key, value: KL(R_teacher ‖ R_student) with R = softmax(X_r·X_rᵀ/√d_r), averaged over the "
          "relation heads and query positions, student last layer vs. teacher_layer (1-based, negative from the top; "
          "defaults R = 48 and layer 12 as the reference, so set teacher_layer for a teacher that is not 12 layers "
          "deep). Each model's heads are concatenated and re-split into R relation heads of its own size "
          "d_r = width/R, so head counts may differ. Decoders with grouped-query attention: keys and values are "
          "concatenated over their kv_heads, so their relation heads have size kv_heads·head_dim/R (R must divide "
          "that width too); queries and keys are taken after RoPE, as the model uses them. Fixes vs. the reference: "
          "padded keys and padded query rows are masked (decoders: future keys too), the reference had no mask. "
          "Tensor parallelism: when tp divides R, each rank's heads hold R/tp whole relation heads (the same ones in "
          "both models), so the KL is computed locally and the ranks' means averaged; otherwise the heads are "
          "gathered (gather_heads) and every rank computes the full loss. The reference required R divisible by tp "
          "and gathered along the key axis, mixing heads in one softmax. No hard term: combine with kd in a task "
          "stage.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
