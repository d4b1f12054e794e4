"""Tokenizers from ``tokenizer.json`` (the ``tokenizers`` library, no ``transformers``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer

Padding = Literal["longest", "keep", "none"]


def _pad_token(path: Path, tok: Tokenizer) -> tuple[str, int] | None:
    """The pad token from tokenizer_config.json / the file's padding section, if any."""
    pad_token = None
    config = path / "tokenizer_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("pad_token")
        pad_token = value.get("content") if isinstance(value, dict) else value
    if pad_token is None and tok.padding is not None:
        pad_token = tok.padding.get("pad_token")
    if pad_token is None:
        return None
    pad_id = tok.token_to_id(pad_token)
    return None if pad_id is None else (pad_token, pad_id)


def load_tokenizer(
    path: str | os.PathLike[str],
    *,
    max_length: int | None = None,
    padding: Padding = "longest",
) -> Tokenizer:
    """Load ``tokenizer.json`` from a checkpoint directory (or the file itself).

    Truncation stored in the file is kept unless ``max_length`` is given — note that the
    all-MiniLM-L6-v2 tokenizer ships ``truncation.max_length = 128`` (and fixed padding to 128).

    Args:
        path: Directory holding ``tokenizer.json``, or the file.
        max_length: Truncate encodings to this many tokens (overrides the file).
        padding: ``"longest"`` pads a batch to its longest member with the model's pad
            token (when it has one); ``"keep"`` keeps the file's padding settings;
            ``"none"`` disables padding.
    """
    p = Path(path)
    directory, file = (p, p / "tokenizer.json") if p.is_dir() else (p.parent, p)
    tok = Tokenizer.from_file(str(file))
    if max_length is not None:
        tok.enable_truncation(max_length)
    if padding == "none":
        tok.no_padding()
    elif padding == "longest":
        pad = _pad_token(directory, tok)
        if pad is None:
            tok.no_padding()
        else:
            tok.enable_padding(pad_id=pad[1], pad_token=pad[0], length=None)
    elif padding != "keep":
        raise ValueError(f"padding ({padding!r}) must be 'longest', 'keep' or 'none'")
    return tok


def encode_batch(
    tokenizer: Tokenizer, texts: Sequence[str] | Sequence[tuple[str, str]]
) -> dict[str, torch.Tensor]:
    """Tokenise a batch into ``input_ids``, ``attention_mask`` and ``token_type_ids`` ``[b, s]``.

    The tokenizer must pad (see :func:`load_tokenizer`) unless all encodings have one length.
    """
    encodings = tokenizer.encode_batch(list(texts))
    lengths = {len(e.ids) for e in encodings}
    if len(lengths) > 1:
        raise ValueError(
            f"encodings have different lengths {sorted(lengths)}; enable padding in the tokenizer"
        )
    return {
        "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
        "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
        "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.long),
    }


__all__ = ["encode_batch", "load_tokenizer"]
