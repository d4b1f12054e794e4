"""MGSKD method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.mgskd.method import MGSKD

SPEC = MethodSpec(
    name="mgskd",
    summary="MGSKD: pair-wise and triplet-angle relations of tokens and random spans (lower layers) and of samples "
            "(upper layers), matched between student and teacher; plus optional soft and hard losses.",
    citation="Liu et al. Multi-Granularity Structural Knowledge Distillation for Language Model Compression. "
             "ACL 2022.",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(
        teacher=("embeddings", "layers.{i}.output", "logits"),
        student=("embeddings", "layers.{i}.output", "logits"),
    ),
    config_schema=load_schema(__name__),
    factory=MGSKD,
    notes="Layer pairs: student hidden states 0..S with teacher hidden states 0, k, ..., (S-1)k and T (k = T // S), "
          "as the reference; pairs below sample_level_m get the token and span losses (pair-relation MSE + "
          "triplet-angle smooth-L1 at the teacher's top-k1 anchors x top-k2 neighbours, angles over the full "
          "vector as the reference), the others the sample loss (per-relation-head angles between mean-pooled "
          "examples). Fixes vs. the reference: span_max_rate 0 means no span level (the reference crashed); spans "
          "are drawn per example over its real tokens with the step's generator (the reference split the padded "
          "sequence once for the whole batch, so spans mixed in padding, and span means averaged padded "
          "positions); anchors and neighbours are chosen among real tokens/spans only, and triplets need a real "
          "anchor and two distinct real neighbours (the reference dropped degenerate ones by testing angle != 0); "
          "sample-level angles use triplets of three distinct examples only (the reference averaged in the "
          "constant degenerate ones, so the term shrank with the batch size); a batch of fewer than three "
          "examples gives a sample term of 0. Memory: token/span triplets gather the k1·k2 neighbour vectors before "
          "differencing, O(b·k1·k2·d) per layer instead of O(b·k1·s·d); sample angles are O(heads·b^3). "
          "Relations compare hidden states within each model, so decoders need no causal mask (padding is "
          "excluded the same way). The soft term defaults to soft cross-entropy without tau^2 (the reference's "
          "task-stage default; its second MGSKD step used soft_loss: kl, temperature 1, intermediate: false). "
          "Validation rejects relation_heads that do not divide both hidden sizes, a teacher shallower than the "
          "student, soft_weight > 0 with a teacher without a task head, and a config that adds no loss.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
