"""The choices of ``gkd export`` and their checks; light (no torch), so the CLI refuses bad
arguments and a missing extra before loading anything."""

from __future__ import annotations

from gkd.deploy.extras import install_hint, missing
from gkd.errors import GkdError

FORMATS = ("hf", "onnx")
DTYPE_CHOICES = ("fp32", "bf16", "fp16")
QUANTIZE_CHOICES = ("none", "int8")


def check_arguments(fmt: str, dtype: str, quantize: str) -> None:
    """Refuse contradictory options, and a missing extra, before anything is read (one line each)."""
    if fmt not in FORMATS:
        raise GkdError(f"--format: expected one of {', '.join(FORMATS)}, got '{fmt}'")
    if dtype not in DTYPE_CHOICES:
        raise GkdError(f"--dtype: expected one of {', '.join(DTYPE_CHOICES)}, got '{dtype}'")
    if quantize not in QUANTIZE_CHOICES:
        raise GkdError(f"--quantize: expected one of {', '.join(QUANTIZE_CHOICES)}, got '{quantize}'")
    if quantize != "none" and fmt != "onnx":
        raise GkdError(f"--quantize {quantize} applies to ONNX exports; add --format onnx")
    if fmt == "onnx" and dtype != "fp32":
        raise GkdError(f"--dtype {dtype}: ONNX exports are fp32 (or int8 with --quantize int8); --dtype applies "
                       "to --format hf")
    absent = missing() if fmt == "onnx" else missing(("transformers",))
    if absent:
        what = ("gkd export --format onnx" if fmt == "onnx"
                else "gkd export (it loads the export back with transformers to check it)")
        raise GkdError(install_hint(what, absent))


__all__ = ["DTYPE_CHOICES", "FORMATS", "QUANTIZE_CHOICES", "check_arguments"]
