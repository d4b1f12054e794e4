"""Several teachers of different size, one student: the "Several teachers" section of docs/methods.md.

Protocol (the method-comparison protocol of ``benchmarks/methods.py`` with two teachers): the
all-MiniLM-L6-v2 teacher fine-tuned on Reuters R8 as in the main job (6 layers), and a second,
smaller teacher distilled from it once with KD (4 layers truncated from it, every other layer
first; ``--assistant-steps`` steps at τ=2). Each method trains the same 2-layer student (truncated
from the 6-layer teacher) for ``--method-steps`` steps, then ``--head-steps`` steps of plain
fine-tuning on the gold labels; single-teacher KD from either teacher and plain fine-tuning are the
baselines. Accuracy is on the 800 held-out test documents; seeds run in rounds.

    python benchmarks/multiteacher.py [--seeds 2] [--method-steps 80] [--head-steps 80] [--only tmkd,mt-bert]

Each run is a separate ``gkd distill`` process. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import methods as bench  # the shared protocol: data, teacher, runner

WORK = bench.WORK.parent / "multiteacher"
BOTH = ["minilm", "minilm4"]

# method -> its entry in the distillation stage (teachers named explicitly)
METHODS: dict[str, list[dict]] = {
    "plain fine-tuning": [],
    "kd (6-layer teacher)": [{"name": "kd", "teachers": ["minilm"], "config": {"temperature": 2.0}}],
    "kd (4-layer teacher)": [{"name": "kd", "teachers": ["minilm4"], "config": {"temperature": 2.0}}],
    "tmkd": [{"name": "tmkd", "teachers": BOTH}],
    "mt-bert": [{"name": "mt-bert", "teachers": BOTH}],
    "uncertainty": [{"name": "uncertainty", "teachers": BOTH}],
    "dgkd": [{"name": "dgkd", "teachers": BOTH}],
    # RL-KD's selection stage (no average warm-up here); the pre-trained MiniLM gives the agent's state.
    "rl-kd": [{"name": "rl-kd", "teachers": [*BOTH, "semantic"],
               "config": {"mode": "select", "semantic_teacher": "semantic", "semantic_pooling": "mean",
                          "temperature": 10.0, "soft_weight": 0.5, "hard_weight": 0.5}}],
}


def second_teacher(teacher: Path, steps: int) -> Path:
    """The 4-layer teacher: KD from the fine-tuned 6-layer one, once (exported in HF layout)."""
    run_dir = WORK / "minilm4"
    export = run_dir / "export"
    if (export / "model.safetensors").is_file():
        return export
    config = {"name": "minilm4", "run_dir": str(run_dir), "seed": 1234,
              "task": {"type": "sequence_classification", "max_length": 64},
              "data": {"train": bench.DATA["train"]}, "teachers": [{"name": "minilm", "path": str(teacher)}],
              "student": {"init": {"strategy": "truncate", "teacher": "minilm", "layers": "strided", "num_layers": 4}},
              "stages": [{"name": "kd", "steps": steps, "methods": [{"name": "kd", "config": {"temperature": 2.0}}],
                          "optimizer": {"lr": 3.0e-4}, "training": {"batch_size": 16}}],
              "checkpoint": {"resume": False}, "export": {"enabled": True, "dir": str(export)},
              "logging": {"plot": False}}
    code, seconds, _, out = bench._run(config, WORK / "minilm4.yaml")
    if code:
        sys.exit(f"the 4-layer teacher failed:\n{out}")
    print(f"4-layer teacher distilled in {seconds:.0f} s")
    return export


def config_for(method: str, seed: int, teachers: dict[str, Path], method_steps: int, head_steps: int) -> dict:
    entries = METHODS[method]
    stages = ([{"name": "distil", "steps": method_steps, "methods": entries, "optimizer": {"lr": 2.0e-4}},
               {"name": "head", "steps": head_steps, "optimizer": {"lr": 3.0e-4}}] if entries else
              [{"name": "plain", "steps": method_steps + head_steps, "optimizer": {"lr": 3.0e-4}}])
    stages[-1]["data"] = {"eval": bench.DATA["eval"]}
    slug = method.replace(" ", "-").replace("(", "").replace(")", "")
    named = {t for e in entries for t in e.get("teachers", [])}
    teachers = {n: p for n, p in teachers.items() if n in named or n == "minilm"}
    return {"name": slug, "run_dir": str(WORK / f"{slug}-seed{seed}"), "seed": seed,
            "task": {"type": "sequence_classification", "max_length": 64}, "data": {"train": bench.DATA["train"]},
            "teachers": [{"name": n, "path": str(p)} for n, p in teachers.items()],
            "student": {"init": {"strategy": "truncate", "teacher": "minilm", "layers": "strided", "num_layers": 2}},
            "stages": stages, "training": {"batch_size": 16, "eval_batch_size": 128},
            "checkpoint": {"resume": False}, "export": {"enabled": False}, "logging": {"plot": False}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--assistant-steps", type=int, default=200)
    ap.add_argument("--method-steps", type=int, default=80)
    ap.add_argument("--head-steps", type=int, default=80)
    ap.add_argument("--only", default="", help="comma-separated methods (default: all)")
    ap.add_argument("--out", default=str(bench.ROOT / "docs" / "methods.md"))
    args = ap.parse_args()
    names = [m for m in METHODS if not args.only or m in args.only.split(",")]
    WORK.mkdir(parents=True, exist_ok=True)
    teacher = bench.finetuned_teacher()
    teachers = {"minilm": teacher, "minilm4": second_teacher(teacher, args.assistant_steps),
                "semantic": Path(bench.TEACHER["path"])}  # the pre-trained MiniLM (pkg: path)
    results: dict[str, list[tuple[float, float, int]]] = {m: [] for m in names}
    failures: dict[str, str] = {}
    for seed in range(1, args.seeds + 1):
        for method in names:
            if method in failures:
                continue
            config = config_for(method, seed, teachers, args.method_steps, args.head_steps)
            code, seconds, rss, out = bench._run(config, WORK / f"{Path(config['run_dir']).name}.yaml")
            if code:
                failures[method] = out.strip().splitlines()[-1] if out.strip() else f"exit code {code}"
                print(f"{method} seed {seed}: FAILED — {failures[method]}")
                continue
            acc = bench.accuracy(Path(config["run_dir"]))
            results[method].append((acc, seconds, rss))
            print(f"{method} seed {seed}: accuracy {acc:.4f}, {seconds:.0f} s, peak RSS {rss / 2**30:.2f} GiB", flush=True)
    write_section(Path(args.out), results, failures, args)


def write_section(out: Path, results: dict, failures: dict, args: argparse.Namespace) -> None:
    rows = []
    for method, runs in results.items():
        if not runs:
            continue
        accs = [a for a, _, _ in runs]
        rows.append(f"| {method} | {statistics.mean(accs):.4f} ± {(max(accs) - min(accs)) / 2:.4f} | "
                    f"{', '.join(f'{a:.4f}' for a in accs)} | {statistics.median(s for _, s, _ in runs):.0f} s | "
                    f"{max(r for _, _, r in runs) / 2**30:.2f} GiB |")
    machine = f"{platform.machine()}, {bench.os.cpu_count()} CPU cores, Python {platform.python_version()}"
    section = f"""## Several teachers

Measured on {datetime.date.today().isoformat()} ({machine}) with

```
python benchmarks/multiteacher.py --seeds {args.seeds} --assistant-steps {args.assistant_steps} --method-steps {args.method_steps} --head-steps {args.head_steps}{f' --only "{args.only}"' if args.only else ''}
```

Two real teachers of different size: the fine-tuned all-MiniLM-L6-v2 (6 layers, as above) and a 4-layer
model distilled from it with KD ({args.assistant_steps} steps, τ=2). Each method trains a **2-layer** student
truncated from the 6-layer teacher for {args.method_steps} steps, then {args.head_steps} steps of plain
fine-tuning; schema defaults (KD at τ=2). Accuracy on the 800 held-out test documents, mean ± half the range
over {args.seeds} seeds; wall time is the median per `gkd distill` process, peak memory its maximum RSS (both
teachers resident). The same setup as one run is `examples/multiteacher/tmkd.yaml`.

| method | accuracy | per seed | wall time | peak RSS |
| --- | --- | --- | --- | --- |
""" + "\n".join(rows) + "\n"
    if failures:
        section += "\nFailed runs: " + "; ".join(f"{m}: {e}" for m, e in failures.items()) + "\n"
    text = out.read_text() if out.is_file() else ""
    head, sep, rest = text.partition("\n## Several teachers\n")
    tail = ""
    if sep:  # keep the sections after the old one
        nxt = rest.find("\n## ")
        tail = rest[nxt:] if nxt >= 0 else ""
    out.write_text(head.rstrip("\n") + "\n\n" + section + tail)
    print(f"wrote the 'Several teachers' section of {out}")


if __name__ == "__main__":
    main()
