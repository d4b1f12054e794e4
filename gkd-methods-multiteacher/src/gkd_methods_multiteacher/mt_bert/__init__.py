"""MT-BERT method plugin (multi-teacher)."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_multiteacher.mt_bert.method import MTBERT

SPEC = MethodSpec(
    name="mt-bert",
    summary="MT-BERT: per-teacher soft losses weighted per example by 1/(1 + the teacher's own gold-label loss), "
            "plus a PKD-style hidden-state term through one trainable projection per teacher.",
    citation="Wu, Wu, Huang. One Teacher is Enough? Pre-trained Language Model Distillation from Multiple Teachers. "
             "Findings of ACL 2021.",
    kind="multi-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(teacher=("embeddings", "layers.{i}.output", "logits"),
                        student=("embeddings", "layers.{i}.output", "logits")),
    has_parameters=True,
    config_schema=load_schema(__name__),
    factory=MTBERT,
    notes="Terms: soft = soft_weight·Σ_i mean_b[soft_{i,b} / (1 + Ĥ_{i,b})] (the paper's multi-teacher distillation "
          "loss and the reference's MT_BERT: summed over teachers, not averaged), where soft_{i,b} is the soft loss "
          "of example b against teacher i (default soft cross-entropy at τ 1, no τ², as in the paper and the "
          "reference's runs) and Ĥ_{i,b} is teacher i's own cross-entropy on example b's gold labels "
          "(ModelView.task_loss_per_example, which replaces the reference's --mt_has_loss; detached); patience = "
          "β·Σ_i Σ_pairs MSE (the paper's multi-teacher hidden loss); hard = hard_weight·the student's task loss, "
          "added once (hard_weight: 0 is the reference's --mt_bert_wo_hard) and claimed as the stage's hard loss. "
          "Defaults are the reference's used command line (PKD with α=1, β=1, soft CE at τ=1, every token, not "
          "normalised, final layer included). Layer pairs per teacher: PKD-Skip's stride_map on that teacher's "
          "depth, student hidden state j with teacher hidden state j·k_i (k_i = T_i // S) for j = 1…S−1, plus "
          "(S, T_i) unless wo_final, plus the embeddings with use_embed; teachers may differ in depth and width. "
          "Projections: one nn.Linear (with bias, as the reference's ColumnParallelLinear) per teacher, shared by "
          "all of that teacher's pairs, held in an nn.ModuleDict keyed by teacher name ('.' written ':'); "
          "project: teacher (the default, the reference's used --mt_bert_fit_teacher) maps h_t_i → h_s and is "
          "applied to the teacher's hidden states (they carry no graph; the projection trains), project: student "
          "maps h_s → h_t_i, project: none needs equal widths. Hidden states are full width on every tensor-"
          "parallel rank, so the projections are plain replicated layers (the reference split them as column-"
          "parallel). Not built, as in the reference: the paper's multi-teacher co-finetuning (teachers fine-tuned "
          "jointly with shared pooling and prediction layers); fine-tune each teacher on its own (train: "
          "teacher:NAME). Not provided: the reference's --mt_bert_fix_layernorm. Hidden states: the reference "
          "(pre-LN GLM) read layernorm_output; here hidden state j is layers.{j-1}.output (post-LN in encoders, the "
          "residual stream in decoders), as in pkd. only_cls uses token 0 in encoders and the last real token in "
          "decoders (the reference always took token 0). Token-level tasks: soft_{i,b} is the mean over example b's "
          "real tokens and Ĥ_{i,b} the mean over its labelled tokens, so the soft term is a mean over examples. "
          "Fixed: padding is excluded from the hidden-state MSE and from the per-example soft means (the reference "
          "multiplied by the mask and divided by every position). Validation rejects a teacher shallower than the "
          "student or a configuration without a layer pair (beta > 0), unequal widths with project: none, a "
          "teacher without a task head or with logits of another width (soft_weight > 0), and all weights 0.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
