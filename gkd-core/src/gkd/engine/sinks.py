"""Optional copies of ``metrics.jsonl``: TensorBoard event files and a Weights & Biases run.

``metrics.jsonl`` stays the source of truth. A sink receives each record as it is appended and,
when a run starts, every record the file keeps (a resumed run drops the steps logged after its
checkpoint), so what a sink shows is exactly what ``metrics.jsonl`` holds, each step once.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from gkd.errors import GkdError

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
TENSORBOARD_HINT = ("true needs the tensorboard package, which is not installed; "
                    "install the optional extra: pip install 'gkd-core[tensorboard]'")
"""Why ``logging.tensorboard: true`` cannot be honoured (after the field's name)."""
WANDB_HINT = ("needs the wandb package, which is not installed; "
              "install the optional extra: pip install 'gkd-core[wandb]'")
"""Why ``logging.wandb`` cannot be honoured (after the field's name)."""


def tensorboard_missing() -> bool:
    """Whether the ``tensorboard`` package cannot be imported (found without importing it)."""
    return importlib.util.find_spec("tensorboard") is None


def wandb_missing() -> bool:
    """Whether the ``wandb`` package cannot be imported (found without importing it)."""
    return importlib.util.find_spec("wandb") is None


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one ``metrics.jsonl`` record under their tags: ``train/loss``,
    ``train/<method>.<term>``, ``train/lr``; ``eval/<metric>`` for evaluation records.
    Values that are not numbers (a non-finite value written as ``null``) are left out."""
    out: dict[str, Any] = {}
    if record.get("kind", "train") == "train":
        out["train/loss"] = record.get("loss")
        out.update({f"train/{name}": value for name, value in (record.get("terms") or {}).items()})
        out["train/lr"] = record.get("lr")
    else:
        out.update({f"eval/{name}": value for name, value in (record.get("metrics") or {}).items()})
    return {tag: float(v) for tag, v in out.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class MetricSink(Protocol):
    """Where records also go; written on global rank 0 only."""

    def write(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """``<run_dir>/tensorboard/events.out.tfevents.*`` through ``torch.utils.tensorboard``,
    rebuilt at every start (event files of an interrupted run may hold steps ``metrics.jsonl``
    no longer has)."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise GkdError(f"logging.tensorboard: {TENSORBOARD_HINT}") from None
        log_dir = Path(run_dir) / TENSORBOARD_DIR
        shutil.rmtree(log_dir, ignore_errors=True)
        self._writer: Any = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: Mapping[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, global_step=int(record["global_step"]), walltime=record.get("time"))
        self._writer.flush()  # so TensorBoard shows the step now and a crash loses nothing

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """A Weights & Biases run under ``<run_dir>/wandb`` (where ``wandb`` puts it), offline by default (``wandb sync`` uploads
    it later). Each start makes one W&B run that replays the kept records, so a resumed gkd run is a
    W&B run with its whole history; in offline mode the runs of earlier starts are removed.

    Args:
        run_dir: The gkd run directory.
        name: The run's name (the W&B run name).
        project: W&B project.
        mode: ``"offline"`` or ``"online"`` (needs ``wandb login``).
        config: The validated run config, shown as the W&B run's config.
        tags: W&B tags.
    """

    def __init__(self, run_dir: Path, *, name: str, project: str, mode: str, config: Mapping[str, Any],
                 tags: tuple[str, ...] = ()) -> None:
        try:
            import wandb
        except ImportError:
            raise GkdError(f"logging.wandb: {WANDB_HINT}") from None
        if mode == "offline":
            for old in (Path(run_dir) / WANDB_DIR).glob("offline-run-*"):
                shutil.rmtree(old, ignore_errors=True)
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
        try:
            self._run: Any = wandb.init(project=project, name=name, dir=str(run_dir), mode=mode,
                                        config=dict(config), tags=list(tags), settings=settings, reinit="create_new")
        except Exception as exc:  # e.g. mode online without `wandb login`: W&B's own error types
            raise GkdError(f"logging.wandb: could not start a W&B run in {mode} mode: {type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}") from None

    def write(self, record: Mapping[str, Any]) -> None:
        values = scalars(record)
        if values:
            self._run.log(values, step=int(record["global_step"]))

    def close(self) -> None:
        self._run.finish()


__all__ = [
    "TENSORBOARD_DIR",
    "TENSORBOARD_HINT",
    "WANDB_DIR",
    "WANDB_HINT",
    "MetricSink",
    "TensorBoardSink",
    "WandbSink",
    "scalars",
    "tensorboard_missing",
    "wandb_missing",
]
