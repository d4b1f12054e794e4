"""``gkd.distill``: the Python entry point of ``gkd distill``."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gkd.config import build_run_config, load_run_config
from gkd.config.errors import ConfigError
from gkd.config.loader import apply_overrides

if TYPE_CHECKING:
    from gkd.engine.callbacks import Callback


def distill(config_or_path: str | Path | Mapping[str, Any], overrides: Iterable[str] = (),
            callbacks: Iterable[Callback] = (), *, progress: bool | None = None, stop_after: int | None = None,
            echo: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run every stage of a run config, as ``gkd distill`` does, and return the run summary.

    Args:
        config_or_path: A YAML/JSON config file, or the config as a dict (validated the same
            way; its relative paths resolve against the current directory). The dict is not modified.
        overrides: ``key.path=value`` assignments, as ``--set`` takes them (e.g. ``"stages[0].steps=10"``).
        callbacks: :class:`gkd.Callback` instances, called in order on global rank 0.
        progress: Progress bar (default: ``logging.progress`` when standard error is a terminal).
        stop_after: Checkpoint and stop once this global step is reached; calling again resumes.
        echo: Where gkd's human-readable lines go (global rank 0 only); None for silence.

    Returns:
        The summary also written to ``<run_dir>/summary.json``: ``name``, ``run_dir``,
        ``global_step``, ``seconds``, ``models`` (the evaluation table's rows), ``export``,
        ``plot``, ``teachers``.

    Raises:
        gkd.config.ConfigError: The config is invalid (every problem, one line each).
        gkd.engine.loop.TrainingInterrupted: ``stop_after`` was reached before the last stage's end.
        gkd.engine.callbacks.CallbackError: A callback raised (the message names it and the event).
    """
    from gkd.engine.trainer import Trainer
    from gkd.plugins.manager import get_plugin_manager

    registry = get_plugin_manager().registry
    if isinstance(config_or_path, Mapping):
        raw = copy.deepcopy(dict(config_or_path))
        issues = apply_overrides(raw, list(overrides))
        if issues:
            raise ConfigError(issues, "config")
        run = build_run_config(raw, base_dir=Path.cwd(), registry=registry)
    else:
        run = load_run_config(config_or_path, tuple(overrides), registry=registry)
    trainer = Trainer(run, registry, progress=progress, stop_after=stop_after, echo=echo or _silent,
                      callbacks=callbacks)
    return trainer.execute()


def _silent(line: str) -> None:
    """The echo of ``echo=None``."""


__all__ = ["distill"]
