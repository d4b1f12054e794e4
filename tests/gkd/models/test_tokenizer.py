"""Tokenizer on the real MiniLM tokenizer.json (no transformers)."""

from __future__ import annotations

import pytest
import torch

from gkd.models import Tokenizer, TokenizerError


def test_minilm_tokenizer_pads_per_batch_and_truncates(minilm_path) -> None:
    tok = Tokenizer.from_dir(minilm_path, 128)
    assert (tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id) == (101, 102, 0, 103)
    batch = tok.encode(["hello world", "a much longer sentence with several more words in it"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.dtype == torch.long
    assert ids[0, 0] == 101 and ids[0, 3] == 102  # [CLS] hello world [SEP]
    assert mask[0].tolist() == [1, 1, 1, 1] + [0] * (ids.shape[1] - 4)  # padded to the longest, not to 128
    assert bool((ids[0, 4:] == 0).all())
    assert tok.encode(["word " * 300])["input_ids"].shape == (1, 128)
    short = Tokenizer.from_dir(minilm_path, 16).encode(["word " * 300, "hi"])
    assert short["input_ids"].shape == (2, 16) and int(short["attention_mask"][1].sum()) == 3


def test_missing_tokenizer_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="cannot load the tokenizer"):
        Tokenizer.from_dir(tmp_path, 16)
