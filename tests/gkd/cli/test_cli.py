from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from gkd.cli import cli

ROOT = Path(__file__).parents[3]
EXAMPLE = ROOT / "examples" / "reuters-minilm" / "config.yaml"


def test_methods_list_json(fresh_plugins):
    result = CliRunner().invoke(cli, ["methods", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["kd"]["distribution"] == "gkd-methods-builtin"
    assert rows["tmkd"]["kind"] == "multi-teacher"
    assert all(r["status"] == "ok" for r in rows.values())


def test_methods_show_prints_schema_with_defaults(fresh_plugins):
    result = CliRunner().invoke(cli, ["methods", "show", "kd", "--json"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["defaults"] == {"temperature": 1.0, "soft_loss": "kl", "soft_weight": 1.0, "hard_weight": 1.0}
    assert info["citation"].startswith("Hinton")
    text = CliRunner().invoke(cli, ["methods", "show", "tinybert"]).output
    assert "trainable parameters: yes" in text and "temperature = 1.0" in text


def test_unknown_method_show_is_bad_input(fresh_plugins):
    result = CliRunner().invoke(cli, ["methods", "show", "kdd"])
    assert result.exit_code == 2
    assert "unknown method 'kdd'; did you mean 'kd'?" in result.output
    assert "Traceback" not in result.output


def test_validate_ok_and_bad_set_key(fresh_plugins):
    ok = CliRunner().invoke(cli, ["validate", str(EXAMPLE)])
    assert ok.exit_code == 0 and "OK" in ok.output
    bad = CliRunner().invoke(cli, ["validate", str(EXAMPLE), "--set", "training.batchsize=8"])
    assert bad.exit_code == 2
    assert "training.batchsize: unknown key; did you mean 'batch_size'?" in bad.output


def test_env_reports_versions():
    result = CliRunner().invoke(cli, ["env", "--json"])
    info = json.loads(result.output)
    assert info["torch"].startswith("2.") and info["megatron-core"].startswith("0.16")
    assert info["cuda_available"] in (True, False)


def _run_gkd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    gkd = Path(sys.executable).parent / "gkd"
    return subprocess.run([str(gkd), *args], capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=120, check=False)


def test_real_subprocess_three_mistakes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("num_layers: 3", "num_layers: 3\n    colour: red")
                   .replace("limit: 1600", "limit: -5").replace("name: kd\n", "name: kdx\n"))
    # the example's relative paths are pkg: paths, so the copy validates from anywhere
    proc = _run_gkd("validate", str(bad))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == f"Error: {bad}: 3 error(s)"
    assert lines[1] == "data.train.limit: -5 is less than the minimum of 1"
    assert lines[2].startswith("stages[2].methods[0].name: unknown method 'kdx'; did you mean 'kd'?")
    assert lines[3].startswith("student.init.colour: unknown key; allowed keys: strategy, path, teacher, layers")
    assert "Traceback" not in proc.stderr + proc.stdout


def test_real_subprocess_lists_broken_plugin(make_plugin_dist):
    site = make_plugin_dist("gkd-broken-example", {"broken-one": "gkd_broken_mod"},
                            {"gkd_broken_mod": "import gkd\nraise ImportError('missing dependency: frobnicate')\n"})
    proc = _run_gkd("methods", "list", "--json", env={"PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["broken-one"]["status"] == "error"
    assert rows["broken-one"]["distribution"] == "gkd-broken-example"
    assert "missing dependency: frobnicate" in rows["broken-one"]["reason"]
    assert {"kd", "tinybert", "tmkd"} <= {n for n, r in rows.items() if r["status"] == "ok"}
