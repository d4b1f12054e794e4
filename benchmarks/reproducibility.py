"""How far a run's result moves with the machine: CPU threads and the CPU's vector instructions.

Runs the main job (examples/reuters-minilm/config.yaml, shortened with ``--set``) from scratch
once per setting, in separate run directories, one after another:

* torch/OpenMP threads: ``--threads`` (default 1 and 2), via ``OMP_NUM_THREADS``;
* kernels: the machine's best (``native``) and AVX2-only (``ATEN_CPU_CAPABILITY=avx2`` for
  PyTorch's own kernels and ``ONEDNN_MAX_CPU_ISA=AVX2`` for oneDNN's), i.e. an older CPU of
  the same family.

Reported per setting: teacher and student test accuracy and the largest absolute difference of
the exported student's weights from the first setting's; then whether a repeat of the first
setting is bitwise identical (same machine, same settings).

    python benchmarks/reproducibility.py [--train 400] [--test 400] [--threads 1 2] [--workdir DIR]

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file
from scratch import scratch_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "reuters-minilm" / "config.yaml"
KERNELS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def run(workdir: Path, name: str, threads: int, kernels: str, args: argparse.Namespace) -> dict:
    run_dir = workdir / name
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **KERNELS[kernels]}
    overrides = [f"run_dir={run_dir}", f"data.train.limit={args.train}", f"data.test.limit={args.test}",
                 "export.onnx=none", "analysis.every=0", "logging.plot=false", "logging.every_steps=0"]
    command = [str(Path(sys.executable).with_name("gkd")), "distill", str(CONFIG), "--no-progress"]
    for o in overrides:
        command += ["--set", o]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = {r["model"]: r for r in summary["models"]}
    return {"name": name, "seconds": seconds, "teacher": rows["teacher:minilm"]["accuracy"],
            "student": rows["student"]["accuracy"], "weights": load_file(str(run_dir / "export" / "model.safetensors"))}


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = scratch_dir("gkd-repro-", args.workdir)
    settings = [(t, k) for k in KERNELS for t in args.threads]
    results = [run(workdir, f"{k}-{t}t", t, k, args) for t, k in settings]
    repeat = run(workdir, "repeat", *settings[0], args)
    ref = results[0]
    print(f"main job, {args.train} training / {args.test} test documents; the first setting is the reference")
    print(f"{'setting':<14}{'teacher':>9}{'student':>9}{'max |Δw| student':>19}{'seconds':>9}")
    for r in results:
        print(f"{r['name']:<14}{r['teacher']:>9.4f}{r['student']:>9.4f}{max_diff(r['weights'], ref['weights']):>19.3g}"
              f"{r['seconds']:>9.0f}")
    same = max_diff(repeat["weights"], ref["weights"])
    print(f"repeat of {ref['name']}: student {repeat['student']:.4f}, max |Δw| {same:.3g} "
          f"({'bitwise identical' if same == 0 else 'NOT identical'})")


if __name__ == "__main__":
    main()
