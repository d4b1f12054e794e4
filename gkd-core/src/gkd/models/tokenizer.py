"""Tokenizers from a checkpoint's ``tokenizer.json`` (the ``tokenizers`` library; no ``transformers``).

:class:`Tokenizer` replaces the file's built-in truncation and padding (all-MiniLM-L6-v2 ships
truncation *and* padding to 128) with an explicit ``max_length`` and per-batch padding, and
finds the special-token ids (pad, cls, sep, mask, bos, eos, unk) that tasks need.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import tokenizers
import torch

from gkd.errors import GkdError


class TokenizerError(GkdError):
    """A checkpoint directory without a readable ``tokenizer.json``."""


_CANDIDATES: dict[str, tuple[str, ...]] = {
    "pad": ("[PAD]", "<pad>", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>"),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|endoftext|>"),
    "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|eot_id|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
}


def _declared_special_tokens(model_dir: Path) -> dict[str, str]:
    """``{kind: token}`` from ``special_tokens_map.json`` / ``tokenizer_config.json``, when present."""
    found: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins
        try:
            data = json.loads((model_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for kind in _CANDIDATES:
            value = data.get(f"{kind}_token") if isinstance(data, dict) else None
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                found[kind] = value
    return found


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with explicit truncation, our own padding and known special ids.

    Args:
        tokenizer: The fast tokenizer; its built-in truncation and padding are replaced.
        max_length: Tokens per example after truncation (special tokens included).
        declared: Special tokens named by the checkpoint (``{"pad": "[PAD]", ...}``), preferred
            over the built-in list of well-known tokens.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, max_length: int,
                 declared: Mapping[str, str] | None = None) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.max_length = max_length
        self._tok = tokenizer
        # tokenizer.json files ship their own limits (MiniLM: truncate and pad to 128); batches
        # are padded per batch by us, so padding is off and truncation follows the run config.
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length, strategy="longest_first", direction="right")
        declared = dict(declared or {})
        self.special_ids: frozenset[int] = frozenset(
            i for i, tok in self._tok.get_added_tokens_decoder().items() if tok.special)
        ids = {kind: self._find(kind, declared.get(kind)) for kind in _CANDIDATES}
        self.cls_id, self.sep_id, self.mask_id = ids["cls"], ids["sep"], ids["mask"]
        self.bos_id, self.eos_id, self.unk_id = ids["bos"], ids["eos"], ids["unk"]
        pad = ids["pad"] if ids["pad"] is not None else self.eos_id
        self.pad_id: int = pad if pad is not None else 0
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str], max_length: int) -> Tokenizer:
        """Load ``<model_dir>/tokenizer.json`` (and the special-token names next to it).
        ``model_dir`` may be a ``pkg:module/sub`` path, as in run configs and ``from_pretrained``.

        Raises:
            TokenizerError: No readable ``tokenizer.json``, or a ``pkg:`` path that does not resolve.
        """
        from gkd.config.paths import PathResolutionError, resolve_path

        try:
            model_dir = resolve_path(os.fspath(model_dir), Path())
        except PathResolutionError as e:
            raise TokenizerError(f"tokenizer {os.fspath(model_dir)!r}: {e}") from None
        path = model_dir / "tokenizer.json"
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for missing or bad files
            raise TokenizerError(f"{path}: cannot load the tokenizer ({e})") from None
        return cls(tok, max_length, _declared_special_tokens(model_dir))

    def _find(self, kind: str, declared: str | None) -> int | None:
        for token in ((declared,) if declared else ()) + _CANDIDATES[kind]:
            index = self._tok.token_to_id(token)
            if index is not None:
                return index
        return None

    def token_lists(self, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """``(ids, special_tokens_mask)`` per text, truncated, not padded.

        Tokenising whole documents to keep 128 tokens dominates loading time, so long texts are
        first cut at a whitespace well past ``max_length`` tokens' worth of characters. The
        tokens before a whitespace cut do not depend on what follows it, so when the cut text
        still fills ``max_length`` the result is exactly the full text's; otherwise (very
        long tokens) the full text is encoded.
        """
        budget = self.max_length * _CHARS_PER_TOKEN_BOUND
        cut = [_cut_at_whitespace(t, budget) for t in texts]
        out = [(e.ids, e.special_tokens_mask) for e in self._tok.encode_batch(cut)]
        redo = [i for i, (t, c) in enumerate(zip(texts, cut, strict=True)) if c is not t and len(out[i][0]) < self.max_length]
        for i, e in zip(redo, self._tok.encode_batch([texts[i] for i in redo]), strict=True):
            out[i] = (e.ids, e.special_tokens_mask)
        return out

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encode and right-pad a batch: ``input_ids`` and ``attention_mask``, ``[b, s]`` int64."""
        ids = [torch.tensor(i, dtype=torch.long) for i, _ in self.token_lists(texts)]
        return {"input_ids": pad_rows(ids, self.pad_id), "attention_mask": pad_rows([torch.ones_like(t) for t in ids], 0)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


_CHARS_PER_TOKEN_BOUND = 8
"""Characters kept per wanted token before tokenising (English averages 4–5; a shorter cut is re-encoded in full)."""


def _cut_at_whitespace(text: str, budget: int) -> str:
    """``text`` itself when short, else its prefix up to the last whitespace before ``budget``."""
    if len(text) <= budget:
        return text
    end = max(text.rfind(" ", 0, budget), text.rfind("\n", 0, budget), text.rfind("\t", 0, budget))
    return text[:end].rstrip() if end > 0 else text


def pad_rows(rows: Sequence[torch.Tensor], value: int | bool) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype if rows else torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


__all__ = ["Tokenizer", "TokenizerError", "pad_rows"]
