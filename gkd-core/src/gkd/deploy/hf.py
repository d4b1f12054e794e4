"""Hugging Face exports: write them (:func:`gkd.models.export_hf`, optionally cast to bf16/fp16)
and load them back with ``transformers`` to check them."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gkd.atomic import atomic_write, atomic_write_json
from gkd.deploy.extras import require
from gkd.deploy.parity import BOUNDS, Parity, compare
from gkd.models import GkdModel, export_hf

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
AUTO_CLASSES = {"classification": "AutoModelForSequenceClassification", "mlm": "AutoModelForMaskedLM",
                "lm": "AutoModelForCausalLM", "none": "AutoModel"}
"""The ``transformers`` auto class that loads an export, by gkd head."""


def write_hf(model: GkdModel, out: Path, *, tokenizer_dir: Path | None, labels: Sequence[str] | None,
             dtype: str = "fp32") -> Path:
    """The Hugging Face directory of ``model``: weights in ``dtype``, ``config.json``, tokenizer
    files and, for a classifier, ``labels.json`` (the run's label vocabulary)."""
    export_hf(model, out, tokenizer_dir=tokenizer_dir)
    if dtype != "fp32":
        weights = out / "model.safetensors"
        tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
        atomic_write(weights, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        config = json.loads((out / "config.json").read_text())
        config["torch_dtype"] = HF_DTYPE_NAMES[dtype]
        atomic_write_json(out / "config.json", config)
    if labels is not None and model.model_config.head == "classification":
        atomic_write_json(out / "labels.json", {"labels": list(labels)})
    return out


@contextlib.contextmanager
def quiet_transformers() -> Iterator[Any]:
    """``transformers`` without its progress bars and notices for the duration (its settings restored)."""
    transformers = require("transformers", "checking a Hugging Face export")
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield transformers
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_transformers(path: Path, head: str, dtype: str = "fp32") -> nn.Module:
    """The export at ``path`` as ``transformers`` loads it (eager attention, eval mode, CPU)."""
    with quiet_transformers() as transformers:
        auto = getattr(transformers, AUTO_CLASSES[head])
        # transformers 5 names the argument ``dtype``; 4.x ``torch_dtype``.
        key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        model = auto.from_pretrained(str(path), attn_implementation="eager", **{key: DTYPES[dtype]})
    return model.eval()


def transformers_logits(model: nn.Module, batch: dict[str, torch.Tensor], head: str) -> torch.Tensor:
    """The logits (last hidden states without a head) of a ``transformers`` model."""
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if head == "lm":
        kwargs["use_cache"] = False
    out = model(**kwargs)
    return out.last_hidden_state if head == "none" else out.logits


@torch.no_grad()
def check_hf(path: Path, head: str, dtype: str, reference: Sequence[torch.Tensor],
             batches: Sequence[dict[str, torch.Tensor]]) -> Parity:
    """``transformers``' outputs of the export at ``path`` against gkd's ``reference``."""
    model = load_transformers(path, head, dtype)
    outputs = [transformers_logits(model, b, head).float() for b in batches]
    return compare(f"transformers ({dtype})", reference, outputs, batches, BOUNDS[dtype])


__all__ = ["AUTO_CLASSES", "DTYPES", "check_hf", "load_transformers", "quiet_transformers", "transformers_logits",
           "write_hf"]
