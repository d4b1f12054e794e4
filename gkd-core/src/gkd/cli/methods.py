"""``gkd methods list`` and ``gkd methods show``."""

from __future__ import annotations

import json
from typing import Any

import click

from gkd.config.schema import defaults_of
from gkd.plugins.manager import get_plugin_manager


def _rows() -> list[dict[str, Any]]:
    registry = get_plugin_manager().registry
    rows: list[dict[str, Any]] = [
        {"name": m.spec.name, "distribution": m.origin.distribution, "version": m.origin.version,
         "kind": m.spec.kind, "stages": list(m.spec.stages), "status": "ok", "summary": m.spec.summary}
        for m in registry
    ]
    rows += [
        {"name": b.name, "distribution": b.origin.distribution, "version": b.origin.version,
         "kind": None, "stages": [], "status": b.status, "reason": b.reason}
        for b in registry.broken
    ]
    return sorted(rows, key=lambda r: r["name"])


@click.group()
def methods() -> None:
    """Inspect installed distillation methods."""


@methods.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per method).")
def list_methods(as_json: bool) -> None:
    """List installed methods: name, distribution, version, kind, status."""
    rows = _rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("NAME", "DISTRIBUTION", "VERSION", "KIND", "STATUS")
    table = [header] + [(r["name"], r["distribution"], r["version"], r["kind"] or "-", r["status"]) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    for r in rows:
        if r["status"] != "ok":
            click.echo(f"  ! {r['name']}: {r['reason']}", err=True)


@methods.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the full description as JSON.")
def show_method(name: str, as_json: bool) -> None:
    """Show a method: summary, citation, features and its config schema with defaults."""
    registered = get_plugin_manager().registry.get(name)
    spec = registered.spec
    info = spec.describe() | {"distribution": registered.origin.distribution, "version": registered.origin.version,
                              "defaults": defaults_of(spec.config_schema)}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{spec.name} — {spec.summary}")
    click.echo(f"  from:      {registered.origin.distribution} {registered.origin.version}")
    click.echo(f"  citation:  {spec.citation}")
    click.echo(f"  kind:      {spec.kind}; stages: {', '.join(spec.stages)}")
    click.echo(f"  modifies forward pass: {'yes' if spec.modifies_forward else 'no'}; "
               f"trainable parameters: {'yes' if spec.has_parameters else 'no'}")
    click.echo(f"  teacher features: {', '.join(spec.features.teacher) or '-'}")
    click.echo(f"  student features: {', '.join(spec.features.student) or '-'}")
    if spec.notes:
        click.echo(f"  notes: {spec.notes}")
    click.echo("  config (defaults):")
    for key, prop in spec.config_schema.get("properties", {}).items():
        default = json.dumps(prop["default"]) if "default" in prop else "(required)" if key in spec.config_schema.get("required", []) else "-"
        desc = prop.get("description", "")
        click.echo(f"    {key} = {default}    {desc}".rstrip())
