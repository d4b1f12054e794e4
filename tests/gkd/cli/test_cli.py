from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from click.utils import make_default_short_help

from gkd.cli import BUILTIN_COMMANDS, EPILOG, cli, load_builtin

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


def test_env_reports_versions_without_importing_torch():
    result = CliRunner().invoke(cli, ["env", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["torch"].startswith("2.") and info["megatron-core"].startswith("0.16")
    assert info["cuda_available"] is None  # not checked without --torch
    plugins = {p["entry_point"]: p for p in info["plugins"]}
    assert plugins["kd"] == {"entry_point": "kd", "distribution": "gkd-methods-builtin", "version": "0.1.0",
                             "module": "gkd_methods_builtin.kd"}
    text = CliRunner().invoke(cli, ["env"]).output
    assert "cuda_available             not checked (run `gkd env --torch`)" in text


def test_env_torch_and_check_plugins():
    result = CliRunner().invoke(cli, ["env", "--json", "--torch", "--check-plugins"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["cuda_available"] in (True, False)
    assert isinstance(info["cpu_threads"], int)
    plugins = {p["entry_point"]: p for p in info["plugins"]}
    assert plugins["tmkd"]["status"] == "ok" and plugins["tmkd"]["methods"] == ["tmkd"]


def test_help_lists_builtins_and_how_to_find_plugin_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert all(f"  {name} " in result.output for name in BUILTIN_COMMANDS)
    assert " ".join(EPILOG.split()) in " ".join(result.output.split())
    assert "-v, --verbose" in result.output


def test_builtin_summaries_match_the_commands():
    # gkd --help shows the table's summaries without importing the commands; they must not drift.
    for name, builtin in BUILTIN_COMMANDS.items():
        command = load_builtin(name)
        assert command.name == name
        assert command.get_short_help_str(limit=500) == make_default_short_help(builtin.summary, 500), name


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(cli, ["distil"])
    assert result.exit_code == 2
    assert "No such command 'distil'" in result.output


def test_distill_prints_its_own_first_line(fresh_plugins, monkeypatch, tmp_path):
    import gkd.engine.trainer as trainer

    class StopAtOnce:
        def __init__(self, run, registry, **kwargs):
            self.kwargs = kwargs

        def execute(self):
            raise trainer.TrainingInterrupted("stopped before step 1 (test)")

    monkeypatch.setattr(trainer, "Trainer", StopAtOnce)
    result = CliRunner().invoke(cli, ["distill", str(EXAMPLE), "--set", f"run_dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == (f"gkd distill: run 'reuters-minilm' → {tmp_path / 'run'}, 3 stage(s) "
                        "(teacher-finetune, tinybert, kd)")
    assert lines[1] == "stopped before step 1 (test)"


def test_real_subprocess_three_mistakes(tmp_path, run_gkd):
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("num_layers: 3", "num_layers: 3\n    colour: red")
                   .replace("limit: 1600", "limit: -5").replace("name: kd\n", "name: kdx\n"))
    # the example's relative paths are pkg: paths, so the copy validates from anywhere
    proc = run_gkd("validate", str(bad))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == f"Error: {bad}: 3 error(s)"
    assert lines[1] == f"{bad}: data.train.limit: -5 is less than the minimum of 1"
    assert lines[2].startswith(f"{bad}: stages[2].methods[0].name: unknown method 'kdx'; did you mean 'kd'?")
    assert lines[3].startswith(f"{bad}: student.init.colour: unknown key; allowed keys: strategy, path, teacher, layers")
    assert "Traceback" not in proc.stderr + proc.stdout


def test_real_subprocess_lists_broken_plugin(make_plugin_dist, run_gkd):
    site = make_plugin_dist("gkd-broken-example", {"broken-one": "gkd_broken_mod"},
                            {"gkd_broken_mod": "import gkd\nraise ImportError('missing dependency: frobnicate')\n"})
    proc = run_gkd("methods", "list", "--json", pythonpath=site)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["broken-one"]["status"] == "error"
    assert rows["broken-one"]["distribution"] == "gkd-broken-example"
    assert "missing dependency: frobnicate" in rows["broken-one"]["reason"]
    assert {"kd", "tinybert", "tmkd"} <= {n for n, r in rows.items() if r["status"] == "ok"}
