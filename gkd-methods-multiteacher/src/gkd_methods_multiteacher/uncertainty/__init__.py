"""Uncertainty method plugin (multi-teacher)."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_multiteacher.uncertainty.method import Uncertainty

SPEC = MethodSpec(
    name="uncertainty",
    summary="Uncertainty: the student's normalised prediction entropy routes each example to one teacher (hard) or "
            "weights every teacher per example (soft); teachers without examples are not run.",
    citation="Li, Lin, Ren, Li, Zhou, Sun. Dynamic Knowledge Distillation for Pre-trained Language Models. EMNLP 2021 "
             "(uncertainty-based teacher adoption).",
    kind="multi-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(teacher=("logits",), student=("logits",)),
    config_schema=load_schema(__name__),
    factory=Uncertainty,
    notes="Follows the paper's uncertainty-based teacher adoption as the GKD reference's Uncertainty class implements "
          "it. Uncertainty: u_b = H(softmax z_b)/log C of the student's logits, detached; for token-level tasks the "
          "mean over the example's real tokens. Fixed: the reference multiplied the logits by the mask, so every "
          "padded position became a uniform distribution with the maximal entropy 1 and raised the uncertainty of "
          "short examples. assign: hard (the paper's and the reference's runs): the micro-batch is sorted by "
          "decreasing u (stable) and the example of rank r (0 = most uncertain) goes to group ⌈(r+1)·n/B⌉ − 1, "
          "i.e. n equal rank quantiles (for two teachers the ⌊B/2⌋ most uncertain examples, as the paper's code); "
          "group j is distilled from teacher_order[j]. teacher_order defaults to the entry's order; the reference "
          "documents its ranks as smallest to largest teacher, and the paper's code sends the uncertain half to the "
          "small teacher, so list the smallest teacher first. assign: soft: w_{b,j} = u_b + (1 − 2u_b)·j/(n − 1), "
          "renormalised to sum to n, i.e. for two teachers u_b and 1 − u_b after the mean over teachers: the "
          "paper's per-example soft selection (its code's soft-instance mode; its 'soft' mode used the batch-mean "
          "entropy). Terms: soft = soft_weight·mean_i mean_b(w_{b,i}·L_{b,i}), L_{b,i} the per-example soft loss "
          "(default τ²·KL at τ 1, as the reference's runs; the paper's released scripts distil with the MSE of the "
          "logits, soft_loss: mse), with hard weights n for the example's own teacher and 0 elsewhere, so the hard "
          "variant is the batch mean of every example's loss against its own teacher; hard = hard_weight·the "
          "student's task loss, added once and claimed as the stage's hard loss. Scale: the reference's hard "
          "indicators sum to 1 per example and its soft weights are renormalised to sum to 1 (its documentation "
          "says n), then averaged over teachers, so its soft term is 1/n of this one (soft_weight: 1/n reproduces "
          "it); the paper's code sums the per-group means, n times this term for equal groups. Two passes "
          "(skip_idle_teachers: true, the default): a plan is made before its pass runs, and the routing needs the "
          "student's logits, so pass 0 runs only the student (the hard term) and pass 1 only the teachers with a "
          "non-zero weight for some example of the micro-batch (the soft term, logged as uncertainty.pass1.soft); the "
          "student is not run again, pass 1 reads its pass-0 logits and their graph. The reference ran every teacher "
          "every step. skip_idle_teachers: false runs every teacher in pass 0 (terms soft and hard), which is "
          "cheaper when another method of the stage reads the same teachers. A per-rank micro-batch smaller than n "
          "with assign: hard (e.g. the short last batch of an epoch) is routed by the same quantile rule and the "
          "teachers without examples are not run (small_batch: route, the default; the reference silently fell "
          "back to the soft variant); small_batch: error raises GkdError naming both sizes instead. Each data-parallel rank routes its own "
          "examples; tensor-parallel ranks see the same gathered logits and route alike. Not provided: the "
          "reference's --uncertainty_inter_entropy (scaling the intermediate loss of the combined student model by "
          "u: in gkd a method cannot scale another method's terms, and this one has no intermediate term) and "
          "--uncertainty_wo_rate (equal weights: use tmkd). Validation rejects a teacher_order that is not the "
          "entry's teachers each once, a teacher without a task head or with logits of another width (soft_weight "
          "> 0), and soft_weight and hard_weight both 0.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
