"""Universal-KD method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.universal_kd.method import UniversalKD

SPEC = MethodSpec(
    name="universal-kd",
    summary="Universal-KD: per-layer learned projections into a common output space, attention over the "
            "teacher layers, KL to the attended teacher mix; plus soft and hard losses.",
    citation="Wu, Rezagholizadeh, Ghaddar, Haidar, Ghodsi. Universal-KD: Attention-based Output-Grounded "
             "Intermediate Layer Knowledge Distillation. EMNLP 2021.",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(teacher=("layers.{i}.output", "logits"), student=("layers.{i}.output", "logits")),
    has_parameters=True,
    config_schema=load_schema(__name__),
    factory=UniversalKD,
    notes="As in the reference: one bias-free projection per layer and model into u = size dimensions (0 = the "
          "student's width), trained jointly with the student through the KL term only; the paper grounds them as "
          "pseudo classifiers in the output space, which size = number of classes approximates (no separate "
          "classifier training step). The attention weights are the softmax of raw dot products of projected "
          "vectors, KL(softmax c_i ‖ softmax z_i) is taken over the projected dimension (vectors as logits, no "
          "temperature) and summed over student layers, averaged over examples. The projections are replicated "
          "nn.Linear layers (the reference used ColumnParallelLinear with a gather): hidden states are "
          "replicated, so no communication is needed under tensor parallelism. Differences from the reference: "
          "hidden states are the layer outputs (post-LN in encoders, the residual stream in decoders), not GLM's "
          "pre-LN layernorm_output; pooling: cls takes the last real token in decoders instead of token 0 (which "
          "under causal attention has seen only itself); pooling: mean averages over real tokens only; "
          "layers: all also matches the last hidden states (the reference's --universal_kd_cg, last layer only, is "
          "not offered). The gradient flows through the attention weights and both projections. The soft "
          "term defaults to the reference's task-stage soft cross-entropy without τ². Validation rejects "
          "layers: intermediate with a one-layer model and soft_weight > 0 with a teacher without a task head.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
