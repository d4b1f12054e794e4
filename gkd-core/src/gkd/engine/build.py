"""The selected methods of a stage, built from the validated config and the models' shapes
(each with its auxiliary parameters and initial state)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from gkd.config.run import RunConfig, StageConfig
from gkd.engine.step import SelectedMethod
from gkd.errors import GkdError
from gkd.methods.api import MethodContext, ModelShape
from gkd.plugins.registry import MethodRegistry

if TYPE_CHECKING:
    from gkd.models import ModelConfig


def model_shape(cfg: ModelConfig) -> ModelShape:
    """What methods may know of a built model (see :class:`ModelShape`)."""
    return ModelShape.from_model_config(cfg)


def build_methods(run: RunConfig, stage: StageConfig, registry: MethodRegistry, student: ModelShape,
                  teachers: Mapping[str, ModelShape]) -> dict[str, SelectedMethod]:
    """Instantiate the stage's methods in config order, each with its own initial state."""
    selected: dict[str, SelectedMethod] = {}
    for index, entry in enumerate(stage.methods):
        spec = registry.get(entry.name).spec
        if spec.factory is None:
            raise GkdError(f"stages[{run.stages.index(stage)}].methods[{index}]: method '{entry.name}' has no implementation")
        if entry.name in selected:
            raise GkdError(f"stage '{stage.name}' selects method '{entry.name}' twice")
        context = MethodContext(student=student, teachers={t: teachers[t] for t in entry.teachers},
                                task=run.task.type, stage_kind=stage.kind, tensor_parallel=run.parallel.tensor_parallel)
        method = spec.factory(entry.config, context)
        selected[entry.name] = SelectedMethod(method, entry.weight, method.initial_state())
    return selected
