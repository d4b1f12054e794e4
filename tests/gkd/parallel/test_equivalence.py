"""Layout equivalence of the whole trainer (issue 11, part 4): ``Trainer(run, registry).execute()``
under TP=2, and under DP=2 with ZeRO 1, 2, 3 and ZeRO-2 + optimizer offload, logs the same loss and
terms at each of five steps as one process (relative difference ≤ 1e-5) and ends with the same
student, for KD, TinyBERT (embedding, hidden, attention and prediction terms) and Theseus (teacher
layers inside the student's forward).

What makes the comparison exact rather than approximate:

* every example has the same number of tokens, so a DP rank's mean over its half of the batch is
  half of the one-process mean (no padding, equal token counts per rank);
* the DP runs use half the reference's micro-batch on each rank: DP rank r takes every d-th
  example of the epoch order, so the ranks' step-i batches together are the reference's batch i;
* no dropout, fp32, one seed; the loop logs terms averaged over DP ranks.

What makes it meaningful: the learning rate moves the weights visibly in five steps, the teacher
is far from its initialisation (its logits differ between examples), Theseus replaces a student
layer by its teacher block in step 2, and ``max_grad_norm`` lies between the reference's
gradient norms, so some steps are clipped and others not and a norm that is not TP/ZeRO-aware
changes the losses.

``python tests/gkd/parallel/test_equivalence.py`` prints the measured differences as a table.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from gkd import parallel
from gkd.atomic import atomic_write_bytes
from gkd.config import load_run_config
from gkd.config.schema import apply_defaults
from gkd.engine.step import step_context
from gkd.engine.trainer import Trainer
from gkd.models import ModelConfig, build_model, export_hf
from gkd.plugins import load_plugin_manager

pytestmark = pytest.mark.distributed

STEPS = 5
BATCH = 8
"""The reference's (and TP=2's) micro-batch; each of the DP=2 ranks takes half."""
SEED = 5
LOSS_TOL = 1e-5
"""Largest relative difference allowed between a layout's logged loss or term and the reference's."""
WEIGHT_TOL = 1e-4
"""Largest absolute difference allowed in the final student weights (they moved by up to 5·lr = 0.015)."""
ZERO_GRADIENT = ".attention.self.key.bias"
"""Weights left out of the weight comparison: a key bias adds the same ``q·b`` to every score of
a query, which the softmax ignores, so its true gradient is zero and what it gets is rounding
noise, which Adam normalises into steps of up to ``lr`` whose sign depends on the reduction order
(measured at TP=2: up to 2.8e-4 apart; 1.3e-2 with Adam's default ``eps`` of 1e-8)."""
EPS = 1e-6
"""Adam's ``eps``: far below the gradients' elements (about 1e-2), but above the rounding noise of a
nearly cancelling gradient element, which ``eps`` = 1e-8 turns into a full step (measured: one
element 5e-5 apart at TP=2 with 1e-8, every element within 1e-5 with 1e-6)."""

METHODS: dict[str, list[dict[str, Any]]] = {
    "kd": [{"name": "kd", "config": {"temperature": 2.0}}],
    "tinybert": [{"name": "tinybert", "config": {"prediction": True, "temperature": 2.0}}],
    "theseus": [{"name": "theseus", "config": {"replacing_rate": 0.5}}],
}
TERMS = {
    "kd": {"kd.soft", "kd.hard"},
    "tinybert": {"tinybert.hidden", "tinybert.attention", "tinybert.prediction"},  # hidden: embeddings too
    "theseus": {"theseus.hard"},
}
MAX_GRAD_NORM = {"kd": 6.0, "tinybert": 100.0, "theseus": 5.0}
"""Between the reference's smallest and largest gradient norm of the five steps (kd 3.8 to 11.7,
tinybert 55 to 143, theseus 2.3 to 8.2): some steps are clipped, others not."""
NOISE = 0.3
"""Standard deviation of the noise added to the teacher's random initialisation."""

WORDS = ["wheat", "corn", "grain", "harvest", "oil", "crude", "refinery", "barrel", "bank", "rates", "dollar", "yen",
         "rose", "fell", "sharply", "today", "the", "a", "prices", "exports"]
TOPICS = {"grain": WORDS[0:4], "oil": WORDS[4:8], "money": WORDS[8:12]}


@dataclass(frozen=True)
class Layout:
    """A run's layout: its config's ``parallel`` section and micro-batch size."""

    name: str
    tensor_parallel: int = 1
    zero: dict[str, Any] | None = None
    batch_size: int = BATCH


REFERENCE = Layout("reference")
TP2 = Layout("tp2", tensor_parallel=2)
DP2 = [Layout(name, zero=zero, batch_size=BATCH // 2) for name, zero in {
    "zero1": {"stage": 1},
    "zero2": {"stage": 2},
    "zero3": {"stage": 3},
    "zero2-offload": {"stage": 2, "offload_optimizer": True},
}.items()]


# ---------------------------------------------------------------------------------------- inputs

def _rows(n: int) -> list[dict[str, str]]:
    """``n`` labelled six-word texts: four topic words of the label, two filler words."""
    g = torch.Generator().manual_seed(11)
    rows = []
    for i in range(n):
        label = list(TOPICS)[i % len(TOPICS)]
        topic = [TOPICS[label][int(j)] for j in torch.randint(4, (3,), generator=g)]
        filler = [WORDS[12 + int(j)] for j in torch.randint(8, (3,), generator=g)]
        rows.append({"text": " ".join(topic[:2] + filler + topic[2:]), "label": label})
    return rows


def make_workspace(root: Path) -> Path:
    """A word-level tokenizer (every text becomes eight tokens), a tiny random BERT teacher (4
    layers, hidden 32, 4 heads, no dropout, 3-class head) and one epoch of the reference's steps."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    (root / "tokenizer").mkdir(parents=True)
    tok.save(str(root / "tokenizer" / "tokenizer.json"))
    cfg = ModelConfig(family="encoder", vocab_size=len(special) + len(WORDS), hidden_size=32, num_layers=4,
                      num_attention_heads=4, ffn_hidden_size=64, max_position_embeddings=16, head="classification",
                      num_labels=3, hidden_dropout=0.0, attention_dropout=0.0)
    teacher = build_model(cfg, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # far from its small initialisation: teacher logits differ between examples
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape, generator=g) * NOISE)
    export_hf(teacher, root / "teacher", tokenizer_dir=root / "tokenizer")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(STEPS * BATCH)))
    return root


def write_config(root: Path, method: str, layout: Layout, tag: str) -> Path:
    """The run config of ``method`` under ``layout``; its run dir is ``root/runs/<tag>/<layout>-<method>``."""
    run_dir = root / "runs" / tag / f"{layout.name}-{method}"
    cfg = {
        "name": run_dir.name, "run_dir": str(run_dir), "seed": SEED,
        "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": str(root / "train.jsonl")}},
        "teachers": [{"name": "t", "path": str(root / "teacher")}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}},
        "stages": [{"name": method, "steps": STEPS, "methods": METHODS[method]}],
        "optimizer": {"lr": 0.003, "weight_decay": 0.01, "eps": EPS},
        "schedule": {"type": "constant", "warmup_steps": 0},
        "training": {"batch_size": layout.batch_size, "max_grad_norm": MAX_GRAD_NORM[method]},
        "parallel": {"tensor_parallel": layout.tensor_parallel, "zero": layout.zero or {"stage": 0}},
        "checkpoint": {"keep_last": 1},
        "logging": {"progress": False, "plot": False},
    }
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    atomic_write_bytes(path, yaml.safe_dump(cfg).encode())
    return path


# ---------------------------------------------------------------------------------------- runs

def train(root: str, tag: str, layouts: list[dict[str, Any]]) -> None:
    """Every (layout, method) run, one after the other, in this process: a worker of
    :func:`gkd.parallel.run_distributed`, or the test process for the reference. Layouts come as
    dicts: a worker cannot unpickle classes of a test module."""
    registry = load_plugin_manager().registry
    for fields in layouts:
        for method in METHODS:
            run = load_run_config(write_config(Path(root), method, Layout(**fields), tag), registry=registry)
            Trainer(run, registry, progress=False, echo=lambda _: None).execute()


@dataclass(frozen=True)
class Result:
    """What rank 0 of a run wrote: per-step loss and terms (metrics.jsonl), final student (export)."""

    losses: list[float]
    terms: list[dict[str, float]]
    weights: dict[str, torch.Tensor]


def results(root: Path, tag: str, layouts: list[Layout]) -> dict[tuple[str, str], Result]:
    """The finished runs of ``tag``, keyed (layout name, method)."""
    out = {}
    for layout in layouts:
        for method in METHODS:
            run_dir = root / "runs" / tag / f"{layout.name}-{method}"
            train_records = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                             if r["kind"] == "train"]
            out[layout.name, method] = Result([r["loss"] for r in train_records], [r["terms"] for r in train_records],
                                              load_file(str(run_dir / "export" / "model.safetensors")))
    return out


def run_reference(root: Path) -> dict[tuple[str, str], Result]:
    train(str(root), "ref", [asdict(REFERENCE)])
    return results(root, "ref", [REFERENCE])


def run_tp2(root: Path) -> dict[tuple[str, str], Result]:
    parallel.run_distributed(train, 2, str(root), "tp2", [asdict(TP2)], tp=2)
    return results(root, "tp2", [TP2])


def run_dp2(root: Path) -> dict[tuple[str, str], Result]:
    parallel.run_distributed(train, 2, str(root), "dp2", [asdict(x) for x in DP2], tp=1)
    return results(root, "dp2", DP2)


def differences(got: Result, ref: Result) -> tuple[float, float]:
    """(largest relative difference of the logged loss and terms over all steps, largest absolute
    difference of the final student weights but :data:`ZERO_GRADIENT`)."""
    rel = 0.0
    for a, b, ta, tb in zip(got.losses, ref.losses, got.terms, ref.terms, strict=True):
        pairs = [(a, b)] + [(ta[k], tb[k]) for k in tb]
        rel = max(rel, *(abs(x - y) / max(abs(y), 1e-12) for x, y in pairs))
    weight = max((got.weights[k] - ref.weights[k]).abs().max().item() for k in ref.weights if ZERO_GRADIENT not in k)
    return rel, weight


# ---------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("equivalence"))


@pytest.fixture(scope="module")
def reference(workspace: Path) -> dict[tuple[str, str], Result]:
    """One process, in the test process itself (``gkd distill`` without a launcher)."""
    return run_reference(workspace)


@pytest.fixture(scope="module")
def tp2(workspace: Path) -> dict[tuple[str, str], Result]:
    """One 2-process job (megatron has one TP size per job): every method at TP=2."""
    return run_tp2(workspace)


@pytest.fixture(scope="module")
def dp2(workspace: Path) -> dict[tuple[str, str], Result]:
    """One 2-process job at TP=1: every ZeRO variant × method, one after the other."""
    return run_dp2(workspace)


def check(got: Result, ref: Result, method: str) -> None:
    assert len(got.losses) == len(ref.losses) == STEPS
    assert all({k for k in t if "/" not in k} == TERMS[method] for t in got.terms + ref.terms)
    assert got.weights.keys() == ref.weights.keys()
    rel, weight = differences(got, ref)
    assert rel <= LOSS_TOL, f"loss {got.losses} vs {ref.losses}, terms {got.terms} vs {ref.terms}"
    assert weight <= WEIGHT_TOL


def test_the_reference_trains_and_exercises_what_the_layouts_must_match(workspace, reference) -> None:
    """The comparison means something: the weights moved far beyond the tolerance, the KD and
    TinyBERT terms are not trivially small, and Theseus ran a teacher block in place of a student
    layer."""
    from gkd_methods_builtin.theseus.method import draw_student_layers, replacement_rate

    start = load_file(str(workspace / "teacher" / "model.safetensors"))  # the student's head is the teacher's
    for method in METHODS:
        final = reference["reference", method].weights
        assert (final["classifier.weight"] - start["classifier.weight"]).abs().max() > 20 * WEIGHT_TOL
        assert len(set(reference["reference", method].losses)) == STEPS
    assert min(t["kd.soft"] for t in reference["reference", "kd"].terms) > 1e-2
    assert min(t["tinybert.attention"] for t in reference["reference", "tinybert"].terms) > 1e-2
    spec = load_plugin_manager().registry.get("theseus").spec
    config = apply_defaults(spec.config_schema, METHODS["theseus"][0]["config"])
    draws = []
    for iteration in range(STEPS):  # the draws of the run: the step's generator depends on (seed, stage, step)
        ctx = step_context(SEED, "theseus", 0, 0, iteration, STEPS, "theseus")
        draws.append(draw_student_layers(2, replacement_rate(config, ctx.progress), ctx.generator,
                                         config["require_student_layer"]))
    assert any(not all(d) for d in draws)


@pytest.mark.parametrize("method", list(METHODS))
def test_tp2_equals_one_process(method: str, reference, tp2) -> None:
    check(tp2["tp2", method], reference["reference", method], method)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("layout", [x.name for x in DP2])
def test_dp2_zero_equals_one_process(layout: str, method: str, reference, dp2) -> None:
    check(dp2[layout, method], reference["reference", method], method)


if __name__ == "__main__":  # the table of docs/parallel.md
    torch.set_num_threads(1)  # as the tests (conftest) and the workers: the reference's reduction order
    with tempfile.TemporaryDirectory() as tmp:
        root = make_workspace(Path(tmp))
        ref = run_reference(root)
        layouts = run_tp2(root) | run_dp2(root)
        print("| layout | method | max rel. diff. of loss and terms (5 steps) | max abs. diff. of final weights |")
        print("|---|---|---|---|")
        for (layout, method), got in layouts.items():
            rel, weight = differences(got, ref["reference", method])
            print(f"| {layout} | {method} | {rel:.1e} | {weight:.1e} |")
