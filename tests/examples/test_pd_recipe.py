"""PD's full recipe: the masked-LM pre-training run, then the distillation run whose student starts
from it (``student.init: {strategy: run, path: …}``), both shortened as the example harness does."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

from gkd.config import load_run_config
from gkd.engine.trainer import Trainer
from gkd.plugins import load_plugin_manager

EXAMPLES = Path(__file__).parents[2] / "examples" / "methods"


def _shorten():
    spec = importlib.util.spec_from_file_location("_method_examples", Path(__file__).with_name("test_method_examples.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.shorten


def _run(config: dict, name: str) -> dict:
    short = EXAMPLES / f".ci-{name}.yaml"  # next to the originals: pkg: and relative paths keep working
    short.write_text(yaml.safe_dump(config))
    registry = load_plugin_manager().registry
    try:
        run = load_run_config(short, registry=registry)
    finally:
        short.unlink()
    return Trainer(run, registry, progress=False, echo=lambda _: None).execute()


def test_pd_runs_after_pd_pretrain(tmp_path: Path) -> None:
    shorten = _shorten()
    pretrain_dir = tmp_path / "pd-pretrain"
    pretrain = shorten(yaml.safe_load((EXAMPLES / "pd-pretrain.yaml").read_text()), pretrain_dir)
    summary = _run(pretrain, "pd-recipe-pretrain")
    assert "perplexity" in next(r for r in summary["models"] if r["model"] == "student")
    assert (pretrain_dir / "export" / "config.json").is_file()

    distil = shorten(yaml.safe_load((EXAMPLES / "pd.yaml").read_text()), tmp_path / "pd")
    # what `--set student.init.strategy=run --set student.init.path=…` does to the file
    distil["student"] = {"init": {**distil["student"]["init"], "strategy": "run", "path": str(pretrain_dir)}}
    summary = _run(distil, "pd-recipe-distil")
    assert "accuracy" in next(r for r in summary["models"] if r["model"] == "student")
    train = [json.loads(x) for x in (tmp_path / "pd" / "metrics.jsonl").read_text().splitlines()]
    assert any("pd.soft" in r.get("terms", {}) for r in train if r["kind"] == "train")
