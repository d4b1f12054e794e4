"""MiniLM method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.minilm.method import MiniLM

SPEC = MethodSpec(
    name="minilm",
    summary="MiniLM: KL of the last layer's self-attention distributions and value relations (per head).",
    citation="Wang et al. MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained "
             "Transformers. NeurIPS 2020.",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(
        teacher=("layers.{i}.attention.scores", "layers.{i}.attention.value"),
        student=("layers.{i}.attention.scores", "layers.{i}.attention.value"),
    ),
    has_parameters=False,
    config_schema=load_schema(__name__),
    factory=MiniLM,
    notes="Terms: attention = KL(A_teacher ‖ A_student) and value = KL(VR_teacher ‖ VR_student) with "
          "VR = softmax(V·Vᵀ/√d_k), each averaged over heads and query positions as in the paper, "
          "student last layer vs. teacher_layer (default the last, as the reference). "
          "Fixes vs. the reference: it applied a softmax to the attention probabilities (a second softmax); gkd "
          "uses the distribution itself, as the log-softmax of the attention scores (log A, without log(0)). Padded "
          "keys get zero probability and padded query rows are left out of the mean (decoders: future keys too; "
          "the value relation is renormalised over the same keys); the reference had no mask. Under tensor "
          "parallelism each rank computes the KL on its own heads and the ranks' means are averaged, instead of the "
          "reference's gather along the key axis, which mixed heads in one softmax. Validation rejects unequal head "
          "counts (attention_weight) and unequal key/value head counts (value_weight, GQA decoders), and a "
          "teacher_layer outside the teacher. No hard term: combine with kd in a task stage.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
