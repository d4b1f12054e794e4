"""``gkd cache info|prune``: what the teacher-output cache holds, and removing it."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import click

from gkd.engine.cache_store import ENV, default_cache_dir, namespace_info, namespaces, prune

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def _size(text: str) -> int:
    match = _SIZE.match(text)
    if match is None:
        raise click.BadParameter(f"'{text}' is not a size; use e.g. 500M, 20G or 1.5T")
    unit = match[2].lower()
    return int(float(match[1]) * 1024 ** ("kmgt".index(unit) + 1 if unit else 0))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _root(directory: Path | None) -> Path:
    return directory if directory is not None else default_cache_dir()


DIR_OPTION = click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False),
                          help=f"Cache directory (default: ${ENV}, else ~/.cache/gkd/teacher-cache; a run's cache.dir).")


@click.group()
def cache() -> None:
    """Inspect and prune the teacher-output cache (run config `cache`)."""


@cache.command()
@DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the table.")
def info(directory: Path | None, as_json: bool) -> None:
    """Size and entries per teacher (one namespace per teacher weights, rank shard and precision)."""
    root = _root(directory)
    rows = [namespace_info(ns) for ns in namespaces(root)]
    if as_json:
        click.echo(json.dumps({"dir": str(root), "namespaces": [
            {"id": r.directory.name, "entries": r.entries, "shards": r.shards, "bytes": r.bytes,
             "last_written": r.newest, **r.description} for r in rows]}, indent=1))
        return
    click.echo(f"teacher cache: {root}")
    if not rows:
        click.echo("empty")
        return
    table = [["namespace", "teacher", "precision", "tp rank", "entries", "shards", "size", "last written"]]
    for r in rows:
        d = r.description
        teacher = f"{d.get('teacher_path', '?')} (sha256 {str(d.get('teacher_sha256', ''))[:12]})"
        table.append([r.directory.name[:12], teacher, str(d.get("precision", "?")),
                      f"{d.get('tp_rank', 0)}/{d.get('tp_size', 1)}", f"{r.entries} entries", str(r.shards),
                      _human(r.bytes), time.strftime("%Y-%m-%d %H:%M", time.localtime(r.newest)) if r.newest else "-"])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    click.echo(f"total: {sum(r.entries for r in rows)} entries, {sum(r.shards for r in rows)} shards, "
               f"{_human(sum(r.bytes for r in rows))}")


@cache.command("prune")
@DIR_OPTION
@click.option("--all", "everything", is_flag=True, help="Remove every entry.")
@click.option("--older-than", type=click.FloatRange(min=0), metavar="DAYS",
              help="Remove shards written more than DAYS days ago.")
@click.option("--max-size", metavar="SIZE", help="Remove the oldest shards until the cache holds at most SIZE (e.g. 20G).")
def prune_cmd(directory: Path | None, everything: bool, older_than: float | None, max_size: str | None) -> None:
    """Remove cached teacher outputs: all, those older than DAYS, or the oldest beyond SIZE."""
    if not (everything or older_than is not None or max_size is not None):
        raise click.UsageError("say what to remove: --all, --older-than DAYS or --max-size SIZE")
    removed, freed = prune(_root(directory), everything=everything,
                           older_than_s=None if older_than is None else older_than * 86400,
                           max_bytes=None if max_size is None else _size(max_size))
    click.echo(f"removed {removed} shard(s), {_human(freed)}")
