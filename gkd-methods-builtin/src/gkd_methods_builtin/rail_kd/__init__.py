"""RAIL-KD method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.rail_kd.method import RailKD

SPEC = MethodSpec(
    name="rail-kd",
    summary="RAIL-KD: random teacher layers (redrawn per epoch), mean-pooled, projected, L2-normalised and matched; "
            "plus optional soft and hard losses.",
    citation="Haidar et al. RAIL-KD: RAndom Intermediate Layer Mapping for Knowledge Distillation. "
             "Findings of NAACL 2022 (arXiv:2109.10164).",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(
        teacher=("embeddings", "layers.{i}.output", "logits"),
        student=("embeddings", "layers.{i}.output", "logits"),
    ),
    has_parameters=True,
    config_schema=load_schema(__name__),
    factory=RailKD,
    notes="Student hidden states 1..S-1 are paired with S-1 sorted random teacher hidden states out of 1..T-1, drawn "
          "with the step's generator at the first step of every resample_every_epochs block (or every "
          "resample_every_steps steps); the draw and the epoch/step it belongs to are the checkpointed method state, "
          "so a resumed run keeps its layers (the reference kept them in attributes). Fixes vs. the reference: "
          "(1) mean pooling over real tokens only (it pooled over padding); (2) the distance is the squared "
          "Euclidean distance of the normalised vectors averaged over the examples of the batch, as in the paper "
          "(the reference summed over the batch too, so the loss grew with the batch size); (3) layer_wise_alpha "
          "weights the per-layer distances of the layer_wise variant as the paper's alpha_i (the reference's "
          "--rail_kd_layer_wise_alpha was unused). The layer_wise variant shares one student and one teacher "
          "projection across all pairs, as the reference does. Decoders use the same mean over real tokens (every "
          "position is a sentence feature of its prefix; padding is excluded). The soft term defaults to soft "
          "cross-entropy without tau^2 (the reference's task-stage default; its pre-training default was "
          "soft_loss: kl). The hard term is the engine's task loss. Validation rejects a teacher shallower than "
          "the student, a 1-layer student without embeddings or final, per-layer alphas of the wrong length or "
          "with variant concat, and soft_weight > 0 with a teacher without a task head.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
