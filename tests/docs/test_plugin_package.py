"""docs/writing-methods.md's example package, examples/plugin, installed by pip as a user would.

``pip install --no-deps --no-build-isolation --no-index --target SITE`` builds a wheel of a copy
of examples/plugin with the setuptools of ``.venv`` (no network) and installs it into SITE, which
goes on ``PYTHONPATH``: the installed ``gkd`` then finds the method through its entry point, lists
it, and runs it alone in a tiny ``gkd distill``. (tests/gkd/methods/test_docs_example.py checks
that the guide's ``file=`` blocks are the package's files and runs the package's own tests.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "plugin"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/plugin, pip-installed into a fresh target directory (built from a copy, so no
    ``build/`` or ``*.egg-info`` appears in the repository)."""
    work = tmp_path_factory.mktemp("plugin-install")
    source = work / "gkd-hidden-cos"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    target = work / "site"
    done = subprocess.run([str(BIN / "python"), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--no-index", "--disable-pip-version-check", "--quiet", "--target", str(target),
                           str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (target / "gkd_hidden_cos" / "schema.json").is_file()  # package data came along
    return target


def _gkd(*args: str, site: Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    return subprocess.run([str(BIN / "gkd"), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300, check=False)


def test_the_installed_method_is_listed(site: Path) -> None:
    done = _gkd("methods", "list", "--json", site=site)
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["hidden-cos"]["distribution"] == "gkd-hidden-cos"
    assert rows["hidden-cos"]["version"] == "0.1.0"
    assert rows["hidden-cos"]["status"] == "ok"


def test_the_installed_method_runs_in_a_tiny_distill(site: Path, tmp_path: Path,
                                                     write_tiny_run: Callable[[Path], Path]) -> None:
    config_path = write_tiny_run(tmp_path)
    config = yaml.safe_load(config_path.read_text())
    config["stages"] = [{"name": "cos", "steps": 2,
                         "methods": [{"name": "hidden-cos", "config": {"teacher_layer": 2, "warmup": 0.5}}]}]
    config_path.write_text(yaml.safe_dump(config))
    done = _gkd("distill", str(config_path), "--no-progress", site=site, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [json.loads(line) for line in (tmp_path / "runs/tiny/metrics.jsonl").read_text().splitlines()]
    terms = [r for r in steps if r.get("stage") == "cos" and "hidden-cos.cos" in r.get("terms", {})]
    assert len(terms) == 2, steps
    assert terms[0]["terms"]["hidden-cos.cos"] == 0.0  # warm-up: the cosine weight starts at 0
    assert terms[1]["terms"]["hidden-cos.cos"] > 0.0
