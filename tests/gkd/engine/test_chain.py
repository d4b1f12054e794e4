"""Teacher-assistant chains as one run: teacher(4 layers) → assistant(3) → assistant(2) →
student(1), each link truncated from the model the previous link published (TAKD). The hand-off
is recorded and fingerprinted, a re-run reuses finished links, and a run killed between links or
inside one resumes to the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gkd.config import ConfigError, load_run_config
from gkd.engine.assets import RunAssets
from gkd.engine.chain import LINK_DIR, TEACHER_META
from gkd.engine.checkpoint import find_latest
from gkd.engine.resume import first_changed_stage
from gkd.engine.serialize import sha256_file
from gkd.engine.trainer import Trainer, TrainingInterrupted
from gkd.errors import GkdError
from gkd.models import ModelConfig, build_model, export_hf
from gkd.plugins import load_plugin_manager

TEXTS = {
    "grain": ["wheat and corn exports fell", "grain harvest was large this year", "corn prices rose on demand"],
    "oil": ["crude oil prices climbed", "oil inventories dropped sharply", "the refinery raised oil output"],
    "money": ["the central bank cut rates", "interest rates were left unchanged", "the dollar rose against the yen"],
}
LINKS = ("ta3", "ta2")


@pytest.fixture(scope="module")
def registry():
    return load_plugin_manager().registry


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, minilm_dir) -> Path:
    """A tiny random 4-layer BERT teacher with a 3-class head (MiniLM's tokenizer) and jsonl data."""
    root = tmp_path_factory.mktemp("chain")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=4, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=3)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=minilm_dir)
    rows = [{"text": t, "label": label} for label, texts in TEXTS.items() for t in texts] * 4
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:9]) + "\n")
    return root


def chain_config(root: Path, run_dir: Path, *, last: dict | None = None, **changes) -> Path:
    """Three TAKD links of 3 steps each (global steps 1–3, 4–6, 7–9); the first two publish."""
    stages = [
        {"name": "ta3", "steps": 3, "methods": [{"name": "takd"}], "publish_as_teacher": "ta3"},
        {"name": "ta2", "steps": 3, "methods": [{"name": "takd"}], "publish_as_teacher": "ta2",
         "student_init": {"strategy": "truncate", "teacher": "ta3", "num_layers": 2}},
        {"name": "student", "steps": 3, "methods": [{"name": "takd"}],
         "student_init": {"strategy": "truncate", "teacher": "ta2", "num_layers": 1}} | (last or {}),
    ]
    cfg = {
        "name": "chain", "run_dir": str(run_dir), "seed": 7,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "test.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 3}},
        "stages": stages,
        "training": {"batch_size": 4, "eval_batch_size": 8},
        "optimizer": {"lr": 1e-3},
        "checkpoint": {"every_steps": 2, "keep_last": 10},
        "logging": {"progress": False, "plot": False},
    } | changes
    path = root / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(config: Path, registry, stop_after=None, messages: list[str] | None = None) -> dict:
    echo = messages.append if messages is not None else (lambda _: None)
    return Trainer(load_run_config(config, registry=registry), registry, progress=False, stop_after=stop_after,
                   echo=echo).execute()


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a finished run in another directory (timestamps kept; the checkpoints' saved config
    names the new run_dir, as if it had run there: their markers record the edited file's size and hash)."""
    shutil.copytree(src, dst)
    for saved in (dst / "checkpoints").glob("step-*/config.json"):
        saved.write_text(json.dumps(json.loads(saved.read_text()) | {"run_dir": str(dst)}))
        marker = json.loads((saved.parent / "COMPLETE").read_text())
        marker["files"]["config.json"] = saved.stat().st_size
        marker["sha256"]["config.json"] = sha256_file(saved)
        (saved.parent / "COMPLETE").write_text(json.dumps(marker))
    return dst


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def reference(workspace, registry) -> Path:
    """One uninterrupted run of the chain."""
    run_dir = workspace / "ref"
    run(chain_config(workspace, run_dir), registry)
    return run_dir


def test_three_link_chain_completes_and_hands_each_link_to_the_next(workspace, registry, reference):
    config = load_run_config(chain_config(workspace, reference), registry=registry)
    # takd without a teachers list reads the teacher published last: the previous link
    assert [s.methods[0].teachers for s in config.stages] == [("t",), ("ta3",), ("ta2",)]
    depths = {name: json.loads((reference / "teachers" / name / "config.json").read_text())["num_hidden_layers"]
              for name in LINKS}
    assert depths == {"ta3": 3, "ta2": 2}
    summary = json.loads((reference / "summary.json").read_text())
    rows = {r["model"]: r for r in summary["models"]}
    assert rows["student"]["layers"] == 1 and rows["teacher:t"]["layers"] == 4
    assert [r["global_step"] for r in train_records(reference)] == list(range(1, 10))
    assert all(set(r["terms"]) == {"takd.soft", "takd.hard"} for r in train_records(reference))
    for name, stage_index, step in (("ta3", 0, 3), ("ta2", 1, 6)):
        meta = json.loads((reference / "teachers" / name / TEACHER_META).read_text())
        assert meta["kind"] == "link" and meta["stage_index"] == stage_index and meta["global_step"] == step
        state = json.loads((reference / "teachers" / name / LINK_DIR / "state.json").read_text())
        assert state["global_step"] == step and state["stage_index"] == stage_index
    for name, depth in (("ta3", 3), ("ta2", 2)):  # the exports hold exactly the link's layers
        keys = weights(reference / "teachers" / name / "model.safetensors")
        assert {int(m.group(1)) for k in keys if (m := re.search(r"encoder\.layer\.(\d+)\.", k))} == set(range(depth))


def test_killed_between_links_and_mid_link_resumes_to_the_same_weights(workspace, registry, reference, monkeypatch):
    split = workspace / "split"
    config = chain_config(workspace, split)
    with pytest.raises(TrainingInterrupted, match="after global step 3 "):
        run(config, registry, stop_after=3)  # the end of link 1: ta3 published and recorded
    ta3 = split / "teachers" / "ta3" / "model.safetensors"
    first = ta3.stat().st_mtime_ns
    with pytest.raises(TrainingInterrupted, match="after global step 5 "):
        run(config, registry, stop_after=5)  # inside link 2 (checkpoint at its step 2)
    assert ta3.stat().st_mtime_ns == first  # resumed at link 1's end: its export is kept
    sources, build = [], RunAssets.build_student

    def recording(self, init):
        sources.append(init.source_dir(self.teacher_paths))
        return build(self, init)

    monkeypatch.setattr(RunAssets, "build_student", recording)
    messages: list[str] = []
    run(config, registry, messages=messages)
    assert any("resuming from" in m and "global step 5" in m for m in messages)
    # each link's student was truncated from the model the previous link published
    assert sources == [split / "teachers" / "ta3", split / "teachers" / "ta2"]
    assert_same(weights(find_latest(reference) / "model.safetensors"), weights(find_latest(split) / "model.safetensors"))
    for name in LINKS:
        assert_same(weights(reference / "teachers" / name / "model.safetensors"),
                    weights(split / "teachers" / name / "model.safetensors"))
    assert [r["global_step"] for r in train_records(split)] == list(range(1, 10))


def test_rerun_after_changing_the_last_link_reuses_the_earlier_links(workspace, registry, reference):
    run_dir = workspace / "rerun"
    copy_run(reference, run_dir)  # a finished run of the chain
    published = {name: run_dir / "teachers" / name / "model.safetensors" for name in LINKS}
    before = {name: (p.stat().st_mtime_ns, weights(p)) for name, p in published.items()}
    old_records = train_records(run_dir)

    messages: list[str] = []
    changed = chain_config(workspace, run_dir, last={"steps": 4, "optimizer": {"lr": 5e-4}})
    summary = run(changed, registry, messages=messages)
    assert any("stages[2] changed since the checkpoints" in m for m in messages), messages
    assert any("[ta3] reusing the finished link 'ta3'" in m for m in messages)
    assert any("[ta2] reusing the finished link 'ta2'" in m for m in messages)
    for name, p in published.items():
        assert p.stat().st_mtime_ns == before[name][0]
        assert_same(weights(p), before[name][1])
    records = train_records(run_dir)
    assert records[:6] == old_records[:6]  # the reused links' records, as they were logged
    assert [r["global_step"] for r in records] == list(range(1, 11)) and summary["global_step"] == 10

    # back to the original config, starting over: both links reused again, and the last link —
    # from the restored stage-end state (RNG streams included) — equals the uninterrupted run's
    messages.clear()
    original = chain_config(workspace, run_dir, checkpoint={"every_steps": 2, "keep_last": 10, "resume": False})
    run(original, registry, messages=messages)
    assert sum("reusing the finished link" in m for m in messages) == 2
    assert_same(weights(find_latest(reference) / "model.safetensors"), weights(find_latest(run_dir) / "model.safetensors"))
    untimed = [[{k: v for k, v in r.items() if k != "time"} for r in train_records(d)] for d in (reference, run_dir)]
    assert untimed[0] == untimed[1]  # the reused records, then the same losses and terms for steps 7-9


def test_changing_a_middle_link_recomputes_it_and_what_follows_only(workspace, registry, reference):
    run_dir = copy_run(reference, workspace / "middle")
    ta3, ta2 = (run_dir / "teachers" / name / "model.safetensors" for name in LINKS)
    kept, redone = ta3.stat().st_mtime_ns, ta2.stat().st_mtime_ns
    stages_changed = yaml.safe_load(chain_config(workspace, run_dir).read_text())["stages"]
    stages_changed[1]["optimizer"] = {"lr": 5e-4}
    messages: list[str] = []
    run(chain_config(workspace, run_dir, stages=stages_changed), registry, messages=messages)
    assert ta3.stat().st_mtime_ns == kept and ta2.stat().st_mtime_ns != redone
    assert [m for m in messages if "reusing the finished link" in m] == [
        next(m for m in messages if "[ta3] reusing the finished link 'ta3'" in m)]
    assert not torch.equal(weights(ta2)["classifier.weight"],
                           weights(reference / "teachers" / "ta2" / "model.safetensors")["classifier.weight"])


def test_a_checkpoint_before_the_changed_stage_is_resumed_other_changes_are_refused(workspace, registry):
    changed = {"steps": 4, "optimizer": {"lr": 5e-4}}
    ref_dir, run_dir = workspace / "later-ref", workspace / "later"
    run(chain_config(workspace, ref_dir, last=changed), registry)
    with pytest.raises(TrainingInterrupted):
        run(chain_config(workspace, run_dir), registry, stop_after=4)  # inside link 2, before the last link
    messages: list[str] = []
    run(chain_config(workspace, run_dir, last=changed), registry, messages=messages)
    assert any("changed since the checkpoint (stages[2]." in m and "it had not reached them: resuming" in m
               for m in messages), messages
    assert_same(weights(find_latest(ref_dir) / "model.safetensors"), weights(find_latest(run_dir) / "model.safetensors"))
    stages = yaml.safe_load(chain_config(workspace, run_dir, last=changed).read_text())["stages"]
    stages[0]["optimizer"] = {"lr": 5e-4}  # the first link: no finished link before it to start over from
    with pytest.raises(GkdError, match=r"different config \(changed: stages\[0\]\.optimizer"):
        run(chain_config(workspace, run_dir, stages=stages), registry)


def test_a_damaged_link_is_not_reused(workspace, registry, reference):
    run_dir = workspace / "damaged"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "teachers" / "ta2" / "model.safetensors").write_bytes(b"not the recorded weights")
    messages: list[str] = []
    run(chain_config(workspace, run_dir), registry, messages=messages)
    assert any("[ta3] reusing the finished link 'ta3'" in m for m in messages)
    assert not any("'ta2'" in m and "reusing" in m for m in messages)
    assert_same(weights(reference / "teachers" / "ta2" / "model.safetensors"),
                weights(run_dir / "teachers" / "ta2" / "model.safetensors"))  # recomputed: same inputs, same link


def test_sigkill_during_the_hand_off_then_resume(workspace, registry, reference):
    """A real process killed with SIGKILL after link 2's export, before its record: the next run
    resumes from link 2's stage-end checkpoint, publishes again and ends with the reference weights."""
    run_dir = workspace / "killed"
    config = chain_config(workspace, run_dir)
    code = textwrap.dedent(f"""
        import os, signal
        from gkd.config import load_run_config
        from gkd.engine import chain
        from gkd.engine.trainer import Trainer
        from gkd.plugins import load_plugin_manager

        def killed(run, index, fingerprint, stage_end):
            if index == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return record(run, index, fingerprint, stage_end)

        record, chain.record_link = chain.record_link, killed
        registry = load_plugin_manager().registry
        Trainer(load_run_config({str(config)!r}, registry=registry), registry, progress=False,
                echo=lambda _: None).execute()
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == -9, done.stderr[-2000:]
    assert (run_dir / "teachers" / "ta2" / "model.safetensors").is_file()  # exported ...
    assert not (run_dir / "teachers" / "ta2" / TEACHER_META).exists()  # ... but not recorded
    run(config, registry)
    assert (run_dir / "teachers" / "ta2" / TEACHER_META).is_file()
    assert_same(weights(find_latest(reference) / "model.safetensors"), weights(find_latest(run_dir) / "model.safetensors"))


def test_validation_accepts_truncating_a_published_assistant_and_reads_its_shape(workspace, registry):
    run_dir = workspace / "never-run"
    stages = yaml.safe_load(chain_config(workspace, run_dir).read_text())["stages"]
    stages[1]["student_init"]["num_layers"] = 4  # ta3 (published by stage 0) has 3 layers
    stages[2]["teachers"] = ["t", "ta2"]  # two teachers for a teacher-assistant method
    with pytest.raises(ConfigError) as info:
        load_run_config(chain_config(workspace, run_dir, stages=stages), registry=registry)
    issues = {i.path: i.message for i in info.value.issues}
    assert issues["stages[1].student_init.num_layers"] == "4 layers cannot be truncated from a 3-layer teacher"
    assert issues["stages[2].methods[0].teachers"].startswith(
        "teacher-assistant method 'takd' distils from one teacher, the previous link of the chain; this stage gives "
        "it 2 (t, ta2)")
    assert len(issues) == 2


def test_first_changed_stage():
    base = {"seed": 1, "logging": {"every_steps": 1}, "stages": [{"name": "a"}, {"name": "b", "steps": 2}]}
    assert first_changed_stage(base, base) is None
    later = base | {"stages": [{"name": "a"}, {"name": "b", "steps": 3}]}
    assert first_changed_stage(base, later) == 1
    assert first_changed_stage(base, base | {"stages": [*base["stages"], {"name": "c"}]}) == 2
    assert first_changed_stage(base, later | {"logging": {"every_steps": 5}}) == 1  # resume-independent
    assert first_changed_stage(base, later | {"seed": 2}) is None  # outside the stages: refused
