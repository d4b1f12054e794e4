"""SID (stacked internal distillation) method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.sid.method import SID

SPEC = MethodSpec(
    name="sid",
    summary="Stacked internal distillation: layer by layer, bottom-up, cosine of the summary token's hidden "
            "states + per-head attention KL of every pair distilled so far; then soft labels.",
    citation="Aguilar, Ling, Zhang, Yao, Fan, Guo. Knowledge Distillation from Internal Representations. "
             "AAAI 2020.",
    kind="single-teacher",
    stages=("task",),
    features=FeatureUse(teacher=("layers.{i}.output", "layers.{i}.attention.scores"),
                        student=("layers.{i}.output", "layers.{i}.attention.scores")),
    config_schema=load_schema(__name__),
    factory=SID,
    notes="Phases: a counter k (JSON state {\"k\": 1}, saved in every checkpoint) runs from 1 to S+1. In phase k ≤ S "
          "student layers j = 1…k are distilled from teacher layers m[j] (uniform_map): the terms are cosine = "
          "cosine_weight·Σ_j (1 − cos) of the summary token of hidden_tap(j) and hidden_tap(m[j]), and attention = "
          "attention_weight·Σ_j KL(teacher ‖ student) of the per-head attention distributions of student layer j and "
          "teacher layer m[j] (softmax of the scores over the real keys, and for decoders the past ones; averaged over "
          "heads and real query rows). Only that phase's features are requested, so early phases extract less. Phase "
          "k = S includes the last pair hidden_tap(S) ↔ hidden_tap(T), the final hidden states. In phase S+1 only the "
          "prediction terms remain: soft (soft CE at τ = 1 by default, the reference's used setting) and, with "
          "hard_weight > 0, the gold-label term (which then claims the stage's hard loss). k advances in after_step: "
          "advance: schedule (default, the reference's used --sid_lim_e=avg) after iteration i while (i+1)·(S+1) ≥ "
          "k·N, N the stage's steps, i.e. S+1 equal phases (a stage shorter than S+1 steps skips phases); advance: threshold after a step whose logged cosine value "
          "is below threshold — that value is the sum over the active pairs times cosine_weight and the entry's "
          "weight (and the mean over gradient-accumulation micro-batches and data-parallel ranks, so that every "
          "rank moves together); the sum grows with k, so the threshold is per phase, not per pair. "
          "Paper vs reference: as the paper's [CLS] activations of each layer, the output of student layer j is compared "
          "with that of teacher layer m[j] (the reference, on pre-LN GLM, read layernorm_output of 0-based layer j — the same hidden state j "
          "after the next layer's input LayerNorm — and the final output for the last pair; gkd's post-LN encoder "
          "outputs are normalised already); the summary token is token 0 ([CLS]) for encoders and the "
          "last real token for decoders (token 0 of a decoder has seen nothing else; the reference always used token "
          "0). For decoders (pre-RMSNorm) the hidden states are the residual stream before the final norm. "
          "Fixes: the counter is checkpointed (the reference re-advanced it one phase per iteration after a resume); "
          "padded keys and query rows (and future keys in decoders) are excluded from the attention KL, which under "
          "tensor parallelism is computed per head on each rank and averaged (the reference gathered along the key "
          "axis, mixing heads); nothing is printed (the reference printed from every rank). Not implemented, as in "
          "the reference: locking (freezing) the layers already distilled — every student layer keeps training, the "
          "earlier layers through their stacked terms. Validation rejects a teacher shallower than the student, "
          "unequal hidden sizes with cosine_weight > 0, unequal head counts with attention_weight > 0, both layer "
          "terms off, both prediction terms off, advance: threshold without the cosine term, and soft_weight > 0 "
          "with a teacher without a task head.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
