"""load_tokenizer / encode_batch on the real MiniLM tokenizer.json (no transformers)."""

from __future__ import annotations

import pytest
import torch

from gkd.models import encode_batch, load_tokenizer


def test_minilm_tokenizer_defaults(minilm_path) -> None:
    tok = load_tokenizer(minilm_path)
    batch = encode_batch(tok, ["hello world", "a much longer sentence with several more words in it"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == batch["token_type_ids"].shape and ids.dtype == torch.long
    assert ids[0, 0] == 101 and ids[0, 3] == 102  # [CLS] hello world [SEP]
    assert mask[0].tolist() == [1, 1, 1, 1] + [0] * (ids.shape[1] - 4)  # padded to the longest, not 128
    assert bool((ids[0, 4:] == 0).all())
    long = encode_batch(tok, ["word " * 300])
    assert long["input_ids"].shape == (1, 128)  # truncation stored in the file


def test_minilm_tokenizer_overrides(minilm_path) -> None:
    tok = load_tokenizer(minilm_path / "tokenizer.json", max_length=16, padding="keep")
    out = encode_batch(tok, ["word " * 300, "hi"])
    assert out["input_ids"].shape == (2, 128)  # the file's fixed padding (128) kept
    assert int(out["attention_mask"][0].sum()) == 16
    unpadded = load_tokenizer(minilm_path, padding="none")
    with pytest.raises(ValueError, match="different lengths"):
        encode_batch(unpadded, ["hi", "hello there friend"])
    pairs = encode_batch(load_tokenizer(minilm_path), [("first part", "second part")])
    assert pairs["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1]]
    with pytest.raises(ValueError, match="padding"):
        load_tokenizer(minilm_path, padding="max")  # type: ignore[arg-type]
