"""Student initialisation.

Four ways to start a student (GKD paper §6 / GLMKD ``--load-pretrained``,
``--student_truncate_tn``):

* :func:`random_student` — random weights (megatron init, seeded);
* :func:`pretrained_student` — an HF checkpoint (another run's export is one too); heads
  the checkpoint lacks start random;
* :func:`truncated_student` — layers picked from a teacher (bottom-k, strided or an
  explicit list); where the student is narrower (hidden size, heads, FFN, vocabulary) each
  tensor keeps its *leading* slice in every dimension (in HF layout, so with an unchanged
  head size the first heads are kept). A MobileBERT student is cut from a MobileBERT teacher
  with the same wiring (trigram, bottleneck options, norm type) and at most its FFNs per
  layer (student FFN ``j`` ← teacher FFN ``j``; the final FFN ← the final FFN); narrower
  ``embedding_size`` / ``intra_bottleneck_size`` keep leading slices too.

:func:`gkd.engine.assets.RunAssets.build_student` chooses one of them from a run config's
``student.init`` (:class:`gkd.config.StudentInit`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from gkd.errors import GkdError
from gkd.models.checkpoint import (
    HEAD_PARAMETER_PREFIXES,
    DictSource,
    LoadReport,
    SafetensorsDir,
    detect_hf_prefix,
    hf_prefix,
    hf_state_dict,
    load_hf_weights,
    load_model_config,
)
from gkd.models.config import ModelConfig
from gkd.models.model import GkdModel, build_model

LayerSelection = Literal["bottom", "strided"] | Sequence[int]

_LAYER_KEY = re.compile(r"^(encoder\.layer|layers)\.(\d+)\.")


def select_teacher_layers(num_teacher: int, num_student: int, strategy: LayerSelection) -> list[int]:
    """Teacher layer copied into each student layer.

    Args:
        num_teacher: Teacher depth ``T``.
        num_student: Student depth ``S`` (``S <= T``).
        strategy: ``"bottom"`` → ``[0, 1, …, S-1]`` (PKD, Theseus); ``"strided"`` →
            ``[floor(j·T/S)]`` (12→6 gives ``[0, 2, 4, 6, 8, 10]``, DistilBERT); or an explicit
            list of ``S`` teacher indices.
    """
    if num_student > num_teacher:
        raise ValueError(f"student has more layers ({num_student}) than the teacher ({num_teacher})")
    if strategy == "bottom":
        return list(range(num_student))
    if strategy == "strided":
        return [j * num_teacher // num_student for j in range(num_student)]
    if isinstance(strategy, str):
        raise ValueError(f"layer strategy ({strategy!r}) must be 'bottom', 'strided' or a list of indices")
    layers = [int(i) for i in strategy]
    if len(layers) != num_student or not all(0 <= i < num_teacher for i in layers):
        raise ValueError(
            f"explicit layer list {layers} must have {num_student} entries in [0, {num_teacher - 1}]"
        )
    return layers


def random_student(cfg: ModelConfig, *, seed: int = 0) -> GkdModel:
    """A randomly initialised student (same weights for any TP size given ``seed``)."""
    return build_model(cfg, seed=seed)


def pretrained_student(
    path: str | os.PathLike[str], cfg: ModelConfig | None = None, *, seed: int = 0
) -> GkdModel:
    """A student loaded from an HF checkpoint directory.

    ``cfg`` (default: the checkpoint's config) may ask for a different head, e.g.
    ``load_model_config(path, head="classification", num_labels=4)``: head parameters the
    checkpoint lacks start random (``seed``), checkpoint heads the student lacks are ignored.
    The backbone must match exactly.
    """
    cfg = cfg if cfg is not None else load_model_config(path)
    model = build_model(cfg, seed=seed)
    report = load_hf_weights(model, path, strict=False)
    _check_backbone(report, str(path))
    return model


def _check_backbone(report: LoadReport, origin: str) -> None:
    missing = [n for n in report.missing if not n.startswith(HEAD_PARAMETER_PREFIXES)]
    if missing:
        raise KeyError(f"{origin} lacks backbone parameters {missing}")


def truncated_state(
    teacher: Mapping[str, torch.Tensor],
    teacher_cfg: ModelConfig,
    student_shapes: Mapping[str, torch.Size],
    student_cfg: ModelConfig,
    layer_map: Sequence[int],
) -> dict[str, torch.Tensor]:
    """HF-named student tensors cut from HF-named teacher tensors.

    Args:
        teacher: Teacher tensors (HF names, any prefix).
        teacher_cfg: Teacher architecture.
        student_shapes: Student HF names → full shapes (from :func:`hf_state_dict`).
        student_cfg: Student architecture.
        layer_map: Teacher layer index for each student layer.

    Returns:
        Student name → leading slice of the matching teacher tensor. Student tensors with no
        teacher counterpart (e.g. a new classifier) are absent.
    """
    if teacher_cfg.family != student_cfg.family:
        raise ValueError(
            f"cannot truncate a {teacher_cfg.family} teacher into a {student_cfg.family} student"
        )
    _check_bottleneck_truncation(teacher_cfg, student_cfg)
    s_prefix, t_prefix = hf_prefix(student_cfg), detect_hf_prefix(teacher_cfg, set(teacher))
    out: dict[str, torch.Tensor] = {}
    for s_name, shape in student_shapes.items():
        if s_prefix and not s_name.startswith(s_prefix):
            t_name = s_name  # head tensors carry no backbone prefix
        else:
            base = s_name[len(s_prefix) :]
            match = _LAYER_KEY.match(base)
            if match:
                base = f"{match.group(1)}.{layer_map[int(match.group(2))]}.{base[match.end() :]}"
            t_name = t_prefix + base
        if t_name not in teacher:
            continue
        src = _bottleneck_view(t_name, teacher, t_prefix, teacher_cfg, student_cfg)
        if src.dim() != len(shape) or any(s > t for s, t in zip(shape, src.shape, strict=True)):
            raise ValueError(
                f"student tensor {s_name} {tuple(shape)} is not a leading slice of teacher {t_name} {tuple(src.shape)}"
            )
        out[s_name] = src[tuple(slice(0, n) for n in shape)].clone()
    return out


def _bottleneck_view(
    t_name: str, teacher: Mapping[str, torch.Tensor], t_prefix: str, t_cfg: ModelConfig, s_cfg: ModelConfig
) -> torch.Tensor:
    """Teacher tensor ``t_name`` arranged so that the student's tensor is its leading slice.

    Only two MobileBERT tensors need it: the trigram projection (columns ``[next | current |
    previous]``, each ``embedding_size`` wide, are sliced one by one) and the MLM ``dense``
    (rows ``embedding_size..hidden_size`` of the full decoder ``[word embeddings; dense]``).
    """
    src = teacher[t_name]
    if not t_cfg.is_mobilebert:
        return src
    es = s_cfg.word_embedding_size
    if t_name == f"{t_prefix}embeddings.embedding_transformation.weight" and t_cfg.trigram_input:
        return torch.cat([part[:, :es] for part in src.chunk(3, dim=1)], dim=1)
    if t_name == "cls.predictions.dense.weight":
        words = teacher.get(
            "cls.predictions.decoder.weight", teacher[f"{t_prefix}embeddings.word_embeddings.weight"]
        )
        return torch.cat([words.t(), src], dim=0)[es:]  # the decoder rows es.. of [h_t, V]
    return src


_IB_LAYOUT_FIELDS = (
    "trigram_input",
    "use_bottleneck",
    "use_bottleneck_attention",
    "key_query_shared_bottleneck",
    "normalization_type",
)
"""MobileBERT options that change which tensors exist or how they are wired; truncation needs them equal."""


def _check_bottleneck_truncation(teacher: ModelConfig, student: ModelConfig) -> None:
    """:class:`GkdError` unless ``student`` can be cut from ``teacher`` (both standard, or
    both MobileBERT with the same wiring and at most the teacher's FFNs per layer)."""
    if teacher.variant != student.variant:
        raise GkdError(
            f"cannot truncate a {teacher.variant!r} teacher into a {student.variant!r} student: "
            "the layers have different parameters (use student init 'random' or 'pretrained')"
        )
    if not teacher.is_mobilebert:
        return
    differ = [
        f"{name} (teacher {getattr(teacher, name)!r}, student {getattr(student, name)!r})"
        for name in _IB_LAYOUT_FIELDS
        if getattr(teacher, name) != getattr(student, name)
    ]
    if differ:
        raise GkdError(
            "cannot truncate this MobileBERT teacher into the student: "
            + ", ".join(differ)
            + " must be equal (use student init 'random' or 'pretrained')"
        )
    if student.num_feedforward_networks > teacher.num_feedforward_networks:
        raise GkdError(
            f"cannot truncate a MobileBERT teacher with num_feedforward_networks="
            f"{teacher.num_feedforward_networks} into a student with {student.num_feedforward_networks}: "
            "the student's extra FFNs have no teacher counterpart"
        )


def truncated_student(
    cfg: ModelConfig,
    teacher: GkdModel | str | os.PathLike[str],
    *,
    layers: LayerSelection = "bottom",
    seed: int = 0,
) -> GkdModel:
    """A student whose layers are copied from a teacher model or checkpoint directory.

    Embeddings (and final norm, pooler, heads where both models have them) come from the
    teacher too; parameters the teacher lacks keep their random initialisation (``seed``).
    Collective under TP when ``teacher`` is a model (its shards are gathered).
    """
    if isinstance(teacher, GkdModel):
        t_cfg, t_tensors = teacher.model_config, hf_state_dict(teacher)
    else:
        t_cfg = load_model_config(teacher)
        src = SafetensorsDir(teacher)
        t_tensors = {name: src.get(name) for name in src.keys()}
    layer_map = select_teacher_layers(t_cfg.num_layers, cfg.num_layers, layers)
    student = build_model(cfg, seed=seed)
    shapes = {name: t.shape for name, t in hf_state_dict(student).items()}
    state = truncated_state(t_tensors, t_cfg, shapes, cfg, layer_map)
    report = load_hf_weights(student, DictSource(state), strict=False)
    _check_backbone(report, "teacher")
    return student


__all__ = [
    "LayerSelection",
    "pretrained_student",
    "random_student",
    "select_teacher_layers",
    "truncated_state",
    "truncated_student",
]
