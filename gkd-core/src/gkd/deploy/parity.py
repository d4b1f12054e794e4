"""The self-check of every export: the exported model's outputs against the gkd model's.

Probe inputs are fixed English sentences of varied length (one filling ``max_length``)
tokenised by the export's own tokenizer, as one padded batch and as a single short example,
so both dynamic axes (batch and sequence) of an ONNX graph are exercised. Outputs are compared
where they mean something: every row of a classifier, the attended tokens of an LM/MLM.

Bounds (``|exported − gkd| ≤ atol + rtol·|gkd|`` elementwise, on the logits; or the share of
positions whose argmax agrees):

==========  ======================================  ===========================================
fp32        atol 1e-4, rtol 1e-4                    transformers / onnxruntime in fp32
fp16        atol 2e-2, rtol 2e-2                    10 mantissa bits
bf16        atol 1e-1, rtol 5e-2                    7 mantissa bits
int8        argmax agrees on ≥ 90 % of positions    dynamic int8 quantisation is lossy by design
==========  ======================================  ===========================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gkd.models import GkdModel, ModelConfig

PROBE_TEXTS: tuple[str, ...] = (
    "Wheat and corn exports fell sharply in the last quarter.",
    "The central bank left interest rates unchanged on Tuesday.",
    "Oil prices climbed as crude inventories dropped for a third week.",
    "The company agreed to acquire its smaller rival for 120 million dollars in cash and stock.",
    "Shipping traffic through the canal was delayed by fog.",
    "Quarterly earnings rose 12 pct to 45 cts a share, beating forecasts.",
    "The dollar fell against the yen and the mark in early trading.",
    "Trade talks between the two countries ended without an agreement.",
    "Net profit.",
    "A small bakery in the old town opened a second shop near the station, hiring six people.",
    "Grain stocks at the port were lower than a year ago, officials said.",
    "The board said the merger would be completed by the end of the year, subject to approval "
    "by shareholders and regulators, and that no jobs would be lost in the process. " * 4,
)
"""Probe sentences (the last one fills any usual ``max_length``)."""


@dataclass(frozen=True)
class Bound:
    """What an export must meet."""

    atol: float | None = None
    rtol: float = 0.0
    min_agreement: float | None = None
    """Least share of compared positions whose argmax must agree (int8)."""

    def describe(self) -> str:
        parts = []
        if self.atol is not None:
            parts.append(f"|Δ| ≤ {self.atol:g} + {self.rtol:g}·|logit|")
        if self.min_agreement is not None:
            parts.append(f"argmax agreement ≥ {self.min_agreement:.0%}")
        return " and ".join(parts)


BOUNDS: dict[str, Bound] = {
    "fp32": Bound(atol=1e-4, rtol=1e-4),
    "fp16": Bound(atol=2e-2, rtol=2e-2),
    "bf16": Bound(atol=1e-1, rtol=5e-2),
    "int8": Bound(min_agreement=0.9),
}


@dataclass(frozen=True)
class Parity:
    """The outcome of one check."""

    what: str
    """What was compared with gkd, e.g. ``onnxruntime (int8)``."""
    bound: Bound
    max_abs: float
    """Largest absolute difference on the compared logits."""
    agreement: float
    """Share of compared positions whose argmax agrees."""
    positions: int
    """Rows (classification) or tokens (LM/MLM) compared."""
    worst: float
    """Largest ``|Δ| / (atol + rtol·|ref|)`` (≤ 1 passes); 0 without an elementwise bound."""

    @property
    def ok(self) -> bool:
        elementwise = self.bound.atol is None or self.worst <= 1.0
        argmax = self.bound.min_agreement is None or self.agreement >= self.bound.min_agreement
        return elementwise and argmax

    def line(self) -> str:
        """One line for the terminal (and for the error when the check fails)."""
        verdict = "OK" if self.ok else "FAILED"
        return (f"{self.what} vs gkd: max |Δ| {self.max_abs:.2e}, argmax agreement {self.agreement:.1%} over "
                f"{self.positions} {'positions' if self.positions != 1 else 'position'} — {verdict} "
                f"(bound: {self.bound.describe()})")

    def to_dict(self) -> dict[str, object]:
        return {"what": self.what, "bound": self.bound.describe(), "max_abs": self.max_abs,
                "argmax_agreement": self.agreement, "positions": self.positions, "ok": self.ok}


def probe_batches(tokenizer_dir: Path | None, cfg: ModelConfig, max_length: int) -> list[dict[str, torch.Tensor]]:
    """Two batches: every probe text (padded) and the first one alone.

    Without a tokenizer (``tokenizer_dir`` None or lacking ``tokenizer.json``) the texts are
    replaced by seeded random token ids of the same lengths.
    """
    from gkd.models import Tokenizer

    max_length = min(max_length, cfg.max_position_embeddings) if cfg.family == "encoder" else max_length
    texts = list(PROBE_TEXTS)
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        tok = Tokenizer.from_dir(Path(tokenizer_dir), max_length)
        batches = [tok.encode(texts), tok.encode(texts[:1])]
    else:
        gen = torch.Generator().manual_seed(0)
        lengths = [max(2, min(max_length, len(t.split()) + 2)) for t in texts]
        rows = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) for n in lengths]
        width = max(lengths)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        batches = [{"input_ids": ids, "attention_mask": mask},
                   {"input_ids": ids[:1, : lengths[0]], "attention_mask": mask[:1, : lengths[0]]}]
    return batches


@torch.no_grad()
def reference_outputs(model: GkdModel, batches: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """gkd's logits (or last hidden states without a head) for each probe batch, fp32 on the CPU."""
    model.eval()
    out = []
    for b in batches:
        result = model(b["input_ids"], b["attention_mask"])
        value = result.logits if result.logits is not None else result.last_hidden
        out.append(value.float().cpu())
    return out


def compare(what: str, reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
            batches: Sequence[dict[str, torch.Tensor]], bound: Bound) -> Parity:
    """Compare ``outputs`` with ``reference`` batch by batch (token outputs on attended tokens only)."""
    max_abs, worst, agree, positions = 0.0, 0.0, 0, 0
    for ref, got, batch in zip(reference, outputs, batches, strict=True):
        got = got.float()
        if got.shape != ref.shape:
            raise ValueError(f"{what}: output shape {tuple(got.shape)} differs from gkd's {tuple(ref.shape)}")
        if ref.dim() == 3:  # [b, s, V|h]: keep attended tokens
            keep = batch["attention_mask"].bool()
            ref, got = ref[keep], got[keep]
        diff = (got - ref).abs()
        max_abs = max(max_abs, float(diff.max()) if diff.numel() else 0.0)
        if bound.atol is not None:
            worst = max(worst, float((diff / (bound.atol + bound.rtol * ref.abs())).max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        positions += ref.shape[0]
    return Parity(what, bound, max_abs, agree / max(positions, 1), positions, worst)


__all__ = ["BOUNDS", "PROBE_TEXTS", "Bound", "Parity", "compare", "probe_batches", "reference_outputs"]
