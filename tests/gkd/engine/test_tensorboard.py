"""``logging.tensorboard`` and ``logging.wandb``: the event files and the W&B run hold exactly
metrics.jsonl's numbers (also across a resume), and a missing package is a one-line error naming
the extra."""

from __future__ import annotations

import glob
import importlib.util
import json
import struct
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gkd.cli import cli
from gkd.config import load_run_config
from gkd.config.errors import ConfigError
from gkd.engine.metrics import MetricsLogger
from gkd.engine.trainer import Trainer, TrainingInterrupted
from gkd.errors import GkdError
from gkd.models import ModelConfig, build_model, export_hf
from gkd.plugins import load_plugin_manager

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TEXTS = {
    "grain": ["wheat and corn exports fell", "grain harvest was large this year", "corn prices rose on demand"],
    "oil": ["crude oil prices climbed", "oil inventories dropped sharply", "the refinery raised oil output"],
    "money": ["the central bank cut rates", "interest rates were left unchanged", "the dollar rose against the yen"],
}
HINT = "pip install 'gkd-core[tensorboard]'"


@pytest.fixture(scope="module")
def registry():
    return load_plugin_manager().registry


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, minilm_dir) -> Path:
    """A tiny random BERT teacher with a 3-class head (MiniLM's tokenizer) and jsonl data."""
    root = tmp_path_factory.mktemp("tensorboard")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=4, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=3)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=minilm_dir)
    rows = [{"text": t, "label": label} for label, texts in TEXTS.items() for t in texts] * 4
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:9]) + "\n")
    return root


def write_config(root: Path, run_dir: Path, tensorboard: bool = True, wandb: bool | dict = False) -> Path:
    cfg = {
        "name": "tiny", "run_dir": str(run_dir), "seed": 7,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}, "eval": {"path": "eval.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}},
        "stages": [
            {"name": "tinybert", "steps": 3, "methods": [{"name": "tinybert"}]},
            {"name": "kd", "steps": 3, "methods": [{"name": "kd", "weight": 0.5}]},
        ],
        "training": {"batch_size": 4, "eval_batch_size": 8, "eval_every_steps": 2},
        "checkpoint": {"every_steps": 2, "keep_last": 10},
        "logging": {"progress": False, "plot": False, "tensorboard": tensorboard, "wandb": wandb},
        "export": {"enabled": False},
    }
    path = root / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(config: Path, registry, stop_after: int | None = None) -> dict:
    return Trainer(load_run_config(config, registry=registry), registry, progress=False, stop_after=stop_after,
                   echo=lambda _: None).execute()


def expected_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl's numbers by TensorBoard tag and global step."""
    out: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        values = ({f"eval/{k}": v for k, v in r["metrics"].items()} if r["kind"] == "eval" else
                  {"train/loss": r["loss"], "train/lr": r["lr"], **{f"train/{k}": v for k, v in r["terms"].items()}})
        for tag, value in values.items():
            assert r["global_step"] not in out.setdefault(tag, {}), (tag, r["global_step"])
            out[tag][r["global_step"]] = value
    return out


def event_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def assert_same(run_dir: Path) -> None:
    want, got = expected_scalars(run_dir), event_scalars(run_dir)
    assert got.keys() == want.keys()
    for tag, steps in want.items():
        assert got[tag].keys() == steps.keys(), tag
        for step, value in steps.items():
            # TensorBoard stores float32.
            assert got[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)


def test_event_files_hold_every_term_of_every_step(workspace, registry):
    run_dir = workspace / "full"
    run(write_config(workspace, run_dir), registry)
    got = event_scalars(run_dir)
    assert {"train/tinybert.hidden", "train/tinybert.attention", "train/kd.soft", "train/kd.hard",
            "train/loss", "train/lr", "eval/accuracy", "eval/loss"} <= got.keys()
    assert sorted(got["train/loss"]) == [1, 2, 3, 4, 5, 6]
    assert sorted(got["train/tinybert.hidden"]) == [1, 2, 3] and sorted(got["train/kd.soft"]) == [4, 5, 6]
    assert sorted(got["eval/accuracy"]) == [2, 3, 5, 6]
    assert_same(run_dir)


def test_resume_rewrites_the_event_files_from_metrics_jsonl(workspace, registry):
    run_dir = workspace / "split"
    config = write_config(workspace, run_dir)
    with pytest.raises(TrainingInterrupted):
        run(config, registry, stop_after=3)  # checkpoint at 2: step 3 is logged, then dropped on resume
    assert sorted(event_scalars(run_dir)["train/loss"]) == [1, 2, 3]
    run(config, registry)
    assert sorted(event_scalars(run_dir)["train/loss"]) == [1, 2, 3, 4, 5, 6]
    assert len(list((run_dir / "tensorboard").iterdir())) == 1
    assert_same(run_dir)


def test_off_by_default_writes_no_event_files(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log_train(stage="s", step=1, global_step=1, loss=1.0, terms={"kd.soft": 1.0}, lr=0.1)
    logger.close()
    assert not (tmp_path / "tensorboard").exists()


def test_missing_package_is_one_line_naming_the_extra(workspace, registry, monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "tensorboard" else find_spec(name, *a, **k))
    config = write_config(workspace, workspace / "missing")
    with pytest.raises(ConfigError) as raised:
        load_run_config(config, registry=registry)
    message = str(raised.value)
    assert "logging.tensorboard" in message and HINT in message
    result = CliRunner().invoke(cli, ["validate", str(config)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert next(line for line in result.output.splitlines() if HINT in line).count("logging.tensorboard") == 1
    load_run_config(write_config(workspace, workspace / "off", tensorboard=False), registry=registry)
    # Validation skipped (a run config built by hand): the logger itself refuses, in one line.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(GkdError, match=r"^logging\.tensorboard: .*gkd-core\[tensorboard\]'$"):
        MetricsLogger(tmp_path, tensorboard=True)


def wandb_history(run_dir: Path) -> list[dict[int, dict[str, float]]]:
    """Each offline W&B run under ``run_dir/wandb``: its logged numbers by step and tag, read
    from the run's ``.wandb`` file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    for path in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "*.wandb"))):
        data, pos, chunk, history = Path(path).read_bytes(), 7, b"", {}
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = chunk + data[pos + 7:pos + 7 + size], pos + 7 + size
            if kind in (1, 4):  # a full record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunk)
                chunk = b""
                if record.WhichOneof("record_type") == "history":
                    items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                    step = int(items.pop("_step"))
                    history.setdefault(step, {}).update(
                        {k: v for k, v in items.items() if not k.startswith("_")})
        runs.append(history)
    return runs


def settled_wandb_history(run_dir: Path, last_step: int, timeout_s: float = 30.0) -> list[dict[int, dict[str, float]]]:
    """:func:`wandb_history` once the last step is on disk: ``run.finish()`` returns when W&B's
    service has the records, and its writer may append them to the file a moment later (seen
    once in five runs on this loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = wandb_history(run_dir)
        if (runs and last_step in runs[-1]) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def by_step(scalars: dict[str, dict[int, float]]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for tag, steps in scalars.items():
        for step, value in steps.items():
            out.setdefault(step, {})[tag] = value
    return out


def test_wandb_offline_run_holds_every_term_of_every_step_across_a_resume(workspace, registry):
    pytest.importorskip("wandb")
    run_dir = workspace / "wandb"
    config = write_config(workspace, run_dir, tensorboard=False, wandb={"project": "gkd-test", "tags": ["tiny"]})
    with pytest.raises(TrainingInterrupted):
        run(config, registry, stop_after=3)  # checkpoint at 2: step 3 is logged, then dropped on resume
    (first,) = settled_wandb_history(run_dir, last_step=3)
    assert sorted(first) == [1, 2, 3]
    run(config, registry)
    (history,) = settled_wandb_history(run_dir, last_step=6)  # the first start's offline run was replaced
    assert history == by_step(expected_scalars(run_dir))  # every term, bit for bit (W&B keeps float64)
    assert {"train/tinybert.hidden", "train/kd.soft", "train/lr", "eval/accuracy"} <= set().union(*history.values())


def test_wandb_missing_package_is_one_line_naming_the_extra(workspace, registry, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "wandb" else find_spec(name, *a, **k))
    config = write_config(workspace, workspace / "no-wandb", tensorboard=False, wandb=True)
    result = CliRunner().invoke(cli, ["validate", str(config)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert any("logging.wandb: needs the wandb package" in line and "gkd-core[wandb]" in line
               for line in result.output.splitlines()), result.output


def test_a_wandb_run_that_cannot_start_is_one_line(monkeypatch, tmp_path):
    wandb = pytest.importorskip("wandb")
    from gkd.engine.sinks import WandbSink

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(GkdError, match=r"^logging\.wandb: could not start a W&B run in online mode: UsageError: "
                                       r"'?api_key not configured"):
        WandbSink(tmp_path, name="x", project="p", mode="online", config={})
