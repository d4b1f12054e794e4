"""ALP-KD method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.alp_kd.method import ALPKD

SPEC = MethodSpec(
    name="alp-kd",
    summary="ALP-KD: each student layer matches (MSE) an attention-weighted mix of all teacher layers, "
            "plus soft and hard losses.",
    citation="Passban, Wu, Rezagholizadeh, Liu. ALP-KD: Attention-Based Layer Projection for Knowledge "
             "Distillation. AAAI 2021.",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(teacher=("layers.{i}.output", "logits"), student=("layers.{i}.output", "logits")),
    has_parameters=False,
    config_schema=load_schema(__name__),
    factory=ALPKD,
    notes="Follows the paper where the reference code differs: the ALP term is weighted by λ = alp_weight "
          "(default 0.2, the reference's --alp_kd_lambda, which the reference defined but never applied, so its "
          "ALP term had weight 1). As in the paper and the reference, the attention weights are the softmax of "
          "raw dot products over all teacher hidden states 1..T (embeddings excluded) for every student hidden "
          "state 1..S, and the gradient flows through the weights. pooling: cls (default) uses one [CLS] vector "
          "per example (token 0 in encoders) as the reference does, and as the paper does after PKD; in decoders "
          "cls takes the last real token instead of token 0, which under causal attention has seen only itself. "
          "pooling: tokens (not in the reference) attends per token and averages the MSE over real tokens only. Hidden states are the layer outputs (post-LN in encoders, "
          "the residual stream in decoders), not GLM's pre-LN layernorm_output. The soft term defaults to the "
          "reference's task-stage soft cross-entropy without τ² (soft_loss: kl gives τ²·KL). Validation rejects "
          "unequal hidden sizes while alp_weight > 0 (no projection), and soft_weight > 0 with a teacher without "
          "a task head.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
