"""Checkpoint sizes and save/load times under each parallel layout.

Builds everything in a scratch directory: a random BERT teacher (``--teacher-layers`` × hidden
``--hidden``, FFN ``--ffn``, 4 heads, a 23-token word-level vocabulary that TP=2 pads to 24, a
3-class head), 40 jsonl examples and a TinyBERT run config (hidden, attention and prediction
losses, so the checkpoint holds an auxiliary projection) whose student is the teacher truncated
to ``--student-layers`` layers. One process trains it for 2 steps and saves the source
checkpoint. Then, for every layout

* TP=1 × DP=1, ZeRO 0 and ZeRO 3 (in this process),
* TP=1 × DP=2, ZeRO 3 and ZeRO 2 + ``offload_optimizer``, then TP=2 × DP=1, ZeRO 0 (the same
  two processes of one :func:`gkd.parallel.run_distributed` job, re-initialised for TP=2),

the stage objects a resumed run holds (student, auxiliary model, DeepSpeed optimizer, scheduler)
load the source checkpoint and write it once in that layout (the sizes reported are that
checkpoint's), then ``--rounds`` rounds load it and save it again (load first in even rounds,
save first in odd ones, so a busy spell of a shared machine hits both). A time runs from a
barrier to a barrier across the job's ranks: load = :func:`gkd.engine.checkpoint.load_checkpoint`
(every rank reads, keeps its part), save = :func:`gkd.engine.checkpoint.save_checkpoint` (gather
to rank 0, write, fsync, rename). Reported: the sizes of the model, auxiliary, optimizer
(safetensors + JSON) and RNG files and of the whole checkpoint (every file, with ``state.json``,
``scheduler.json`` and ``COMPLETE``), and each time's median and min–max over the rounds.

    python benchmarks/checkpoints.py [--hidden 32] [--ffn 4*hidden] [--teacher-layers 4]
                                     [--student-layers 2] [--rounds 5] [--threads 1] [--workdir DIR]

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STOP = 2  # steps trained before the source checkpoint
STEPS = 4
BATCH = 4
WORDS = ["wheat", "corn", "grain", "oil", "crude", "barrel", "bank", "rates", "dollar", "rose", "fell", "the",
         "a", "prices", "exports", "today", "sharply", "yen"]
TOPICS = {"grain": WORDS[0:3], "oil": WORDS[3:6], "money": WORDS[6:9]}
SINGLE = {"TP=1 DP=1 ZeRO 0": {"tp": 1, "zero": {"stage": 0}},
          "TP=1 DP=1 ZeRO 3": {"tp": 1, "zero": {"stage": 3}}}
PAIR = {"TP=1 DP=2 ZeRO 3": {"tp": 1, "zero": {"stage": 3}},
        "TP=1 DP=2 ZeRO 2+offload": {"tp": 1, "zero": {"stage": 2, "offload_optimizer": True}},
        "TP=2 DP=1 ZeRO 0": {"tp": 2, "zero": {"stage": 0}}}  # last: the job switches to TP=2 for it
FILES = {"model": ("model.safetensors",), "auxiliary": ("auxiliary.safetensors",),
         "optimizer": ("optimizer.safetensors", "optimizer.json"), "rng": ("rng.safetensors",)}


def build_workspace(root: Path, cfg: dict[str, int]) -> None:
    """Tokenizer, teacher and training data under ``root``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from gkd.models import ModelConfig, build_model, export_hf

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    (root / "tok").mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tok" / "tokenizer.json"))
    teacher = ModelConfig(family="encoder", vocab_size=len(special) + len(WORDS), hidden_size=cfg["hidden"],
                          num_layers=cfg["teacher_layers"], num_attention_heads=4, ffn_hidden_size=cfg["ffn"],
                          max_position_embeddings=16, head="classification", num_labels=3)
    export_hf(build_model(teacher, seed=3), root / "teacher", tokenizer_dir=root / "tok")
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(40):
        label = list(TOPICS)[i % 3]
        words = [TOPICS[label][int(j)] for j in torch.randint(3, (2,), generator=g)]
        words += [WORDS[9 + int(j)] for j in torch.randint(9, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g)]
        rows.append({"text": " ".join(words), "label": label})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_config(root: Path, name: str, student_layers: int, *, tp: int = 1,
                 zero: dict[str, Any] | None = None) -> Path:
    import yaml

    cfg = {
        "name": name, "run_dir": str(root / "runs" / name), "seed": 9,
        "task": {"type": "sequence_classification", "max_length": 12},
        "data": {"train": {"path": str(root / "train.jsonl")}},
        "teachers": [{"name": "t", "path": str(root / "teacher")}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": student_layers}},
        "stages": [{"name": "tinybert", "steps": STEPS, "methods": [{"name": "tinybert", "config": {"prediction": True}}]}],
        "optimizer": {"lr": 0.003, "weight_decay": 0.01},
        "training": {"batch_size": BATCH, "max_grad_norm": 1.0},
        "parallel": {"tensor_parallel": tp, "zero": zero or {"stage": 0}},
        "checkpoint": {"every_steps": 1, "keep_last": 10},
        "logging": {"progress": False, "plot": False},
    }
    path = root / "runs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_source(config: Path) -> Path:
    """Train ``STOP`` steps in this process; the checkpoint they leave."""
    from gkd.config import load_run_config
    from gkd.engine.checkpoint import find_latest
    from gkd.engine.trainer import Trainer, TrainingInterrupted
    from gkd.plugins import load_plugin_manager

    registry = load_plugin_manager().registry
    run = load_run_config(config, registry=registry)
    try:
        Trainer(run, registry, progress=False, stop_after=STOP, echo=lambda _: None).execute()
    except TrainingInterrupted:
        pass  # stop_after ends the run this way
    latest = find_latest(Path(run.run_dir))
    assert latest is not None and latest.name == f"step-{STOP:08d}", latest
    return latest


def measure(config: Path, source: Path, rounds: int) -> dict[str, Any]:
    """Build a resumed run's stage objects in this process's layout, load ``source`` and save it
    once, then time ``rounds`` alternating load/save rounds on that copy."""
    from torch import nn

    from gkd import parallel
    from gkd.config import load_run_config
    from gkd.engine.assets import RunAssets
    from gkd.engine.build import build_methods, model_shape
    from gkd.engine.checkpoint import load_checkpoint, save_checkpoint
    from gkd.engine.loop import Trainable
    from gkd.engine.schedule import build_scheduler
    from gkd.parallel.placement import Placement
    from gkd.parallel.zero import deepspeed_config, initialize_engine
    from gkd.plugins import load_plugin_manager

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
    objects = {"model": student, "auxiliary": auxiliary, "optimizer": optimizer, "scheduler": scheduler}
    out = Path(run.run_dir)
    state = load_checkpoint(source, **objects)
    written = save_checkpoint(out, state, keep_last=1, **objects)

    def timed(fn: Callable[[], object]) -> float:
        parallel.barrier()  # every rank starts together: the time is the collective's, not a wait
        start = time.perf_counter()
        fn()
        parallel.barrier()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"load": [], "save": []}
    for r in range(rounds):
        for op in (("load", "save") if r % 2 == 0 else ("save", "load")):
            if op == "load":
                times[op].append(timed(lambda: load_checkpoint(written, **objects)))
            else:
                times[op].append(timed(lambda: save_checkpoint(out, state, keep_last=1, **objects)))
    sizes = {p.name: p.stat().st_size for p in written.iterdir() if p.is_file()}
    return {"times": times, "sizes": sizes}


def pair_job(root: str, student_layers: int, source: str, rounds: int) -> dict[str, Any]:
    """Every two-process layout in one job: DP=2 first, then the same processes as a TP=2 pair."""
    from megatron.core import parallel_state

    from gkd import parallel

    base, results = Path(root), {}
    for label, layout in PAIR.items():
        if layout["tp"] != parallel.tp_world_size():
            parallel_state.destroy_model_parallel()
            parallel.initialize(layout["tp"], seed=parallel.DEFAULT_SEED)
        config = write_config(base, f"pair-{len(results)}", student_layers, tp=layout["tp"], zero=layout["zero"])
        results[label] = measure(config, Path(source), rounds)
    return results


def spread(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:8.1f} ms ({min(values) * 1e3:.1f}–{max(values) * 1e3:.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=32, help="hidden size of teacher and student")
    ap.add_argument("--ffn", type=int, default=None, help="FFN size (default 4 × hidden)")
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="timed load/save rounds per layout")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process and of each rank")
    ap.add_argument("--workdir", type=Path, default=None, help="an empty directory to keep the workspace in (default: a temporary one)")
    args = ap.parse_args()
    import torch
    from safetensors import safe_open

    from gkd import parallel

    torch.set_num_threads(args.threads)
    cfg = {"hidden": args.hidden, "ffn": args.ffn or 4 * args.hidden, "teacher_layers": args.teacher_layers}
    started = time.perf_counter()
    load_avg = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        root = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gkd-ckpt-bench-")))
        root.mkdir(parents=True, exist_ok=True)
        build_workspace(root, cfg)
        source = train_source(write_config(root, "source", args.student_layers))
        results = {label: measure(write_config(root, f"single-{i}", args.student_layers, **layout), source, args.rounds)
                   for i, (label, layout) in enumerate(SINGLE.items())}
        results |= parallel.run_distributed(pair_job, 2, str(root), args.student_layers, str(source), args.rounds,
                                            tp=1, threads_per_rank=args.threads, timeout_s=900)[0]
        params = {}
        for f in ("model", "auxiliary"):
            with safe_open(str(source / f"{f}.safetensors"), "pt") as st:
                params[f] = sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load_avg:.1f} at start; {args.threads} torch thread(s) per process; student "
          f"{args.student_layers} layers × hidden {cfg['hidden']}, FFN {cfg['ffn']} ({params['model']:,} parameters, "
          f"auxiliary {params['auxiliary']:,}); {args.rounds} rounds per layout; "
          f"{time.perf_counter() - started:.0f} s in all")
    print(f"\n{'layout':26} {'model':>10} {'auxiliary':>10} {'optimizer':>10} {'rng':>10} {'whole':>10}  (KiB)")
    for label, r in results.items():
        cells = [sum(r["sizes"].get(n, 0) for n in names) for names in FILES.values()]
        print(f"{label:26} " + " ".join(f"{c / 1024:10,.1f}" for c in cells)
              + f" {sum(r['sizes'].values()) / 1024:10,.1f}")
    print(f"\n{'layout':26} {'load: median (min–max)':>32} {'save: median (min–max)':>32}")
    for label, r in results.items():
        print(f"{label:26} {spread(r['times']['load']):>32} {spread(r['times']['save']):>32}")


if __name__ == "__main__":
    main()
