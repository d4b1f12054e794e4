"""Teachers partitioned over the data-parallel ranks (``teachers[].partition: data_parallel``),
on two gloo processes (DP=2, TP=1): the logits and every tapped feature equal an unpartitioned
teacher's bitwise, a rank holds about half the teacher between forward passes and at most one
unit more during one, the step keeps the ranks' collectives paired when a plan differs between
ranks, and a short trainer run gives the same losses as without the partition."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml
from torch import nn

from gkd import parallel
from gkd.atomic import atomic_write_bytes
from gkd.config import load_run_config
from gkd.config.errors import ConfigError
from gkd.engine.step import distill_step
from gkd.engine.trainer import Trainer
from gkd.errors import GkdError
from gkd.methods import STUDENT, ForwardRequest, Method, PassPlan, teacher_key
from gkd.models import ModelConfig, build_model, export_hf
from gkd.parallel.teacher_partition import ALIGN_BYTES, partition, partition_of, partition_parameter_bytes
from gkd.plugins import load_plugin_manager
from gkd.testing import context_of, selected, step, tiny_batch, tiny_config

pytestmark = pytest.mark.distributed

CPU = torch.device("cpu")
MOBILEBERT = dict(model_type="mobilebert", vocab_size=99, hidden_size=32, embedding_size=8, intra_bottleneck_size=16,
                  num_hidden_layers=4, num_attention_heads=4, intermediate_size=24, num_feedforward_networks=2,
                  max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _configs() -> dict[str, ModelConfig]:
    """Four-layer teachers covering every way ``GkdModel`` reads its head weights."""
    return {
        "encoder-classification": tiny_config("encoder", 4),
        "encoder-mlm-tied": tiny_config("encoder", 4, task="masked_lm"),
        "decoder-lm-tied": tiny_config("decoder", 4),
        "decoder-lm-untied": tiny_config("decoder", 4, tie_word_embeddings=False),
        "mobilebert-mlm": ModelConfig.from_hf_config(MOBILEBERT, head="mlm"),
    }


def _frozen(cfg: ModelConfig, seed: int) -> nn.Module:
    return build_model(cfg, seed=seed, device="cpu").eval().requires_grad_(False)


def _parameter_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind ``model``'s registered parameters (meta: none)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for p in model.parameters() if not p.is_meta and p.numel()}
    return sum(storages.values())


def _unit_bytes(model: nn.Module) -> int:
    """The largest set of parameters the partition may hold at once, from the unpartitioned model:
    a layer, the embeddings, or the rest (the head) with the tied word embeddings."""
    def size(params: Any) -> int:
        return sum(p.numel() * p.element_size() for p in dict.fromkeys(params))

    inside = {id(p) for m in (model.embeddings, model.layers) for p in m.parameters()}
    head = [p for p in model.parameters() if id(p) not in inside]
    if model.model_config.tie_word_embeddings and (model.lm_head is not None or model.mlm_decoder is not None):
        head.append(model.embeddings.word_embeddings.weight)
    return max([size(model.embeddings.parameters()), size(head), *(size(m.parameters()) for m in model.layers)])


class OnRankZeroOnly(Method):
    """Reads the teacher only on data-parallel rank 0 (a plan that depends on the rank's batch)."""

    name = "rank-zero-only"

    def plan(self, step, state, pass_index, previous):
        if pass_index > 0:
            return None
        models = {STUDENT: ForwardRequest()}
        if parallel.dp_rank() == 0:
            models[teacher_key(self.teacher_name)] = ForwardRequest()
        return PassPlan(models)

    def loss(self, step, state, pass_index, outputs):
        view = outputs.models.get(teacher_key(self.teacher_name))
        target = view.logits if view is not None else torch.zeros_like(outputs.student.logits)
        return {"soft": (outputs.student.logits - target).pow(2).mean()}


def exactness_worker() -> dict[str, Any]:
    """Every teacher of :func:`_configs` twice (resident and partitioned, same weights) on this
    rank's own batch, then the step and the safety checks."""
    out: dict[str, Any] = {}
    rank = dist.get_rank()
    for k, (name, cfg) in enumerate(_configs().items()):
        reference, model = _frozen(cfg, 10 + k), _frozen(cfg, 10 + k)
        full, largest = _parameter_bytes(reference), _unit_bytes(reference)
        part = partition(model, CPU, label=f"teacher '{name}'")
        assert part is not None and partition_of(model) is part
        samples: list[int] = []  # parameter bytes held at each module's call, slices included
        for module in model.modules():  # registered after the partition's: they see the gathered unit
            module.register_forward_pre_hook(
                lambda *_, s=samples, m=model, q=part: s.append(_parameter_bytes(m) + q.resident_bytes))
        family = "decoder" if cfg.family == "decoder" else "encoder"
        task = {"mlm": "masked_lm", "lm": "causal_lm"}.get(cfg.head, "sequence_classification")
        batch = tiny_batch(family, task, batch=3, vocab_size=cfg.vocab_size,
                           generator=torch.Generator().manual_seed(100 * k + rank))
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch}
        names = reference.tap_names()
        with torch.no_grad():
            with reference.capture(names) as expected:
                ref_out = reference(**inputs)
            for _ in range(2):  # twice: gathering again gives the same weights
                with model.capture(names) as got:
                    out_ = model(**inputs)
        assert set(got) == set(expected) == set(names)
        out[name] = {
            "different": [n for n in names if not torch.equal(got[n], expected[n])],
            "logits_equal": torch.equal(out_.logits, ref_out.logits),
            "hidden_equal": torch.equal(out_.last_hidden, ref_out.last_hidden),
            "full": full, "resident": part.resident_bytes, "between": _parameter_bytes(model),
            "peak": max(samples), "largest_unit": largest, "reported_largest": part.largest_gathered_bytes(),
            "reported_peak": part.peak_gathered_bytes, "num_params": len(list(reference.parameters())),
            "shapes_kept": {n: p.shape for n, p in model.named_parameters()}
            == {n: p.shape for n, p in reference.named_parameters()},
            "all_meta": all(p.is_meta for p in model.parameters()),
            "forwards": part.forwards, "gathers": part.gathers,
            "helper_between": partition_parameter_bytes(model), "units_total": sum(part.unit_bytes().values()),
        }
    out["bf16"] = _in_another_dtype()
    out["step"] = _step_with_a_rank_dependent_plan()
    out["checks"] = _safety_checks()
    return out


def _in_another_dtype() -> list[str]:
    """A teacher run in bf16 (the engine's ``teachers[].dtype``): sliced in bf16, as
    ``model.to(bfloat16)`` would hold it; returns the features that differ (none)."""
    cfg = tiny_config("decoder", 4)
    reference = _frozen(cfg, 8).to(torch.bfloat16)
    model = _frozen(cfg, 8)
    part = partition(model, CPU, dtype=torch.bfloat16, label="teacher 'bf16'")
    assert part is not None and all(p.dtype == torch.bfloat16 for p in model.parameters())
    batch = tiny_batch("decoder", generator=torch.Generator().manual_seed(dist.get_rank()))
    names = reference.tap_names()
    with torch.no_grad(), reference.capture(names) as expected:
        reference(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad(), model.capture(names) as got:
        model(batch["input_ids"], batch["attention_mask"])
    return [n for n in names if not (got[n].dtype == torch.bfloat16 and torch.equal(got[n], expected[n]))]


def _step_with_a_rank_dependent_plan() -> dict[str, Any]:
    cfg = tiny_config("encoder", 4)
    teacher = _frozen(cfg, 3)
    part = partition(teacher, CPU, label="teacher 't'")
    models = {STUDENT: build_model(tiny_config("encoder", 2), seed=1).train(), teacher_key("t"): teacher}
    method = OnRankZeroOnly({}, context_of(models, teachers=["t"]))
    losses = []
    for i in range(2):
        batch = tiny_batch(generator=torch.Generator().manual_seed(i + 10 * dist.get_rank()))
        result = distill_step(models, {"m": selected(method)}, {"m": step(i)}, batch)
        result.loss.backward()
        losses.append(float(result.loss.detach()))
    reference = _frozen(cfg, 3)
    with torch.no_grad():
        expected = reference(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
        student = models[STUDENT](**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    target = expected if dist.get_rank() == 0 else torch.zeros_like(student)
    return {"forwards": part.forwards, "last_loss": losses[-1],
            "expected_last_loss": float((student - target).pow(2).mean())}


def _safety_checks() -> dict[str, str]:
    """Autograd is refused on every rank before any collective; two ranks running different
    partitioned teachers get an error on both ranks instead of paired-up wrong collectives."""
    a, b = _frozen(tiny_config("encoder", 2), 5), _frozen(tiny_config("encoder", 2), 6)
    parts = partition(a, CPU, label="teacher 'a'"), partition(b, CPU, label="teacher 'b'")
    batch = tiny_batch()
    messages = {}
    try:
        a(batch["input_ids"], batch["attention_mask"])
    except GkdError as exc:
        messages["grad"] = str(exc)
    try:
        with torch.no_grad():
            (a if dist.get_rank() == 0 else b)(batch["input_ids"], batch["attention_mask"])
    except GkdError as exc:
        messages["mismatch"] = str(exc)
    with torch.no_grad():  # still usable afterwards: the check's collective was paired
        a(batch["input_ids"], batch["attention_mask"])
    messages["released"] = str(all(p.is_meta for m in (a, b) for p in m.parameters())
                               and all(u.holders == 0 for p in parts if p for u in p.units.values()))
    return messages


@pytest.fixture(scope="module")
def exactness() -> list[dict[str, Any]]:
    return parallel.run_distributed(exactness_worker, 2, tp=1)


@pytest.mark.parametrize("name", list(_configs()))
def test_partitioned_teacher_gives_bitwise_the_resident_features(exactness, name):
    for rank in exactness:
        r = rank[name]
        assert r["different"] == [] and r["logits_equal"] and r["hidden_equal"]
        assert r["forwards"] == 2 and r["shapes_kept"] and r["all_meta"]


@pytest.mark.parametrize("name", list(_configs()))
def test_a_rank_holds_half_the_teacher_and_one_unit_more_at_most(exactness, name):
    for rank in exactness:
        r = rank[name]
        assert r["resident"] <= 0.55 * r["full"]
        assert r["between"] == 0  # between forward passes only the slices hold storage
        assert r["helper_between"] == r["resident"]
        assert r["full"] <= r["units_total"] <= r["full"] + ALIGN_BYTES * (r["num_params"] + 2 * 8)
        # alignment: each parameter starts at 64 bytes; the DP padding rounds each flat buffer up
        slack = ALIGN_BYTES * (r["num_params"] + 2 * 4)
        assert r["largest_unit"] <= r["reported_largest"] <= r["largest_unit"] + slack
        assert r["peak"] <= r["resident"] + r["reported_largest"]
        assert r["peak"] - r["resident"] == r["reported_peak"]  # the hooks saw what the partition counted


def test_a_bf16_teacher_is_sliced_in_bf16(exactness):
    assert all(rank["bf16"] == [] for rank in exactness)


def test_every_rank_runs_a_teacher_some_rank_planned(exactness):
    for rank in exactness:
        assert rank["step"]["forwards"] == 2  # rank 1 ran the teacher too, and dropped the result
        assert rank["step"]["last_loss"] == pytest.approx(rank["step"]["expected_last_loss"], rel=1e-6)


def test_autograd_and_mismatched_teachers_fail_on_every_rank(exactness):
    for rank in exactness:
        checks = rank["checks"]
        assert "teacher 'a' is partitioned over the data-parallel ranks, but was asked to run with autograd" \
            in checks["grad"]
        assert "the data-parallel ranks are not running the same teacher forward pass" in checks["mismatch"]
        assert "rank 0: " in checks["mismatch"] and "another teacher" in checks["mismatch"]
        assert checks["released"] == "True"


def tp_dp_worker() -> dict[str, Any]:
    """TP=2 × DP=2: each rank slices its TP shard over its data-parallel peer (the rank with the
    same TP rank); the two ranks of a TP group share a batch, the two DP groups do not."""
    out = {}
    for k, (name, cfg) in enumerate(_configs().items()):
        if name not in ("encoder-mlm-tied", "decoder-lm-tied"):
            continue
        reference, model = _frozen(cfg, 10 + k), _frozen(cfg, 10 + k)
        part = partition(model, CPU, label=f"teacher '{name}'")
        family = "decoder" if cfg.family == "decoder" else "encoder"
        batch = tiny_batch(family, "causal_lm" if family == "decoder" else "masked_lm", batch=3,
                           generator=torch.Generator().manual_seed(100 * k + parallel.dp_rank()))
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch}
        names = reference.tap_names()
        with torch.no_grad(), reference.capture(names) as expected:
            reference(**inputs)
        with torch.no_grad(), model.capture(names) as got:
            model(**inputs)
        out[name] = {"different": [n for n in names if not torch.equal(got[n], expected[n])],
                     "fraction": part.resident_bytes / _parameter_bytes(reference), "dp": part.world,
                     "tp": parallel.tp_world_size()}
    return out


@pytest.mark.slow  # four processes: about a minute and a half on a busy 2-core machine
def test_partition_under_tensor_parallelism():
    for rank in parallel.run_distributed(tp_dp_worker, 4, tp=2):
        for r in rank.values():
            assert r["different"] == [] and r["fraction"] <= 0.55 and r["dp"] == 2 and r["tp"] == 2


# ---------------------------------------------------------------------------- the trainer

STEPS = 4
METHODS = {
    "kd": [{"name": "kd", "config": {"temperature": 2.0}}],
    "tinybert": [{"name": "tinybert", "config": {"prediction": True, "temperature": 2.0}}],
}
PARTITION = {"partition": "data_parallel"}
RUNS: dict[str, tuple[str, dict[str, str], int, str | None]] = {
    # name: (method, teachers[0] fields, ZeRO stage, the run it must equal)
    "resident-kd": ("kd", {}, 0, None),
    "partitioned-kd": ("kd", PARTITION, 0, "resident-kd"),
    "partitioned-cpu-kd": ("kd", PARTITION | {"offload": "cpu"}, 0, "resident-kd"),
    "resident-tinybert": ("tinybert", {}, 0, None),
    "partitioned-tinybert": ("tinybert", PARTITION, 0, "resident-tinybert"),
    "resident-zero3-kd": ("kd", {}, 3, None),  # the student's ZeRO-3 hooks and the teacher's side by side
    "partitioned-zero3-kd": ("kd", PARTITION, 3, "resident-zero3-kd"),
}
TERMS = {"kd": {"kd.soft", "kd.hard"}, "tinybert": {"tinybert.hidden", "tinybert.attention", "tinybert.prediction"}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 4-layer BERT teacher with a 3-class head, its tokenizer, 32 training and 8 test examples."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    root = tmp_path_factory.mktemp("partition")
    words = ["wheat", "corn", "oil", "crude", "bank", "rates", "rose", "fell", "the", "a"]
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    (root / "tokenizer").mkdir()
    tok.save(str(root / "tokenizer" / "tokenizer.json"))
    cfg = ModelConfig(family="encoder", vocab_size=len(special + words), hidden_size=32, num_layers=4,
                      num_attention_heads=4, ffn_hidden_size=64, max_position_embeddings=16, head="classification",
                      num_labels=3, hidden_dropout=0.0, attention_dropout=0.0)
    teacher = build_model(cfg, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # far from its small initialisation: the teacher's logits differ between examples
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    export_hf(teacher, root / "teacher", tokenizer_dir=root / "tokenizer")
    rows = []
    for i in range(8 * STEPS + 8):
        picked = [words[int(j)] for j in torch.randint(len(words), (5,), generator=g)]
        rows.append({"text": " ".join(picked), "label": ["grain", "oil", "money"][i % 3]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-8]))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[-8:]))
    return root


def write_config(root: Path, run_name: str) -> Path:
    method, fields, zero, _ = RUNS[run_name]
    cfg = {
        "name": run_name, "run_dir": str(root / "runs" / run_name), "seed": 5,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": str(root / "train.jsonl")}, "test": {"path": str(root / "test.jsonl")}},
        "teachers": [{"name": "t", "path": str(root / "teacher"), **fields}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}},
        "stages": [{"name": method, "steps": STEPS, "methods": METHODS[method]}],
        "optimizer": {"lr": 0.003},
        "schedule": {"type": "constant", "warmup_steps": 0},
        "training": {"batch_size": 4},
        "parallel": {"zero": {"stage": zero}},
        "checkpoint": {"keep_last": 1},
        "logging": {"progress": False, "plot": False},
        "export": {"enabled": False},
    }
    path = root / f"{run_name}.yaml"
    atomic_write_bytes(path, yaml.safe_dump(cfg).encode())
    return path


def trainer_worker(root: str) -> dict[str, list[tuple[int, float]]]:
    """Every run of :data:`RUNS` in this 2-process job; per run, the (forward passes, resident
    fraction) of each partition the engine installed (the loaded teachers are not reachable from
    outside the trainer, so the engine's call is wrapped in this worker process)."""
    import gkd.engine.assets as assets

    installed: list[Any] = []
    original = assets.partition

    def recording(*args: Any, **kwargs: Any) -> Any:
        installed.append(original(*args, **kwargs))
        return installed[-1]

    assets.partition = recording  # type: ignore[assignment]
    registry = load_plugin_manager().registry
    seen = {}
    for name in RUNS:
        installed.clear()
        run = load_run_config(write_config(Path(root), name), registry=registry)
        Trainer(run, registry, progress=False, echo=lambda _: None).execute()
        seen[name] = [(p.forwards, p.resident_bytes / p.full_bytes) for p in installed]
    return seen


def _logged(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return [r for r in records if r["kind"] == "train"], {row["model"]: row for row in summary["models"]}


def test_trainer_with_a_partitioned_teacher_logs_the_same_losses(workspace):
    installed = parallel.run_distributed(trainer_worker, 2, str(workspace), tp=1)
    for rank in installed:
        for name, partitions in rank.items():
            if RUNS[name][3] is None:
                assert partitions == []
            else:  # one teacher, partitioned: once per step, then once for the test split (one batch)
                ((forwards, fraction),) = partitions
                assert forwards == STEPS + 1 and fraction <= 0.55
    for name, (method, _, _, reference) in RUNS.items():
        if reference is None:
            continue
        (expected, expected_models), (got, got_models) = _logged(workspace / "runs" / reference), \
            _logged(workspace / "runs" / name)
        assert len(expected) == STEPS and {k for k in expected[0]["terms"] if "/" not in k} == TERMS[method]
        for ref, row in zip(expected, got, strict=True):  # observed bitwise; the bound asked for is 1e-6
            assert row["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=0)
            assert row["terms"].keys() == ref["terms"].keys()
            assert all(row["terms"][k] == pytest.approx(v, rel=1e-6, abs=0) for k, v in ref["terms"].items())
        # the end-of-run evaluation runs the partitioned teacher on every rank, as it runs a resident one
        teacher, ref_teacher = got_models["teacher:t"], expected_models["teacher:t"]
        assert teacher["accuracy"] == ref_teacher["accuracy"]
        assert teacher["eval_loss"] == pytest.approx(ref_teacher["eval_loss"], rel=1e-6, abs=0)
        assert teacher["parameters"] == ref_teacher["parameters"]


# ---------------------------------------------------------------------------- validation

def test_bad_combinations_are_one_line_validation_errors(workspace):
    registry = load_plugin_manager().registry
    cases = {
        "disk": ({"partition": "data_parallel", "offload": "disk"}, METHODS["kd"],
                 "teachers[0].partition: 'data_parallel' cannot be combined with offload 'disk'"),
        "theseus": ({"partition": "data_parallel"}, [{"name": "theseus", "config": {}}],
                    "teachers[0].partition: teacher 't' cannot be partitioned ('data_parallel') for method 'theseus'"),
        "unknown": ({"partition": "zero3"}, METHODS["kd"], "teachers[0].partition"),
    }
    for name, (fields, methods, message) in cases.items():
        path = write_config(workspace, "resident-kd")
        cfg = yaml.safe_load(path.read_text())
        cfg["teachers"][0] |= fields
        cfg["stages"][0]["methods"] = methods
        bad = workspace / f"bad-{name}.yaml"
        atomic_write_bytes(bad, yaml.safe_dump(cfg).encode())
        with pytest.raises(ConfigError) as info:
            load_run_config(bad, registry=registry)
        (issue,) = info.value.issues
        assert "\n" not in str(issue) and str(issue).startswith(message), str(issue)
