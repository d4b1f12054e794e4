"""DIITO method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.diito.method import DIITO

SPEC = MethodSpec(
    name="diito",
    summary="DIITO: DistilBERT's terms (τ²·KL, hard, cosine) plus τ²·KL between teacher and student after the same "
            "interchange intervention (hidden states of a span swapped in from the next example), two passes a step.",
    citation="Wu, Geiger, Rozner, Kreiss, Lu, Icard, Potts, Goodman. Causal Distillation for Language Models. "
             "NAACL 2022 (arXiv:2112.02505).",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(teacher=("layers.{i}.output", "logits"), student=("layers.{i}.output", "logits")),
    modifies_forward=True,
    config_schema=load_schema(__name__),
    factory=DIITO,
    notes="Two passes a step, both optimised. Pass 0: ce (τ²·KL on the logits), mlm (the student's hard loss: the "
          "MLM or causal-LM loss, the task loss in a task stage) and cos (cosine of the last hidden states over real "
          "tokens); it records the aligned hidden states. Pass 1 (logged diito.pass1.*): the dual of example i is "
          "example i+1 (the batch rolled by one); in the student and in the teacher the interchanged positions of "
          "every aligned hidden state take the dual's pass-0 values, and causal_ce is τ²·KL(intervened teacher ‖ "
          "intervened student) (causal_cos optional; no hard term). Defaults are the paper's and the reference's "
          "used run (every weight 0.25, causal_cos 0, τ 2, ratio 0.3). "
          "Alignment: full draws the student layer ℓ ∈ 1..S every step from the step generator and interchanges "
          "student hidden state ℓ and teacher hidden states m[ℓ-1]+1..m[ℓ] (stride_map as the reference, or "
          "layer_map: uniform); middle interchanges student hidden state ⌊S/2⌋+1 and teacher ⌊T/2⌋+1 (the "
          "reference's middle, and the paper's released 6-layer mapping: teacher layer output 6 ↔ student 3, "
          "0-based); late interchanges the last two hidden states of each model (the reference's late; only the last "
          "for a one-layer model). Hidden states are layers.{i}.output: post-LN layer outputs in encoders (the "
          "paper's BERT/DistilBERT layer outputs; the reference's GLM used the pre-LN layernorm_output), the "
          "residual stream in decoders. "
          "Interchange: consecutive (the paper) draws per example ⌊ratio·min(len, dual len)⌋ tokens (at most "
          "max_interchange_tokens) at a random start in the example and another in its dual, always inside both "
          "examples' real tokens; random and masked (the reference's other ways) pair positions in increasing "
          "order. Fixed: the reference drew random and masked positions over the padded length (padding could be "
          "swapped in); gkd draws only real tokens. skip_ends (not in the paper) keeps [CLS]/[SEP] or a decoder's "
          "first token out of the interchange. Spans have one length per example, so the operation is "
          "write_positions of the dual's gathered values (write_span's result for equal lengths). "
          "The student's sources are its own pass-0 features (the reference's rolled batch; the paper ran a "
          "separate student forward on a separately masked dual batch): they keep their pass-0 graph, so the "
          "causal term also trains the dual's computation; the teacher's come from its no-grad pass-0 run. "
          "ce_mask defaults to every real token (the paper's default; labelled = its --restrict_ce_to_mask); the "
          "causal KL uses the same mask, also over positions an intervention cannot reach (before the span in a "
          "decoder), as the paper. Fixed: cosine rows of padding are excluded (the reference kept them as distance "
          "1); no global iteration counters, forward_repeat_num or per-step attributes: the layer is read back from "
          "pass 0's features and the positions come from the step generator, so a resumed run redraws them "
          "identically. Task stages are allowed (the reference: pretrain only): ce on the class logits. Validation "
          "rejects a teacher shallower than the student for the full alignment, unequal widths with a cosine term, a "
          "teacher without a task head with a KL term, and interchange: masked outside masked_lm. Interchanged "
          "features are hidden states, full width on every tensor-parallel rank, and the draws do not depend on the "
          "rank: no communication.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
