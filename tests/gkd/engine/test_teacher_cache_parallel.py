"""The teacher cache under the multi-process launch: DP=2 (both ranks share one namespace, each
writes its own shards) and TP=2 (each rank caches its own heads' shard of the sharded features in
a namespace of its own). A second run is served every teacher batch and trains bit for bit the
student of an uncached run. All runs happen in one :func:`gkd.parallel.run_distributed` job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gkd import parallel
from gkd.config import load_run_config
from gkd.engine.trainer import Trainer
from gkd.plugins import load_plugin_manager


@pytest.fixture(scope="module")
def workspace(cache_workspace: Path) -> Path:
    return cache_workspace


def write_config(root: Path, name: str, *, tp: int, dp: int, cache: Any) -> Path:
    cfg = {
        "name": name, "run_dir": str(root / "runs" / name), "seed": 7,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": str(root / "train.jsonl")}},
        "teachers": [{"name": "t", "path": str(root / "teacher")}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}},
        "stages": [{"name": "tinybert", "epochs": 1,
                    "methods": [{"name": "tinybert", "config": {"prediction_weight": 1.0}}]}],
        "training": {"batch_size": 2},
        "parallel": {"tensor_parallel": tp, "data_parallel": dp},
        "checkpoint": {"every_steps": 0, "keep_last": 1},
        "logging": {"progress": False, "plot": False},
        "export": {"enabled": False},
        "cache": cache,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def execute(config: Path) -> list[str]:
    lines: list[str] = []
    registry = load_plugin_manager().registry
    Trainer(load_run_config(config, registry=registry), registry, progress=False, echo=lines.append).execute()
    return [line for line in lines if "teacher cache" in line]


def job(root: str) -> dict[str, list[str]]:
    """On each rank: DP=2 runs (plain, fill, served), then TP=2 runs in the same processes."""
    from megatron.core import parallel_state

    base = Path(root)
    out: dict[str, list[str]] = {}
    for tp, dp in ((1, 2), (2, 1)):
        if tp == 2:
            parallel_state.destroy_model_parallel()
            parallel.initialize(2, seed=parallel.DEFAULT_SEED)
        cache = {"mode": "required", "dir": str(base / f"cache-tp{tp}")}
        execute(write_config(base, f"plain-tp{tp}", tp=tp, dp=dp, cache="off"))
        out[f"fill-tp{tp}"] = execute(write_config(base, f"fill-tp{tp}", tp=tp, dp=dp, cache=cache))
        out[f"served-tp{tp}"] = execute(write_config(base, f"served-tp{tp}", tp=tp, dp=dp, cache=cache))
    return out


def weights(root: Path, name: str) -> dict[str, torch.Tensor]:
    checkpoint = sorted((root / "runs" / name / "checkpoints").iterdir())[-1]
    return load_file(next(checkpoint.glob("model*.safetensors")))


@pytest.fixture(scope="module")
def results(workspace: Path) -> list[dict[str, list[str]]]:
    return parallel.run_distributed(job, 2, str(workspace), tp=1, timeout_s=900)


def test_data_parallel_ranks_share_a_namespace_and_a_second_run_is_served(workspace, results):
    rank0 = results[0]
    assert rank0["fill-tp1"][0].startswith("[tinybert] teacher cache: 0 of 4 teacher batches served (0% of examples)")
    assert rank0["served-tp1"][0].startswith("[tinybert] teacher cache: 4 of 4 teacher batches served (100%")
    namespaces = [p for p in (workspace / "cache-tp1").iterdir() if p.is_dir()]
    assert len(namespaces) == 1  # both ranks: the same teacher, rank shard and precision
    described = json.loads((namespaces[0] / "namespace.json").read_text())
    assert (described["tp_rank"], described["tp_size"]) == (0, 1)
    writers = {shard.name.split("-")[2] for shard in namespaces[0].glob("*.safetensors")}
    assert len(writers) == 2  # one process id per rank: each wrote its own shards
    plain, served = weights(workspace, "plain-tp1"), weights(workspace, "served-tp1")
    assert all(torch.equal(served[k], plain[k]) for k in plain)


def test_tensor_parallel_ranks_cache_their_own_shards(workspace, results):
    for rank in results:
        assert rank["served-tp2"] == [] or rank["served-tp2"][0].startswith(
            "[tinybert] teacher cache: 8 of 8 teacher batches served (100%")
    assert results[0]["served-tp2"]
    namespaces = sorted((p for p in (workspace / "cache-tp2").iterdir() if p.is_dir()),
                        key=lambda p: json.loads((p / "namespace.json").read_text())["tp_rank"])
    assert [json.loads((p / "namespace.json").read_text())["tp_rank"] for p in namespaces] == [0, 1]
    for namespace in namespaces:  # attention scores of this rank's 2 of 4 heads
        shard = load_file(next(namespace.glob("*.safetensors")))
        scores = [v for k, v in shard.items() if k.endswith("attention.scores")]
        assert scores and all(v.shape[0] == 2 for v in scores)
    plain, served = weights(workspace, "plain-tp2"), weights(workspace, "served-tp2")
    assert all(torch.equal(served[k], plain[k]) for k in plain)
