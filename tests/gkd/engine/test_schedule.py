"""Learning-rate schedules: values at warm-up end, middle and end; state round trip."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from gkd.config.run import ScheduleConfig
from gkd.engine.schedule import LRMultiplier, build_scheduler, warmup_steps_for


def lrs(schedule: dict, total: int, peak: float = 2.0) -> list[float]:
    """The LR used by each of ``total`` optimizer steps."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = build_scheduler(opt, ScheduleConfig(**schedule), total)
    out = []
    for _ in range(total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(("kind", "quarter"), [("linear", 0.75), ("cosine", 0.5 * (1 + math.cos(math.pi / 4)))])
def test_decaying_schedules(kind: str, quarter: float) -> None:
    # 10 warm-up steps, then 100 decay steps to a floor of 10% of the peak.
    got = lrs({"type": kind, "warmup_steps": 10, "min_lr_ratio": 0.1}, 110)
    assert got[0] == pytest.approx(2.0 / 10)  # the first step already trains
    assert got[9] == pytest.approx(2.0)  # the last warm-up step reaches the peak
    assert got[10] == pytest.approx(2.0)  # decay starts from the peak
    assert got[35] == pytest.approx(2.0 * (0.1 + 0.9 * quarter))  # a quarter in: linear and cosine differ
    assert got[60] == pytest.approx(2.0 * 0.55)  # halfway: midway between peak and floor for both
    assert got[110] == pytest.approx(0.2)  # the floor at the end
    assert all(a >= b for a, b in itertools.pairwise(got[10:]))


def test_constant_and_warmup_steps_override() -> None:
    got = lrs({"type": "constant", "warmup_ratio": 0.5, "warmup_steps": 4}, 20, peak=1.0)
    assert got[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert got[-1] == 1.0
    assert warmup_steps_for(ScheduleConfig(warmup_ratio=0.05), 30) == 2  # rounded up: a short run still warms up
    assert warmup_steps_for(ScheduleConfig(), 100) == 10  # schema default ratio 0.1
    assert lrs({"type": "linear", "warmup_ratio": 0.0}, 4, peak=1.0) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_invalid_schedule_and_json_state() -> None:
    with pytest.raises(ValueError, match="unknown schedule type"):
        LRMultiplier("step", 0, 10, 0.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, ScheduleConfig(type="cosine", warmup_steps=2), 10)
    for _ in range(3):
        opt.step()
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))  # plain JSON, no pickled lambdas
    assert state["lr_lambdas"] == [{"kind": "cosine", "warmup_steps": 2, "total_steps": 10, "min_lr_ratio": 0.0}]
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_scheduler(opt2, ScheduleConfig(type="cosine", warmup_steps=2), 10)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
