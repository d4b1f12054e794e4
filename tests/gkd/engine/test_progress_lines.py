"""Progress without a bar (logs, CI): a line every ``logging.every_steps`` steps and at the
stage's end; ``every_steps: 0`` switches the lines off."""

from __future__ import annotations

import pytest

from gkd.config.schema import run_schema, schema_issues
from gkd.engine.progress import StageProgress, progress_bar_wanted


def lines(every: int, total: int = 5, start: int = 0) -> list[str]:
    out: list[str] = []
    shown = StageProgress(total=total, start=start, desc="[1/2] kd", bar=False, every=every, echo=out.append)
    for step in range(start + 1, total + 1):
        shown.update(step, loss=0.5, lr=1e-4)
    shown.close()
    return out


def test_line_mode_prints_every_n_steps_and_the_last():
    assert lines(2) == [f"[1/2] kd step {s}/5 loss 0.5000 lr 1.00e-04" for s in (2, 4, 5)]
    assert [line.split()[3] for line in lines(2, start=3)] == ["4/5", "5/5"]


def test_every_steps_zero_switches_lines_off():
    assert lines(0) == []
    issues = schema_issues(run_schema(), {"logging": {"every_steps": 0}})
    assert not [i for i in issues if i.path.startswith("logging")]
    assert [i for i in schema_issues(run_schema(), {"logging": {"every_steps": -1}}) if i.path.startswith("logging")]


@pytest.mark.parametrize(("setting", "configured", "tty", "bar"), [
    (None, True, True, True), (None, True, False, False), (None, False, True, False),
    (True, False, False, True), (False, True, True, False)])
def test_bar_only_on_a_terminal_unless_forced(monkeypatch, setting, configured, tty, bar):
    monkeypatch.setattr("sys.stderr.isatty", lambda: tty)
    assert progress_bar_wanted(setting, configured) is bar
