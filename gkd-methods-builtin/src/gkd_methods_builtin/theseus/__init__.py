"""Theseus (BERT-of-Theseus, progressive module replacing) method plugin."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_methods_builtin.theseus.method import Theseus

SPEC = MethodSpec(
    name="theseus",
    summary="BERT-of-Theseus: each student layer is randomly replaced by its block of teacher layers, with a "
            "replacement rate rising to 1; hard loss of the hybrid model.",
    citation="Xu, Zhou, Ge, Wei, Zhou. BERT-of-Theseus: Compressing BERT by Progressive Module Replacing. "
             "EMNLP 2020.",
    kind="single-teacher",
    stages=("task",),
    features=FeatureUse(student=("logits",)),
    modifies_forward=True,
    config_schema=load_schema(__name__),
    factory=Theseus,
    notes="Semantics follow the paper: the replacement rate r is the probability that a teacher (predecessor) "
          "block is replaced by its student (successor) layer, i.e. student layer j runs with probability r and "
          "teacher block j otherwise (the reference's 'student module kept with probability r' is the same draw). "
          "r follows the paper's curriculum p = min(1, k·t + b) with b = replacing_rate (0.3) and k chosen so that "
          "r reaches 1 after not_replaced_fraction κ (0.66) of the stage: r = min(1, r0 + (1 − r0)·progress/κ); "
          "the rest of the stage is the paper's successor fine-tuning (pure student). schedule: constant gives the "
          "paper's constant scheduler (r0 for κ of the stage, then 1). Fixed: the rate is clipped to 1 (the "
          "reference did not clip), and teacher parameters never receive gradients (the reference left them "
          "requires_grad and accumulated .grad every step): teacher layers run with detached parameters "
          "(torch.func.functional_call), so gradients flow through them into the student layers below but never "
          "into the teacher, even if requires_grad was left on. Kept from the reference, not in the paper: the "
          "draw is repeated until at least one student layer runs (require_student_layer: false gives the paper's "
          "independent draws). Teacher blocks come from gkd.methods.uniform_map (contiguous, sizes differ by at "
          "most 1, larger blocks first; the paper needs T divisible by S, the reference's segmentation was "
          "front-heavy, 12→5 gave 3,3,3,2,1). Teacher layers run in the teacher's mode (eval, no dropout) and "
          "dtype, as in the reference; the paper's code ran them inside its training-mode model, with dropout. "
          "The paper shares the predecessor's embeddings and output layer and trains only the successor layers; "
          "here the student has its own embeddings and head (copied from the teacher by student.init.strategy: "
          "truncate, identical at the start) and all student parameters are trained. The only term is hard "
          "(hard_weight · the task loss of the hybrid forward; it claims the stage's hard loss); the teacher is "
          "never run on its own (the plan names only the student). Draws come from the step generator: the same "
          "on every TP rank and after a resume; with gradient accumulation each micro-batch draws anew (the "
          "paper draws per forward pass). A replaced layer changes the stack's depth, so layers.{i}.* taps of "
          "other methods would refer to the hybrid stack: the method claims forward:layers; combine it with "
          "logits-based methods (KD) only. Evaluation runs the pure student. Under tensor parallelism teacher "
          "layers are sharded like the student's, and no extra communication is needed. Validation rejects a "
          "teacher of another family or hidden size, a teacher shallower than the student, and a student "
          "without a task head.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
