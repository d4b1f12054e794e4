"""ONNX exports of a Hugging Face export, optionally int8-quantised, checked with onnxruntime.

The graph is traced from the ``transformers`` model of the export (eager attention), not from
gkd's megatron-core model: megatron-core's modules do not trace (their ``_extra_state``
entries are ``None`` and their tensor-parallel autograd functions take ``None`` arguments),
while the ``transformers`` classes are the standard, well-supported ONNX path. The check is
still against gkd's own model, so a wrong weight mapping or a wrong graph both fail it.

Tracing uses torch's TorchScript-based exporter (``dynamo=False``): the newer torch.export
exporter needs the ``onnxscript`` package as well. Inputs are ``input_ids`` and
``attention_mask`` (int64, ``[batch, sequence]``, both axes dynamic); the output is ``logits``
(``last_hidden_state`` for a model without a head). ``int8`` is onnxruntime's dynamic
quantisation (int8 weights, activations quantised per batch at run time), for CPUs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gkd.atomic import fsync_dir, tmp_sibling
from gkd.deploy.extras import install_hint, missing, require
from gkd.deploy.hf import load_transformers, transformers_logits
from gkd.deploy.parity import BOUNDS, Parity, compare
from gkd.errors import GkdError

ONNX_FILE = "model.onnx"
OPSET = 17
INPUTS = ("input_ids", "attention_mask")
QUANTIZATIONS = ("none", "int8")
ONNX_SIZE_LIMIT = 2**31 - 2**24
"""A protobuf file holds at most 2 GiB; larger graphs need external data files, which are not handled yet."""


def require_onnx(what: str) -> None:
    """Raise one line naming the extra when onnx, onnxruntime or transformers is missing."""
    absent = missing()
    if absent:
        raise GkdError(install_hint(what, absent))


class _Logits(nn.Module):
    """A ``transformers`` model as ``(input_ids, attention_mask) -> logits`` for tracing."""

    def __init__(self, model: nn.Module, head: str) -> None:
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return transformers_logits(self.model, {"input_ids": input_ids, "attention_mask": attention_mask}, self.head)


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    quantize: str
    parity: Parity
    opset: int = OPSET

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path.name, "quantize": self.quantize, "opset": self.opset, "inputs": list(INPUTS),
                "output": "logits", "parity": self.parity.to_dict()}


def session(path: Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of ``path`` with full graph optimisation and ``threads`` intra-op
    threads (default: as many as torch uses, so the two runtimes are compared fairly)."""
    ort = require("onnxruntime", "running an ONNX model")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its notices about unused initialisers are not the user's concern
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_session(sess: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The first output of ``sess`` for ``batch`` (only the graph's inputs are fed)."""
    feed = {name: batch[name].to(torch.int64).numpy() for name in INPUTS}
    return torch.from_numpy(np.asarray(sess.run(None, feed)[0]))


@contextlib.contextmanager
def _root_warnings_off() -> Iterator[None]:
    """onnxruntime's quantiser warns through the root logger; silence it for one call."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(before)


def _trace(hf_dir: Path, head: str, target: Path, example: dict[str, torch.Tensor]) -> None:
    model = _Logits(load_transformers(hf_dir, head, "fp32"), head)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    output = "last_hidden_state" if head == "none" else "logits"
    axes[output] = {0: "batch"} if head == "classification" else {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer and deprecation notices about branches that are constant for these inputs.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example["input_ids"], example["attention_mask"]), str(target), dynamo=False,
                          input_names=list(INPUTS), output_names=[output], dynamic_axes=axes, opset_version=OPSET,
                          do_constant_folding=True)


def export_onnx(hf_dir: Path, head: str, reference: Sequence[torch.Tensor],
                batches: Sequence[dict[str, torch.Tensor]], *, quantize: str = "none") -> OnnxExport:
    """Write ``<hf_dir>/model.onnx`` from the Hugging Face export in ``hf_dir`` and check it.

    Args:
        hf_dir: A checked Hugging Face export (fp32).
        head: gkd's head of the model (``classification``, ``mlm``, ``lm``, ``none``).
        reference: gkd's outputs for ``batches`` (:func:`gkd.deploy.parity.reference_outputs`).
        batches: Probe batches (:func:`gkd.deploy.parity.probe_batches`).
        quantize: ``none`` (fp32) or ``int8`` (dynamic quantisation).

    Raises:
        GkdError: The extra is missing, or onnxruntime's outputs miss the bound (the file is not written).
    """
    require_onnx("an ONNX export")
    if quantize not in QUANTIZATIONS:
        raise GkdError(f"--quantize: expected one of {', '.join(QUANTIZATIONS)}, got '{quantize}'")
    onnx = require("onnx", "an ONNX export")
    weights = sum(p.stat().st_size for p in hf_dir.glob("model*.safetensors"))
    if weights >= ONNX_SIZE_LIMIT:
        raise GkdError(f"{hf_dir}: {weights / 2**30:.1f} GiB of weights; ONNX exports over 2 GiB (external data files) "
                       "are not supported yet; use --format hf")
    final = hf_dir / ONNX_FILE
    traced = tmp_sibling(final)
    quantized = traced.with_name(traced.name + ".int8")
    try:
        _trace(hf_dir, head, traced, batches[0])
        onnx.checker.check_model(str(traced))
        written = traced
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            with _root_warnings_off():  # its advice to pre-process (shape inference fails on these graphs)
                quantize_dynamic(str(traced), str(quantized), weight_type=QuantType.QInt8, per_channel=True)
            written = quantized
        sess = session(written)
        outputs = [run_session(sess, b) for b in batches]
        parity = compare(f"onnxruntime ({'int8' if quantize == 'int8' else 'fp32'})", reference, outputs, batches,
                         BOUNDS["int8" if quantize == "int8" else "fp32"])
        if not parity.ok:
            raise GkdError(f"{final}: the ONNX export does not match the gkd model: {parity.line()}")
        os.replace(written, final)
        fsync_dir(final.parent)
    finally:
        for leftover in (traced, quantized):
            leftover.unlink(missing_ok=True)
    return OnnxExport(final, quantize, parity)


__all__ = ["INPUTS", "ONNX_FILE", "OPSET", "QUANTIZATIONS", "OnnxExport", "export_onnx", "require_onnx",
           "run_session", "session"]
