"""The run's assets: teachers frozen, in their dtype, loaded once per directory; one student path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from gkd.config import load_run_config
from gkd.engine.assets import RunAssets
from gkd.errors import GkdError
from gkd.models import ModelConfig, build_model, export_hf
from gkd.parallel.placement import Placement
from gkd.plugins import load_plugin_manager


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, minilm_dir):
    root = tmp_path_factory.mktemp("assets")
    cfg = ModelConfig(family="encoder", vocab_size=30522, hidden_size=32, num_layers=4, num_attention_heads=4,
                      ffn_hidden_size=64, max_position_embeddings=64, head="classification", num_labels=2)
    export_hf(build_model(cfg, seed=3), root / "teacher", tokenizer_dir=minilm_dir)
    rows = [{"text": f"text number {i}", "label": "ab"[i % 2]} for i in range(8)]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = {
        "run_dir": str(root / "run"), "task": {"type": "sequence_classification", "max_length": 16},
        "data": {"train": {"path": "train.jsonl"}},
        "teachers": [{"name": "t", "path": "teacher", "dtype": "bf16"}],
        "student": {"init": {"strategy": "truncate", "teacher": "t", "layers": [0, 3]},
                    "architecture": {"ffn_hidden_size": 48}},
        "stages": [{"name": "kd", "steps": 1, "methods": [{"name": "kd"}]}],
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return load_run_config(root / "run.yaml", registry=load_plugin_manager().registry)


def test_teacher_is_frozen_in_its_dtype_and_loaded_once(run_config):
    assets = RunAssets(run_config, Placement(torch.device("cpu")))
    teacher = assets.teacher("t")
    assert assets.teacher("t") is teacher
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert not hasattr(teacher, "_gkd_path")  # bookkeeping lives in the assets, not on the model
    assert assets.teacher_shape("t").num_labels == 2
    source = assets.teachers["t"].path
    assets.set_teacher_path("t", Path(str(source)))  # the same directory: the loaded model is kept
    assert assets.teacher("t") is teacher
    copy = shutil.copytree(source, source.parent / "teacher-copy", dirs_exist_ok=True)
    assets.set_teacher_path("t", copy)  # e.g. fine-tuned: the next use loads the new directory
    again = assets.teacher("t")
    assert again is not teacher and {p.dtype for p in again.parameters()} == {torch.bfloat16}


def test_student_from_the_one_init_path(run_config):
    assets = RunAssets(run_config, Placement(torch.device("cpu")))
    student = assets.build_student(run_config.student.init)
    assert student.model_config.num_layers == 2 and student.model_config.ffn_hidden_size == 48
    assert student.model_config.num_labels == 2 and assets.labels is not None and assets.labels.labels == ["a", "b"]
    assert all(p.dtype == torch.float32 and p.requires_grad for p in student.parameters())


def test_fp16_needs_cuda():
    with pytest.raises(GkdError, match=r"teachers\[t\].dtype: 'fp16' needs CUDA"):
        Placement(torch.device("cpu")).dtype("fp16", "teachers[t].dtype")
    assert Placement(torch.device("cpu")).dtype("bf16", "x") is torch.bfloat16
