"""A fast start (``gkd --help``, ``--version``, ``env`` import no heavy dependency and no
plugin) and a quiet one (megatron-core's and DeepSpeed's start-up notices hidden unless -v)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "megatron", "deepspeed", "gkd_methods_builtin", "gkd_methods_multiteacher")

_PROBE = """
import json, sys
from gkd.cli import main
watch = sys.argv.pop(1)
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(watch.split(",")))
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["env"], ["env", "--json"]])
def test_fast_commands_import_no_torch_megatron_or_plugin(args):
    proc = subprocess.run([sys.executable, "-c", _PROBE, ",".join(HEAVY), *args], capture_output=True, text=True,
                          timeout=60, check=False)
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}, proc.stderr
    assert proc.stdout.strip()


# The notices gkd.quiet hides, as they start (megatron-core 0.16, DeepSpeed 0.19).
NOTICES = (
    "UserWarning: Transformer Engine and Apex are not installed. Falling back",
    "Setting accelerator to CPU.",
)


def _notices(proc: subprocess.CompletedProcess[str]) -> set[str]:
    out = proc.stdout + proc.stderr  # DeepSpeed logs to standard output
    return {n for n in NOTICES if n in out}


def test_gkd_hides_dependency_notices_and_verbose_shows_them(noisy_plugin_site, run_gkd):
    quiet = run_gkd("noisy", pythonpath=noisy_plugin_site)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.strip().splitlines() == ["noisy done"]
    assert _notices(quiet) == set(), quiet.stdout + quiet.stderr
    assert quiet.stderr == ""

    verbose = run_gkd("-v", "noisy", pythonpath=noisy_plugin_site)
    assert verbose.returncode == 0, verbose.stderr
    assert _notices(verbose) == set(NOTICES)
    assert verbose.stderr.count("Transformer Engine and Apex are not installed") == 4


def test_library_use_installs_no_filter():
    # Importing gkd (CLI included) must leave the warnings of a research script alone.
    code = """
import gkd, gkd.cli, gkd.plugins, gkd.quiet
import megatron.core, megatron.core.optimizer
from megatron.core.transformer.transformer_config import TransformerConfig
TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=2)
import deepspeed
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr
    assert _notices(proc) == set(NOTICES)


def test_quiet_rules_are_exact_idempotent_and_undone_by_verbose():
    import logging
    import warnings

    from gkd.quiet import quiet_dependencies

    msg = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
    deepspeed = logging.getLogger("DeepSpeed")
    with warnings.catch_warnings(record=True) as seen:
        quiet_dependencies()
        rules = list(warnings.filters)
        quiet_dependencies()
        assert warnings.filters == rules
        warnings.warn_explicit(msg, UserWarning, "x.py", 1, module="megatron.core.optimizer")  # hidden
        warnings.warn_explicit(msg, UserWarning, "x.py", 2, module="my_research")  # another module: shown
        warnings.warn_explicit("Transformer Engine and Apex are not installed. Falling back", RuntimeWarning,
                               "x.py", 3, module="megatron.core.optimizer")  # another category: shown
        assert [w.lineno for w in seen] == [2, 3]
        assert len(deepspeed.filters) == 1
        notice = logging.LogRecord("DeepSpeed", logging.WARNING, "x", 1, "Setting accelerator to CPU. If ...",
                                   None, None)
        other = logging.LogRecord("DeepSpeed", logging.WARNING, "x", 1, "ZeRO stage 3 is slow", None, None)
        assert not deepspeed.filter(notice) and deepspeed.filter(other)

        quiet_dependencies(verbose=True)
        assert deepspeed.filters == []
        warnings.warn_explicit(msg, UserWarning, "x.py", 4, module="megatron.core.optimizer")
        assert [w.lineno for w in seen] == [2, 3, 4]
