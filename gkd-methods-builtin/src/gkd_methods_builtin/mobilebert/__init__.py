"""MobileBERT (progressive knowledge transfer) method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.mobilebert.method import MobileBERT

SPEC = MethodSpec(
    name="mobilebert",
    summary="MobileBERT: progressive knowledge transfer (hidden MSE + per-head attention KL), one layer per phase, "
            "then pre-training distillation (hard + τ²·KL).",
    citation="Sun, Yu, Song, Liu, Yang, Zhou. MobileBERT: a Compact Task-Agnostic BERT for Resource-Limited Devices. "
             "ACL 2020.",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(
        teacher=("embeddings", "layers.{i}.output", "layers.{i}.attention.scores", "logits"),
        student=("embeddings", "layers.{i}.output", "layers.{i}.attention.scores", "logits"),
    ),
    modifies_forward=True,
    config_schema=load_schema(__name__),
    factory=MobileBERT,
    notes="The method, not the architecture: it works for any teacher and student with equal hidden width (the "
          "residual stream, which hidden-like taps carry; MobileBERT's inverted-bottleneck models keep it equal) and "
          "equal head counts; no projection. Layers are paired with uniform_map (m): hidden pair j = student "
          "hidden_tap(j) ↔ teacher hidden_tap(m[j]) (post-LN layer outputs in encoders, the residual stream in "
          "decoders), attention pair j = student layer j ↔ teacher layer m[j+1]−1. A counter k (JSON state, "
          "checkpointed; the reference recomputed it after a resume and re-advanced it one phase per iteration) "
          "starts at 1. Phase k ≤ S trains student layer k−1: term hidden = kd_weight·hidden_weight·Σ w·MSE "
          "(feature-map transfer, the mean over every element of the real tokens) and term attention = "
          "kd_weight·attention_weight·Σ w·KL(softmax Â ‖ softmax A) (attention transfer, per head over the keys, "
          "averaged over heads and real query rows; padded keys, and future keys in decoders, excluded; computed on "
          "each TP rank's heads, then averaged over ranks). Only the features of the active pairs are requested, so "
          "early phases extract less. lower_layers: freeze (default, the paper: layers below the one being trained "
          "are frozen) keeps only the newest pairs (hidden k, attention k−1, w = 1) and attaches the operation "
          "layers.{k−1}.input → value.detach() to the student: the forward values are unchanged, but no gradient of "
          "that step flows below layer k−1, so lower layers and the embeddings get none (the embeddings are never "
          "transferred, as in the paper, where they are copied from the teacher: use student.init truncate), and "
          "higher layers and the head get none from these terms either (evaluation runs the plain student). What "
          "is frozen is the gradient, not the optimizer: DeepSpeed hands the optimizer zero gradients for those "
          "parameters, so AdamW's decoupled weight decay still shrinks them and a layer trained in an earlier "
          "phase keeps moving on its Adam momentum for a while (optimizer.weight_decay: 0 removes the first; the "
          "second fades within some tens of steps at β1 = 0.9). The detach acts on "
          "the whole student forward of the step: a method combined with mobilebert in one stage gets no gradient "
          "below layer k−1 either. down_weight "
          "(the reference, close to the paper's softened variant, which tunes lower layers with a small learning "
          "rate) keeps every pair up to k (hidden 0…k, embeddings included; attention 0…k−1), the earlier ones with "
          "w = earlier_weight (0.1), and changes nothing in the forward pass. Phase k = S+1 is pre-training "
          "distillation: the paper's L_MLM + α·L_KD (its NSP term does not apply): hard = hard_weight·task loss "
          "(the MLM loss in a masked_lm run; the task loss in a task stage) and soft = soft_weight·τ²·KL(teacher ‖ "
          "student) on the logits over the labelled positions (the masked tokens). The reference used the hard term "
          "only: set soft_weight: 0 to reproduce it (default 0.5, a value for α ∈ (0, 1)). No hard or soft term "
          "while k ≤ S, as the reference. after_step advances k while iteration + 1 ≥ k·N/(S+1) (N = the stage's "
          "steps; compared in integers) or k·steps_per_phase, up to S+1: a stage shorter than S+1 steps skips "
          "phases instead of falling behind. Feature-map transfer is the plain MSE of the paper's equation (its "
          "remark that splitting it into normalised-map and statistics terms stabilises training is not "
          "implemented). kd_weight 0.5 is the reference's. The inverted-bottleneck architecture is a model "
          "option of the models layer, not part of the method; pre-training an IB teacher is a plain stage. "
          "Validation rejects unequal hidden sizes (hidden_weight > 0), unequal head counts (attention_weight > 0), "
          "a teacher shallower than the student, phases without any loss, and soft_weight > 0 with a teacher "
          "without a task head.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
