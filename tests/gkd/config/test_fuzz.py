"""Property-based fuzzing of run configs: malformed files, values and ``--set`` expressions.

Every generated config is invalid by construction (one fault injected into a config that is
checked to be valid), and for every one both ``gkd validate`` and ``gkd distill`` must exit 2
with no traceback, print ``Error: FILE: N error(s)`` and then N lines that each start with the
file, and print the same lines. The line naming the injected fault's JSON path must be among them
(file-level faults — syntax, encoding, empty — name the file and, where there is one, the line).

The CLI runs in-process (click's CliRunner); a few cases run the real ``gkd`` script to prove no
traceback reaches standard error. ``gkd distill``'s trainer is replaced by one that fails the
test, so an accidentally valid config would never train. Examples are derandomized: CI sees the
same configs on every run.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gkd.cli import cli
from gkd.config import load_run_config, run_schema
from gkd.plugins.manager import get_plugin_manager

EXAMPLES = 20
"""Examples per fault family; 11 families give 220 configs a run."""

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

BASE: dict[str, Any] = {
    "name": "fuzz",
    "run_dir": "runs/fuzz",
    "seed": 7,
    "task": {"type": "sequence_classification", "num_labels": 2, "max_length": 32},
    "data": {"train": {"path": "train.jsonl", "format": "jsonl", "limit": 10}, "eval": {"path": "train.jsonl"}},
    "teachers": [{"name": "big", "path": "teacher", "dtype": "fp32"}],
    "student": {"init": {"strategy": "truncate", "teacher": "big", "num_layers": 2},
                "architecture": {"hidden_size": 64}},
    "stages": [{"name": "kd", "steps": 5, "teachers": ["big"],
                "methods": [{"name": "kd", "weight": 1.0, "config": {"temperature": 2.0, "soft_loss": "kl"}}],
                "optimizer": {"lr": 1e-4}, "training": {"batch_size": 4}}],
    "optimizer": {"lr": 5e-5, "weight_decay": 0.01, "eps": 1e-8, "betas": [0.9, 0.999]},
    "schedule": {"type": "linear", "warmup_ratio": 0.1, "min_lr_ratio": 0.0},
    "training": {"batch_size": 8, "eval_batch_size": 16, "grad_accum": 1, "max_grad_norm": 1.0,
                 "eval_every_steps": 0, "precision": "fp32"},
    "parallel": {"tensor_parallel": 1, "timeout_s": 600},
    "checkpoint": {"every_steps": 0, "keep_last": 2},
    "logging": {"every_steps": 10},
    "analysis": {"every": 0, "probe_examples": 8, "batch_size": 4},
}
"""A valid config touching every section (checked by :func:`test_the_base_config_is_valid`)."""

INTS: dict[str, tuple[int, int | None]] = {
    "seed": (0, 2**32 - 1), "task.num_labels": (2, 10**6), "task.max_length": (8, 32768),
    "data.train.limit": (1, 10**12), "student.init.num_layers": (1, 1024),
    "student.architecture.hidden_size": (8, 2**20), "stages[0].steps": (1, 10**9),
    "stages[0].training.batch_size": (1, 2**20), "training.batch_size": (1, 2**20),
    "training.eval_batch_size": (1, 2**20), "training.grad_accum": (1, 2**20),
    "training.eval_every_steps": (0, 10**9), "parallel.tensor_parallel": (1, 4096),
    "checkpoint.every_steps": (0, 10**9), "checkpoint.keep_last": (1, 10**6), "logging.every_steps": (0, 10**9),
    "analysis.every": (0, 10**9), "analysis.probe_examples": (1, 10**9), "analysis.batch_size": (1, 2**20),
}
"""Integer fields of :data:`BASE` -> (minimum, maximum) of the schema."""

NUMBERS: dict[str, tuple[float, float | None, bool]] = {
    "optimizer.lr": (0, None, True), "optimizer.weight_decay": (0, None, False), "optimizer.eps": (0, None, True),
    "schedule.warmup_ratio": (0, 1, False), "schedule.min_lr_ratio": (0, 1, False),
    "training.max_grad_norm": (0, None, False), "parallel.timeout_s": (0, 2592000, True),
    "stages[0].optimizer.lr": (0, None, True), "stages[0].methods[0].weight": (0, None, False),
    "stages[0].methods[0].config.temperature": (0, None, True),
}
"""Number fields -> (minimum, maximum, whether the minimum is exclusive)."""

STRINGS = ("name", "run_dir", "data.train.path", "data.train.text_field", "teachers[0].name", "teachers[0].path",
           "stages[0].name", "stages[0].methods[0].name", "student.init.teacher")
ENUMS = {"task.type", "schedule.type", "teachers[0].dtype", "data.train.format", "training.precision",
         "stages[0].methods[0].config.soft_loss", "student.init.strategy"}
OBJECTS = ("", "task", "data", "data.train", "data.eval", "teachers[0]", "student", "student.init",
           "student.architecture", "stages[0]", "stages[0].methods[0]", "stages[0].methods[0].config",
           "stages[0].optimizer", "stages[0].training", "optimizer", "schedule", "training", "parallel",
           "checkpoint", "logging", "analysis")
REQUIRED = ("task", "data", "student", "stages", "task.type", "data.train", "data.train.path", "teachers[0].name",
            "teachers[0].path", "student.init", "student.init.strategy", "stages[0].name",
            "stages[0].methods[0].name")
NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=10)


def _all_property_names(node: Any) -> set[str]:
    names: set[str] = set()
    if isinstance(node, dict):
        names |= set(node.get("properties", {}))
        for value in node.values():
            names |= _all_property_names(value)
    elif isinstance(node, list):
        for value in node:
            names |= _all_property_names(value)
    return names


KNOWN_KEYS = _all_property_names(run_schema()) | {"temperature", "soft_loss", "soft_weight", "hard_weight"}


# --------------------------------------------------------------------------- one fault


@dataclass
class Case:
    """One invalid config: the file's bytes, its ``--set`` arguments and the field the fault is at."""

    family: str
    text: bytes
    suffix: str = ".yaml"
    overrides: tuple[str, ...] = ()
    path: str | None = ""
    """JSON path of the fault ('' : a file-level fault; '--set' : a malformed --set)."""
    needs: tuple[str, ...] = field(default_factory=tuple)
    """Words the fault's line must hold (file-level faults: e.g. 'line ')."""


def _parts(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for piece in path.replace("]", "").split("."):
        name, *indices = piece.split("[")
        parts.append(name)
        parts.extend(int(i) for i in indices)
    return [p for p in parts if p != ""]


def _get(cfg: Any, path: str) -> Any:
    for part in _parts(path):
        cfg = cfg[part]
    return cfg


def _set(cfg: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    *head, last = _parts(path)
    node: Any = out
    for part in head:
        node = node[part]
    node[last] = value
    return out


def _delete(cfg: dict[str, Any], path: str) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    *head, last = _parts(path)
    node: Any = out
    for part in head:
        node = node[part]
    del node[last]
    return out


def _dump(cfg: Any, suffix: str) -> bytes:
    if suffix == ".json":
        return json.dumps(cfg, indent=1).encode()
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True).encode()


SUFFIX = st.sampled_from([".yaml", ".json"])


@st.composite
def wrong_types(draw: st.DrawFn) -> Case:
    path = draw(st.sampled_from([*INTS, *NUMBERS, *STRINGS, *ENUMS]))
    junk = st.one_of(st.lists(st.integers(0, 9), max_size=3), st.dictionaries(NAME, st.integers(0, 9), max_size=2),
                     st.booleans(), st.none())
    if path in INTS:
        value = draw(st.one_of(junk, NAME, st.floats(0.1, 100.0).filter(lambda x: not x.is_integer())))
    elif path in NUMBERS:
        value = draw(st.one_of(junk, NAME))
    elif path in ENUMS:
        value = draw(st.one_of(junk, st.integers(), NAME.filter(lambda s: s not in {"sequence_classification",
                                                                                  "linear", "fp32", "jsonl", "kl"})))
    else:
        value = draw(st.one_of(junk, st.integers(-5, 5), st.floats(-1, 1, allow_nan=False)))
    if path in ENUMS and isinstance(value, str):
        allowed = {"task.type": ("sequence_classification", "masked_lm", "causal_lm"),
                   "schedule.type": ("constant", "linear", "cosine"), "teachers[0].dtype": ("fp32", "bf16", "fp16"),
                   "data.train.format": ("auto", "jsonl", "csv", "text", "orange-tab"),
                   "training.precision": ("fp32", "bf16", "fp16"), "stages[0].methods[0].config.soft_loss":
                   ("kl", "ce", "mse"), "student.init.strategy": ("pretrained", "truncate", "random", "run")}[path]
        value = value if value not in allowed else value + "x"
    suffix = draw(SUFFIX)
    return Case("wrong type", _dump(_set(BASE, path, value), suffix), suffix, path=path)


@st.composite
def unknown_keys(draw: st.DrawFn) -> Case:
    where = draw(st.sampled_from(OBJECTS))
    key = draw(NAME.filter(lambda k: k not in KNOWN_KEYS))
    node = _get(BASE, where) if where else BASE
    cfg = _set(BASE, f"{where}.{key}" if where else key, draw(st.integers(0, 3))) if node is not None else BASE
    suffix = draw(SUFFIX)
    return Case("unknown key", _dump(cfg, suffix), suffix, path=f"{where}.{key}" if where else key)


@st.composite
def out_of_range(draw: st.DrawFn) -> Case:
    path = draw(st.sampled_from([*INTS, *NUMBERS]))
    if path in INTS:
        low, high = INTS[path]
        options = [st.integers(low - 1000, low - 1)] + ([st.integers(high + 1, high + 10**6)] if high else [])
        value: Any = draw(st.one_of(*options))
    else:
        low_f, high_f, exclusive = NUMBERS[path]
        below = st.floats(-1e6, low_f, exclude_max=not exclusive)
        options = [below] + ([st.floats(high_f, 1e12, exclude_min=True)] if high_f is not None else [])
        value = draw(st.one_of(*options))
    suffix = draw(SUFFIX)
    return Case("out of range", _dump(_set(BASE, path, value), suffix), suffix, path=path)


@st.composite
def non_finite(draw: st.DrawFn) -> Case:
    path = draw(st.sampled_from([*INTS, *NUMBERS]))
    value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    suffix = draw(SUFFIX)
    if suffix == ".yaml" and draw(st.booleans()):  # as a user types it: 1e999 reads as inf
        text = _dump(_set(BASE, path, 12345.5), suffix).replace(b"12345.5", b"1e999" if value > 0 else b"-1e999") \
            if not math.isnan(value) else _dump(_set(BASE, path, value), suffix)
        return Case("NaN/inf", text, suffix, path=path)
    return Case("NaN/inf", _dump(_set(BASE, path, value), suffix), suffix, path=path)


@st.composite
def huge_integers(draw: st.DrawFn) -> Case:
    path = draw(st.sampled_from([*INTS, *NUMBERS]))
    value = draw(st.one_of(st.integers(2**53 + 1, 10**40), st.integers(-(10**40), -(2**53) - 1)))
    if path in INTS and INTS[path][1] is not None:
        value = draw(st.one_of(st.just(value), st.integers(INTS[path][1] + 1, 2**53)))
    suffix = draw(SUFFIX)
    return Case("huge integer", _dump(_set(BASE, path, value), suffix), suffix, path=path)


@st.composite
def missing_sections(draw: st.DrawFn) -> Case:
    path = draw(st.sampled_from([*REQUIRED, "stages[0].steps", "stages"]))
    suffix = draw(SUFFIX)
    if path == "stages" and draw(st.booleans()):
        return Case("missing section", _dump(_set(BASE, "stages", []), suffix), suffix, path="stages")
    expected = "stages[0]" if path == "stages[0].steps" else path  # neither steps nor epochs: the stage is named
    return Case("missing section", _dump(_delete(BASE, path), suffix), suffix, path=expected)


def _references() -> list[tuple[str, Callable[[str], dict[str, Any]]]]:
    dup_teacher = [*BASE["teachers"], {"name": "big", "path": "teacher"}]
    dup_stage = [*BASE["stages"], {**BASE["stages"][0]}]
    return [
        ("stages[0].teachers[0]", lambda n: _set(BASE, "stages[0].teachers", [n])),
        ("student.init.teacher", lambda n: _set(BASE, "student.init.teacher", n)),
        ("stages[0].methods[0].name", lambda n: _set(BASE, "stages[0].methods[0].name", n)),
        ("stages[0].train", lambda n: _set(BASE, "stages[0].train", f"teacher:{n}")),
        ("stages[0].publish_as_teacher", lambda n: _set(BASE, "stages[0].publish_as_teacher", "big")),
        ("teachers[1].name", lambda n: _set(BASE, "teachers", dup_teacher)),
        ("stages[1].name", lambda n: _set(BASE, "stages", dup_stage)),
        ("teachers[0].path", lambda n: _set(BASE, "teachers[0].path", f"missing-{n}")),
        ("teachers[0].path", lambda n: _set(BASE, "teachers[0].path", "teacher-without-weights")),
        ("data.train.path", lambda n: _set(BASE, "data.train.path", f"missing-{n}.jsonl")),
        ("data.train.path", lambda n: _set(BASE, "data.train.path", "pkg:no_such_package_gkd/x.jsonl")),
    ]


@st.composite
def bad_references(draw: st.DrawFn) -> Case:
    path, make = draw(st.sampled_from(_references()))
    name = draw(NAME.filter(lambda n: n not in {"big", "kd", "tmkd", "tinybert"} and n not in get_plugin_manager()
                            .registry.names()))
    suffix = draw(SUFFIX)
    return Case("bad reference", _dump(make(name), suffix), suffix, path=path)


@st.composite
def bad_set_expressions(draw: st.DrawFn) -> Case:
    kind = draw(st.sampled_from(["syntax", "structure", "value", "unreadable"]))
    text = _dump(BASE, ".yaml")
    if kind == "syntax":
        key = draw(st.one_of(
            NAME.map(lambda k: k.replace("=", "")),  # no '='
            st.builds(lambda k: f"{k}..x=1", NAME), st.builds(lambda k: f"1{k}=2", NAME), st.just("=3"),
            st.builds(lambda k: f"{k}[x]=1", NAME), st.builds(lambda k: f"{k}[=1", NAME),
            st.builds(lambda k: f"{k} y=1", NAME), st.builds(lambda k: f"{k}[{'9' * 12}]=1", NAME)))
        return Case("--set", text, overrides=(key,), path="--set")
    if kind == "structure":
        path, expr = draw(st.sampled_from([("task[0]", "task[0]=1"), ("stages[5]", "stages[5].steps=1"),
                                           ("seed.x", "seed.x=1"), ("teachers[0].name.y", "teachers[0].name.y=2"),
                                           ("stages.name", "stages.name=x")]))
        return Case("--set", text, overrides=(expr,), path=path)
    if kind == "value":
        path = draw(st.sampled_from([*INTS, *NUMBERS]))
        value = draw(st.sampled_from([".nan", ".inf", "-.inf", "1e999", "not-a-number", "[1, 2]", "{a: 1}",
                                      str(10**30)]))
        return Case("--set", text, overrides=(f"{path}={value}",), path=path)
    size = draw(st.integers(4400, 5000))
    depth = size // 6
    value = draw(st.sampled_from(["9" * size, "[" * depth + "]" * depth, "{a: 1, a: 2}"]))
    if value.startswith("["):  # refused by the YAML reader (too deep) or by the value checks (deeper than 32)
        return Case("--set", text, overrides=(f"seed={value}",), path=None, needs=("nested",))
    return Case("--set", text, overrides=(f"seed={value}",), path="--set")


YAML_BREAKERS = ('"unterminated string', "a: b: c", "\tkey: tab-indented", "@reserved: x", "`backtick: x",
                 "key: 'unterminated")


@st.composite
def syntax_errors(draw: st.DrawFn) -> Case:
    if draw(st.booleans()):
        text = _dump(BASE, ".json")
        if draw(st.booleans()):
            cut = draw(st.integers(1, len(text) - 1))
            return Case("syntax", text[:cut], ".json", needs=("invalid JSON at line",))
        lines = text.splitlines(keepends=True)
        at = draw(st.integers(1, len(lines) - 1))
        junk = draw(st.sampled_from([b",\n", b"'single': 1,\n", b"// comment\n", b"{\n", b"]\n", b"NaNa\n"]))
        return Case("syntax", b"".join([*lines[:at], junk, *lines[at:]]), ".json", needs=("invalid JSON at line",))
    lines = _dump(BASE, ".yaml").splitlines(keepends=True)
    at = draw(st.integers(0, len(lines)))
    junk = draw(st.sampled_from(YAML_BREAKERS)).encode() + b"\n"
    return Case("syntax", b"".join([*lines[:at], junk, *lines[at:]]), needs=("invalid YAML at line",))


@st.composite
def bad_files(draw: st.DrawFn) -> Case:
    kind = draw(st.sampled_from(["empty", "blank", "comments", "binary", "utf16", "utf16-nobom", "latin1",
                                 "control", "scalar", "list"]))
    suffix = draw(SUFFIX)
    valid = _dump(BASE, suffix)
    if kind == "empty":
        return Case("empty/binary", b"", suffix, needs=("empty",))
    if kind == "blank":
        return Case("empty/binary", draw(st.sampled_from([b" ", b"\n\n", b"\t\n  \n"])), suffix, needs=("empty",))
    if kind == "comments":
        return Case("empty/binary", b"# only a comment\n", ".yaml", needs=("top level is empty",))
    if kind == "binary":
        blob = draw(st.binary(min_size=0, max_size=200))
        at = draw(st.integers(0, len(blob)))
        return Case("empty/binary", blob[:at] + b"\0" + blob[at:], suffix, needs=("not a text file",))
    if kind == "utf16":
        return Case("empty/binary", valid.decode().encode(draw(st.sampled_from(["utf-16", "utf-32"]))), suffix,
                    needs=("UTF-16",))
    if kind == "utf16-nobom":
        return Case("empty/binary", valid.decode().encode("utf-16-le"), suffix, needs=("NUL byte",))
    if kind == "latin1":
        at = draw(st.integers(0, len(valid)))
        return Case("empty/binary", valid[:at] + draw(st.sampled_from([b"\xff", b"\xe9t\xe9", b"\xc3("])) + valid[at:],
                    suffix, needs=("not UTF-8",))
    if kind == "control":
        at = draw(st.integers(0, len(valid)))
        char = draw(st.sampled_from([b"\x07", b"\x1b", b"\x08"]))
        return Case("empty/binary", valid[:at] + char + valid[at:], suffix, needs=("line",))
    if kind == "scalar":
        return Case("empty/binary", draw(st.sampled_from([b"42\n", b"just text\n", b"null\n", b"true\n"])), ".yaml",
                    needs=("top level",))
    return Case("empty/binary", b"- a\n- b\n" if suffix == ".yaml" else b"[1, 2]", suffix,
                needs=("top level must be a mapping",))


@st.composite
def yaml_structure(draw: st.DrawFn) -> Case:
    kind = draw(st.sampled_from(["duplicate", "nested-duplicate", "alias-cycle", "deep", "huge-literal",
                                 "non-string-key"]))
    valid = _dump(BASE, ".yaml")
    if kind == "duplicate":
        key = draw(st.sampled_from(["seed", "name", "run_dir"]))
        return Case("YAML structure", valid + f"{key}: {draw(st.integers(0, 9))}\n".encode(), path=key,
                    needs=("given twice",))
    if kind == "nested-duplicate":
        return Case("YAML structure", valid.replace(b"  max_length: 32\n", b"  max_length: 32\n  max_length: 64\n"),
                    path="task.max_length", needs=("given twice",))
    if kind == "alias-cycle":
        return Case("YAML structure", valid.replace(b"checkpoint:\n", b"checkpoint: &loop\n  again: *loop\n"
                                                    b"checkpoint_old:\n"), path="checkpoint.again")
    if kind == "deep":
        depth = draw(st.integers(40, 3000))
        # Refused by the value checks (deeper than 32) or, deeper still, by the YAML reader itself.
        return Case("YAML structure", valid + b"deep: " + b"[" * depth + b"]" * depth + b"\n", path=None,
                    needs=("nested",))
    if kind == "huge-literal":
        digits = draw(st.integers(4400, 20000))
        return Case("YAML structure", valid.replace(b"seed: 7", b"seed: " + b"9" * digits), needs=("integer longer",))
    return Case("YAML structure", valid.replace(b"checkpoint:\n", b"checkpoint:\n  3: x\n"),
                path="checkpoint.3", needs=("keys must be strings",))


# --------------------------------------------------------------------------- running them


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the teacher checkpoint and data file :data:`BASE` refers to."""
    root = tmp_path_factory.mktemp("fuzz")
    cfg = {"model_type": "bert", "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
           "intermediate_size": 128}
    for name, weights in (("teacher", True), ("teacher-without-weights", False)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(cfg))
        if weights:  # validation checks the weights exist; nothing here loads them
            (root / name / "model.safetensors").write_bytes(b"")
    (root / "train.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    return root


@pytest.fixture(scope="module")
def tally() -> Iterator[Counter[str]]:
    """Configs tried per fault family (printed at the end: the figures of docs/reliability.md)."""
    counts: Counter[str] = Counter()
    yield counts
    total = sum(counts.values())
    print(f"\nconfig fuzz: {total} malformed configs, each refused by validate and distill with exit 2: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


@pytest.fixture(scope="module")
def crashes() -> Iterator[list[BaseException]]:
    """``gkd distill``'s trainer fails the test (only a config error may stop distill here), and
    every exception of the cross-field checks is recorded: check_config hides one when the schema
    has already refused the config, but none may happen at all."""
    import gkd.engine.trainer as trainer
    from gkd.config.validate import _Checker

    class MustNotTrain:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise AssertionError("gkd distill accepted a fuzzed config and started training")

    seen: list[BaseException] = []
    checker_run = _Checker.run

    def recorded(self: _Checker) -> None:
        try:
            checker_run(self)
        except Exception as exc:
            seen.append(exc)
            raise

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "Trainer", MustNotTrain)
        mp.setattr(_Checker, "run", recorded)
        yield seen


def check(case: Case, workspace: Path, tally: Counter[str], crashes: list[BaseException]) -> None:
    """Run validate and distill on ``case``; both refuse it the same way, one line per problem."""
    tally[case.family] += 1
    crashes.clear()
    config = workspace / f"case-{tally.total()}{case.suffix}"
    config.write_bytes(case.text)
    runner = CliRunner()
    results = {cmd: runner.invoke(cli, [cmd, str(config), *(a for o in case.overrides for a in ("--set", o))])
               for cmd in ("validate", "distill")}
    lines = {}
    for cmd, result in results.items():
        where = f"{cmd} {case.family} {case.overrides} {case.text[:300]!r}:\n{result.output}"
        if not isinstance(result.exception, (SystemExit, type(None))):
            where += "".join(traceback.format_exception(result.exception))
        assert result.exit_code == 2, where
        assert isinstance(result.exception, SystemExit), (where, result.exception)
        assert "Traceback" not in result.output, where
        head, *rest = result.stderr.splitlines()
        count = int(head.removeprefix(f"Error: {config}: ").removesuffix(" error(s)"))
        assert count == len(rest) >= 1, where
        assert all(line.startswith(f"{config}: ") for line in rest), where
        if case.path:
            assert any(line.startswith(f"{config}: {case.path}: ") for line in rest), where
        if case.path == "":  # a file-level fault: the one line names the file (above) and says what is wrong
            assert len(rest) == 1, where
        for word in case.needs:
            assert any(word in line for line in rest), (word, where)
        lines[cmd] = rest
    assert lines["validate"] == lines["distill"]
    assert not crashes, "".join(traceback.format_exception(crashes[0]))


def test_the_base_config_is_valid(workspace):
    for suffix in (".yaml", ".json"):
        path = workspace / f"base{suffix}"
        path.write_bytes(_dump(BASE, suffix))
        run = load_run_config(path)
        assert run.stages[0].steps == 5 and run.stages[0].methods[0].config["temperature"] == 2.0


FAMILIES = {"wrong_types": wrong_types, "unknown_keys": unknown_keys, "out_of_range": out_of_range,
            "non_finite": non_finite, "huge_integers": huge_integers, "missing_sections": missing_sections,
            "bad_references": bad_references, "bad_set_expressions": bad_set_expressions,
            "syntax_errors": syntax_errors, "bad_files": bad_files, "yaml_structure": yaml_structure}


@pytest.mark.parametrize("family", FAMILIES)
def test_fuzzed_configs_are_refused_with_one_line_each(family, workspace, tally, crashes):
    @FUZZ
    @given(case=FAMILIES[family]())
    def run(case: Case) -> None:
        check(case, workspace, tally, crashes)

    run()


@pytest.mark.parametrize(("command", "content", "overrides", "expected"), [
    ("validate", b"\xff\xfes\x00e\x00e\x00d\x00", (), "UTF-16/UTF-32 text"),
    ("distill", None, ("optimizer.lr=.inf",), "optimizer.lr: inf is not a finite number"),
])
def test_no_traceback_reaches_stderr_of_the_real_script(command, content, overrides, expected, workspace):
    config = workspace / f"real-{command}-{len(overrides)}-{expected[:6]}.yaml".replace(" ", "_").replace("/", "_")
    config.write_bytes(content if content is not None else _dump(BASE, ".yaml"))
    gkd = Path(sys.executable).parent / "gkd"
    proc = subprocess.run([str(gkd), command, str(config), *(a for o in overrides for a in ("--set", o))],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and proc.stdout == ""
    assert any(line.startswith(f"{config}: ") and expected in line for line in proc.stderr.splitlines()), proc.stderr
