"""``gkd distill CONFIG``: run every stage, then print the teacher/student table."""

from __future__ import annotations

import os
import warnings

import click

from gkd.config import load_run_config

EXIT_PEER_FAILED = 1
"""Exit code of a rank that stopped because another rank of the job died or hung."""
EXIT_DIVERGED = 1
"""Exit code of a run stopped by ``training.nonfinite`` (valid input, training went NaN/inf)."""


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field, e.g. stages[1].steps=10.")
@click.option("--stop-after", type=click.IntRange(min=1), default=None,
              help="Checkpoint and stop once this global step is reached; run again to resume.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on when stderr is a terminal).")
def distill(config: str, overrides: tuple[str, ...], stop_after: int | None, progress: bool | None) -> None:
    """Distil as described by CONFIG (YAML or JSON), resuming from the latest checkpoint."""
    from gkd.engine.report import format_timings
    from gkd.engine.step import NonFiniteError
    from gkd.engine.trainer import Trainer, TrainingInterrupted, format_table
    from gkd.plugins.manager import get_plugin_manager

    registry = get_plugin_manager().registry
    # Every rank of a launched job checks the config before any process group exists, so a bad
    # config stops each of them with the same one-line error.
    run = load_run_config(config, overrides, registry=registry)
    # One rank speaks (errors aside); the launcher's RANK is known before torch is imported.
    speaks = os.environ.get("RANK", "0").strip() in ("0", "")
    echo = click.echo if speaks else _silent
    if not speaks:
        warnings.simplefilter("ignore")  # the same warnings as rank 0's, once per process
    # gkd's own first line, before the trainer imports megatron-core and DeepSpeed.
    echo(f"gkd distill: run {run.name!r} → {run.run_dir}, {len(run.stages)} stage(s) "
         f"({', '.join(s.name for s in run.stages)})")
    from gkd.parallel.liveness import Heartbeat, describe_loss
    from gkd.parallel.state import LaunchEnvironment

    launched = LaunchEnvironment.detect()
    trainer = Trainer(run, registry, progress=progress, stop_after=stop_after, echo=click.echo)
    try:
        # Heartbeats in the job's store let a survivor name the rank that died.
        with Heartbeat(launched, connect_timeout_s=run.parallel.timeout_s):
            summary = trainer.execute()
    except TrainingInterrupted as exc:
        echo(str(exc))
        return
    except NonFiniteError as exc:
        if speaks:  # every rank saw the same step
            click.echo(f"Error: {exc}", err=True)
        raise SystemExit(EXIT_DIVERGED) from None
    except Exception as exc:
        from gkd.parallel.state import peer_failure

        what = peer_failure(exc)
        if what is None:
            raise
        # A survivor of a dead or stuck rank: one line, not a traceback through DeepSpeed and gloo.
        lost = describe_loss(launched)
        click.echo(f"Error: rank {os.environ.get('RANK', '0')}: lost {lost} of this job ({what}): it exited, "
                   f"or did not answer within parallel.timeout_s ({run.parallel.timeout_s:g} s); the process that failed "
                   "first says why", err=True)
        raise SystemExit(EXIT_PEER_FAILED) from None
    echo(format_table(summary))
    exported = summary["export"] or "none (export.enabled: false)"
    echo(f"run directory: {summary['run_dir']} ({summary['seconds']} s); exported student: {exported}")
    echo(format_timings(summary))


def _silent(line: str) -> None:
    """The echo of every rank but global rank 0."""
