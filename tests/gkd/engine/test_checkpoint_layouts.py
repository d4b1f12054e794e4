"""Checkpoints under every layout: the same files whatever wrote them, bitwise resume under
ZeRO 1, 2, 3 and ZeRO-2 + optimizer offload with two data-parallel processes, and resumption
under another layout (TP=2 → TP=1, DP=2 → DP=1; TP=1 → TP=2 and DP=1 → DP=2 too) with the same
weights and optimizer moments.

All two-process runs happen in one :func:`gkd.parallel.run_distributed` job (its start-up costs
more than the runs): the data-parallel layouts first, then the same processes re-initialised as
one tensor-parallel pair. The single-process checks (loading those checkpoints into a one-process
layout and saving them again, a step of training after a layout change) run in the test process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn

from gkd import parallel
from gkd.atomic import atomic_write_bytes
from gkd.config import load_run_config
from gkd.engine.assets import RunAssets
from gkd.engine.build import build_methods, model_shape
from gkd.engine.checkpoint import find_latest, load_checkpoint, save_checkpoint
from gkd.engine.data import BatchIterator, TaskDataset
from gkd.engine.loop import Trainable
from gkd.engine.resume import config_differences, data_position, translate_data_position
from gkd.engine.schedule import build_scheduler
from gkd.engine.serialize import CheckpointError
from gkd.engine.trainer import Trainer, TrainingInterrupted
from gkd.errors import GkdError
from gkd.models import ModelConfig, build_model, export_hf
from gkd.parallel.placement import Placement
from gkd.parallel.zero import deepspeed_config, initialize_engine
from gkd.plugins import load_plugin_manager

STEPS = 4
STOP = 2
BATCH = 4
WORDS = ["wheat", "corn", "grain", "oil", "crude", "barrel", "bank", "rates", "dollar", "rose", "fell", "the",
         "a", "prices", "exports", "today", "sharply", "yen"]
TOPICS = {"grain": WORDS[0:3], "oil": WORDS[3:6], "money": WORDS[6:9]}
ZERO = {
    "zero1": {"stage": 1},
    "zero2": {"stage": 2},
    "zero3": {"stage": 3},
    "zero2-offload": {"stage": 2, "offload_optimizer": True},
}
TP2 = "tp2"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT teacher (4 layers, hidden 32, dropout on; and a copy without dropout)
    whose vocabulary (23 tokens) TP=2 pads, and 40 training examples."""
    root = tmp_path_factory.mktemp("layouts")
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    cfg = ModelConfig(family="encoder", vocab_size=len(special) + len(WORDS), hidden_size=32, num_layers=4,
                      num_attention_heads=4, ffn_hidden_size=64, max_position_embeddings=16, head="classification",
                      num_labels=3)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=root / "tok")
    # The same weights without dropout: runs compared across TP sizes draw no dropout masks.
    quiet = cfg.replace(hidden_dropout=0.0, attention_dropout=0.0)
    export_hf(build_model(quiet, seed=3), root / "teacher-nodrop", tokenizer_dir=root / "tok")
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(40):
        label = list(TOPICS)[i % 3]
        words = [TOPICS[label][int(j)] for j in torch.randint(3, (2,), generator=g)]
        words += [WORDS[9 + int(j)] for j in torch.randint(9, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g)]
        rows.append({"text": " ".join(words), "label": label})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def write_config(root: Path, name: str, *, tp: int = 1, zero: dict[str, Any] | None = None,
                 teacher: str = "teacher") -> Path:
    """TinyBERT (hidden, attention and prediction losses: a trainable projection in the auxiliary
    model) for STEPS steps, a checkpoint every step."""
    cfg = {
        "name": name, "run_dir": str(root / "runs" / name), "seed": 9,
        "task": {"type": "sequence_classification", "max_length": 12},
        "data": {"train": {"path": str(root / "train.jsonl")}},
        "teachers": [{"name": "t", "path": str(root / teacher)}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}},
        "stages": [{"name": "tinybert", "steps": STEPS,
                    "methods": [{"name": "tinybert", "config": {"prediction": True}}]}],
        "optimizer": {"lr": 0.003, "weight_decay": 0.01},
        "training": {"batch_size": BATCH, "max_grad_norm": 1.0},
        "parallel": {"tensor_parallel": tp, "zero": zero or {"stage": 0}},
        "checkpoint": {"every_steps": 1, "keep_last": 10},
        "logging": {"progress": False, "plot": False},
    }
    path = root / "runs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, yaml.safe_dump(cfg).encode())
    return path


def execute(config: Path, stop_after: int | None = None, echo: Any = None) -> None:
    registry = load_plugin_manager().registry
    trainer = Trainer(load_run_config(config, registry=registry), registry, progress=False, stop_after=stop_after,
                      echo=echo or (lambda _: None))
    try:
        trainer.execute()
    except TrainingInterrupted:
        assert stop_after is not None


def straight_and_split(root: Path, name: str, **layout: Any) -> None:
    """``<name>-ref`` trains STEPS steps; ``<name>`` stops after STOP and resumes."""
    execute(write_config(root, f"{name}-ref", **layout))
    split = write_config(root, name, **layout)
    execute(split, stop_after=STOP)
    execute(split)


def reload(config: Path, checkpoint: Path, out: Path) -> Path:
    """Load ``checkpoint`` into the stage objects a resumed run of ``config`` builds in this
    process's layout (student, auxiliary model, DeepSpeed optimizer, scheduler), then save them
    again under ``out``: what a resumed run holds, in the checkpoint format."""
    registry = load_plugin_manager().registry
    run = load_run_config(config, registry=registry)
    parallel.ensure_initialized(tp=run.parallel.tensor_parallel, seed=run.seed)
    assets = RunAssets(run, Placement.for_this_process())
    stage = run.stages[0]
    student = assets.build_student(run.student.init)
    teachers = {t: assets.teacher_shape(t) for t in stage.used_teachers}
    methods = build_methods(run, stage, registry, model_shape(student.model_config), teachers)
    auxiliary = nn.ModuleDict({n: s.method for n, s in methods.items()})
    ds = deepspeed_config(micro_batch=BATCH, grad_accum=1, max_grad_norm=1.0, precision="fp32", zero=run.parallel.zero,
                          data_parallel=parallel.dp_world_size())
    _, optimizer, scheduler = initialize_engine(Trainable(student, auxiliary), stage.optimizer,
                                                lambda opt: build_scheduler(opt, stage.schedule, STEPS), ds)
    state = load_checkpoint(checkpoint, model=student, auxiliary=auxiliary, optimizer=optimizer, scheduler=scheduler)
    return save_checkpoint(out, state, model=student, auxiliary=auxiliary, optimizer=optimizer, scheduler=scheduler)


def two_process_job(root: str) -> None:
    """Every two-process run: DP=2 with each ZeRO layout, then TP=2 (the same processes)."""
    from megatron.core import parallel_state

    base = Path(root)
    for name, zero in ZERO.items():
        straight_and_split(base, name, zero=zero)
    reload(write_config(base, "into-dp2", zero=ZERO["zero3"]), base / "runs" / "single" / "checkpoints" /
           f"step-{STOP:08d}", base / "reloaded" / "into-dp2")
    execute(write_config(base, "zero3-moved", zero=ZERO["zero3"]), stop_after=STOP)
    parallel_state.destroy_model_parallel()
    parallel.initialize(2, seed=parallel.DEFAULT_SEED)
    straight_and_split(base, TP2, tp=2)
    execute(write_config(base, f"{TP2}-moved", tp=2, teacher="teacher-nodrop"), stop_after=STOP)
    execute(write_config(base, f"{TP2}-moved-ref", tp=2, teacher="teacher-nodrop"))
    reload(write_config(base, "into-tp2", tp=2), base / "runs" / "single" / "checkpoints" / f"step-{STOP:08d}",
           base / "reloaded" / "into-tp2")


@pytest.fixture(scope="module")
def runs(workspace: Path) -> Path:
    execute(write_config(workspace, "single"), stop_after=STOP)  # the one-process checkpoint the job loads
    parallel.run_distributed(two_process_job, 2, str(workspace), tp=1, timeout_s=900)
    return workspace / "runs"


def tensors(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f: load_file(str(checkpoint / f"{f}.safetensors")) for f in ("model", "auxiliary", "optimizer")}


def assert_same_state(got: Path, expected: Path) -> None:
    a, b = tensors(got), tensors(expected)
    for f in a:
        assert a[f].keys() == b[f].keys(), f
        for name in a[f]:
            assert torch.equal(a[f][name], b[f][name]), f"{f}: {name}"
    opt_a, opt_b = (json.loads((p / "optimizer.json").read_text()) for p in (got, expected))
    assert opt_a["step"] == opt_b["step"] and len(opt_a["param_groups"]) == len(opt_b["param_groups"])
    for group_a, group_b in zip(opt_a["param_groups"], opt_b["param_groups"], strict=True):
        common = set(group_a) & set(group_b)  # DeepSpeed's ZeRO-3 groups carry keys of its own
        assert {"lr", "betas", "weight_decay", "eps"} <= common
        assert {k: group_a[k] for k in common} == {k: group_b[k] for k in common}
    assert json.loads((got / "scheduler.json").read_text()) == json.loads((expected / "scheduler.json").read_text())


def losses(run_dir: Path) -> list[tuple[int, float, dict[str, float]]]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["global_step"], r["loss"], r["terms"]) for r in records if r["kind"] == "train"]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [*ZERO, TP2])
def test_resume_is_bitwise_under_every_layout(runs: Path, layout: str) -> None:
    ref, split = runs / f"{layout}-ref", runs / layout
    assert find_latest(split).name == f"step-{STEPS:08d}"
    assert_same_state(find_latest(split), find_latest(ref))
    assert losses(split) == losses(ref) and len(losses(ref)) == STEPS
    moments = tensors(find_latest(ref))["optimizer"]
    assert {"exp_avg.auxiliary.tinybert.proj.weight", "exp_avg_sq.model.classifier.weight"} <= set(moments)
    assert all(float(v.abs().sum()) > 0 for k, v in moments.items() if k.startswith("exp_avg_sq."))


@pytest.mark.distributed
def test_every_layout_writes_full_tp1_tensors(runs: Path) -> None:
    """TP=2 stores the gathered, unpadded vocabulary (23 rows, not TP=2's 24) and the same names
    and shapes as one process; the auxiliary projection is replicated over TP."""
    single = tensors(runs / "single" / "checkpoints" / f"step-{STOP:08d}")
    for layout in [*ZERO, TP2]:
        got = tensors(runs / layout / "checkpoints" / f"step-{STOP:08d}")
        for f in single:
            assert {k: v.shape for k, v in got[f].items()} == {k: v.shape for k, v in single[f].items()}, (layout, f)
    assert single["model"]["embeddings.word_embeddings.weight"].shape[0] == 5 + len(WORDS)
    marker = json.loads((runs / TP2 / "checkpoints" / f"step-{STOP:08d}" / "COMPLETE").read_text())
    assert marker["format"] == 2 and marker["layout"] == {"world_size": 2, "tensor_parallel": 2, "data_parallel": 1,
                                                         "optimizer": "AdamW"}
    zero3 = json.loads((runs / "zero3" / "checkpoints" / f"step-{STOP:08d}" / "COMPLETE").read_text())
    assert zero3["layout"]["optimizer"] == "DeepSpeedZeroOptimizer_Stage3" and zero3["layout"]["data_parallel"] == 2
    rng = load_file(str(runs / TP2 / "checkpoints" / f"step-{STOP:08d}" / "rng.safetensors"))
    assert {"0.torch.cpu", "1.torch.cpu"} <= set(rng)
    streams = [k for k in rng if k.startswith("0.megatron.")]
    assert streams and any(not torch.equal(rng[k], rng["1" + k[1:]]) for k in streams)  # one stream per TP rank


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [*ZERO, TP2])
def test_two_process_checkpoint_loads_into_one_process(runs: Path, layout: str, tmp_path: Path) -> None:
    """DP=2 (ZeRO k) → DP=1 with the same ZeRO stage, TP=2 → TP=1: loaded and gathered again,
    every weight, moment and step is the one saved."""
    source = runs / layout / "checkpoints" / f"step-{STOP:08d}"
    zero = ZERO.get(layout)
    again = reload(write_config(runs.parent, f"{layout}-into-one", zero=zero), source, tmp_path)
    assert_same_state(again, source)


@pytest.mark.distributed
@pytest.mark.parametrize("target", ["into-dp2", "into-tp2"])
def test_one_process_checkpoint_loads_into_two_processes(runs: Path, target: str) -> None:
    source = runs / "single" / "checkpoints" / f"step-{STOP:08d}"
    assert_same_state(find_latest(runs.parent / "reloaded" / target), source)


@pytest.mark.distributed
def test_resume_under_another_layout_continues_training(runs: Path) -> None:
    """A TP=2 run (without dropout) resumed with TP=1 says so and continues as TP=2 did (the same
    step-3 weights up to reduction order); a DP=2 ZeRO-3 run resumed with one process continues at the next unseen
    example, saying that the global batch changed. (Both were stopped by the two-process job.)"""
    for layout, zero, teacher in ((TP2, None, "teacher-nodrop"), ("zero3", ZERO["zero3"], "teacher")):
        said: list[str] = []
        execute(write_config(runs.parent, f"{layout}-moved", zero=zero, teacher=teacher), stop_after=STOP + 1,
                echo=said.append)
        step3 = runs / f"{layout}-moved" / "checkpoints" / f"step-{STOP + 1:08d}"
        state = json.loads((step3 / "state.json").read_text())
        if layout == TP2:
            assert any("written under TP=2 × DP=1, ZeRO 0; continuing under TP=1 × DP=1, ZeRO 0" in s for s in said)
            ref = load_file(str(runs / f"{TP2}-moved-ref" / "checkpoints" / f"step-{STOP + 1:08d}" / "model.safetensors"))
            got = load_file(str(step3 / "model.safetensors"))
            assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-6  # measured: 4e-9
            assert state["data_position"]["index"] == STOP + 1
        else:
            assert any("written under TP=1 × DP=2, ZeRO 3" in s for s in said)
            assert any("data-parallel size 2 → 1: the data continues after example 16 of epoch 0" in s for s in said)
            # DP=2 had taken 2 steps × 2 ranks × 4 examples; one process continues with its 5th micro-batch.
            position = state["data_position"]
            assert (position["epoch"], position["index"], position["world_size"], position["examples"]) == (0, 5, 1, 20)


# ------------------------------------------------------------------ single process, no spawning

def _iterator(n: int, world_size: int, rank: int = 0) -> BatchIterator:
    class Numbers(TaskDataset):
        def __init__(self) -> None:
            self._ids = [torch.tensor([i]) for i in range(n)]

        def collate(self, indices, generator=None):  # type: ignore[no-untyped-def, override]
            return {"ids": torch.tensor(list(indices))}

    return BatchIterator(Numbers(), 2, seed=3, rank=rank, world_size=world_size)


def test_data_position_moves_between_data_parallel_sizes() -> None:
    """The examples the DP=2 ranks took together are the ones DP=1 took; a DP=1 position inside a
    DP=2 step is refused in one line; the end of an epoch stays the end."""
    two = [_iterator(10, 2, r) for r in range(2)]
    taken = sorted(int(x) for it in two for _ in range(2) for x in next(it)["ids"])
    one = _iterator(10, 1)
    position, line = translate_data_position(data_position(two[0]), one)
    one.load_state_dict(position)
    first = _iterator(10, 1)
    assert sorted(int(x) for _ in range(4) for x in next(first)["ids"]) == taken
    assert torch.equal(next(one)["ids"], next(first)["ids"])
    assert line == ("data-parallel size 2 → 1: the data continues after example 8 of epoch 0; with training.batch_size 2 "
                    "per rank a micro-step now takes 2 examples instead of 4")
    odd = _iterator(10, 1)
    for _ in range(3):
        next(odd)
    with pytest.raises(GkdError, match=r"^cannot continue the data position under data-parallel size 2: the "
                                       r"checkpoint had taken 6 examples of epoch 0, not a multiple of 4"):
        translate_data_position(data_position(odd), _iterator(10, 2))
    ended = _iterator(10, 2)
    for _ in range(ended.batches_per_epoch):
        next(ended)
    position, _ = translate_data_position(data_position(ended), _iterator(10, 1))
    assert position["index"] == _iterator(10, 1).batches_per_epoch and position["epoch"] == 0
    same, nothing = translate_data_position(data_position(odd), _iterator(10, 1))
    assert nothing is None and same["index"] == 3


def test_the_layout_may_change_between_a_run_and_its_resumption() -> None:
    saved = {"seed": 1, "parallel": {"tensor_parallel": 2, "zero": {"stage": 3}},
             "teachers": [{"name": "t", "offload": "none", "partition": "data_parallel"}]}
    moved = {"seed": 1, "parallel": {"tensor_parallel": 1, "data_parallel": 2},
             "teachers": [{"name": "t", "offload": "cpu", "partition": "none"}]}
    assert config_differences(saved, moved) == []
    assert config_differences(saved, moved | {"seed": 2}) == ["seed"]


def test_format_1_checkpoint_is_read_and_its_missing_optimizer_named(tmp_path: Path) -> None:
    """A checkpoint of an older gkd (format 1: state by parameter index, one RNG set) still loads
    into a plain optimizer; one written under ZeRO (no optimizer state) is refused in one line."""
    from gkd.engine.serialize import capture_rng_state, flatten_optimizer_state, write_json, write_safetensors

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "step-00000001"
    path.mkdir()
    write_safetensors(path / "model.safetensors", model.state_dict())
    write_safetensors(path / "auxiliary.safetensors", {})
    rng_tensors, rng_meta = capture_rng_state()
    write_safetensors(path / "rng.safetensors", rng_tensors, {"gkd.rng": json.dumps(rng_meta)})
    write_json(path / "state.json", {"format": 1, "global_step": 1, "extra": {"optimizer_saved": False}})
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir())}
    write_json(path / "COMPLETE", {"format": 1, "global_step": 1, "files": files})
    fresh = nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match=r"holds no optimizer state \(an older gkd did not save it under ZeRO"):
        load_checkpoint(path, model=fresh, optimizer=torch.optim.AdamW(fresh.parameters(), lr=0.1))
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    write_safetensors(path / "optimizer.safetensors", tensors)
    write_json(path / "optimizer.json", meta)
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.name != "COMPLETE"}
    write_json(path / "COMPLETE", {"format": 1, "global_step": 1, "files": files})
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    load_checkpoint(path, model=fresh, optimizer=fresh_opt)
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state[fresh.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])
