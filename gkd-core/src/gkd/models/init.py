"""Student initialisation.

Four ways to start a student (GKD paper §6 / GLMKD ``--load-pretrained``,
``--student_truncate_tn``):

* :func:`random_student` — random weights (megatron init, seeded);
* :func:`pretrained_student` — an HF checkpoint; heads the checkpoint lacks start random;
* :func:`distilled_student` — another run's exported student (an HF checkpoint too);
* :func:`truncated_student` — layers picked from a teacher (bottom-k, uniform stride or an
  explicit list); where the student is narrower (hidden size, heads, FFN, vocabulary) each
  tensor keeps its *leading* slice in every dimension (in HF layout, so with an unchanged
  head size the first heads are kept).

:func:`init_student` dispatches on a :class:`StudentInit` (what a run config describes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

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

LayerSelection = Literal["bottom", "uniform"] | Sequence[int]
InitMethod = Literal["random", "pretrained", "distilled", "truncate"]

_LAYER_KEY = re.compile(r"^(encoder\.layer|layers)\.(\d+)\.")


def select_teacher_layers(num_teacher: int, num_student: int, strategy: LayerSelection) -> list[int]:
    """Teacher layer copied into each student layer.

    Args:
        num_teacher: Teacher depth ``T``.
        num_student: Student depth ``S`` (``S <= T``).
        strategy: ``"bottom"`` → ``[0, 1, …, S-1]`` (PKD, Theseus); ``"uniform"`` →
            ``[floor(j·T/S)]`` (12→6 gives ``[0, 2, 4, 6, 8, 10]``, DistilBERT); or an explicit
            list of ``S`` teacher indices.
    """
    if num_student > num_teacher:
        raise ValueError(f"student has more layers ({num_student}) than the teacher ({num_teacher})")
    if strategy == "bottom":
        return list(range(num_student))
    if strategy == "uniform":
        return [j * num_teacher // num_student for j in range(num_student)]
    if isinstance(strategy, str):
        raise ValueError(f"layer strategy ({strategy!r}) must be 'bottom', 'uniform' or a list of indices")
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


def distilled_student(
    path: str | os.PathLike[str], cfg: ModelConfig | None = None, *, seed: int = 0
) -> GkdModel:
    """A student from another run's :func:`~gkd.models.checkpoint.export_hf` directory."""
    return pretrained_student(path, cfg, seed=seed)


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
        src = teacher[t_name]
        if src.dim() != len(shape) or any(s > t for s, t in zip(shape, src.shape, strict=True)):
            raise ValueError(
                f"student tensor {s_name} {tuple(shape)} is not a leading slice of teacher {t_name} {tuple(src.shape)}"
            )
        out[s_name] = src[tuple(slice(0, n) for n in shape)].clone()
    return out


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


@dataclass(frozen=True)
class StudentInit:
    """How to initialise a student (the ``student.init`` section of a run)."""

    method: InitMethod = "random"
    """``random``, ``pretrained``, ``distilled`` or ``truncate``."""
    path: str | None = None
    """Checkpoint directory (pretrained / distilled), or the teacher directory for ``truncate``
    when no teacher model is passed."""
    layers: LayerSelection = "bottom"
    """Teacher layer selection for ``truncate``."""
    seed: int = 0
    """Seed of every random initialisation."""


def init_student(cfg: ModelConfig | None, how: StudentInit, *, teacher: GkdModel | None = None) -> GkdModel:
    """Build a student according to ``how``.

    Args:
        cfg: Student architecture; may be ``None`` for ``pretrained`` / ``distilled``
            (taken from the checkpoint).
        how: The method and its parameters.
        teacher: Teacher model for ``truncate`` (else ``how.path`` is read).
    """
    if how.method == "random":
        if cfg is None:
            raise ValueError("random initialisation needs a ModelConfig")
        return random_student(cfg, seed=how.seed)
    if how.method in ("pretrained", "distilled"):
        if how.path is None:
            raise ValueError(f"{how.method} initialisation needs a checkpoint path")
        return pretrained_student(how.path, cfg, seed=how.seed)
    if how.method == "truncate":
        if cfg is None:
            raise ValueError("truncate initialisation needs the student's ModelConfig")
        source = teacher if teacher is not None else how.path
        if source is None:
            raise ValueError("truncate initialisation needs a teacher model or a teacher checkpoint path")
        return truncated_student(cfg, source, layers=how.layers, seed=how.seed)
    raise ValueError(f"unknown init method {how.method!r}")


__all__ = [
    "InitMethod",
    "LayerSelection",
    "StudentInit",
    "distilled_student",
    "init_student",
    "pretrained_student",
    "random_student",
    "select_teacher_layers",
    "truncated_state",
    "truncated_student",
]
