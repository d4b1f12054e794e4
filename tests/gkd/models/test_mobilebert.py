"""MobileBERT's inverted-bottleneck (IB) encoder: HF parity, export, taps, TP, shapes, init."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gkd import parallel
from gkd.errors import GkdError
from gkd.models import (
    LAYER_ROLES,
    GkdModel,
    ModelConfig,
    build_model,
    export_hf,
    from_pretrained,
    hf_state_dict,
    load_model_config,
    shard_kind,
    truncated_student,
)
from gkd.models.sharding import ShardKind, gather_full

transformers = pytest.importorskip("transformers")

VOCAB = 99  # odd: padded to 100 rows under TP=2
HF_KW: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    embedding_size=8,
    intra_bottleneck_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=24,
    num_feedforward_networks=3,
    max_position_embeddings=32,
    num_labels=3,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
"""Tiny MobileBERT: residual 32, attention/FFN at 16 (4 heads of 4), 3 FFNs, trigram, NoNorm."""

HF_CLASSES = {
    "base": "MobileBertModel",
    "classification": "MobileBertForSequenceClassification",
    "mlm": "MobileBertForMaskedLM",
}

# Options beyond the default wiring (trigram, NoNorm, shared key/query bottleneck).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "layer_norm+bottleneck_attention+no_pooler_dense": dict(
        normalization_type="layer_norm",
        use_bottleneck_attention=True,
        classifier_activation=False,
        layer_norm_eps=1e-7,
    ),
    "no_bottleneck+no_trigram+one_ffn": dict(
        use_bottleneck=False, trigram_input=False, embedding_size=32, num_feedforward_networks=1
    ),
    "unshared_qk": dict(key_query_shared_bottleneck=False, intra_bottleneck_size=32, trigram_input=False),
}


def tiny_ib(**overrides: Any) -> ModelConfig:
    """The gkd config of :data:`HF_KW` (no dropout), with overrides."""
    kw: dict[str, Any] = dict(
        family="encoder",
        variant="mobilebert",
        vocab_size=VOCAB,
        hidden_size=32,
        embedding_size=8,
        intra_bottleneck_size=16,
        num_layers=2,
        num_attention_heads=4,
        ffn_hidden_size=24,
        num_feedforward_networks=3,
        max_position_embeddings=32,
        hidden_act="relu",
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def _perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Random norm weights and biases (initialised to 1 / 0, which would hide wiring errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def save_tiny_mobilebert(path: Path, kind: str = "classification", seed: int = 0, **overrides: Any) -> Path:
    """A random tiny HF MobileBERT saved with safetensors (norms and biases perturbed)."""
    torch.manual_seed(seed)
    cfg = transformers.MobileBertConfig(**(HF_KW | overrides))
    model = getattr(transformers, HF_CLASSES[kind])(cfg).eval()
    _perturb_norms(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_batch(vocab: int = VOCAB, b: int = 3, s: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, s - 3 :] = 0
    if b > 2:
        mask[2, s // 2 :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    types = torch.zeros(b, s, dtype=torch.long)
    types[0, s // 2 :] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _hf_outputs(path: Path, kind: str, batch: dict[str, torch.Tensor]) -> Any:
    cls = getattr(transformers, HF_CLASSES[kind])
    model = cls.from_pretrained(str(path), attn_implementation="eager").eval()
    with torch.no_grad():
        return model(**batch, output_hidden_states=True, output_attentions=True)


def _max(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    d = (a - b).abs()
    return float((d[rows] if rows is not None else d).max())


def _hidden_names(n: int) -> list[str]:
    return ["embeddings"] + [f"layers.{i}.output" for i in range(n)]


# --------------------------------------------------------------------------- config
def test_config_reads_and_writes_mobilebert_hf_configs(tmp_path) -> None:
    hf = transformers.MobileBertConfig(**HF_KW).to_dict()
    hf["architectures"] = ["MobileBertForSequenceClassification"]
    cfg = ModelConfig.from_hf_config(hf)
    assert (cfg.family, cfg.variant, cfg.head) == ("encoder", "mobilebert", "classification")
    assert (cfg.hidden_size, cfg.true_hidden_size, cfg.word_embedding_size, cfg.kv_channels) == (32, 16, 8, 4)
    assert (cfg.num_feedforward_networks, cfg.trigram_input, cfg.normalization_type) == (3, True, "no_norm")
    assert cfg.hidden_act == "relu" and cfg.attention_size == 16 and cfg.extra_hf == {}
    back = cfg.to_hf_config()
    assert back["model_type"] == "mobilebert" and back["architectures"] == [
        "MobileBertForSequenceClassification"
    ]
    for key, value in HF_KW.items():
        if key != "num_labels":
            assert back[key] == value, key
    assert ModelConfig.from_hf_config(back) == cfg
    # transformers accepts what gkd writes.
    assert transformers.MobileBertConfig(**back).true_hidden_size == 16
    # The transformers defaults apply to keys a config.json leaves out.
    sparse = ModelConfig.from_hf_config(
        {"model_type": "mobilebert", "architectures": ["MobileBertForMaskedLM"]}
    )
    assert (sparse.hidden_size, sparse.true_hidden_size, sparse.word_embedding_size, sparse.num_layers) == (
        512,
        128,
        128,
        24,
    )
    assert sparse.head == "mlm" and not sparse.add_pooler and sparse.hidden_dropout == 0.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(variant="standard"), "only applies to variant 'mobilebert'"),
        (dict(family="decoder", hidden_act="silu"), "must be 'encoder'"),
        (dict(intra_bottleneck_size=18), "must be a multiple of num_attention_heads"),
        (dict(key_query_shared_bottleneck=False), "must equal hidden_size"),
        (dict(head="mlm", embedding_size=32), "embedding_size (32) < hidden_size (32)"),
        (dict(num_feedforward_networks=0), "num_feedforward_networks (0) must be >= 1"),
        (dict(normalization_type="rms"), "normalization_type"),
        (dict(head_dim=8), "leave head_dim unset"),
    ],
)
def test_invalid_mobilebert_configs_are_refused(changes, message) -> None:
    with pytest.raises(ValueError) as err:
        tiny_ib(**changes)
    assert message in str(err.value)


def test_standard_configs_are_unchanged() -> None:
    bert = ModelConfig(
        family="encoder",
        vocab_size=10,
        hidden_size=64,
        num_layers=1,
        num_attention_heads=4,
        ffn_hidden_size=8,
    )
    assert bert.variant == "standard" and bert.kv_channels == 16 and bert.true_hidden_size == 64
    assert bert.to_hf_config()["model_type"] == "bert"


# --------------------------------------------------------------------------- HF parity
@pytest.mark.parametrize(
    ("kind", "variant"), [("mlm", "default"), ("base", "default")] + [("classification", v) for v in VARIANTS]
)
def test_loaded_checkpoint_matches_transformers(tmp_path, kind: str, variant: str) -> None:
    path = save_tiny_mobilebert(tmp_path / "hf", kind, **VARIANTS[variant])
    model = from_pretrained(path).eval()
    cfg = model.model_config
    assert cfg.variant == "mobilebert" and cfg.head == {"base": "none"}.get(kind, kind)
    batch = make_batch()
    ref = _hf_outputs(path, kind, batch)
    names = set(_hidden_names(2)) | {f"layers.{i}.attention.probs" for i in range(2)}
    with torch.no_grad(), model.capture(names) as f:
        out = model(**batch)
    real = batch["attention_mask"].bool()
    hidden = [_max(f[n], h, real) for n, h in zip(_hidden_names(2), ref.hidden_states, strict=True)]
    assert max(hidden) <= 1e-5, hidden
    for i in range(2):
        assert _max(f[f"layers.{i}.attention.probs"], ref.attentions[i]) <= 1e-5
    if kind == "classification":
        assert out.logits.shape == (3, 3) and _max(out.logits, ref.logits) <= 1e-5
    elif kind == "mlm":
        assert out.logits.shape == (3, 10, VOCAB) and _max(out.logits, ref.logits, real) <= 1e-5
    else:
        assert out.logits is None and _max(out.pooled, ref.pooler_output) <= 1e-5
    hf_model = getattr(transformers, HF_CLASSES[kind]).from_pretrained(str(path))
    assert model.num_parameters() == sum(p.numel() for p in hf_model.parameters())


# --------------------------------------------------------------------------- export
@pytest.mark.parametrize("kind", ["classification", "mlm"])
def test_export_round_trip_through_transformers(tmp_path, kind: str) -> None:
    head = {
        "classification": dict(head="classification", num_labels=3),
        "mlm": dict(head="mlm", add_pooler=False),
    }[kind]
    model = build_model(tiny_ib(**head), seed=3).eval()
    _perturb_norms(model, 1)
    out_dir = export_hf(model, tmp_path / "export")
    hf_cfg = json.loads((out_dir / "config.json").read_text())
    assert hf_cfg["model_type"] == "mobilebert" and hf_cfg["architectures"] == [HF_CLASSES[kind]]
    batch = make_batch()
    ref = _hf_outputs(out_dir, kind, batch)
    with torch.no_grad():
        out = model(**batch)
    real = batch["attention_mask"].bool()
    assert _max(out.last_hidden, ref.hidden_states[-1], real) <= 1e-5
    assert _max(out.logits, ref.logits, real if kind == "mlm" else None) <= 1e-5
    # gkd reads its export back bit for bit.
    again = from_pretrained(out_dir)
    assert again.model_config == model.model_config
    for (n, a), (_, b) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_untied_mlm_decoder_round_trips(tmp_path) -> None:
    path = save_tiny_mobilebert(tmp_path / "hf", "mlm", tie_word_embeddings=False)
    model = from_pretrained(path).eval()
    assert model.mlm_word_decoder is not None
    batch = make_batch()
    ref = _hf_outputs(path, "mlm", batch)
    with torch.no_grad():
        out = model(**batch)
    assert _max(out.logits, ref.logits, batch["attention_mask"].bool()) <= 1e-5
    tensors = hf_state_dict(model)
    assert "cls.predictions.decoder.weight" in tensors and tensors["cls.predictions.dense.weight"].shape == (
        24,
        VOCAB,
    )


# --------------------------------------------------------------------------- taps
def test_every_tap_has_its_documented_shape_and_wiring() -> None:
    model = build_model(tiny_ib(head="classification", num_labels=3), seed=0).eval()
    _perturb_norms(model, 0)
    batch = make_batch()
    B, S = batch["input_ids"].shape
    names = set(model.tap_names())
    assert names == {"embeddings", "pooled", "logits"} | {
        f"layers.{i}.{r}" for i in range(2) for r in LAYER_ROLES
    }
    with torch.no_grad(), model.capture(names) as f:
        out = model(**batch)
    assert set(f) == names
    for i in range(2):
        for role in ("input", "output"):
            assert f[f"layers.{i}.{role}"].shape == (B, S, 32)  # the residual stream
        for role in ("query", "key", "value"):
            assert f[f"layers.{i}.attention.{role}"].shape == (B, 4, S, 4)  # intra 16 / 4 heads
        for role in ("scores", "probs"):
            assert f[f"layers.{i}.attention.{role}"].shape == (B, 4, S, S)
        assert f[f"layers.{i}.attention.context"].shape == (B, S, 16)
        assert f[f"layers.{i}.ffn.intermediate"].shape == (B, S, 24)
    assert (
        f["embeddings"].shape == (B, S, 32) and f["pooled"].shape == (B, 32) and f["logits"].shape == (B, 3)
    )
    torch.testing.assert_close(f["embeddings"], f["layers.0.input"], rtol=0, atol=0)
    torch.testing.assert_close(f["layers.0.output"], f["layers.1.input"], rtol=0, atol=0)
    torch.testing.assert_close(f["layers.1.output"], out.last_hidden, rtol=0, atol=0)
    # Attention semantics at the intra width.
    q, k, v = (f[f"layers.0.attention.{r}"] for r in ("query", "key", "value"))
    scores, probs = f["layers.0.attention.scores"], f["layers.0.attention.probs"]
    pad = (batch["attention_mask"] == 0)[:, None, None, :].expand_as(scores)
    torch.testing.assert_close(scores[~pad], ((q @ k.transpose(-1, -2)) / 2.0)[~pad])
    torch.testing.assert_close(probs, scores.softmax(-1))
    torch.testing.assert_close(f["layers.0.attention.context"], (probs @ v).transpose(1, 2).reshape(B, S, 16))
    # The value reads the residual stream (key_query_shared_bottleneck), the query the shared bottleneck.
    layer = model.layers[0]
    x = f["layers.0.input"]
    expect_v = layer.self_attention.linear_v(x.transpose(0, 1))[0].transpose(0, 1)
    torch.testing.assert_close(v, expect_v.view(B, S, 4, 4).transpose(1, 2))
    qk_in = layer.bottleneck_attention_norm(layer.bottleneck_attention(x))
    torch.testing.assert_close(q, layer.self_attention.linear_q(qk_in)[0].view(B, S, 4, 4).transpose(1, 2))
    # ffn.intermediate belongs to the last FFN: relu of its fc1.
    inter = f["layers.1.ffn.intermediate"]
    assert bool((inter >= 0).all()) and bool((inter == 0).any())


def test_operations_change_the_forward_and_gradients_reach_features() -> None:
    # Large random weights, so that every branch visibly moves the residual stream.
    model = build_model(tiny_ib(head="classification", num_labels=3, initializer_range=0.3), seed=0).eval()
    batch = make_batch()
    with torch.no_grad():
        plain = model(**batch).last_hidden
    for name, fn in [
        ("layers.0.output", lambda h: h + 0.5),
        ("layers.1.ffn.intermediate", lambda t: t * 2.0),
        ("layers.0.attention.probs", lambda p: p.flip(-1)),
        ("layers.1.attention.context", lambda c: c * 0.0),
        ("embeddings", lambda e: e * 1.5),
    ]:
        with torch.no_grad(), model.capture(operations={name: fn}):
            changed = model(**batch).last_hidden
        assert _max(changed, plain) > 1e-3, name
    # The operation's value is what the rest of the pass sees.
    with (
        torch.no_grad(),
        model.capture({"layers.1.input"}, operations={"layers.0.output": lambda h: h * 0.0}) as f,
    ):
        model(**batch)
    assert bool((f["layers.1.input"] == 0).all())
    # Features keep their graph.
    with model.capture({"layers.0.output", "layers.1.attention.scores"}) as f:
        model(**batch)
    (f["layers.0.output"].square().mean() + f["layers.1.attention.scores"].clamp(-1e4).mean()).backward()
    assert model.layers[0].bottleneck_input.weight.grad is not None
    assert model.layers[1].self_attention.linear_q.weight.grad is not None


def test_layers_operation_runs_a_foreign_ib_layer() -> None:
    a = build_model(tiny_ib(), seed=0).eval()
    b = build_model(tiny_ib(intra_bottleneck_size=8, num_feedforward_networks=2), seed=1).eval()
    batch = make_batch()
    with (
        torch.no_grad(),
        a.capture({"layers.1.attention.probs"}, operations={"layers": lambda ls: [ls[0], b.layers[1]]}) as f,
    ):
        swapped = a(**batch).last_hidden
    assert f["layers.1.attention.probs"].shape == (3, 4, 10, 10)
    with torch.no_grad():
        h0 = a.embeddings(batch["input_ids"], batch["token_type_ids"])
        mask = (batch["attention_mask"] == 0)[:, None, None, :]
        expect = b.layers[1](a.layers[0](h0, attention_mask=mask), attention_mask=mask).transpose(0, 1)
    torch.testing.assert_close(swapped, expect, rtol=0, atol=0)
    other = build_model(tiny_ib(hidden_size=48, embedding_size=8), seed=2)
    with (
        pytest.raises(ValueError, match="hidden size 48"),
        a.capture(operations={"layers": lambda ls: [other.layers[0]]}),
    ):
        a(**batch)


# --------------------------------------------------------------------------- shapes and validation
def test_model_shape_has_the_bottleneck_head_dim(tmp_path) -> None:
    from gkd.config.validate import shape_from_hf
    from gkd.methods import ModelShape

    cfg = tiny_ib(head="classification", num_labels=3)
    shape = ModelShape.from_model_config(cfg)
    assert (shape.family, shape.hidden_size, shape.attention_size, shape.head_dim) == ("encoder", 32, 16, 4)
    assert shape.has_pooler and shape.head == "classification"
    path = save_tiny_mobilebert(tmp_path / "hf", "classification")
    from_json = shape_from_hf(json.loads((path / "config.json").read_text()))
    assert from_json == ModelShape(**{**shape.__dict__, "has_pooler": None, "num_labels": None})
    bert = ModelShape.from_model_config(
        ModelConfig(
            family="encoder",
            vocab_size=10,
            hidden_size=64,
            num_layers=1,
            num_attention_heads=4,
            ffn_hidden_size=8,
        )
    )
    assert bert.attention_size is None and bert.head_dim == 16


def _write_run(tmp_path: Path, teacher: Path, student: Path | dict[str, Any], method: str) -> Path:
    (tmp_path / "train.jsonl").write_text("".join(f'{{"text": "a b c", "label": {x}}}\n' for x in range(3)))
    init = student if isinstance(student, dict) else {"strategy": "pretrained", "path": str(student)}
    run = {
        "task": {"type": "sequence_classification"},
        "data": {"train": {"path": "train.jsonl"}},
        "teachers": [{"name": "ib", "path": str(teacher)}],
        "student": {"init": init},
        "stages": [{"name": "kd", "steps": 2, "teachers": ["ib"], "methods": [{"name": method}]}],
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    return path


def test_validation_accepts_an_ib_teacher_and_student(tmp_path) -> None:
    from gkd.config import ConfigError, load_run_config
    from gkd.plugins import load_plugin_manager

    registry = load_plugin_manager().registry
    teacher = save_tiny_mobilebert(tmp_path / "teacher", "classification", intra_bottleneck_size=32)
    student = save_tiny_mobilebert(tmp_path / "student", "base", num_hidden_layers=1)
    run = load_run_config(_write_run(tmp_path, teacher, student, "kd"), registry=registry)
    assert run.teachers[0].name == "ib"
    truncate = {"strategy": "truncate", "teacher": "ib", "num_layers": 1}
    run = load_run_config(_write_run(tmp_path, teacher, truncate, "kd"), registry=registry)
    assert run.student.init.strategy == "truncate"
    if "mobilebert" in registry:
        load_run_config(_write_run(tmp_path, teacher, student, "mobilebert"), registry=registry)
        # Unequal head counts are refused by the method's checks, from config.json alone.
        odd = save_tiny_mobilebert(tmp_path / "odd", "base", num_attention_heads=2)
        with pytest.raises(ConfigError, match="head"):
            load_run_config(_write_run(tmp_path, teacher, odd, "mobilebert"), registry=registry)


# --------------------------------------------------------------------------- student init
def test_truncated_ib_student_copies_the_teacher(tmp_path) -> None:
    teacher = build_model(tiny_ib(head="mlm", add_pooler=False, num_layers=3), seed=5).eval()
    _perturb_norms(teacher, 2)
    # Same widths, strided layers: the student is exactly teacher layers [0, 2] (FFNs included).
    same = truncated_student(tiny_ib(head="mlm", num_layers=2), teacher, layers=[0, 2]).eval()
    batch = make_batch()
    with torch.no_grad():
        h0 = teacher.embeddings(batch["input_ids"], batch["token_type_ids"])
        mask = (batch["attention_mask"] == 0)[:, None, None, :]
        expect = teacher.layers[2](teacher.layers[0](h0, attention_mask=mask), attention_mask=mask)
        got = same(**batch)
    torch.testing.assert_close(got.last_hidden, expect.transpose(0, 1), rtol=0, atol=0)
    # Narrower: fewer FFNs, smaller embedding / bottleneck / FFN / vocabulary keep leading slices.
    small_cfg = tiny_ib(
        head="mlm",
        num_layers=1,
        embedding_size=4,
        intra_bottleneck_size=8,
        ffn_hidden_size=12,
        num_feedforward_networks=2,
        vocab_size=50,
    )
    small = truncated_student(small_cfg, teacher, layers=[1])
    t, s = hf_state_dict(teacher), hf_state_dict(small)
    p = "mobilebert."
    torch.testing.assert_close(
        s[f"{p}embeddings.word_embeddings.weight"],
        t[f"{p}embeddings.word_embeddings.weight"][:50, :4],
        rtol=0,
        atol=0,
    )
    tri = t[f"{p}embeddings.embedding_transformation.weight"]  # [32, 3·8]: next | current | previous
    torch.testing.assert_close(
        s[f"{p}embeddings.embedding_transformation.weight"],
        torch.cat([tri[:, 0:4], tri[:, 8:12], tri[:, 16:20]], dim=1),
        rtol=0,
        atol=0,
    )
    layer = f"{p}encoder.layer.0."
    torch.testing.assert_close(
        s[f"{layer}ffn.0.intermediate.dense.weight"],
        t[f"{p}encoder.layer.1.ffn.0.intermediate.dense.weight"][:12, :8],
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        s[f"{layer}output.dense.weight"],
        t[f"{p}encoder.layer.1.output.dense.weight"][:8, :12],
        rtol=0,
        atol=0,
    )
    # MLM decoder = [word embeddings; dense] over hidden: the student's dense holds teacher rows 4..31.
    full = torch.cat(
        [t[f"{p}embeddings.word_embeddings.weight"].t(), t["cls.predictions.dense.weight"]], dim=0
    )
    torch.testing.assert_close(s["cls.predictions.dense.weight"], full[4:32, :50], rtol=0, atol=0)


def test_truncation_across_architectures_is_refused() -> None:
    teacher = build_model(tiny_ib(), seed=0)
    bert = ModelConfig(
        family="encoder",
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=1,
        num_attention_heads=4,
        ffn_hidden_size=24,
    )
    with pytest.raises(GkdError, match="'mobilebert' teacher into a 'standard' student"):
        truncated_student(bert, teacher)
    with pytest.raises(GkdError, match="num_feedforward_networks=3 into a student with 4"):
        truncated_student(tiny_ib(num_layers=1, num_feedforward_networks=4), teacher)
    with pytest.raises(GkdError, match="normalization_type"):
        truncated_student(tiny_ib(num_layers=1, normalization_type="layer_norm"), teacher)


# --------------------------------------------------------------------------- the mobilebert method
def test_mobilebert_method_runs_on_ib_models() -> None:
    pytest.importorskip("gkd_methods_builtin.mobilebert")
    from gkd.testing import build_method, run_step, tiny_batch

    task = "sequence_classification"
    teacher = (
        build_model(
            tiny_ib(
                head="classification", num_labels=3, num_layers=4, intra_bottleneck_size=32, vocab_size=128
            ),
            seed=1,
        )
        .eval()
        .requires_grad_(False)
    )
    student = build_model(tiny_ib(head="classification", num_labels=3, num_layers=2, vocab_size=128), seed=0)
    models = {"student": student, "teacher:t": teacher}
    batch = tiny_batch("encoder", task, batch=2, seq=8, vocab_size=128, num_labels=3)
    for config in ({}, {"lower_layers": "down_weight"}):  # phase k = 1: student layer 0 ← teacher
        method = build_method("mobilebert", config, models=models, task=task)
        result = run_step(method, models, batch)
        assert bool(torch.isfinite(result.loss)) and result.loss.item() > 0
        student.zero_grad()
        result.loss.backward()
        grads = [p.grad for p in student.layers[0].parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads)


# --------------------------------------------------------------------------- TP = 2
GATHER_HEADS = ("query", "key", "value", "scores", "probs")


def _tp_case(model: GkdModel, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    model.eval()
    names = {f"layers.0.attention.{r}" for r in (*GATHER_HEADS, "context")}
    names |= {"embeddings", "layers.1.ffn.intermediate", "layers.1.output", "logits"}
    with model.capture(names) as f:
        out = model(**batch)
    feats = {}
    for name, t in f.items():
        role = name.split(".", 2)[-1]
        if role.startswith("attention.") and role.split(".")[1] in GATHER_HEADS:
            t = parallel.gather_heads(t)
        elif role in ("attention.context", "ffn.intermediate"):
            t = parallel.gather_last_dim(t)
        feats[name] = t
    loss = (
        out.logits.logsumexp(-1).mean()
        + feats["layers.0.attention.probs"].square().sum(-1).mean()
        + feats["layers.1.ffn.intermediate"].abs().mean()
        + feats["layers.1.output"].square().mean()
        + parallel.all_reduce_mean_over_tp(f["layers.0.attention.context"].square().mean())
    )
    loss.backward()
    cfg, tp, group = model.model_config, parallel.tp_world_size(), parallel.tp_group()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:  # bottleneck_attention, unused with use_bottleneck_attention (as in transformers)
            assert name.split(".", 2)[-1].startswith("bottleneck_attention"), name
            continue
        kind = shard_kind(name, cfg)
        g = gather_full(p.grad, kind, group, tp)
        grads[name] = (g[: cfg.vocab_size] if kind is ShardKind.VOCAB else g).clone()
    return {
        "features": {k: v.detach().clone() for k, v in feats.items()},
        "logits": out.logits.detach().clone(),
        "grads": grads,
        "num_parameters": model.num_parameters(),
        "local_q_rows": model.layers[0].self_attention.linear_q.weight.shape[0],
        "hf": hf_state_dict(model),
    }


def _tp_cases(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, how in spec["models"].items():
        model = from_pretrained(how) if isinstance(how, str) else build_model(how, seed=0)
        out[name] = _tp_case(model, spec["batch"])
    return out


def tp_worker(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Runs on each of the two ranks (module level: the launcher imports it)."""
    return _tp_cases(spec)


@pytest.mark.distributed
def test_tp2_equals_tp1(tmp_path) -> None:
    spec = {
        "batch": make_batch(b=2, s=9),
        "models": {
            "mlm_checkpoint": str(save_tiny_mobilebert(tmp_path / "mlm", "mlm")),
            # Vocabulary 100 (no TP padding), so the random init is the same for TP=1 and TP=2.
            "classification_random": tiny_ib(
                head="classification",
                num_labels=3,
                vocab_size=100,
                normalization_type="layer_norm",
                use_bottleneck_attention=True,
            ),
        },
    }
    reference = _tp_cases(spec)
    ranks = parallel.run_distributed(tp_worker, 2, spec, tp=2, timeout_s=240)
    for case, ref in reference.items():
        assert ref["local_q_rows"] == 16
        for got in ranks:
            got = got[case]
            assert got["local_q_rows"] == 8  # two of the four heads per rank
            for k in ref["features"]:
                assert _max(got["features"][k], ref["features"][k]) <= 1e-5, (case, k)
            assert _max(got["logits"], ref["logits"]) <= 1e-5
            for k in ref["grads"]:
                assert _max(got["grads"][k], ref["grads"][k]) <= 1e-5, (case, k)
            assert got["num_parameters"] == ref["num_parameters"]
            assert got["hf"].keys() == ref["hf"].keys()
            for k in ref["hf"]:
                assert torch.equal(got["hf"][k], ref["hf"][k]), (case, k)


def test_load_model_config_of_saved_checkpoint(tmp_path) -> None:
    path = save_tiny_mobilebert(tmp_path / "hf", "mlm", normalization_type="layer_norm")
    cfg = load_model_config(path)
    assert cfg.head == "mlm" and cfg.normalization_type == "layer_norm" and not cfg.add_pooler
