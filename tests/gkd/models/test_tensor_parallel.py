"""TP=2 (two gloo processes) reproduces TP=1: taps after gather, logits, gradients, checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from gkd import parallel
from gkd.models import (
    GkdModel,
    ModelConfig,
    build_model,
    export_hf,
    from_pretrained,
    shard_kind,
)
from gkd.models.sharding import ShardKind, gather_full

pytestmark = pytest.mark.distributed

TOL = 1e-5
GATHER_HEADS = ("query", "key", "value", "scores", "probs")


def _features(model: GkdModel) -> set[str]:
    names = {f"layers.0.attention.{r}" for r in (*GATHER_HEADS, "context")}
    names |= {"embeddings", "layers.1.ffn.intermediate", "layers.1.output", "logits"}
    return names | ({"final_norm", "pooled"} & set(model.tap_names()))


def _gathered(name: str, t: torch.Tensor) -> torch.Tensor:
    role = name.split(".", 2)[-1] if name.startswith("layers.") else name
    if role.startswith("attention.") and role.split(".")[1] in GATHER_HEADS:
        return parallel.gather_heads(t)
    if role in ("attention.context", "ffn.intermediate"):
        return parallel.gather_last_dim(t)
    return t


def _loss(f: dict[str, torch.Tensor], feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """A distillation-like loss using both reduction styles of gkd.parallel."""
    # Local shard, then exact mean over TP (shards are equal-sized).
    ctx = parallel.all_reduce_mean_over_tp(f["layers.0.attention.context"].square().mean())
    logits = feats["logits"]
    return (
        logits.logsumexp(-1).mean()
        + feats["layers.0.attention.probs"].square().sum(-1).mean()
        + 0.1 * feats["layers.0.attention.query"].square().mean()
        + feats["layers.1.ffn.intermediate"].abs().mean()
        + feats["layers.1.output"].square().mean()
        + ctx
    )


def _run_case(model: GkdModel, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    model.eval()
    kwargs = (
        dict(batch)
        if model.model_config.family == "encoder"
        else {k: batch[k] for k in ("input_ids", "attention_mask")}
    )
    with model.capture(_features(model)) as f:
        out = model(**kwargs)
    feats = {name: _gathered(name, t) for name, t in f.items()}
    loss = _loss(f, feats)
    loss.backward()
    cfg, tp, group = model.model_config, parallel.tp_world_size(), parallel.tp_group()
    grads, weights = {}, {}
    for name, p in model.named_parameters():
        kind = shard_kind(name, cfg)
        g, w = gather_full(p.grad, kind, group, tp), gather_full(p, kind, group, tp)
        if kind is ShardKind.VOCAB:
            g, w = g[: cfg.vocab_size], w[: cfg.vocab_size]
        grads[name], weights[name] = g.clone(), w.clone()
    with torch.no_grad(), model.capture(operations={"layers.1.attention.scores": lambda s: s * 0.5}):
        op_logits = model(**kwargs).logits
    return {
        "features": {k: v.detach().clone() for k, v in feats.items()},
        "logits": out.logits.detach().clone(),
        "loss": loss.detach().clone(),
        "grads": grads,
        "weights": weights,
        "op_logits": op_logits.clone(),
        "local_qkv_rows": model.layers[0].self_attention.linear_qkv.weight.shape[0],
        "local_vocab_rows": model.embeddings.word_embeddings.weight.shape[0],
        "num_parameters": model.num_parameters(),
    }


def _cases(spec: dict[str, Any], export_dir: str | None) -> dict[str, dict[str, Any]]:
    batch = spec["batch"]
    results = {}
    for name, how in spec["models"].items():
        model = from_pretrained(how) if isinstance(how, str) else build_model(how, seed=0)
        b = {k: v.clamp(max=model.model_config.vocab_size - 1) for k, v in batch.items()}
        results[name] = _run_case(model, b)
        if export_dir is not None and name == "decoder_checkpoint":
            export_hf(model, Path(export_dir) / name)
    return results


def tp_worker(spec: dict[str, Any], export_dir: str) -> dict[str, dict[str, Any]]:
    """Runs on each of the two ranks (module level: the launcher imports it)."""
    return _cases(spec, export_dir)


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory, hf_checkpoint, encoder_cfg, decoder_cfg, batch):
    root = tmp_path_factory.mktemp("tp")
    spec = {
        "batch": batch(128, b=2, s=9),
        "models": {
            # Odd vocabulary: padded to 100 rows, 50 per rank.
            "encoder_checkpoint": str(hf_checkpoint(root / "bert", "bert", kind="mlm", vocab=99)),
            "decoder_checkpoint": str(hf_checkpoint(root / "llama", "llama")),
            "encoder_random": encoder_cfg(head="classification", num_labels=3),
            "decoder_random_tied": decoder_cfg(tie_word_embeddings=True),
        },
    }
    reference = _cases(spec, None)
    ranks = parallel.run_distributed(tp_worker, 2, spec, str(root / "export"), tp=2, timeout_s=240)
    return spec, reference, ranks, root / "export"


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


CASES = ["encoder_checkpoint", "decoder_checkpoint", "encoder_random", "decoder_random_tied"]


@pytest.mark.parametrize("case", CASES)
def test_tp2_features_logits_and_grads_equal_tp1(tp_results, case: str) -> None:
    _, reference, ranks, _ = tp_results
    ref = reference[case]
    for rank in ranks:
        got = rank[case]
        assert _max_diff(got["features"], ref["features"]) <= TOL
        assert float((got["logits"] - ref["logits"]).abs().max()) <= TOL
        assert float((got["loss"] - ref["loss"]).abs()) <= TOL
        assert _max_diff(got["grads"], ref["grads"]) <= TOL
        assert float((got["op_logits"] - ref["op_logits"]).abs().max()) <= TOL
        assert got["num_parameters"] == ref["num_parameters"]
    assert not torch.allclose(ref["op_logits"], ref["logits"])  # the operation had an effect


@pytest.mark.parametrize("case", CASES)
def test_each_rank_holds_its_shard(tp_results, case: str) -> None:
    _, reference, ranks, _ = tp_results
    ref = reference[case]
    assert all(r[case]["local_qkv_rows"] * 2 == ref["local_qkv_rows"] for r in ranks)
    expect_vocab = 50 if case == "encoder_checkpoint" else ref["local_vocab_rows"] // 2
    assert all(r[case]["local_vocab_rows"] == expect_vocab for r in ranks)
    # Loaded or seeded weights are the TP=1 weights, bit for bit.
    for r in ranks:
        assert _max_diff(r[case]["weights"], ref["weights"]) == 0.0


def test_export_under_tp_merges_shards(tp_results) -> None:
    transformers = pytest.importorskip("transformers")
    spec, reference, _, export_root = tp_results
    out_dir = export_root / "decoder_checkpoint"
    hf = transformers.LlamaForCausalLM.from_pretrained(out_dir).eval()
    b = spec["batch"]
    with torch.no_grad():
        logits = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    real = b["attention_mask"].bool()
    assert float((logits - reference["decoder_checkpoint"]["logits"])[real].abs().max()) <= TOL
    merged = from_pretrained(out_dir)
    assert isinstance(merged.model_config, ModelConfig) and merged.model_config.kv_heads == 2
