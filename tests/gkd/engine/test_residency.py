"""Teachers that need not all fit (``teachers[].offload``): an offloaded teacher gives bitwise the
results of a resident one; with ``disk`` it holds no parameter storage between forward passes and
only the teachers of a step's plan are read; a resume still checks the teacher's sha256."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from gkd.atomic import atomic_write_bytes
from gkd.config import load_run_config
from gkd.engine.assets import checkpoint_reader
from gkd.engine.checkpoint import find_latest
from gkd.engine.serialize import CheckpointError
from gkd.engine.step import distill_step
from gkd.engine.trainer import Trainer, TrainingInterrupted
from gkd.errors import GkdError
from gkd.methods import STUDENT, ForwardRequest, Method, PassPlan, teacher_key
from gkd.models import ModelConfig, build_model, export_hf, from_pretrained
from gkd.parallel.offload import offload, parameter_bytes
from gkd.plugins import load_plugin_manager
from gkd.testing import build_method, context_of, selected, step, tiny_batch, tiny_config

DEPTHS = {"deep": 4, "mid": 3, "shallow": 2}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory) -> dict[str, Path]:
    """Three tiny encoder teachers of different depth, as Hugging Face checkpoints."""
    root = tmp_path_factory.mktemp("offload-teachers")
    out = {}
    for k, (name, depth) in enumerate(DEPTHS.items()):
        out[name] = export_hf(build_model(tiny_config("encoder", depth), seed=20 + k), root / name)
    return out


def load_teachers(dirs: dict[str, Path], mode: str, dtype: torch.dtype = torch.float32):
    """The teachers as the engine loads them (frozen, eval, in ``dtype``), offloaded with ``mode``."""
    models, residencies = {}, {}
    for name, path in dirs.items():
        model = from_pretrained(path, strict=True, device="cpu").eval().requires_grad_(False).to(dtype=dtype)
        residencies[name] = offload(model, mode, CPU, label=f"teacher '{name}'",
                                    reload=checkpoint_reader(path, name) if mode == "disk" else None)
        models[teacher_key(name)] = model
    return models, residencies


def tmkd_steps(teachers, n_steps: int = 3):
    """TMKD on a fresh student for ``n_steps`` SGD steps: every loss, term and gradient, plus the
    teacher parameter bytes holding storage at each teacher forward pass."""
    torch.manual_seed(0)
    models = {STUDENT: build_model(tiny_config("encoder", 2), seed=1).train()} | teachers
    samples: list[int] = []
    for key in teachers:  # registered after the offload hooks: runs with the teacher brought in
        teachers[key].register_forward_pre_hook(
            lambda *_: samples.append(sum(parameter_bytes(t) for t in teachers.values())))
    method = build_method("tmkd", {"soft_loss": "kl", "temperature": 2.0}, models=models)
    sel = selected(method)
    opt = torch.optim.SGD(models[STUDENT].parameters(), lr=0.5)
    record = []
    for i in range(n_steps):
        opt.zero_grad()
        batch = tiny_batch(generator=torch.Generator().manual_seed(i), batch=3)
        result = distill_step(models, {"tmkd": sel}, {"tmkd": step(i)}, batch)
        result.loss.backward()
        record.append((result.loss.detach().clone(), {k: v.detach().clone() for k, v in result.terms.items()},
                       {n: p.grad.clone() for n, p in models[STUDENT].named_parameters()}))
        opt.step()
    return record, samples


@pytest.mark.parametrize(("mode", "dtype"), [("cpu", torch.float32), ("disk", torch.float32), ("disk", torch.bfloat16)])
def test_offloaded_teachers_give_bitwise_the_resident_losses_and_gradients(teacher_dirs, mode, dtype):
    resident, _ = load_teachers(teacher_dirs, "none", dtype)
    offloaded, residencies = load_teachers(teacher_dirs, mode, dtype)
    expected, resident_samples = tmkd_steps(resident)
    got, samples = tmkd_steps(offloaded)
    for (loss_a, terms_a, grads_a), (loss_b, terms_b, grads_b) in zip(expected, got, strict=True):
        assert torch.equal(loss_a, loss_b)
        assert terms_a.keys() == terms_b.keys() and all(torch.equal(terms_a[k], terms_b[k]) for k in terms_a)
        assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    sizes = {name: parameter_bytes(resident[teacher_key(name)]) for name in DEPTHS}
    assert len(samples) == 3 * len(DEPTHS) and set(resident_samples) == {sum(sizes.values())}
    assert all(r.loads == 3 for r in residencies.values())  # once per step, each teacher
    if mode == "disk":
        # during a teacher's forward only that teacher holds parameters: the peak is the largest teacher
        assert samples[:3] == [sizes["deep"], sizes["mid"], sizes["shallow"]]
        assert max(samples) == max(sizes.values()) < sum(sizes.values())
        for model in offloaded.values():  # between steps: no parameter storage at all
            assert parameter_bytes(model) == 0
            assert all(p.is_meta and p.requires_grad is False for p in model.parameters())
        shapes = {n: p.shape for n, p in resident[teacher_key("deep")].named_parameters()}
        assert {n: p.shape for n, p in offloaded[teacher_key("deep")].named_parameters()} == shapes
    else:  # on a CPU-only machine the device is host memory: 'cpu' keeps every teacher where it is
        assert set(samples) == {sum(sizes.values())}
        assert all(parameter_bytes(m, CPU) == parameter_bytes(resident[k]) for k, m in offloaded.items())


class FirstTeacherOnly(Method):
    """A two-teacher method whose plan names only the first teacher."""

    name = "first-only"

    def plan(self, step, state, pass_index, previous):
        if pass_index > 0:
            return None
        return PassPlan({STUDENT: ForwardRequest(), teacher_key(self.context.teacher_names[0]): ForwardRequest()})

    def loss(self, step, state, pass_index, outputs):
        first = outputs.teacher(self.context.teacher_names[0]).logits
        return {"soft": (outputs.student.logits - first).pow(2).mean()}


def test_a_teacher_left_out_of_the_plan_is_never_read(teacher_dirs):
    teachers, residencies = load_teachers({k: teacher_dirs[k] for k in ("mid", "deep")}, "disk")
    models = {STUDENT: build_model(tiny_config("encoder", 2), seed=1)} | teachers
    method = FirstTeacherOnly({}, context_of(models, teachers=["mid", "deep"]))
    seen = []
    teachers[teacher_key("mid")].register_forward_pre_hook(
        lambda *_: seen.append({k: parameter_bytes(t) > 0 for k, t in teachers.items()}))
    for i in range(2):
        distill_step(models, {"first-only": selected(method)}, {"first-only": step(i)}, tiny_batch())
    assert residencies["mid"].loads == 2 and residencies["deep"].loads == 0
    assert seen == [{"teacher:mid": True, "teacher:deep": False}] * 2
    assert parameter_bytes(teachers[teacher_key("deep")]) == parameter_bytes(teachers[teacher_key("mid")]) == 0


def test_offloaded_teacher_refuses_autograd_and_releases_on_error(teacher_dirs):
    teachers, residencies = load_teachers({"mid": teacher_dirs["mid"]}, "disk")
    model, batch = teachers[teacher_key("mid")], tiny_batch()
    with pytest.raises(GkdError, match="teacher 'mid' is offloaded, but was asked to run with autograd"):
        model(batch["input_ids"], batch["attention_mask"])
    assert parameter_bytes(model) == 0 and not residencies["mid"].resident
    with torch.no_grad(), residencies["mid"].hold():  # several forwards, one read
        a = model(batch["input_ids"], batch["attention_mask"]).logits
        b = model(batch["input_ids"], batch["attention_mask"]).logits
        assert parameter_bytes(model) > 0
    assert torch.equal(a, b) and residencies["mid"].loads == 2 and parameter_bytes(model) == 0


def test_a_disk_teacher_whose_checkpoint_changes_during_the_run_is_refused(teacher_dirs, tmp_path):
    path = shutil.copytree(teacher_dirs["shallow"], tmp_path / "shallow")
    teachers, _ = load_teachers({"shallow": path}, "disk")
    weights = load_file(str(path / "model.safetensors"))
    save_file({k: v + 1 for k, v in weights.items()}, str(path / "model.safetensors"))
    batch = tiny_batch()
    with torch.no_grad(), pytest.raises(GkdError, match="changed on disk during the run"):
        teachers[teacher_key("shallow")](batch["input_ids"], batch["attention_mask"])


def _tp_worker(teacher_dir: str) -> dict:
    """One TP rank: a resident teacher and a 'disk' one built as the engine builds it."""
    from gkd import parallel
    from gkd.models import load_model_config

    resident = from_pretrained(teacher_dir).eval().requires_grad_(False)
    model = build_model(load_model_config(teacher_dir), init_weights=False, device="cpu").eval().requires_grad_(False)
    residency = offload(model, "disk", CPU, reload=checkpoint_reader(Path(teacher_dir)))
    during: list[int] = []
    model.register_forward_pre_hook(lambda *_: during.append(parameter_bytes(model)))
    batch = tiny_batch(vocab_size=97)
    with torch.no_grad():
        expected = resident(batch["input_ids"], batch["attention_mask"]).logits
        got = model(batch["input_ids"], batch["attention_mask"]).logits
    return {"tp": parallel.tp_world_size(), "equal": torch.equal(expected, got), "during": during,
            "local": parameter_bytes(resident), "after": parameter_bytes(model), "loads": residency.loads}


@pytest.mark.distributed
def test_under_tensor_parallelism_each_rank_reads_only_its_shard(tmp_path):
    """TP=2: each rank's 'disk' teacher reads back exactly its shard of the checkpoint (the logits
    equal a resident teacher's bitwise, vocabulary padding included) and drops it afterwards."""
    from gkd import parallel

    cfg = tiny_config("encoder", 3, vocab_size=97)  # 97 rows: the vocabulary shards are padded
    path = str(export_hf(build_model(cfg, seed=4), tmp_path / "teacher"))
    (one,) = parallel.run_distributed(_tp_worker, 1, path)
    two = parallel.run_distributed(_tp_worker, 2, path)
    for rank in (one, *two):
        assert rank["equal"] and rank["loads"] == 1 and rank["after"] == 0
        assert rank["during"] == [rank["local"]]  # the whole local shard, and only during the forward
    assert [r["tp"] for r in (one, *two)] == [1, 2, 2]
    assert all(r["local"] < 0.75 * one["local"] for r in two)  # a shard, not the full teacher


# ---------------------------------------------------------------- through the trainer

TEXTS = ["wheat and corn exports fell", "crude oil prices climbed", "the central bank cut rates",
         "grain harvest was large", "oil inventories dropped", "interest rates were unchanged"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, minilm_dir) -> Path:
    """Three random BERT teachers of different depth with MiniLM's tokenizer, and jsonl data."""
    root = tmp_path_factory.mktemp("offload-run")
    for k, (name, depth) in enumerate(DEPTHS.items()):
        cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=depth, num_attention_heads=4,
                          ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=3)
        export_hf(build_model(cfg, seed=3 + k), root / name, tokenizer_dir=minilm_dir)
    rows = [{"text": t, "label": "abc"[i % 3]} for i, t in enumerate(TEXTS)] * 2
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def write_config(root: Path, run_dir: Path, mode: str, stages: list | None = None) -> Path:
    cfg = {
        "run_dir": str(run_dir), "seed": 5, "task": {"type": "sequence_classification", "max_length": 12},
        "data": {"train": {"path": "train.jsonl"}, "test": {"path": "train.jsonl", "limit": 4}},
        "teachers": [{"name": n, "path": n, "offload": mode} for n in DEPTHS],
        "student": {"init": {"strategy": "truncate", "teacher": "deep", "num_layers": 2}},
        "stages": stages or [{"name": "tmkd", "steps": 3, "methods": [{"name": "tmkd", "config": {"soft_loss": "kl"}}]}],
        "training": {"batch_size": 4, "eval_batch_size": 4},
        "checkpoint": {"every_steps": 1, "keep_last": 10},
        "logging": {"progress": False, "plot": False},
    }
    path = root / f"{run_dir.name}.yaml"
    atomic_write_bytes(path, yaml.safe_dump(cfg).encode())
    return path


def run(config: Path, stop_after: int | None = None) -> dict:
    registry = load_plugin_manager().registry
    return Trainer(load_run_config(config, registry=registry), registry, progress=False, stop_after=stop_after,
                   echo=lambda _: None).execute()


def losses(run_dir: Path) -> list[tuple[float, dict]]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["terms"]) for r in records if r["kind"] == "train"]


def test_trainer_with_offloaded_teachers_fine_tuned_and_published_matches_resident(workspace, monkeypatch):
    """Fine-tune a teacher, distil three teachers with TMKD and publish an assistant, distil the
    assistant: the same losses and final weights with every offload mode; the fine-tuned teacher
    is read from run_dir/teachers/, and the published assistant is offloaded like the others."""
    import gkd.engine.assets as assets_module

    stages = [
        {"name": "ft", "train": "teacher:shallow", "steps": 2},
        {"name": "tmkd", "steps": 2, "methods": [{"name": "tmkd", "config": {"soft_loss": "kl"}}],
         "publish_as_teacher": "ta"},
        {"name": "ta-kd", "steps": 2, "teachers": ["ta"], "methods": [{"name": "kd"}],
         "student_init": {"strategy": "truncate", "teacher": "deep", "num_layers": 1}},
    ]
    offloaded: list[tuple[str, str]] = []
    real = assets_module.offload
    reads: list[Path] = []
    real_reader = assets_module.checkpoint_reader

    def recording(model, mode, device, **kw):
        offloaded.append((kw["label"], mode))
        return real(model, mode, device, **kw)

    def reader(path, label="teacher"):
        reads.append(path)
        return real_reader(path, label)

    monkeypatch.setattr(assets_module, "offload", recording)
    monkeypatch.setattr(assets_module, "checkpoint_reader", reader)
    results = {}
    for mode in ("none", "cpu", "disk"):
        run_dir = workspace / f"chain-{mode}"
        summary = run(write_config(workspace, run_dir, mode, stages))
        results[mode] = (losses(run_dir), load_file(str(find_latest(run_dir) / "model.safetensors")),
                         {r["model"]: (r["parameters"], r.get("accuracy")) for r in summary["models"]})
    ref_losses, ref_weights, ref_rows = results["none"]
    for mode in ("cpu", "disk"):
        got_losses, got_weights, got_rows = results[mode]
        assert got_losses == ref_losses, mode
        assert ref_weights.keys() == got_weights.keys()
        assert all(torch.equal(ref_weights[k], got_weights[k]) for k in ref_weights), mode
        assert got_rows == ref_rows, mode  # the end-of-run evaluation of every teacher, offloaded too
    assert len(ref_losses) == 6
    labels = [label for label, mode in offloaded if mode == "disk"]
    assert "teacher 'ta' (offload: disk)" in labels  # the published assistant
    assert workspace / "chain-disk" / "teachers" / "shallow" in reads  # the fine-tuned teacher, re-read from there
    assert workspace / "chain-disk" / "teachers" / "ta" in reads


def test_resume_with_disk_teachers_still_checks_their_sha256(workspace, tmp_path):
    teachers = tmp_path / "teachers"
    for name in DEPTHS:
        shutil.copytree(workspace / name, teachers / name)
    shutil.copy(workspace / "train.jsonl", teachers / "train.jsonl")
    config = write_config(teachers, tmp_path / "resume", "disk")
    with pytest.raises(TrainingInterrupted):
        run(config, stop_after=1)
    weights = load_file(str(teachers / "mid" / "model.safetensors"))
    save_file({k: v * 2 for k, v in weights.items()}, str(teachers / "mid" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"teacher 'mid' changed since the checkpoint"):
        run(config)


def test_a_changed_offload_does_not_block_a_resume():
    """Offloading changes no result, so a run may resume with another (or a missing) ``offload``;
    a changed dtype still differs."""
    from gkd.engine.resume import config_differences

    saved = {"teachers": [{"name": "a", "path": "p", "dtype": "fp32"}], "logging": {"plot": True}}
    current = {"teachers": [{"name": "a", "path": "p", "dtype": "fp32", "offload": "disk"}], "logging": {"plot": False}}
    assert config_differences(saved, current) == []
    assert config_differences(saved, {"teachers": [{"name": "a", "path": "p", "dtype": "bf16", "offload": "cpu"}]}) \
        == ["teachers[0].dtype"]
