"""``gkd export RUN_DIR --to DIR``: a run's student as a checked Hugging Face or ONNX directory."""

from __future__ import annotations

import click

from gkd.deploy.options import DTYPE_CHOICES, FORMATS, QUANTIZE_CHOICES, check_arguments


@click.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--to", "to", required=True, type=click.Path(file_okay=False),
              help="Destination directory (new, empty, or an earlier gkd export, which is replaced).")
@click.option("--stage", default=None, help="Export the student at the end of this stage (default: the final one).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="hf", show_default=True,
              help="hf: a transformers directory; onnx: the same plus model.onnx (needs gkd-core[onnx]).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="fp32", show_default=True,
              help="Weight dtype of an hf export.")
@click.option("--quantize", type=click.Choice(QUANTIZE_CHOICES), default="none", show_default=True,
              help="int8: dynamic int8 quantisation of the ONNX model, for CPUs.")
def export(run_dir: str, to: str, stage: str | None, fmt: str, dtype: str, quantize: str) -> None:
    """Export a run's student (final or --stage) to Hugging Face or ONNX, checked against the gkd model."""
    from gkd.deploy.export import export_run

    check_arguments(fmt, dtype, quantize)  # before torch is imported: a missing extra fails fast
    result = export_run(run_dir, to, stage=stage, fmt=fmt, dtype=dtype, quantize=quantize, echo=click.echo)
    click.echo(f"exported the student of stage '{result.source.stage}' to {result.out} in {result.seconds:.1f} s: "
               f"{', '.join(result.files)}")
