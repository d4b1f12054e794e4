"""``gkd plan`` and the planner's arithmetic (:mod:`gkd.parallel.planner`); the predictions are
checked against measured runs in ``tests/gkd/parallel/test_memory.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from gkd.cli import cli
from gkd.models import ModelConfig, build_model, export_hf
from gkd.parallel.planner import (
    GiB,
    Layout,
    ModelUse,
    PlanError,
    Workload,
    architecture_from_spec,
    estimate,
    parse_bytes,
    parse_count,
    plan,
    recommendation_key,
    units,
    zero12_gradient_elements,
)


def _plan(*args: str) -> Any:
    result = CliRunner().invoke(cli, ["plan", *args])
    return result


# ---------------------------------------------------------------------------------- the paper's result


@pytest.fixture(scope="module")
def hundred_billion() -> dict[str, Any]:
    result = _plan("--teacher", "100B", "--student", "10B", "--gpus", "8", "--gpu-memory", "40GiB", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_a_100b_teacher_fits_8_a100_40gb_only_with_tp_zero_and_offload(hundred_billion):
    """GKD's claim: a 100B-scale teacher distils on 8 × A100-40GB with TP + ZeRO + offload.
    With the paper's teacher placement (each rank holds its TP shard of the teacher), the only
    layouts that fit use TP > 1, a ZeRO stage and optimizer offload; dropping any one fails."""
    (stage,) = hundred_billion["stages"]
    assert 99e9 < stage["teachers"][0]["parameters"] < 102e9 and 9.5e9 < stage["student"]["parameters"] < 10.5e9
    whole = [e for e in hundred_billion["layouts"] if e["layout"]["teacher"] == "resident"]
    fitting = [e["layout"] for e in whole if e["fits"]]
    assert fitting
    assert all(lay["tp"] > 1 and lay["zero"] >= 1 and lay["offload_optimizer"] for lay in fitting)
    best_without_offload = min(e["peak"] for e in whole if not e["layout"]["offload_optimizer"])
    assert best_without_offload > hundred_billion["usable"]
    assert hundred_billion["recommended_whole_teachers"]["layout"] == {
        "tp": 8, "dp": 1, "zero": 1, "offload_optimizer": True, "teacher": "resident"}
    # Beyond the paper: a teacher partitioned over the DP ranks also fits without TP.
    partitioned = [e["layout"] for e in hundred_billion["layouts"] if e["fits"] and "partition" in e["layout"]["teacher"]]
    assert any(lay["tp"] == 1 for lay in partitioned)
    assert hundred_billion["recommended"]["layout"]["tp"] == 1


def test_host_memory_limits_offload():
    args = ["--teacher", "100B", "--student", "10B", "--gpus", "8", "--gpu-memory", "40GiB", "--json"]
    roomy = json.loads(_plan(*args, "--host-memory", "1TiB").output)
    tight = json.loads(_plan(*args, "--host-memory", "128GiB").output)
    assert tight["host_memory_per_gpu"] == 16 * GiB
    assert roomy["recommended_whole_teachers"] is not None
    assert tight["recommended_whole_teachers"] is None  # its 21 GiB of offloaded state per GPU exceed 16 GiB
    assert all(e["host"] <= 16 * GiB for e in tight["layouts"] if e["fits"])


def test_table_is_sorted_and_marks_the_recommendation():
    result = _plan("--teacher", "100B", "--student", "10B", "--gpus", "8", "--gpu-memory", "40GiB")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("TP "))
    rows = [line.split() for line in lines[header + 1:] if line[:2].strip().isdigit()]
    peaks = [float(r[11]) for r in rows if "←" not in r]
    assert peaks == sorted(peaks) and len(rows) >= 25
    assert sum("←" in r for r in rows) == 1
    assert any(line.startswith("recommended (ZeRO first, then more TP, then offload): TP1 DP8 ZeRO-3 +offload")
               for line in lines)
    assert "with whole teachers on every rank (the paper's strategy): TP8 DP1 ZeRO-1 +offload teacher:resident" in \
        result.output


def test_does_not_fit_reports_the_shortfall():
    result = _plan("--teacher", "100B", "--student", "10B", "--gpus", "8", "--gpu-memory", "6GiB", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    smallest = min(e["peak"] for e in data["layouts"])
    assert data["recommended"] is None and data["shortfall"] == smallest - data["usable"] > 0
    text = _plan("--teacher", "100B", "--student", "10B", "--gpus", "8", "--gpu-memory", "6GiB").output
    assert f"exceeds the usable 5.00 GiB by {data['shortfall'] / GiB:.2f} GiB per GPU" in text
    assert text.splitlines()[-1].startswith("does not fit: the smallest peak")


SIZES = ["--gpus", "8", "--gpu-memory", "40GiB"]


@pytest.mark.parametrize(("args", "message"), [
    ([*SIZES, "--teacher", "100X", "--student", "1B"], "Error: --teacher: '100X' is not a parameter count"),
    ([*SIZES, "--teacher", "1B", "--student", "layers=2"], "Error: --student: 'layers=2': give a size"),
    (["--gpus", "8", "--gpu-memory", "lots", "--teacher", "1B", "--student", "350M"],
     "Error: --gpu-memory: 'lots' is not a memory size"),
    ([*SIZES, "--teacher", "1B,colour=red", "--student", "350M"],
     "Error: --teacher: 'colour' in '1B,colour=red' is not a model key"),
    ([*SIZES, "--teacher", "1B"], "Error: give CONFIG, or --student"),
    ([*SIZES, "--teacher", "1B", "--student", "350M", "--method", "kdd"], "Error: --method: unknown method 'kdd'"),
    ([*SIZES, "--teacher", "1B,vocab=1000", "--student", "350M"], "Error: --teacher: teacher's vocabulary (1000)"),
    ([*SIZES, "--student", "350M", "--reserve", "41GiB"], "Error: --reserve (41GiB) leaves nothing"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    result = _plan(*args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith(message), result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


# ---------------------------------------------------------------------------------- from a run config


@pytest.fixture
def run_config(tmp_path: Path) -> Path:
    common: dict[str, Any] = dict(family="encoder", vocab_size=97, num_attention_heads=4, ffn_hidden_size=64,
                                  max_position_embeddings=64, head="classification", num_labels=3)
    export_hf(build_model(ModelConfig(hidden_size=32, num_layers=4, **common), seed=1), tmp_path / "teacher")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": "a b c", "label": x}) + "\n" for x in "xyz"))
    cfg = {
        "name": "planned", "run_dir": str(tmp_path / "run"), "seed": 1,
        "task": {"type": "sequence_classification", "max_length": 32, "num_labels": 3},
        "data": {"train": {"path": "train.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "num_layers": 2}},
        "stages": [{"name": "tinybert", "steps": 1, "methods": [{"name": "tinybert"}]},
                   {"name": "kd", "steps": 1, "methods": [{"name": "kd"}], "training": {"batch_size": 8}}],
        "training": {"batch_size": 4},
        "parallel": {"tensor_parallel": 1, "zero": {"stage": 2}},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_plan_of_a_run_config(run_config, fresh_plugins):
    result = _plan(str(run_config), "--gpus", "2", "--gpu-memory", "2GiB", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    tinybert, kd = data["stages"]
    assert (tinybert["name"], tinybert["micro_batch"], tinybert["seq_len"]) == ("tinybert", 4, 32)
    assert (kd["name"], kd["micro_batch"]) == ("kd", 8)
    student = ModelConfig(family="encoder", vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4,
                          ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=3)
    assert tinybert["student"]["parameters"] == build_model(student).num_parameters()
    assert tinybert["auxiliary_parameters"] == 32 * 32  # TinyBERT's W_h
    assert {"embeddings", "layers.1.output", "layers.1.attention.scores"} <= set(tinybert["student"]["features"])
    assert {"layers.3.output", "layers.3.attention.scores"} <= set(tinybert["teachers"][0]["features"])
    assert kd["student"]["features"] == [] and kd["teachers"][0]["logits"]
    assert data["recommended"]["layout"] == {"tp": 1, "dp": 2, "zero": 0, "offload_optimizer": False,
                                             "teacher": "resident"}
    text = _plan(str(run_config), "--gpus", "2", "--gpu-memory", "2GiB", "--all").output
    configured = [line for line in text.splitlines() if line.endswith("(config)")]
    assert len(configured) == 1 and configured[0].split()[:5] == ["1", "2", "2", "no", "resident"]
    assert text.splitlines()[0] == "stage 'tinybert': fp32, micro-batch 4 × 32 tokens"


def test_plan_of_a_run_config_rejects_sizes(run_config, fresh_plugins):
    result = _plan(str(run_config), "--teacher", "1B", "--gpus", "2", "--gpu-memory", "2GiB")
    assert result.exit_code == 2
    assert "give either CONFIG or them" in result.output


# ---------------------------------------------------------------------------------- arithmetic


def test_sizes_and_named_scales():
    assert parse_count("1.3B") == 1_300_000_000 and parse_count("350m") == 350_000_000
    assert parse_bytes("40GiB") == 40 * GiB and parse_bytes("80GB") == 80 * 10**9 and parse_bytes("16") == 16 * GiB
    big = architecture_from_spec("100B")
    assert (big.num_layers, big.hidden_size, big.num_attention_heads) == (80, 10240, 80)
    derived = architecture_from_spec("10B")
    assert abs(derived.num_parameters() - 10e9) < 0.2e9
    wide = architecture_from_spec("2B,hidden=2048")
    assert wide.hidden_size == 2048 and abs(wide.num_parameters() - 2e9) < 0.06e9
    exact = architecture_from_spec("layers=4,hidden=256,heads=4,vocab=1000,family=encoder")
    assert exact.num_parameters() == build_model(ModelConfig(
        family="encoder", vocab_size=1000, hidden_size=256, num_layers=4, num_attention_heads=4, ffn_hidden_size=1024,
        head="classification")).num_parameters()
    with pytest.raises(PlanError, match="two of the three"):
        architecture_from_spec("1B,layers=4,hidden=256")


def test_zero12_keeps_whole_gradients_of_parameters_that_cross_a_partition():
    # one group of 10 + 6 elements, DP 2: padded to 16, partitions [0, 8) and [8, 16)
    assert zero12_gradient_elements([[10, 6]], 2) == 16  # rank 0: the 10; rank 1: the 10 and the 6
    assert zero12_gradient_elements([[4, 4, 8]], 2) == 8
    assert zero12_gradient_elements([[4, 4, 8]], 1) == 16


def test_partitioned_teacher_holds_a_slice_and_gathers_one_unit():
    teacher = architecture_from_spec("layers=8,hidden=512,heads=8,vocab=1000")
    student = architecture_from_spec("layers=2,hidden=256,heads=4,vocab=1000")
    work = Workload(ModelUse(student, dtype="fp32"), (ModelUse(teacher, dtype="fp32"),), precision="fp32",
                    micro_batch=2, seq_len=64)
    whole = estimate(work, Layout(1, 4, 0, teacher="resident"))
    part = estimate(work, Layout(1, 4, 0, teacher="partition"))
    cpu = estimate(work, Layout(1, 4, 0, teacher="partition+cpu"))
    assert whole.teachers == teacher.num_parameters() * 4
    assert part.teachers == pytest.approx(whole.teachers / 4, rel=1e-3)
    assert part.gathered == max(units(teacher, 1).values()) * 4
    assert cpu.teachers == 0 and cpu.teachers_host == part.teachers and cpu.gathered == part.gathered
    assert part.activations == whole.activations and part.student == whole.student


def test_recommendation_order_is_zero_then_tp_then_offload():
    ordered = sorted([Layout(2, 4, 0), Layout(1, 8, 3), Layout(1, 8, 2, True), Layout(8, 1, 0), Layout(1, 8, 0),
                      Layout(1, 8, 0, teacher="cpu")], key=recommendation_key)
    assert ordered == [Layout(1, 8, 0), Layout(1, 8, 3), Layout(2, 4, 0), Layout(8, 1, 0), Layout(1, 8, 2, True),
                       Layout(1, 8, 0, teacher="cpu")]


def test_plan_enumerates_valid_layouts_only():
    work = Workload(ModelUse(architecture_from_spec("layers=2,hidden=256,heads=4,vocab=1000")),
                    (ModelUse(architecture_from_spec("layers=4,hidden=384,heads=6,vocab=1000")),))
    result = plan([work], gpus_per_node=4, nodes=2, gpu_memory=80 * GiB)
    tps = {e.layout.tp for e in result.estimates}
    assert tps == {1, 2}  # TP 4 would split 6 heads unevenly
    assert all(e.layout.tp * e.layout.dp == 8 for e in result.estimates)
    assert not any(e.layout.zero == 0 and e.layout.offload_optimizer for e in result.estimates)
    assert result.recommended is not None and result.recommended.layout == Layout(1, 8, 0)
