"""CKD method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.ckd.method import CKD

SPEC = MethodSpec(
    name="ckd",
    summary="CKD: word-relation and layer-transforming-relation distillation (distance and angle), plus soft "
            "and hard losses.",
    citation="Park, Kim, Yang. Distilling Linguistic Context for Language Model Compression. EMNLP 2021.",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(teacher=("embeddings", "layers.{i}.output", "logits"),
                        student=("embeddings", "layers.{i}.output", "logits")),
    has_parameters=False,
    config_schema=load_schema(__name__),
    factory=CKD,
    notes="Relations as in the paper and the reference (whose losses come from the CKD authors' code): WR-Dist "
          "and LTR-Dist are KL(teacher ‖ student) between softmax distributions of cosine similarities (the "
          "diagonal excluded), WR-Angle and LTR-Angle squared errors of triplet angle cosines; student hidden "
          "states 0..S are paired with the teacher's at the uniform map (embeddings, contiguous blocks, last "
          "layer). Bounded cost: WR-Angle uses only the triplets within a local window around each vertex token "
          "(window_size, default 21, as the reference and the paper's local window), b·L·s·(window−1)² angles "
          "per model, computed from Gram matrices without materialising difference vectors; LTR-Angle uses all "
          "layer triplets (b·s·L³); nothing is sampled. Fixes vs. the reference: padding never enters a relation "
          "(pairs and triplets over real tokens only) and every term is divided by the number of tokens that "
          "have a relation, so padding never dilutes a mean; each term is summed over layers (WR) or relation "
          "rows (LTR) and averaged over tokens. Decoders: a token's word relations use only the preceding real "
          "tokens (the context it sees under causal attention); layer relations are per token and need no "
          "causal mask. Hidden states are the layer outputs (post-LN in encoders, the residual stream in "
          "decoders), not GLM's pre-LN layernorm_output. The soft term defaults to the reference's task-stage "
          "soft cross-entropy without τ². Validation rejects a teacher shallower than the student and "
          "soft_weight > 0 with a teacher without a task head.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
