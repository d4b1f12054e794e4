"""Damaged checkpoints: every file's sha256 is recorded in ``COMPLETE`` when it is written, so a
truncated, bit-flipped, edited or missing file is refused in one line naming it; a run falls back to
the newest intact checkpoint (saying so) and resumes bitwise, or stops with exit 2 when none is left."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from gkd.cli import cli
from gkd.config import load_run_config
from gkd.engine.checkpoint import (
    COMPLETE,
    CheckpointState,
    clean_incomplete,
    find_intact,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from gkd.engine.serialize import CheckpointError, sha256_file
from gkd.engine.trainer import Trainer, TrainingInterrupted
from gkd.models import ModelConfig, build_model, export_hf
from gkd.plugins import load_plugin_manager

TEXTS = {
    "grain": ["wheat and corn exports fell", "grain harvest was large this year", "corn prices rose on demand"],
    "oil": ["crude oil prices climbed", "oil inventories dropped sharply", "the refinery raised oil output"],
    "money": ["the central bank cut rates", "interest rates were left unchanged", "the dollar rose against the yen"],
}


@pytest.fixture(scope="module")
def registry():
    return load_plugin_manager().registry


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("corruption")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=4, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=3)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=minilm_dir)
    rows = [{"text": t, "label": label} for label, texts in TEXTS.items() for t in texts] * 4
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:9]) + "\n")
    return root


def write_config(root: Path, name: str) -> Path:
    cfg = {
        "name": "corruption", "run_dir": str(root / name), "seed": 7,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "test.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}},
        "stages": [
            {"name": "tinybert", "steps": 3, "methods": [{"name": "tinybert"}]},
            {"name": "kd", "steps": 3, "methods": [{"name": "kd", "weight": 0.5, "config": {"temperature": 2.0}}]},
        ],
        "training": {"batch_size": 4, "eval_batch_size": 8},
        "checkpoint": {"every_steps": 2, "keep_last": 10},
        "logging": {"progress": False},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(config: Path, registry, stop_after: int | None = None, echo: Callable[[str], None] = lambda _: None) -> dict:
    return Trainer(load_run_config(config, registry=registry), registry, progress=False, stop_after=stop_after,
                   echo=echo).execute()


@pytest.fixture(scope="module")
def reference(workspace: Path, registry) -> Path:
    """One uninterrupted run (checkpoints at global steps 2, 3, 4, 6), shared by the module."""
    run(write_config(workspace, "reference"), registry)
    return workspace / "reference"


# ---------------------------------------------------------------------------------------- damages


def flip_bytes(name: str, count: int = 64) -> Callable[[Path], None]:
    """``count`` bytes inverted, spread over the file (the header included)."""
    def damage(ckpt: Path) -> None:
        data = bytearray((ckpt / name).read_bytes())
        for i in range(count):
            data[(i * 7919 + 3) % len(data)] ^= 0xFF
        (ckpt / name).write_bytes(bytes(data))
    return damage


def truncate(name: str) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        with open(ckpt / name, "r+b") as f:
            f.truncate((ckpt / name).stat().st_size // 2)
    return damage


def zero_tail(name: str) -> Callable[[Path], None]:
    """A same-size truncation: the second half of the file replaced by zeros (as a crashed copy leaves it)."""
    def damage(ckpt: Path) -> None:
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
    return damage


def edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    """An edit that keeps the file's size where it can (padded with spaces): only the hash can tell."""
    def damage(ckpt: Path) -> None:
        before = (ckpt / name).stat().st_size
        data = json.loads((ckpt / name).read_text())
        change(data)
        text = json.dumps(data, indent=2) + "\n"
        (ckpt / name).write_text(text + " " * (before - len(text.encode())))
    return damage


def replace_text(name: str, old: str, new: str) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        text = (ckpt / name).read_text()
        assert old in text
        (ckpt / name).write_text(text.replace(old, new, 1))
    return damage


def remove(name: str) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / name).unlink()


def set_lr(opt: dict) -> None:
    opt["param_groups"][0]["lr"] = 0.5


def rehash(name: str) -> Callable[[Path], None]:
    """Make the marker agree with the (damaged) file: what a writer bug would leave."""
    def damage(ckpt: Path) -> None:
        marker = json.loads((ckpt / COMPLETE).read_text())
        marker["files"][name] = (ckpt / name).stat().st_size
        marker["sha256"][name] = sha256_file(ckpt / name)
        (ckpt / COMPLETE).write_text(json.dumps(marker))
    return damage


def both(*damages: Callable[[Path], None]) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        for d in damages:
            d(ckpt)
    return damage


def state_field(key: str, value: object) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        state[key] = value
    return change


def data_index(state: dict) -> None:
    state["data_position"]["index"] += 1


DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "model truncated": (truncate("model.safetensors"), r"model\.safetensors has \d+ bytes, expected \d+ bytes"),
    "model same-size truncation": (zero_tail("model.safetensors"), r"model\.safetensors does not match the sha256"),
    "model 64 bytes flipped": (flip_bytes("model.safetensors"), r"model\.safetensors does not match the sha256"),
    "auxiliary bit flip": (flip_bytes("auxiliary.safetensors", 1), r"auxiliary\.safetensors does not match"),
    "optimizer tensors bit flip": (flip_bytes("optimizer.safetensors", 1), r"optimizer\.safetensors does not match"),
    "rng bit flip": (flip_bytes("rng.safetensors", 1), r"rng\.safetensors does not match"),
    "optimizer lr edited": (edit_json("optimizer.json", set_lr), r"optimizer\.json does not match the sha256"),
    "stage_iteration edited": (edit_json("state.json", state_field("stage_iteration", 3)),
                               r"state\.json does not match the sha256"),
    "data index edited": (edit_json("state.json", data_index), r"state\.json does not match the sha256"),
    "scheduler edited": (replace_text("scheduler.json", '"last_epoch": 1', '"last_epoch": 0'),
                         r"scheduler\.json does not match the sha256"),
    "state invalid JSON": (both(replace_text("state.json", "{", "["), rehash("state.json")),
                           r"state\.json: not valid JSON"),
    "config invalid JSON": (both(replace_text("config.json", "{", "<"), rehash("config.json")),
                            r"config\.json: not valid JSON"),
    "state wrong-typed field": (both(edit_json("state.json", state_field("global_step", "four")), rehash("state.json")),
                                r"state\.json: global_step must be a non-negative integer, got \"four\""),
    "data position wrong type": (both(edit_json("state.json", lambda s: s["data_position"].update(index=-1)),
                                      rehash("state.json")),
                                 r"state\.json: data_position\.index must be a non-negative integer, got -1"),
    "optimizer shard missing": (remove("optimizer.safetensors"), r"optimizer\.safetensors has no file"),
    "marker invalid JSON": (replace_text(COMPLETE, "{", "{{"), r"COMPLETE: not valid JSON"),
    "marker wrong-typed sizes": (edit_json(COMPLETE, lambda m: m["files"].update({"model.safetensors": "big"})),
                                 r"COMPLETE: files must map file names to sizes"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_each_damage_is_detected_in_one_line(kind: str, reference: Path, tmp_path: Path) -> None:
    damage, message = DAMAGES[kind]
    ckpt = tmp_path / "checkpoints" / "step-00000004"
    shutil.copytree(reference / "checkpoints" / "step-00000004", ckpt)
    verify_checkpoint(ckpt)  # intact before
    damage(ckpt)
    with pytest.raises(CheckpointError, match=message) as caught:
        verify_checkpoint(ckpt)
    line = str(caught.value)
    print(f"{kind}: {line}")
    assert "\n" not in line and str(ckpt) in line
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt, restore_rng=False)
    assert find_intact(tmp_path) == (None, [(ckpt, line)])


def test_markers_without_hashes_still_load_with_their_sizes_checked(reference: Path, tmp_path: Path) -> None:
    """A marker of an older gkd (sizes only): loaded as before; a size mismatch is still refused."""
    ckpt = tmp_path / "checkpoints" / "step-00000004"
    shutil.copytree(reference / "checkpoints" / "step-00000004", ckpt)
    edit_json(COMPLETE, lambda m: m.pop("sha256"))(ckpt)
    state = load_checkpoint(ckpt, restore_rng=False)
    assert isinstance(state, CheckpointState) and state.global_step == 4
    truncate("model.safetensors")(ckpt)
    with pytest.raises(CheckpointError, match=r"model\.safetensors has"):
        load_checkpoint(ckpt, restore_rng=False)


def test_damaged_latest_falls_back_to_the_previous_one_bitwise(workspace: Path, registry, reference: Path) -> None:
    config = write_config(workspace, "fallback")
    with pytest.raises(TrainingInterrupted):
        run(config, registry, stop_after=4)
    run_dir = workspace / "fallback"
    latest = run_dir / "checkpoints" / "step-00000004"
    flip_bytes("model.safetensors")(latest)
    lines: list[str] = []
    run(config, registry, echo=lines.append)
    said = [line for line in lines if "is damaged" in line]
    assert len(said) == 1 and "step-00000004 is damaged: model.safetensors does not match the sha256" in said[0]
    assert "falling back to the previous checkpoint" in said[0] and said[0].endswith("step-00000003")
    assert any("resuming from" in line and "step-00000003" in line for line in lines)
    assert (run_dir / "checkpoints" / "step-00000004.damaged").is_dir()
    ref = load_file(str(reference / "export" / "model.safetensors"))
    got = load_file(str(run_dir / "export" / "model.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_no_intact_checkpoint_stops_with_exit_2(workspace: Path, registry) -> None:
    config = write_config(workspace, "hopeless")
    with pytest.raises(TrainingInterrupted):
        run(config, registry, stop_after=2)
    flip_bytes("model.safetensors", 1)(workspace / "hopeless" / "checkpoints" / "step-00000002")
    result = CliRunner().invoke(cli, ["distill", str(config), "--no-progress"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert "no intact checkpoint in" in errors[0] and "model.safetensors does not match the sha256" in errors[0]
    assert "checkpoint.resume: false" in errors[0]


# ------------------------------------------------------------------------- incomplete directories


def _save(run_dir: Path, step: int, **kw) -> Path:
    return save_checkpoint(run_dir, CheckpointState(global_step=step), model={"w": torch.full((4,), float(step))}, **kw)


def test_pruning_is_crash_safe_and_leftovers_are_cleaned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer killed mid-prune leaves ``step-N.del-PID`` (never a half checkpoint under its name); a
    writer killed mid-save leaves ``step-N.tmp-PID``; an older gkd's half-pruned ``step-N`` has no
    marker: the next start removes them all, and a checkpoint moved aside for a re-save comes back."""
    for step in (1, 2, 3):
        _save(tmp_path, step)
    root = tmp_path / "checkpoints"
    import gkd.engine.checkpoint as ckpt

    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):  # deletes one file, then "dies"
        if ".del-" in str(path) and Path(path).is_dir():
            next(Path(path).iterdir()).unlink()
            raise KeyboardInterrupt("killed while pruning")
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(tmp_path, keep_last=2)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    half = [p.name for p in root.iterdir() if ".del-" in p.name]
    assert len(half) == 1 and half[0].startswith("step-00000001.del-")
    shutil.copytree(root / "step-00000002", root / "step-00000005.tmp-999999999")  # a dead writer's
    old_half = root / "step-00000004"
    shutil.copytree(root / "step-00000002", old_half)
    (old_half / COMPLETE).unlink()  # what an older gkd's prune left
    shutil.copytree(root / "step-00000003", root / "step-00000006.old-999999999")  # killed mid re-save
    (root / ".latest.tmp-999999999").write_text("step-0000")  # killed while replacing the pointer
    removed = clean_incomplete(tmp_path)
    assert sorted(removed) == sorted([half[0], "step-00000005.tmp-999999999", "step-00000004",
                                      ".latest.tmp-999999999"])
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000003", "step-00000006"]
    verify_checkpoint(root / "step-00000006")


def test_a_newer_format_is_not_mistaken_for_damage(tmp_path: Path) -> None:
    """A checkpoint of a newer gkd is refused (update gkd), never moved aside for an older one."""
    _save(tmp_path, 1)
    newer = _save(tmp_path, 2)
    edit_json(COMPLETE, lambda m: m.update(format=99))(newer)
    with pytest.raises(CheckpointError, match=r"written by a newer gkd \(checkpoint format 99"):
        find_intact(tmp_path)
    assert newer.is_dir()
