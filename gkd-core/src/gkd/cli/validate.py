"""``gkd validate CONFIG``."""

from __future__ import annotations

import click

from gkd.config import load_run_config


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field, e.g. stages[0].steps=10.")
def validate(config: str, overrides: tuple[str, ...]) -> None:
    """Check a run config without running it; every error is printed as 'FILE: path: message'."""
    run = load_run_config(config, overrides)
    methods = sorted({m.name for s in run.stages for m in s.methods})
    click.echo(f"{config}: OK — {len(run.stages)} stage(s), {len(run.teachers)} teacher(s), "
               f"methods: {', '.join(methods) or 'none'}")
