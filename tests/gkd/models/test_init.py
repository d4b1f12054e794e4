"""Student initialisation: random, pretrained, distilled, truncated from a teacher."""

from __future__ import annotations

import pytest
import torch

from gkd.models import (
    build_model,
    export_hf,
    hf_state_dict,
    load_model_config,
    pretrained_student,
    random_student,
    select_teacher_layers,
    truncated_student,
)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_select_teacher_layers() -> None:
    assert select_teacher_layers(12, 6, "bottom") == [0, 1, 2, 3, 4, 5]
    assert select_teacher_layers(12, 6, "strided") == [0, 2, 4, 6, 8, 10]
    assert select_teacher_layers(6, 4, "strided") == [0, 1, 3, 4]
    assert select_teacher_layers(4, 2, [3, 1]) == [3, 1]
    with pytest.raises(ValueError, match="more layers"):
        select_teacher_layers(2, 3, "bottom")
    with pytest.raises(ValueError, match=r"must have 2 entries in \[0, 3\]"):
        select_teacher_layers(4, 2, [0, 4])
    with pytest.raises(ValueError, match="'top'"):
        select_teacher_layers(4, 2, "top")  # type: ignore[arg-type]


def test_random_student_is_seeded_and_leaves_global_rng_alone(encoder_cfg) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = _params(random_student(encoder_cfg(), seed=7))
    assert torch.equal(torch.rand(3), expected)
    b = _params(random_student(encoder_cfg(), seed=7))
    c = _params(random_student(encoder_cfg(), seed=8))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["layers.0.mlp.linear_fc1.weight"], c["layers.0.mlp.linear_fc1.weight"])
    w = a["layers.1.self_attention.linear_qkv.weight"]
    assert (
        abs(float(w.std()) - 0.02) < 0.004
        and float(a["layers.1.self_attention.linear_qkv.bias"].abs().max()) == 0
    )


def test_pretrained_student_with_a_new_head(tiny_bert_dirs) -> None:
    base = tiny_bert_dirs["base"]
    cfg = load_model_config(base, head="classification", num_labels=5)
    student = pretrained_student(base, cfg, seed=3)
    reference = _params(pretrained_student(base))
    params = _params(student)
    for name, value in reference.items():
        assert torch.equal(params[name], value), name
    assert params["classifier.weight"].shape == (5, 64) and float(params["classifier.weight"].abs().sum()) > 0
    with pytest.raises(KeyError, match=r"lacks backbone parameters \['layers.2"):
        pretrained_student(base, cfg.replace(num_layers=3))


def test_distilled_student_round_trip(encoder_cfg, tmp_path, batch) -> None:
    student = random_student(encoder_cfg(head="classification", num_labels=3), seed=4)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    b = batch(100)
    student(**b).logits.logsumexp(-1).mean().backward()  # one update: not the random init any more
    opt.step()
    export_hf(student, tmp_path / "run1")
    again = pretrained_student(tmp_path / "run1")
    assert again.model_config == student.model_config
    original, loaded = _params(student), _params(again)
    assert all(torch.equal(original[n], loaded[n]) for n in original)
    assert again.num_parameters() == student.num_parameters()


def test_truncated_encoder_equals_teacher_running_the_chosen_layers(encoder_cfg, batch) -> None:
    teacher = build_model(encoder_cfg(num_layers=4, head="classification", num_labels=3), seed=11).eval()
    student = truncated_student(
        encoder_cfg(head="classification", num_labels=3), teacher, layers="strided"
    ).eval()
    b = batch(100)
    with torch.no_grad():
        with teacher.capture(operations={"layers": lambda ls: [ls[0], ls[2]]}):
            expect = teacher(**b)
        got = student(**b)
    torch.testing.assert_close(got.logits, expect.logits, rtol=0, atol=0)
    explicit = truncated_student(encoder_cfg(), teacher, layers=[3, 1])
    t, s = hf_state_dict(teacher), hf_state_dict(explicit)
    assert torch.equal(
        s["encoder.layer.0.output.dense.weight"], t["bert.encoder.layer.3.output.dense.weight"]
    )
    assert torch.equal(
        s["encoder.layer.1.attention.self.key.bias"], t["bert.encoder.layer.1.attention.self.key.bias"]
    )


def test_truncated_student_takes_leading_slices(encoder_cfg, decoder_cfg) -> None:
    teacher = build_model(encoder_cfg(num_layers=3), seed=12)
    narrow = encoder_cfg(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64)
    student = truncated_student(narrow, teacher, layers="bottom")
    t, s = hf_state_dict(teacher), hf_state_dict(student)
    assert torch.equal(s["embeddings.word_embeddings.weight"], t["embeddings.word_embeddings.weight"][:, :32])
    assert torch.equal(
        s["encoder.layer.1.attention.self.query.weight"],
        t["encoder.layer.1.attention.self.query.weight"][:32, :32],
    )
    assert torch.equal(
        s["encoder.layer.1.intermediate.dense.bias"], t["encoder.layer.1.intermediate.dense.bias"][:64]
    )
    assert torch.equal(
        s["encoder.layer.0.output.LayerNorm.weight"], t["encoder.layer.0.output.LayerNorm.weight"][:32]
    )

    d_teacher = build_model(decoder_cfg(num_layers=3), seed=13)
    d_narrow = decoder_cfg(
        num_layers=2, hidden_size=32, num_attention_heads=2, num_kv_heads=1, ffn_hidden_size=48
    )
    d_student = truncated_student(d_narrow, d_teacher, layers=[2, 0])
    t, s = hf_state_dict(d_teacher), hf_state_dict(d_student)
    # First 2 query heads and first KV head (head size 16 unchanged), first 48 FFN rows.
    assert torch.equal(
        s["model.layers.0.self_attn.q_proj.weight"], t["model.layers.2.self_attn.q_proj.weight"][:32, :32]
    )
    assert torch.equal(
        s["model.layers.0.self_attn.k_proj.weight"], t["model.layers.2.self_attn.k_proj.weight"][:16, :32]
    )
    assert torch.equal(
        s["model.layers.1.mlp.gate_proj.weight"], t["model.layers.0.mlp.gate_proj.weight"][:48, :32]
    )
    assert torch.equal(s["lm_head.weight"], t["lm_head.weight"][:, :32])
    with pytest.raises(ValueError, match="not a leading slice"):
        truncated_student(decoder_cfg(num_layers=2, ffn_hidden_size=200), d_teacher)
    with pytest.raises(ValueError, match="cannot truncate a decoder teacher into a encoder student"):
        truncated_student(encoder_cfg(), d_teacher)


def test_truncation_from_a_teacher_checkpoint(tiny_llama_dir, decoder_cfg, batch) -> None:
    student = truncated_student(decoder_cfg(num_layers=1), tiny_llama_dir, layers=[1])
    t = hf_state_dict(pretrained_student(tiny_llama_dir))
    s = hf_state_dict(student)
    assert torch.equal(s["model.layers.0.mlp.down_proj.weight"], t["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(s["model.norm.weight"], t["model.norm.weight"])
    two_layers = random_student(decoder_cfg(), seed=1)
    one_layer = sum(p.numel() for p in student.layers[0].parameters())
    assert two_layers.num_parameters() - student.num_parameters() == one_layer
