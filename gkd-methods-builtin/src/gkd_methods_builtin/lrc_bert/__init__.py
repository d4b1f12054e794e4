"""LRC-BERT (latent-representation contrastive distillation) method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.lrc_bert.method import LRCBERT

SPEC = MethodSpec(
    name="lrc-bert",
    summary="LRC-BERT: contrastive (COS-NCE) distillation of every student layer against in-batch teacher "
            "negatives through a projection W, with gradient perturbation of the embeddings; plus soft and hard "
            "terms in its second stage.",
    citation="Fu, Zhou, Yang, Tang, Liu, Liu, Li. LRC-BERT: Latent-representation Contrastive Knowledge Distillation "
             "for Natural Language Understanding. AAAI 2021.",
    kind="single-teacher",
    stages=("task",),
    features=FeatureUse(teacher=("layers.{i}.output",), student=("embeddings", "layers.{i}.output")),
    modifies_forward=True,
    has_parameters=True,
    config_schema=load_schema(__name__),
    factory=LRCBERT,
    notes="Contrastive term: student hidden states 1…S, each projected by W (nn.Linear(h_s, h_t), bias-free, one W "
          "shared by every layer), against teacher hidden states m[1…S] (uniform_map, m[S] = T). g_ij = 1 − mean cos(W s_i, t_j) "
          "over the layers and the token positions real in both examples i and j (padding never counts); per example "
          "l_i = 1 − Σ_{j≠i} g_ij/(2(B−1)) + g_ii (COS-NCE with the B−1 other examples of the batch as negatives: "
          "g ∈ [0, 2], so the negatives' part is in [0, 1] and l_i in [0, 3]); contrastive = α·#layers·mean_i l_i, which equals the sum over the "
          "layer pairs of the per-layer COS-NCE (l is linear in g). Negatives are teacher rows only, as in the paper; "
          "with gather_dp (default) every data-parallel rank's teacher rows are candidates (gkd.methods.gather_over_dp, "
          "sequences padded to the longest rank's), so the mean over ranks of the term is the single-process term on "
          "the whole batch, and since the teacher rows are constants, the ranks' averaged gradients are the "
          "single-process gradients. soft (kl at τ = 1.1 by default) and hard are KD's prediction terms, off by "
          "default (stage 1 of the paper); set soft_weight: 1, hard_weight: 3 for stage 2, the reference's used settings. "
          "Gradient perturbation (perturb, default on, both stages of the paper): pass 0 is a probe whose terms are "
          "logged (lrc-bert.<term>) but not optimised; its gradient g with respect to the student's embedding output "
          "(torch.autograd.grad, which leaves every .grad untouched, so gradient accumulation works; the reference "
          "zeroed the gradients and could not accumulate) gives pass 1 the operation embeddings + ε·g/‖g‖₂ (nothing "
          "added when g is not finite); only pass 1's terms (lrc-bert.pass1.<term>) are optimised. The teacher runs "
          "once per step: pass 1 reuses its pass-0 results. ‖g‖₂ is the norm of the whole micro-batch's gradient "
          "(perturb_norm: tensor, one norm per micro-batch as the design specifies); perturb_norm: example "
          "normalises each example's gradient instead, which does not depend on the batch's composition (nor on "
          "data parallelism). ε (epsilon, default 1) scales it; the reference had no ε (ε = 1). "
          "Fixes: the diagonal is subtracted once (the reference subtracted b·g_ii); padding excluded from the "
          "cosine mean. Validation rejects a teacher shallower than the student (with alpha > 0), all terms off, and "
          "soft_weight > 0 with a teacher without a task head. Hidden states are replicated under tensor "
          "parallelism: the term needs no TP communication.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
