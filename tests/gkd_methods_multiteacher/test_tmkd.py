from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gkd.methods import ModelView
from gkd.testing import build_method, check_conformance, outputs, shape, step

PACKAGE = Path(__file__).resolve().parents[2] / "gkd-methods-multiteacher"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_tmkd_averages_teachers(reduction):
    g = torch.Generator().manual_seed(0)
    z, t1, t2 = (torch.randn(4, 3, generator=g) for _ in range(3))
    m = build_method("tmkd", {"reduction": reduction, "hard_weight": 0.5}, teachers={"a": shape(), "b": shape()})
    plan = m.plan(step(), {}, 0, None)
    assert set(plan.models) == {"student", "teacher:a", "teacher:b"}
    terms = m.loss(step(), {}, 0, outputs({"attention_mask": torch.ones(4, 1)}, ModelView({}, z, torch.tensor(2.0)),
                                          {"a": ModelView({}, t1), "b": ModelView({}, t2)}))
    per = torch.stack([((z - t1) ** 2).mean(), ((z - t2) ** 2).mean()])
    expected = per.mean() if reduction == "mean" else per.sum()
    assert terms["soft"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["hard"].item() == pytest.approx(1.0)


def test_tmkd_check_names_the_teacher_without_head():
    from gkd.methods import GkdError

    with pytest.raises(GkdError, match="tmkd: teacher 'b' has no task head"):
        build_method("tmkd", teachers={"a": shape(), "b": shape(head="none")})


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_tmkd_conformance_with_two_teachers_of_different_depth(family):
    report = check_conformance("tmkd", {"soft_loss": "kl", "temperature": 2.0}, family=family,
                               teachers={"deep": 4, "shallow": 3})
    assert set(report.plans[0][0]) == {"student", "teacher:deep", "teacher:shallow"}


def test_tmkd_imports_and_registers_without_the_builtin_methods():
    code = textwrap.dedent("""
        import sys
        sys.modules["gkd_methods_builtin"] = None  # importing it now raises ImportError
        import gkd_methods_multiteacher.tmkd as tmkd
        from gkd.plugins import GkdPluginManager, Origin
        manager = GkdPluginManager()
        assert manager.add_plugin(tmkd, Origin("tmkd", "gkd-methods-multiteacher", "0")), manager.registry.broken
        assert manager.registry.names() == ["tmkd"]
        assert not any(m.startswith("gkd_methods_builtin") for m in sys.modules if sys.modules[m] is not None)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_no_file_of_the_multiteacher_distribution_mentions_the_builtin_one():
    files = [p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts
             and not any(part.endswith(".egg-info") for part in p.parts)]
    assert any(p.name == "pyproject.toml" for p in files)
    offending = [str(p.relative_to(PACKAGE)) for p in files
                 if "gkd_methods_builtin" in p.read_text(encoding="utf-8", errors="replace")
                 or "gkd-methods-builtin" in p.read_text(encoding="utf-8", errors="replace")]
    assert offending == []
