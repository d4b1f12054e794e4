"""TinyBERT method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.tinybert.method import TinyBERT

SPEC = MethodSpec(
    name="tinybert",
    summary="TinyBERT: embedding + hidden MSE through a learned W_h, attention-score MSE, prediction soft CE.",
    citation="Jiao et al. TinyBERT: Distilling BERT for Natural Language Understanding. Findings of EMNLP 2020.",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(
        teacher=("embeddings", "layers.{i}.output", "layers.{i}.attention.scores", "logits"),
        student=("embeddings", "layers.{i}.output", "layers.{i}.attention.scores", "logits"),
    ),
    has_parameters=True,
    config_schema=load_schema(__name__),
    factory=TinyBERT,
    notes="Run general distillation (prediction: false) then a task step with hidden/attention/embeddings false and "
          "prediction: true, as two stages. Follows the paper where the reference code differs: W_h has no bias "
          "(eq. 8 of the paper; the reference's nn.Linear had one). Fixes vs. the reference: W_h is applied inside "
          "TinyBERT's loss only, so combined methods never see projected features; padded and causally masked "
          "attention entries are excluded from the score MSE instead of cancelling through a -65504 fill; the random "
          "layer choice is part of the checkpointed method state (drawn only when hidden or attention is on). "
          "Validation rejects unequal head counts with attention: true, a teacher shallower than the student, and "
          "prediction: true with a teacher without a task head.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
