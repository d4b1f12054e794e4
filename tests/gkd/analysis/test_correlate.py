"""Correlations and run comparison of gkd.analysis against scipy.stats on fixed series."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from gkd.analysis.correlate import ALL, Movement, compare, correlate, correlate_scopes, scopes, targets
from gkd.analysis.records import DistanceKey, csv_text

LOSS = [None, 2.0, 1.5, 1.1, 0.9, None, 0.8, 0.75, 0.7]
ACCURACY = [0.30, 0.42, 0.55, 0.61, 0.66, 0.66, 0.70, 0.74, 0.73]
HIDDEN = [0.90, 0.70, 0.52, 0.40, 0.33, 0.33, 0.30, 0.26, 0.27]
PROBS = [0.10, 0.30, 0.20, 0.50, 0.40, 0.40, 0.10, 0.60, 0.20]


def points() -> list[dict]:
    out = []
    for k in range(9):
        stage = "tinybert" if k < 5 else "kd"
        out.append({"stage": stage, "stage_index": 0 if k < 5 else 1, "step": k % 5, "global_step": k,
                    "at": "start" if k in (0, 5) else "step", "loss": LOSS[k],
                    "terms": None if LOSS[k] is None else {f"{stage}.a": LOSS[k] / 2},
                    "metric": {"name": "accuracy", "value": ACCURACY[k]},
                    "distances": {"t:L1:hidden.mse": HIDDEN[k], "t:L2:probs.kl": PROBS[k], "t:out:logits.kl_T1": 0.5}})
    return out


def test_correlations_equal_scipy():
    found = {(str(c.distance), c.target): c for c in correlate(points())}
    for name, xs in (("t:L1:hidden.mse", HIDDEN), ("t:L2:probs.kl", PROBS)):
        c = found[(name, "accuracy")]
        assert c.n == 9 and c.scope == ALL
        assert c.spearman == pytest.approx(stats.spearmanr(xs, ACCURACY).statistic, abs=1e-12)
        assert c.spearman_p == pytest.approx(stats.spearmanr(xs, ACCURACY).pvalue, rel=1e-9)
        assert c.pearson == pytest.approx(stats.pearsonr(xs, ACCURACY).statistic, abs=1e-12)
        assert c.pearson_p == pytest.approx(stats.pearsonr(xs, ACCURACY).pvalue, rel=1e-9)
        # the stage starts have no training loss: those points are left out of the loss's correlation
        with_loss = [(x, y) for x, y in zip(xs, LOSS, strict=True) if y is not None]
        lx, ly = zip(*with_loss, strict=True)
        c = found[(name, "loss")]
        assert c.n == 7
        assert c.spearman == pytest.approx(stats.spearmanr(lx, ly).statistic, abs=1e-12)
        assert c.pearson == pytest.approx(stats.pearsonr(lx, ly).statistic, abs=1e-12)
    # a distance that never moved has no correlation (NaN), and sorts as the weakest
    constant = found[("t:out:logits.kl_T1", "accuracy")]
    assert math.isnan(constant.spearman) and constant.strength == 0.0


def test_scopes_and_targets():
    pts = points()
    assert list(scopes(pts)) == [ALL, "tinybert", "kd"] and len(scopes(pts)["kd"]) == 4
    assert targets(pts) == ["loss", "accuracy", "term:tinybert.a", "term:kd.a"]
    by_scope = {c.scope for c in correlate_scopes(pts)}
    assert by_scope == {ALL, "tinybert", "kd"}
    kd = [c for c in correlate_scopes(pts) if c.scope == "kd" and c.target == "accuracy"
          and str(c.distance) == "t:L1:hidden.mse"]
    assert kd[0].n == 4 and kd[0].spearman == pytest.approx(stats.spearmanr(HIDDEN[5:], ACCURACY[5:]).statistic)
    # the kd stage has 3 points with a loss, tinybert 4: both are enough (3)
    assert {(c.scope, c.n) for c in correlate_scopes(pts) if c.target == "loss"} == {(ALL, 7), ("tinybert", 4),
                                                                                    ("kd", 3)}


def test_compare_ranks_the_largest_difference_in_movement_first():
    a = points()
    b = [dict(p, distances={"u:L1:hidden.mse": 0.9, "u:L2:probs.kl": PROBS[k], "u:out:logits.kl_T1": 0.5 - 0.05 * k})
         for k, p in enumerate(points())]
    moved = {m.distance: m for m in compare(a, b)}  # one teacher each: matched without the teacher's name
    assert list(moved) == ["out:logits.kl_T1", "L1:hidden.mse", "L2:probs.kl"]
    hidden = moved["L1:hidden.mse"]
    assert (hidden.a_start, hidden.a_end, hidden.b_start, hidden.b_end) == (0.90, 0.27, 0.9, 0.9)
    assert hidden.a_change == pytest.approx((0.27 - 0.90) / 0.90) and hidden.b_change == 0.0
    assert moved["L2:probs.kl"].difference == 0.0
    assert Movement.change(0.0, 0.4) == 1.0 and math.isnan(Movement.change(0.0, 0.0))


def test_distance_keys_and_csv():
    key = DistanceKey.parse("minilm:L3:logits.kl_T5")
    assert (key.teacher, key.layer, key.feature) == ("minilm", "L3", "logits.kl_T5") and str(key) == "minilm:L3:logits.kl_T5"
    assert sorted([DistanceKey("t", "out", "x"), DistanceKey("t", "L2", "x"), DistanceKey("t", "emb", "x"),
                   DistanceKey("t", "L10", "x")], key=lambda k: k.layer_order)[1:3] == [
        DistanceKey("t", "L2", "x"), DistanceKey("t", "L10", "x")]
    lines = csv_text(points()).splitlines()
    assert lines[0] == ("stage,stage_index,step,global_step,at,loss,metric,metric_value,term:tinybert.a,term:kd.a,"
                        "t:L1:hidden.mse,t:L2:probs.kl,t:out:logits.kl_T1")
    assert lines[1] == "tinybert,0,0,0,start,,accuracy,0.3,,,0.9,0.1,0.5"
