"""DistilBERT method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.distilbert.method import DistilBERT

SPEC = MethodSpec(
    name="distilbert",
    summary="DistilBERT: cosine distance between the last hidden states, τ²·KL on the logits, plus the MLM (hard) loss.",
    citation="Sanh, Debut, Chaumond, Wolf. DistilBERT, a distilled version of BERT: smaller, faster, cheaper and "
             "lighter. arXiv:1910.01108, 2019.",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(teacher=("layers.{i}.output", "logits"), student=("layers.{i}.output", "logits")),
    config_schema=load_schema(__name__),
    factory=DistilBERT,
    notes="Weights default to the reference's (α_ce = α_mlm = α_cos = 1, τ = 1); the DistilBERT authors' training and "
          "the reference's used runs take soft_weight 5, hard_weight 2, cos_weight 1, temperature 2 (examples/methods/distilbert.yaml). "
          "The paper initialises the student from every other teacher layer, which the reference did not implement: "
          "use student.init {strategy: truncate, layers: strided}. Fixed: rows outside the mask are removed from "
          "the cosine and KL means (the reference kept masked cosine rows as distance 1 and divided the KL by every "
          "position). The hidden states are the last layer's outputs (layers.{S-1}.output, layers.{T-1}.output): in "
          "gkd's post-LN encoders the final normalised state, as the reference's transformer.output; in decoders "
          "the residual stream before the final RMSNorm (a method for both families cannot declare final_norm). "
          "The masks: labelled = positions with a token label (masked tokens of masked_lm as the reference's "
          "loss_mask, next-token positions of causal_lm; every real token for per-example labels), tokens = every "
          "real token. In a task stage the soft term is on the task logits and the hard term is the task loss. "
          "Not offered: --distilbert_fix_layernorm (a new student LayerNorm on the raw last-layer output); gkd's "
          "encoder taps are already post-LN. Validation rejects unequal hidden sizes with cos_weight > 0 (the "
          "reference asserted; it has no projection) and soft_weight > 0 with a teacher without a task head. "
          "Hidden states and logits are replicated under tensor parallelism: no communication is needed.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
