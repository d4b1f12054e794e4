"""``gkd config schema``: the run-config JSON Schema, the reference for every field."""

from __future__ import annotations

import json

import click

from gkd.config import run_schema


@click.group()
def config() -> None:
    """Run-config reference."""


@config.command("schema")
def schema() -> None:
    """Print the JSON Schema (Draft 2020-12) of run configs."""
    click.echo(json.dumps(run_schema(), indent=2))
