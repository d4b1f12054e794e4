"""Progress without a bar (logs, CI): a line every ``logging.every_steps`` steps and at the
stage's end; ``every_steps: 0`` switches the lines off."""

from __future__ import annotations

import re

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
    shown = lines(2)
    assert [line.split(" loss")[0] for line in shown] == [f"[1/2] kd step {s}/5 ({p}%)" for s, p in
                                                          ((2, 40), (4, 80), (5, 100))]
    pace = re.compile(r"^\[1/2\] kd step \d/5 \(\d+%\) loss 0\.5000 lr 1\.00e-04 [\d.e+]+ step/s, \d+:\d\d left$")
    assert all(pace.match(line) for line in shown), shown
    assert shown[-1].endswith(" 0:00 left")
    assert [line.split()[3] for line in lines(2, start=3)] == ["4/5", "5/5"]


def test_line_mode_pace_counts_only_steps_of_this_process(monkeypatch):
    clock = iter([100.0, 104.0])
    monkeypatch.setattr("gkd.engine.progress.time.monotonic", lambda: next(clock))
    out: list[str] = []
    shown = StageProgress(total=20, start=10, desc="[1/1] kd", bar=False, every=2, echo=out.append)
    shown.update(12, loss=0.5, lr=1e-4)  # 2 steps in 4 s after resuming at step 10: 0.5 step/s, 8 steps left
    assert out == ["[1/1] kd step 12/20 (60%) loss 0.5000 lr 1.00e-04 0.5 step/s, 0:16 left"]


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
