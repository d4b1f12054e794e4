"""Every shipped example config runs under ``gkd distill``, shortened for CI.

Each file in ``examples/methods/`` (and the combination configs in ``examples/combinations/``,
and the multi-teacher and teacher-assistant configs in ``examples/multiteacher/``) is run as
written except: a temporary ``run_dir``, 48 training / 32 test documents of 32 tokens, 2 steps
per stage and small batches. The point is that the config validates, every stage runs
through ``gkd distill``'s code path with the real MiniLM teacher and real text, and every loss
term the methods log is finite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gkd.cli import cli
from gkd.config import load_run_config
from gkd.plugins import load_plugin_manager

ROOT = Path(__file__).parents[2] / "examples"
CONFIGS = (sorted((ROOT / "methods").glob("*.yaml")) + sorted((ROOT / "combinations").glob("*.yaml"))
           + sorted((ROOT / "multiteacher").glob("*.yaml")))
STEPS = 2


def shorten(config: dict, run_dir: Path) -> dict:
    """The CI-sized version of an example config."""
    config = dict(config, run_dir=str(run_dir))
    config["task"] = {**config["task"], "max_length": 32}
    data = {k: dict(v) for k, v in config["data"].items()}
    for split, limit in (("train", 48), ("eval", 32), ("test", 32)):
        if split in data:
            data[split]["limit"] = limit
    config["data"] = data
    stages = []
    for stage in config["stages"]:
        stage = {k: v for k, v in stage.items() if k != "epochs"} | {"steps": STEPS}
        stage["training"] = {**stage.get("training", {}), "batch_size": 8}
        if "data" in stage:
            stage["data"] = {k: dict(v, limit=32) for k, v in stage["data"].items()}
        stages.append(stage)
    config["stages"] = stages
    config["training"] = {**config.get("training", {}), "batch_size": 8, "eval_batch_size": 32}
    config["logging"] = {**config.get("logging", {}), "progress": False, "plot": False}
    return config


@pytest.fixture(scope="module")
def registry():
    return load_plugin_manager().registry


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_example_config_runs(path: Path, tmp_path: Path, registry) -> None:
    config = shorten(yaml.safe_load(path.read_text()), tmp_path / "run")
    short = path.parent / f".ci-{path.stem}.yaml"  # next to the original: relative paths keep working
    short.write_text(yaml.safe_dump(config))
    try:
        run = load_run_config(short, registry=registry)
        result = CliRunner().invoke(cli, ["distill", str(short), "--no-progress"])  # the user's command
    finally:
        short.unlink()
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"gkd distill: run '{run.name}'")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == STEPS * len(run.stages)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == STEPS * len(run.stages)
    for record in train:
        assert all(math.isfinite(v) for v in record["terms"].values()), record
    methods = {m.name for s in run.stages for m in s.methods}
    logged = {k.split(".", 1)[0] for r in train for k in r["terms"]}
    assert methods <= logged, f"methods that logged no term: {methods - logged}"
    student = next(r for r in summary["models"] if r["model"] == "student")
    assert "accuracy" in student or "perplexity" in student


def test_an_incompatible_combination_is_refused_before_launch(registry) -> None:
    """Mix5 with DistilBERT's gold-label term switched on: two methods would add the hard loss."""
    from gkd.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_run_config(ROOT / "combinations" / "mix5.yaml", ["stages[1].methods[4].config.hard_weight=1"],
                        registry=registry)
    (issue,) = info.value.issues
    assert issue.path == "stages[1].methods[4].config.hard_weight"
    assert "'kd' (methods[0].config.hard_weight) and 'distilbert' both claim the hard (gold-label) loss" in issue.message
