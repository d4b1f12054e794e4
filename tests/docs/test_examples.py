"""Every Python and shell example of README.md and docs/*.md runs, or says why not.

Each fenced ``python``, ``bash``, ``sh``, ``shell`` or ``console`` block needs a *disposition*: an
HTML comment (invisible when rendered) on the line right before its fence. A block without one, or
with one this module does not understand, fails, so a new or renamed example cannot slip through
unclassified::

    <!-- example: run [id=ID] [after=ID] [setup=NAME] [output=exact|normalised|status] [limit=N] [set K=V ...] -->
    <!-- example: file NAME [id=ID] [after=ID] [setup=NAME] -->
    <!-- example: synopsis -->
    <!-- example: imports -->
    <!-- example: names MODULE -->
    <!-- example: outline MODULE:CLASS -->
    <!-- example: signature -->
    <!-- example: covered by tests/PATH.py -->
    <!-- example: same as PATH -->
    <!-- example: skip — REASON -->

``run``
    Runs the block in a fresh temporary directory that links the repository's ``examples``,
    ``benchmarks``, ``scripts``, ``tests`` and ``.venv``, with ``.venv/bin`` first on ``PATH``.
    ``python`` blocks run as ``python example.py``; shell blocks under ``bash -euo pipefail``;
    ``console`` blocks run their ``$ `` commands (a trailing ``\\`` continues one) in one bash,
    in order, and compare what each printed (standard output and error, merged) with the lines
    the doc shows under it:

    - ``exact`` (the default): equal line by line, trailing blanks ignored;
    - ``normalised``: also every number compared as ``N`` and runs of spaces as one (times,
      throughputs, losses, column widths of tables);
    - ``status``: the output is not compared, every command must exit with 0 (long runs shortened
      with ``set``, whose figures the doc shows from the full run).

    In ``exact`` and ``normalised``, ``…`` (or ``...``) inside a line matches any text, and a line
    that is only ``…`` matches any number of lines. ``/tmp/`` in the block means the block's own
    temporary directory (so runs never collide), ``/work/main/`` the repository root.
    ``set K=V ...`` (last, it takes the rest of the comment) appends ``--set K=V`` to every
    ``gkd distill``, ``gkd validate`` and ``gkd plan`` command, e.g. to make a long run tiny.
    ``limit=N`` turns every ``--limit M`` of the block into ``--limit N`` (``gkd eval`` on fewer
    documents). ``id=ID`` names the block's directory; ``after=ID`` runs the block in that directory after the
    block ``ID`` of the same doc (a continuation, e.g. ``gkd analyze`` after ``gkd distill``);
    ``setup=NAME`` prepares the directory with one of ``SETUPS`` below (a tiny teacher and data,
    a tiny run of the main job, plugin distributions).
``file NAME``
    Writes the block to ``NAME`` in the directory without running it (a later ``after=`` block runs it).
``synopsis``
    A usage summary with placeholders (``gkd distill CONFIG [--set k=v]``): for every line starting
    with ``gkd``, ``gkd <command> --help`` must succeed and list every ``--option`` the line shows.
``imports``
    For fragments that cannot run alone: only the block's ``import``/``from … import`` statements run,
    so a renamed function or module fails.
``names MODULE``
    For a fragment of a method's code: every name it reads that it does not assign (other than
    built-ins and the arguments of ``Method.plan``/``loss``) must exist in ``MODULE``.
``outline MODULE:CLASS``
    For a class outline: every ``def`` of the block must exist on that class.
``signature``
    A block ``module.function(parameters) -> type``: the function exists and takes exactly these
    parameters, of the same kinds (positional, keyword-only) and with the same defaults.
``covered by tests/PATH.py``
    Another test executes the block; the file must exist and name the doc.
``same as PATH``
    The block is the repository file ``PATH``, character for character (a config shown in full).

Language-less, ``yaml``, ``json`` and ``toml`` blocks are output and config samples: a marker is
optional for them (``same as`` makes one checked too).
``skip — REASON``
    Only for what cannot run on a CPU-only CI machine without network: GPUs, several nodes,
    downloads, ``make demo``'s 7-minute run, placeholder paths. The count of run and skipped
    blocks is printed at the end of the session.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash", "sh", "shell", "console"}
SAMPLES = {"yaml", "json", "toml", ""}  # output and config samples: a marker is optional
LINKED = ("examples", "benchmarks", "scripts", "tests", ".venv")
FENCE = re.compile(r"^(?P<fence>`{3,})(?P<lang>[\w-]*)(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S)
MARKER = re.compile(r"^<!--\s*example:\s*(?P<spec>.*?)\s*-->\s*$")
TIMEOUT = 600
MARK = "@@gkd-example-rc="


@dataclass(frozen=True)
class Block:
    """One fenced example: where it is, what it says, and its disposition."""

    doc: Path
    line: int
    lang: str
    info: str
    body: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


@dataclass
class Disposition:
    kind: str  # run | file | synopsis | imports | names | outline | signature | same | covered | skip
    argument: str = ""
    id: str | None = None
    after: str | None = None
    setup: str | None = None
    output: str = "exact"
    overrides: list[str] = field(default_factory=list)
    limit: str | None = None


def blocks(doc: Path) -> list[Block]:
    """The example blocks of ``doc`` in order, each with the marker line right before its fence."""
    text = doc.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1] if m.start() else ""
        marker = MARKER.match(before)
        if m.group("lang") not in LANGUAGES and not (m.group("lang") in SAMPLES and marker):
            continue
        found.append(Block(doc, text.count("\n", 0, m.start()) + 1, m.group("lang"), m.group("info").strip(),
                           m.group("body"), marker.group("spec") if marker else None))
    return found


def parse(block: Block) -> Disposition:
    """The block's disposition; ``ValueError`` says what is wrong with the marker."""
    spec = block.marker
    if spec is None:
        raise ValueError("no '<!-- example: … -->' line right before the fence (see tests/docs/test_examples.py)")
    if m := re.fullmatch(r"skip\s*(?:—|-|:)\s*(\S.*)", spec):
        return Disposition("skip", m.group(1))
    if m := re.fullmatch(r"covered by (tests/\S+\.py)", spec):
        return Disposition("covered", m.group(1))
    if m := re.fullmatch(r"same as (\S+)", spec):
        return Disposition("same", m.group(1))
    if spec == "imports":
        if block.lang != "python":
            raise ValueError("'imports' is for python blocks")
        return Disposition("imports")
    if spec in ("synopsis", "signature"):
        return Disposition(spec)
    if m := re.fullmatch(r"names ([\w.]+)", spec):
        return Disposition("names", m.group(1))
    if m := re.fullmatch(r"outline ([\w.]+):(\w+)", spec):
        return Disposition("outline", f"{m.group(1)}:{m.group(2)}")
    words = spec.split()
    if not words or words[0] not in ("run", "file"):
        raise ValueError(f"unknown disposition {spec!r}")
    disposition = Disposition(words[0])
    rest = words[1:]
    if disposition.kind == "file":
        if not rest:
            raise ValueError("'file' needs a file name")
        disposition.argument, rest = rest[0], rest[1:]
    for i, word in enumerate(rest):
        key, sep, value = word.partition("=")
        if word == "set":
            if disposition.kind != "run" or not rest[i + 1:]:
                raise ValueError("'set' needs K=V overrides and a 'run' block")
            disposition.overrides = rest[i + 1:]
            break
        if not sep or key not in ("id", "after", "setup", "output", "limit") or not value:
            raise ValueError(f"unknown option {word!r}")
        if key == "limit" and not value.isdigit():
            raise ValueError(f"limit={value}: expected a number of documents")
        if key == "output" and value not in ("exact", "normalised", "status"):
            raise ValueError(f"output={value}: expected exact, normalised or status")
        setattr(disposition, key, value)
    if disposition.setup and disposition.setup not in SETUPS:
        raise ValueError(f"setup={disposition.setup}: expected one of {', '.join(sorted(SETUPS))}")
    return disposition


# --- setups: what a directory needs before a block runs -------------------------------------------------

def _tiny_run(root: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    """A tiny random 4-layer BERT teacher with a 3-class head (MiniLM's tokenizer), ``train.jsonl``,
    ``test.jsonl`` and ``run.yaml`` (one 4-step KD stage into ``runs/tiny``); see tests/docs/conftest.py."""
    request.getfixturevalue("write_tiny_run")(root)
    return {}


#: The main job of the README shortened to about a minute: 256 training documents (enough for every
#: test label to occur), 16 test documents, an eighth of each stage's epochs.
MAIN_RUN_OVERRIDES = ["data.train.limit=256", "data.test.limit=16", "stages[0].epochs=0.125",
                      "stages[1].epochs=0.125", "stages[2].epochs=0.125"]


def _main_run(root: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    """``runs/reuters-minilm``: the README's main job with ``MAIN_RUN_OVERRIDES`` (every stage, analysis
    points, both exports), run once per session and linked into the directory. Its ``run_dir`` is the
    config's, so a block running ``gkd distill`` with the same overrides resumes it."""
    cache: Path = request.getfixturevalue("doc_cache")
    run_dir = cache / "runs" / "reuters-minilm"
    if not (run_dir / "summary.json").is_file():
        argv = [str(_venv_bin() / "gkd"), "distill", str(ROOT / "examples/reuters-minilm/config.yaml"), "--no-progress"]
        for item in MAIN_RUN_OVERRIDES:
            argv += ["--set", item]
        done = subprocess.run(argv, cwd=cache, capture_output=True, text=True, timeout=TIMEOUT, env=_env({}))
        assert done.returncode == 0, f"the shortened main job failed:\n{done.stdout}\n{done.stderr}"
    (root / "runs").mkdir(exist_ok=True)
    (root / "runs" / "reuters-minilm").symlink_to(run_dir)
    return {}


def _analysis_b(root: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    """``/tmp/gkd-analysis-demo-kd``, docs/analysis.md's second run, stood in for by the first one
    (the comparison's format and options are what is checked, not its figures)."""
    (root / "tmp" / "gkd-analysis-demo-kd").symlink_to(root / "tmp" / "gkd-analysis-demo")
    return {}


def _no_onnxruntime(root: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    """A Python that cannot import ``onnxruntime`` (a ``sitecustomize`` blocks it), as without the extra."""
    site = root / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['onnxruntime'] = None\n")
    return {"PYTHONPATH": str(site)}


def _hidden_cos(root: Path, request: pytest.FixtureRequest, broken: bool = False) -> dict[str, str]:
    """examples/plugin (docs/writing-methods.md's package) importable from ``site/`` with the
    ``*.dist-info`` pip would write, and its ``use.yaml``; ``broken``: its ``__init__`` imports a
    missing module first, as in the guide's broken-plugin example."""
    import shutil
    import tomllib

    plugin = ROOT / "examples" / "plugin"
    site = root / "site"
    shutil.copytree(plugin / "src", site)
    if broken:
        init = site / "gkd_hidden_cos" / "__init__.py"
        init.write_text(init.read_text() + "\nimport frobnicate  # noqa: E402, F401\n")
    project = tomllib.loads((plugin / "pyproject.toml").read_text())["project"]
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
        for group, eps in project["entry-points"].items()))
    shutil.copy(plugin / "use.yaml", root / "use.yaml")
    return {"PYTHONPATH": str(site)}


def _command_plugins(root: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    """The command-only plugin distributions of tests/gkd/cli (one broken, one adding ``gkd hello``)
    installed into ``site/``, which goes on ``PYTHONPATH``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gkd_cli_test_conftest", ROOT / "tests/gkd/cli/conftest.py")
    assert spec and spec.loader
    plugins = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugins)
    site = root / "site"
    for dist, version, entry, module, source in [
        ("gkd-broken-commands", "1.2.3", "broken-cmds", "gkd_broken_cmds", plugins.BROKEN_COMMANDS),
        ("gkd-hello", "0.4.0", "hello-plugin", "gkd_hello_cmd", plugins.HELLO),
    ]:
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[gkd.methods]\n{entry} = {module}\n")
        (site / f"{module}.py").write_text(source)
    return {"PYTHONPATH": str(site)}


def _bad_config(root: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    """``bad.yaml``: the main job's config with the three mistakes of docs/configuration.md's diff."""
    import yaml

    config = yaml.safe_load((ROOT / "examples/reuters-minilm/config.yaml").read_text())
    config["data"]["train"]["limit"] = -5
    config["student"]["init"]["colour"] = "red"
    config["stages"][2]["methods"][0]["name"] = "kdx"
    (root / "bad.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return {}


SETUPS: dict[str, Callable[[Path, pytest.FixtureRequest], dict[str, str]]] = {
    "tiny-run": _tiny_run,
    "main-run": _main_run,
    "command-plugins": _command_plugins,
    "bad-config": _bad_config,
    "analysis-b": _analysis_b,
    "no-onnxruntime": _no_onnxruntime,
    "hidden-cos": _hidden_cos,
    "hidden-cos-broken": lambda root, request: _hidden_cos(root, request, broken=True),
}


# --- running ----------------------------------------------------------------------------------------------


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "GKD_"))}
    env["PATH"] = os.pathsep.join([str(_venv_bin()), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"  # standard output and error merged in the order they were written
    env["COLUMNS"] = "80"  # click wraps help text at the terminal width; the docs show 80 columns
    return env | extra


def _localise(text: str, root: Path) -> str:
    """``/tmp/`` → the block's directory, ``/work/main/`` → the repository: runs never collide."""
    # One pass: the repository itself may live under /tmp/ (a CI clone), so a path already mapped
    # must not be mapped again.
    return re.sub(r"/work/main/|/tmp/", lambda m: f"{ROOT}/" if m.group() == "/work/main/" else f"{root}/tmp/", text)


def _with_overrides(command: str, overrides: list[str], limit: str | None = None) -> str:
    if limit:
        command = re.sub(r"--limit \d+", f"--limit {limit}", command)
    if not overrides:
        return command
    command = re.sub(r"\\\n\s*", " ", command)  # one line per command: the overrides go at its end
    extra = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    pattern = re.compile(r"(\bgkd\s+(?:distill|validate|plan)\b[^|;&#\n]*?)(\s*(?:[|;&#].*)?)$", re.M)
    return pattern.sub(lambda m: f"{m.group(1)} {extra}{m.group(2)}", command)


def console_steps(body: str) -> list[tuple[str, str]]:
    """``(command, expected output)`` for every ``$ `` command of a console block."""
    steps: list[tuple[str, list[str]]] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            command = [line[2:]]
            while command[-1].rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                command.append(lines[i])
            steps.append(("\n".join(command), []))
        elif steps:
            steps[-1][1].append(line)
        i += 1
    return [(c, "\n".join(out)) for c, out in steps]


def _pattern(expected: str, normalised: bool) -> re.Pattern[str]:
    parts = []
    for line in expected.rstrip().splitlines():
        if line.strip() in ("…", "..."):
            parts.append(r"(?:[^\n]*\n)*?")
            continue
        pieces = re.split(r"…|\.\.\.", _normalise(line) if normalised else line.rstrip())
        parts.append(".*?".join(re.escape(p) for p in pieces) + r"\n")
    return re.compile("".join(parts), re.S)


def _normalise(text: str) -> str:
    text = re.sub(r"[-+]?\d+(?:[.,:]\d+)*(?:[eE][-+]?\d+)?", "N", text)
    return re.sub(r"[ \t]+", " ", text).rstrip()


def matches(expected: str, actual: str, mode: str) -> bool:
    """``actual`` printed what the doc shows as ``expected`` (see the module docstring)."""
    if mode == "normalised":
        actual = "\n".join(_normalise(line) for line in actual.splitlines())
    else:
        actual = "\n".join(line.rstrip() for line in actual.splitlines())
    actual = actual.strip("\n") + "\n"
    if not expected.strip():
        return True
    return _pattern(expected, mode == "normalised").fullmatch(actual) is not None


def run_console(block: Block, d: Disposition, root: Path, env: dict[str, str]) -> None:
    steps = console_steps(_localise(block.body, root))
    assert steps, f"{block.where}: a console block shows no '$ ' command"
    script = ["exec 2>&1"]
    for command, _ in steps:
        script += [_with_overrides(command, d.overrides, d.limit), f"__rc=$?; printf '\\n{MARK}%s\\n' $__rc; (exit $__rc)"]
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=root, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    chunks = re.split(rf"\n{re.escape(MARK)}(\d+)\n", "\n" + done.stdout)
    outputs, codes = chunks[0:-1:2], [int(c) for c in chunks[1::2]]
    outputs = [outputs[0].removeprefix("\n"), *outputs[1:]]
    assert len(codes) == len(steps), f"{block.where}: the block stopped early:\n{done.stdout}"
    for (command, expected), out, rc in zip(steps, outputs, codes, strict=True):
        if d.output == "status":
            assert rc == 0, f"{block.where}: `{command}` exited with {rc}:\n{out}"
        else:
            assert matches(expected, out, d.output), (
                f"{block.where}: `{command}` (exit {rc}) printed\n{out}\nwhere the doc shows ({d.output})\n{expected}")


def run_block(block: Block, d: Disposition, root: Path, env: dict[str, str]) -> None:
    if d.kind == "file":
        target = root / d.argument
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_localise(block.body, root))
        return
    if block.lang == "console":
        run_console(block, d, root, env)
        return
    body = _localise(block.body, root)
    if block.lang == "python":
        (root / "example.py").write_text(body)
        argv = [str(_venv_bin() / "python"), "example.py"]
    else:
        argv = ["bash", "-euo", "pipefail", "-c", _with_overrides(body, d.overrides, d.limit)]
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{block.where} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"


def check_imports(block: Block) -> None:
    tree = ast.parse(block.body)
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert imports, f"{block.where}: 'imports' but the block imports nothing"
    code = compile(ast.Module(body=imports, type_ignores=[]), block.where, "exec")
    exec(code, {})


def check_synopsis(block: Block) -> None:
    for line in block.body.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "gkd":
            continue
        path = []
        for word in words[1:]:
            if not re.fullmatch(r"[a-z][a-z-]*", word):
                break
            path.append(word)
        done = subprocess.run([str(_venv_bin() / "gkd"), *path, "--help"], capture_output=True, text=True,
                              timeout=TIMEOUT, env=_env({}))
        assert done.returncode == 0, f"{block.where}: `gkd {' '.join(path)} --help` failed:\n{done.stderr}"
        options = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", " ".join(words[1 + len(path):])))
        missing = [o for o in sorted(options) if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", done.stdout)]
        assert not missing, f"{block.where}: `gkd {' '.join(path)}` has no option {', '.join(missing)}"


def check_names(block: Block, module_name: str) -> None:
    import builtins
    import importlib

    module = importlib.import_module(module_name)
    tree = ast.parse(re.sub(r"^\s*\.\.\.\s*$", "", block.body, flags=re.M).replace("\nreturn ", "\n_ = "))
    assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    arguments = {"self", "step", "state", "pass_index", "previous", "outputs"}  # of Method.plan and .loss
    missing = sorted(n for n in read - assigned - arguments if not hasattr(builtins, n) and not hasattr(module, n))
    assert not missing, f"{block.where}: {module_name} has no {', '.join(missing)}"


def check_signature(block: Block) -> None:
    import importlib
    import inspect

    m = re.fullmatch(r"\s*([\w.]+)(\(.*\))\s*(?:->\s*(.+?))?\s*", block.body, re.S)
    assert m, f"{block.where}: not of the form module.function(parameters) -> type"
    module_name, _, name = m.group(1).rpartition(".")
    actual = inspect.signature(getattr(importlib.import_module(module_name), name))
    shown = ast.parse(f"def f{m.group(2)}: ...").body[0].args  # type: ignore[attr-defined]
    positional = [(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in shown.args]
    keyword = [(a.arg, inspect.Parameter.KEYWORD_ONLY) for a in shown.kwonlyargs]
    defaults = [None] * (len(shown.args) - len(shown.defaults)) + list(shown.defaults) + list(shown.kw_defaults)
    expected = [(n, k, None if d is None else ast.literal_eval(d) if not isinstance(d, ast.Name) else d.id)
                for (n, k), d in zip(positional + keyword, defaults, strict=True)]
    got = [(p.name, p.kind, None if p.default is inspect.Parameter.empty
            else p.default.__name__ if callable(p.default) else p.default) for p in actual.parameters.values()]
    got = [(n, k, list(d) if isinstance(d, tuple) else d) for n, k, d in got]
    expected = [(n, k, list(d) if isinstance(d, tuple) else d) for n, k, d in expected]
    assert got == expected, f"{block.where}: {m.group(1)}{actual} differs from what the doc shows"


def check_outline(block: Block, target: str) -> None:
    import importlib

    module, _, name = target.partition(":")
    cls = getattr(importlib.import_module(module), name)
    tree = ast.parse(re.sub(r"\.\.\.\s*#.*", "...", block.body))
    defs = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    assert defs, f"{block.where}: the outline defines nothing"
    missing = [n for n in defs if not hasattr(cls, n)]
    assert not missing, f"{block.where}: {target} has no {', '.join(missing)}"


# --- the tests ---------------------------------------------------------------------------------------------

ALL = [b for doc in DOCS for b in blocks(doc)]


def test_every_example_has_a_valid_disposition():
    problems = []
    for block in ALL:
        try:
            parse(block)
        except ValueError as exc:
            problems.append(f"{block.where} ({block.lang}): {exc}")
    assert not problems, "\n".join(problems)


def test_after_and_ids_name_earlier_blocks_of_the_same_doc():
    for doc in DOCS:
        seen: set[str] = set()
        for block in blocks(doc):
            try:
                d = parse(block)
            except ValueError:
                continue  # reported by the test above
            if d.after:
                assert d.after in seen, f"{block.where}: after={d.after} names no earlier block of {doc.name}"
            if d.id:
                assert d.id not in seen, f"{block.where}: id={d.id} is used twice"
                seen.add(d.id)


@pytest.fixture(scope="module")
def directories() -> dict[tuple[Path, str], tuple[Path, dict[str, str]]]:
    """The directory and setup environment of every block with an ``id``, for the blocks that run
    ``after`` it."""
    return {}


@pytest.mark.parametrize("block", ALL, ids=[f"{b.where}-{b.lang}" for b in ALL])
def test_example(block: Block, directories: dict[tuple[Path, str], tuple[Path, dict[str, str]]],
                 tmp_path: Path, request: pytest.FixtureRequest) -> None:
    try:
        d = parse(block)
    except ValueError as exc:
        pytest.fail(f"{block.where}: {exc}")
    if d.kind == "skip":
        pytest.skip(f"{block.where}: {d.argument}")
    if d.kind == "covered":
        test = ROOT / d.argument
        assert test.is_file(), f"{block.where}: {d.argument} does not exist"
        name = str(block.doc.relative_to(ROOT))
        assert name in test.read_text(encoding="utf-8"), f"{block.where}: {d.argument} does not mention {name}"
        return
    if d.kind == "imports":
        check_imports(block)
        return
    if d.kind == "outline":
        check_outline(block, d.argument)
        return
    if d.kind == "synopsis":
        check_synopsis(block)
        return
    if d.kind == "signature":
        check_signature(block)
        return
    if d.kind == "same":
        assert (ROOT / d.argument).is_file(), f"{block.where}: {d.argument} does not exist"
        assert block.body == (ROOT / d.argument).read_text(encoding="utf-8"), (
            f"{block.where} differs from {d.argument}: copy the file into the doc")
        return
    if d.kind == "names":
        check_names(block, d.argument)
        return
    if d.after:
        if (block.doc, d.after) not in directories:
            pytest.fail(f"{block.where}: block {d.after!r}, which this one continues, did not run")
        root, extra = directories[(block.doc, d.after)]
    else:
        extra = {}
        # A block that later blocks continue works outside its own tmp_path: pytest removes a passed
        # test's tmp_path when it ends (tmp_path_retention_policy = "failed").
        root = request.getfixturevalue("tmp_path_factory").mktemp("chain") / "work" if d.id else tmp_path / "work"
        root.mkdir()
        (root / "tmp").mkdir()
        for name in LINKED:
            if (ROOT / name).exists():
                (root / name).symlink_to(ROOT / name)
    if d.setup:
        extra = extra | SETUPS[d.setup](root, request)
    run_block(block, d, root, _env(extra))
    if d.id:
        directories[(block.doc, d.id)] = (root, extra)


def example_counts() -> dict[str, int]:
    """How many blocks run, are checked otherwise, or are skipped (printed by tests/docs/conftest.py)."""
    counts = {k: 0 for k in ("run", "file", "synopsis", "imports", "names", "outline", "signature", "same",
                             "covered", "skip", "unclassified")}
    for block in ALL:
        try:
            counts[parse(block).kind] += 1
        except ValueError:
            counts["unclassified"] += 1
    return counts
