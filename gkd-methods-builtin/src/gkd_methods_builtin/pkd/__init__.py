"""PKD (patient knowledge distillation) method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.pkd.method import PKD

SPEC = MethodSpec(
    name="pkd",
    summary="Patient KD: β·MSE of L2-normalised [CLS] hidden states of intermediate layers (PKD-Skip or PKD-Last), "
            "plus (1−α)·hard + α·soft.",
    citation="Sun, Cheng, Gan, Liu. Patient Knowledge Distillation for BERT Model Compression. EMNLP 2019.",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(teacher=("embeddings", "layers.{i}.output", "logits"),
                        student=("embeddings", "layers.{i}.output", "logits")),
    config_schema=load_schema(__name__),
    factory=PKD,
    notes="Defaults are the paper's patience loss, which is the reference's used command line (normalised, [CLS] "
          "only, final layer left out, τ=10, τ²·KL, α=0.5, β=100); the reference's own flag defaults are off "
          "(un-normalised MSE on every token, final layer included, τ=1, soft CE). Hidden states: the reference "
          "(pre-LN GLM) read layernorm_output, the normalised input of a layer; here student hidden state j is "
          "paired with teacher hidden state j·k (k = T // S, gkd.methods.stride_map) through hidden_tap, i.e. "
          "layers.{j-1}.output, which in gkd's post-LN encoders is the normalised hidden state, and the final "
          "pair (wo_final: false) is layer S's output with layer T's (for encoders the reference's final-LN output). "
          "For decoders (pre-RMSNorm) layers.{i}.output is the un-normalised residual stream, and the final pair "
          "is taken before the final norm (a method for both families cannot declare final_norm). only_cls on a "
          "decoder uses the last real token of each sequence: token 0 has seen nothing else under the causal "
          "mask, so it is no summary. Added: PKD-Last (layer_strategy: last, teacher hidden states T−S+1…T−1, "
          "as in the paper; the reference has only PKD-Skip). Fixed: padding is excluded from the all-token MSE "
          "mean (the reference divided by every position). Kept from the reference (and the PKD authors' code): "
          "the MSE is a mean over the vector elements, where the paper writes a squared L2 norm summed over the "
          "hidden dimension (h times larger); β's default is calibrated on the mean. The paper's L_DS is soft "
          "cross-entropy without τ² (soft_loss: ce); the default follows the reference's used τ²·KL. The hard term "
          "(1−α)·task loss claims the stage's hard loss while α < 1. Validation rejects a teacher shallower than "
          "the student, unequal hidden sizes with beta > 0, a configuration without any layer pair, and alpha > 0 "
          "with a teacher without a task head. Hidden states are replicated under tensor parallelism: no "
          "communication is needed.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
