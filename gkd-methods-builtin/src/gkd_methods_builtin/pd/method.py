"""PD (Turc et al., 2019): KD's behaviour with PD's defaults; the pre-training is a plain stage."""

from __future__ import annotations

from gkd_methods_builtin.kd.method import KD


class PD(KD):
    """Pre-trained distillation's distillation step: soft cross-entropy on the teacher's logits at
    τ = 1 and no hard loss (the defaults of its schema). The student it distils is the product of
    a plain masked-LM pre-training run (``examples/methods/pd-pretrain.yaml``)."""

    name = "pd"
