"""gkd plugin: the hidden-cos method."""

from __future__ import annotations

from gkd.methods import FeatureUse, MethodRegistrar, MethodSpec, hookimpl, load_schema
from gkd_hidden_cos.method import HiddenCos

SPEC = MethodSpec(
    name="hidden-cos",
    summary="Cosine distance between the student's last hidden state and a teacher hidden state, plus the hard loss.",
    citation="Sanh et al. DistilBERT, a distilled version of BERT. arXiv:1910.01108, 2019 (cosine term).",
    kind="single-teacher",
    stages=("pretrain", "task"),
    features=FeatureUse(teacher=("layers.{i}.output",), student=("layers.{i}.output",)),
    has_parameters=True,
    config_schema=load_schema(__name__),
    factory=HiddenCos,
    notes="A linear projection maps the student width to the teacher width.",
)


@hookimpl
def gkd_register_methods(register: MethodRegistrar) -> None:
    register(SPEC)
