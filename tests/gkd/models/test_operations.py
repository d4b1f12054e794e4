"""Operation hooks: replace / perturb / write spans / swap layers; attach for one pass only."""

from __future__ import annotations

import pytest
import torch

from gkd.models import (
    add_perturbation,
    build_model,
    compose,
    replace_with,
    swap_layers,
    write_positions,
    write_span,
)
from gkd.models.taps import active_session


def _mask(b: dict[str, torch.Tensor]) -> torch.Tensor:
    return (b["attention_mask"] == 0)[:, None, None, :]


def test_replace_layer_output(encoder_cfg, batch) -> None:
    model = build_model(encoder_cfg()).eval()
    b = batch(100)
    new = torch.randn(3, 10, 64)
    with (
        torch.no_grad(),
        model.capture({"layers.1.input", "layers.0.output"}, {"layers.0.output": replace_with(new)}) as f,
    ):
        out = model(**b)
        expect = model.layers[1](new.transpose(0, 1), attention_mask=_mask(b)).transpose(0, 1)
    torch.testing.assert_close(f["layers.1.input"], new, rtol=0, atol=0)
    torch.testing.assert_close(
        f["layers.0.output"], new, rtol=0, atol=0
    )  # features record the value after the op
    torch.testing.assert_close(out.last_hidden, expect)


def test_perturb_embeddings_with_gradient_to_the_perturbation(encoder_cfg, batch) -> None:
    model = build_model(encoder_cfg()).eval()
    b = batch(100)
    with torch.no_grad(), model.capture({"embeddings"}) as clean:
        plain = model(**b)
    delta = torch.full((3, 10, 64), 0.1, requires_grad=True)
    with model.capture({"embeddings"}, {"embeddings": add_perturbation(delta)}) as f:
        out = model(**b)
    torch.testing.assert_close(f["embeddings"], clean["embeddings"] + 0.1)
    assert not torch.allclose(out.last_hidden, plain.last_hidden)
    out.last_hidden.square().mean().backward()
    assert delta.grad is not None and float(delta.grad.abs().sum()) > 0


def test_write_span_from_a_recorded_pass(encoder_cfg, batch) -> None:
    """DIITO-style interchange: positions of pass B take pass A's recorded values."""
    model = build_model(encoder_cfg()).eval()
    a, b = batch(100, seed=1), batch(100, seed=2)
    with model.capture({"layers.0.output"}) as fa:
        model(**a)
    source = fa["layers.0.output"]
    with torch.no_grad(), model.capture({"layers.0.output"}) as fb:
        model(**b)
    starts, src_starts = torch.tensor([2, 0, 5]), torch.tensor([4, 1, 0])
    with model.capture(
        {"layers.0.output"}, {"layers.0.output": write_span(source, starts, 3, src_start=src_starts)}
    ) as f:
        out = model(**b)
    got, plain = f["layers.0.output"], fb["layers.0.output"]
    for row, (dst, src) in enumerate(zip(starts.tolist(), src_starts.tolist(), strict=True)):
        torch.testing.assert_close(
            got[row, dst : dst + 3], source[row, src : src + 3].detach(), rtol=0, atol=0
        )
        keep = [p for p in range(10) if not dst <= p < dst + 3]
        torch.testing.assert_close(got[row, keep], plain[row, keep], rtol=0, atol=0)
    out.last_hidden.sum().backward()  # gradients reach pass A through the written values
    assert model.layers[0].self_attention.linear_qkv.weight.grad.abs().sum() > 0
    with (
        pytest.raises(IndexError, match="does not fit"),
        model.capture(operations={"layers.0.output": write_span(source, 9, 3)}),
    ):
        model(**b)


def test_write_positions_and_compose(encoder_cfg, batch) -> None:
    model = build_model(encoder_cfg()).eval()
    b = batch(100)
    values = torch.zeros(3, 10, 64)
    where = torch.zeros(3, 10, dtype=torch.bool)
    where[:, 0] = True
    op = compose(add_perturbation(torch.ones(64)), write_positions(values, where))
    with torch.no_grad(), model.capture({"layers.0.input", "embeddings"}, {"layers.0.input": op}) as f:
        model(**b)
    assert float(f["layers.0.input"][:, 0].abs().max()) == 0.0
    torch.testing.assert_close(f["layers.0.input"][:, 1:], f["embeddings"][:, 1:] + 1)


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_teacher_layers_run_in_the_student_stack(family: str, encoder_cfg, decoder_cfg, batch) -> None:
    """Theseus: teacher blocks (other head count, same width) replace a student layer."""
    if family == "encoder":
        s_cfg = encoder_cfg()
        t_cfg = encoder_cfg(num_layers=4, num_attention_heads=8, ffn_hidden_size=256)
    else:
        s_cfg = decoder_cfg()
        t_cfg = decoder_cfg(
            num_layers=4, num_attention_heads=8, num_kv_heads=4, ffn_hidden_size=160, rope_theta=100.0
        )
    student, teacher = build_model(s_cfg, seed=1).eval(), build_model(t_cfg, seed=2).eval()
    b = batch(s_cfg.vocab_size)
    ids, am = b["input_ids"], b["attention_mask"]
    op = swap_layers({1: teacher.layers[2:4]})
    with student.capture({"layers.1.attention.probs", "layers.1.input"}, {"layers": op}) as f:
        out = student(ids, am)
    # Reference: run the same modules by hand.
    h = f["layers.1.input"].transpose(0, 1)
    for layer in (teacher.layers[2], teacher.layers[3]):
        h = layer(h, attention_mask=_mask(b))
    if student.final_norm is not None:
        h = student.final_norm(h)
    torch.testing.assert_close(out.last_hidden, h.transpose(0, 1))
    # Taps are positional: position 1 is now the teacher block with 8 heads.
    assert f["layers.1.attention.probs"].shape == (3, 8, 10, 10)
    out.last_hidden.square().mean().backward()
    assert student.layers[0].self_attention.linear_qkv.weight.grad.abs().sum() > 0
    assert teacher.layers[2].mlp.linear_fc1.weight.grad.abs().sum() > 0
    assert student.layers[1].self_attention.linear_qkv.weight.grad is None  # swapped out
    # Next pass is the plain student again.
    plain = student(ids, am)
    assert plain.last_hidden.shape == out.last_hidden.shape and not torch.allclose(
        plain.last_hidden, out.last_hidden
    )


def test_layers_of_another_width_are_rejected(encoder_cfg, batch) -> None:
    student = build_model(encoder_cfg())
    wide = build_model(encoder_cfg(hidden_size=128))
    with (
        pytest.raises(ValueError, match="hidden size 128, the model has 64"),
        student.capture(operations={"layers": swap_layers({0: wide.layers[0]})}),
    ):
        student(**batch(100))


def test_operations_are_removed_after_a_failing_pass(encoder_cfg, batch) -> None:
    model = build_model(encoder_cfg()).eval()
    b = batch(100)
    with torch.no_grad():
        plain = model(**b).last_hidden

        def boom(t: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("operation failed")

        with (
            pytest.raises(RuntimeError, match="operation failed"),
            model.capture({"layers.1.output"}, {"layers.0.output": boom}),
        ):
            model(**b)
        assert model._pending is None and active_session() is None
        torch.testing.assert_close(model(**b).last_hidden, plain, rtol=0, atol=0)

        # Also when the failure comes from an unrelated exception inside the block.
        with (
            pytest.raises(KeyError),
            model.capture(operations={"embeddings": add_perturbation(torch.ones(64))}),
        ):
            raise KeyError("before the forward")
        torch.testing.assert_close(model(**b).last_hidden, plain, rtol=0, atol=0)


def test_bad_operation_results_are_reported(encoder_cfg, batch) -> None:
    model = build_model(encoder_cfg())
    b = batch(100)
    with (
        pytest.raises(ValueError, match=r"operation at 'layers.0.output' returned shape \(3, 10, 32\)"),
        model.capture(operations={"layers.0.output": lambda t: t[..., :32]}),
    ):
        model(**b)
    with (
        pytest.raises(TypeError, match="returned list"),
        model.capture(operations={"embeddings": lambda t: [t]}),
    ):
        model(**b)
    with (
        pytest.raises(TypeError, match=r"list of nn\.Module"),
        model.capture(operations={"layers": lambda ls: ls[0]}),
    ):
        model(**b)


def test_inner_model_calls_do_not_leak_into_the_outer_capture(encoder_cfg, batch) -> None:
    student, teacher = build_model(encoder_cfg(), seed=1).eval(), build_model(encoder_cfg(), seed=2).eval()
    b = batch(100)
    with torch.no_grad():
        with student.capture({"layers.0.output"}) as ref:
            student(**b)
        seen: list[torch.Tensor] = []

        def run_teacher(t: torch.Tensor) -> torch.Tensor:
            seen.append(teacher(**b).last_hidden)  # a full forward of another model mid-pass
            return t

        with student.capture({"layers.0.output"}, {"embeddings": run_teacher}) as f:
            student(**b)
    torch.testing.assert_close(f["layers.0.output"], ref["layers.0.output"], rtol=0, atol=0)
    assert len(seen) == 1 and not torch.allclose(seen[0], f["layers.0.output"])


def test_operation_on_attention_scores(encoder_cfg, batch) -> None:
    model = build_model(encoder_cfg()).eval()
    b = batch(100)

    def flatten_head0(scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, 0] = torch.where(scores[:, 0] > torch.finfo(scores.dtype).min, 0.0, scores[:, 0])
        return scores

    with (
        torch.no_grad(),
        model.capture({"layers.0.attention.probs"}, {"layers.0.attention.scores": flatten_head0}) as f,
    ):
        model(**b)
    real = b["attention_mask"].sum(1).float()
    expect = (b["attention_mask"].float() / real[:, None])[:, None, :].expand(3, 10, 10)
    torch.testing.assert_close(f["layers.0.attention.probs"][:, 0], expect)
