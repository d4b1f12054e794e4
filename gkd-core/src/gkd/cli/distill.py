"""``gkd distill CONFIG``: run every stage, then print the teacher/student table."""

from __future__ import annotations

import click

from gkd.config import load_run_config


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field, e.g. stages[1].steps=10.")
@click.option("--stop-after", type=click.IntRange(min=1), default=None,
              help="Checkpoint and stop once this global step is reached; run again to resume.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on when stderr is a terminal).")
def distill(config: str, overrides: tuple[str, ...], stop_after: int | None, progress: bool | None) -> None:
    """Distil as described by CONFIG (YAML or JSON), resuming from the latest checkpoint."""
    from gkd.engine.trainer import Trainer, TrainingInterrupted, format_table
    from gkd.plugins.manager import get_plugin_manager

    registry = get_plugin_manager().registry
    run = load_run_config(config, overrides, registry=registry)
    # gkd's own first line, before the trainer imports megatron-core and DeepSpeed.
    click.echo(f"gkd distill: run {run.name!r} → {run.run_dir}, {len(run.stages)} stage(s) "
               f"({', '.join(s.name for s in run.stages)})")
    trainer = Trainer(run, registry, progress=progress, stop_after=stop_after, echo=click.echo)
    try:
        summary = trainer.execute()
    except TrainingInterrupted as exc:
        click.echo(str(exc))
        return
    click.echo(format_table(summary))
    click.echo(f"run directory: {summary['run_dir']} ({summary['seconds']} s); exported student: {summary['export']}")
