"""gkd export: Hugging Face and ONNX round trips (transformers and onnxruntime against gkd's own
model, on inputs other than the export's probe), the model card, --stage, int8, failed checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import transformers
from safetensors.torch import load_file

from gkd.deploy import parity as parity_module
from gkd.deploy.export import export_run
from gkd.deploy.parity import Bound
from gkd.deploy.source import find_student, load_student
from gkd.engine.checkpoint import find_latest
from gkd.engine.fingerprint import sha256_of_checkpoint
from gkd.errors import GkdError
from gkd.models import Tokenizer, hf_state_dict

FRESH = ["the yen rose against the dollar", "refinery output", "corn and wheat harvest grew strongly this year"]
"""Inputs the export's own check never saw."""


def fresh_batch(model_dir: Path, max_length: int) -> dict[str, torch.Tensor]:
    return Tokenizer.from_dir(model_dir, max_length).encode(FRESH)


def onnx_logits(path: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {k: batch[k].numpy() for k in ("input_ids", "attention_mask")})[0]
    return torch.from_numpy(np.asarray(out))


@torch.no_grad()
def gkd_logits(run_dir: Path, stage: str | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return load_student(find_student(run_dir, stage))(batch["input_ids"], batch["attention_mask"]).logits


def test_classifier_round_trips_through_transformers_and_onnxruntime(classifier_run, tmp_path):
    out = tmp_path / "cls"
    result = export_run(classifier_run.run_dir, out, fmt="onnx")
    assert [p.what for p in result.checks] == ["transformers (fp32)", "onnxruntime (fp32)"]
    assert all(p.ok and p.max_abs < 1e-4 for p in result.checks)
    batch = fresh_batch(out, 16)
    ref = gkd_logits(classifier_run.run_dir, None, batch)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    with torch.no_grad():
        got = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(onnx_logits(out / "model.onnx", batch), ref, atol=1e-4, rtol=1e-4)
    # Dynamic axes: one example of another length through the same graph.
    single = {k: v[1:2, :4] for k, v in batch.items()}
    torch.testing.assert_close(onnx_logits(out / "model.onnx", single), gkd_logits(classifier_run.run_dir, None, single),
                               atol=1e-4, rtol=1e-4)
    labels = json.loads((out / "labels.json").read_text())["labels"]
    config = json.loads((out / "config.json").read_text())
    assert labels == ["grain", "money", "oil"]
    assert config["id2label"] == {"0": "grain", "1": "money", "2": "oil"} and config["label2id"]["oil"] == 2
    meta = json.loads((out / "gkd-export.json").read_text())
    assert meta["stage"] == "kd" and meta["source"]["kind"] == "export" and meta["onnx"]["quantize"] == "none"


def test_model_card_names_teachers_with_sha256_methods_stages_and_versions(classifier_run, tmp_path):
    out = tmp_path / "card"
    export_run(classifier_run.run_dir, out)
    card = (out / "README.md").read_text()
    teacher = classifier_run.run_dir / "teachers" / "t"  # the fine-tuned teacher the student learned from
    assert sha256_of_checkpoint(teacher) in card
    assert sha256_of_checkpoint(classifier_run.teacher) in card  # and the checkpoint it was fine-tuned from
    assert "fine-tuned by stage `ft`" in card
    for stage in ("`ft`", "`tinybert`", "`kd` (this export)"):
        assert stage in card
    assert "kd (weight 1; temperature 2.0)" in card and "tinybert (weight 1" in card
    assert "| gkd-methods-builtin | " in card and "kd, tinybert" in card
    assert "| student | 2 | " in card and "`train.jsonl`" in card
    assert "pipeline_tag: text-classification" in card
    assert "transformers (fp32) vs gkd: max |Δ|" in card and "— OK" in card


def test_stage_exports_that_stages_checkpoint(classifier_run, tmp_path):
    out = tmp_path / "tinybert"
    result = export_run(classifier_run.run_dir, out, stage="tinybert")
    meta = json.loads((out / "gkd-export.json").read_text())
    assert result.source.kind == "checkpoint" and meta["global_step"] == 5  # 2 teacher + 3 TinyBERT steps
    checkpoint = classifier_run.run_dir / "checkpoints" / "step-00000005"
    assert result.source.checkpoint == checkpoint
    exported = load_file(str(out / "model.safetensors"))
    expected = hf_state_dict(load_student(find_student(classifier_run.run_dir, "tinybert")))
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    final = load_file(str(classifier_run.run_dir / "export" / "model.safetensors"))
    assert not torch.equal(final["classifier.weight"], exported["classifier.weight"])  # KD changed it later
    assert "`tinybert` (this export)" in (out / "README.md").read_text()
    # The stage-end checkpoint records the student's architecture (what the export rebuilt it from).
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["extra"]["student_model"]["num_layers"] == 2


def test_final_stage_from_the_latest_checkpoint_equals_the_export(classifier_run, tmp_path):
    """Without the run's export directory the final stage comes from its stage-end checkpoint."""
    from_export = load_student(find_student(classifier_run.run_dir))
    source = find_student(classifier_run.run_dir, "kd")
    assert source.kind == "export"
    checkpoint = load_student(dataclasses.replace(source, kind="checkpoint", weights=find_latest(classifier_run.run_dir)))
    for (name, a), (_, b) in zip(from_export.named_parameters(), checkpoint.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_int8_onnx_agrees_on_argmax_for_most_examples(classifier_run, tmp_path):
    out = tmp_path / "int8"
    result = export_run(classifier_run.run_dir, out, fmt="onnx", quantize="int8")
    check = result.checks[-1]
    assert check.what == "onnxruntime (int8)" and check.ok and check.agreement >= 0.9
    # On the run's test texts too: the int8 graph's class equals gkd's for at least 8 of 9 (the bound, 90 %).
    rows = [json.loads(x) for x in classifier_run.test_data.read_text().splitlines()]
    batch = Tokenizer.from_dir(out, 16).encode([r["text"] for r in rows])
    agree = (onnx_logits(out / "model.onnx", batch).argmax(-1) == gkd_logits(classifier_run.run_dir, None, batch)
             .argmax(-1)).float().mean()
    assert agree >= 8 / 9
    assert (out / "model.onnx").stat().st_size < 0.5 * (tmp_path / "int8" / "model.safetensors").stat().st_size


def test_bf16_hugging_face_export(classifier_run, tmp_path):
    out = tmp_path / "bf16"
    result = export_run(classifier_run.run_dir, out, dtype="bf16")
    assert result.checks[0].what == "transformers (bf16)" and result.checks[0].ok
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_decoder_lm_round_trips(lm_run, tmp_path):
    out = tmp_path / "lm"
    result = export_run(lm_run.run_dir, out, fmt="onnx")
    assert all(p.ok for p in result.checks) and result.checks[0].positions > 20  # attended tokens
    batch = fresh_batch(out, 12)
    keep = batch["attention_mask"].bool()
    ref = gkd_logits(lm_run.run_dir, None, batch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        got = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(onnx_logits(out / "model.onnx", batch)[keep], ref[keep], atol=1e-4, rtol=1e-4)
    assert "pipeline_tag: text-generation" in (out / "README.md").read_text()
    assert not (out / "labels.json").exists()


def test_masked_lm_round_trips(mlm_run, tmp_path):
    out = tmp_path / "mlm"
    result = export_run(mlm_run.run_dir, out, fmt="onnx")
    assert all(p.ok for p in result.checks)
    batch = fresh_batch(out, 12)
    keep = batch["attention_mask"].bool()
    ref = gkd_logits(mlm_run.run_dir, None, batch)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        got = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(onnx_logits(out / "model.onnx", batch)[keep], ref[keep], atol=1e-4, rtol=1e-4)


def test_a_failed_check_is_one_line_and_leaves_nothing(classifier_run, tmp_path, monkeypatch):
    earlier = tmp_path / "earlier"
    export_run(classifier_run.run_dir, earlier)
    before = (earlier / "model.safetensors").read_bytes()
    monkeypatch.setitem(parity_module.BOUNDS, "fp32", Bound(atol=1e-30))
    with pytest.raises(GkdError) as info:
        export_run(classifier_run.run_dir, earlier, stage="tinybert")
    message = str(info.value)
    assert "\n" not in message and "does not match the gkd model" in message and "FAILED" in message
    assert (earlier / "model.safetensors").read_bytes() == before  # the earlier export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier"]  # no staging directory left


def test_export_refuses_a_directory_that_is_not_an_export(classifier_run, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(GkdError, match="is not an earlier gkd export"):
        export_run(classifier_run.run_dir, tmp_path / "notes")
    with pytest.raises(GkdError, match="inside the run's own files"):
        export_run(classifier_run.run_dir, classifier_run.run_dir / "checkpoints" / "x")
