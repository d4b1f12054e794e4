"""HF checkpoints in (parity with transformers) and out (transformers loads the export)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from gkd.models import (
    export_hf,
    from_pretrained,
    hf_state_dict,
    load_hf_weights,
    load_model_config,
)

transformers = pytest.importorskip("transformers")


def _llama(path: Path):
    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    d = (a - b).abs()
    return float(d[mask].max() if mask is not None else d.max())


def test_llama_hidden_states_and_logits_match(tiny_llama_dir, batch) -> None:
    model = from_pretrained(tiny_llama_dir).eval()
    ref_model = _llama(tiny_llama_dir)
    b = batch(128)
    real = b["attention_mask"].bool()
    with torch.no_grad():
        with model.capture({"embeddings", "layers.0.output", "final_norm"}) as f:
            out = model(b["input_ids"], b["attention_mask"])
        ref = ref_model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True
        )
    # transformers' hidden_states: embeddings, layer 0 output, final-norm output (2 layers).
    assert _max_diff(f["embeddings"], ref.hidden_states[0], real) <= 1e-5
    assert _max_diff(f["layers.0.output"], ref.hidden_states[1], real) <= 1e-5
    assert _max_diff(f["final_norm"], ref.hidden_states[2], real) <= 1e-5
    assert _max_diff(out.logits, ref.logits, real) <= 1e-5
    assert model.num_parameters() == sum(p.numel() for p in ref_model.parameters())


def test_tied_llama_and_base_model_layout(tmp_path, batch) -> None:
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    tied = transformers.LlamaForCausalLM(cfg).eval()
    tied.save_pretrained(tmp_path / "causal")
    tied.model.save_pretrained(tmp_path / "base")  # LlamaModel: keys without the "model." prefix
    b = batch(96)
    with torch.no_grad():
        ref = tied(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        ours = from_pretrained(tmp_path / "causal").eval()
        assert ours.model_config.tie_word_embeddings and ours.lm_head.weight is None
        out = ours(b["input_ids"], b["attention_mask"])
        base = from_pretrained(tmp_path / "base").eval()
        assert base.model_config.head == "none" and base.lm_head is None
        base_out = base(b["input_ids"], b["attention_mask"])
    real = b["attention_mask"].bool()
    assert _max_diff(out.logits, ref.logits, real) <= 1e-5
    torch.testing.assert_close(base_out.last_hidden, out.last_hidden, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["classification", "mlm", "base"])
def test_bert_parity_and_export_round_trip(kind: str, tiny_bert_dirs, tmp_path, batch, minilm_path) -> None:
    src = tiny_bert_dirs[kind]
    auto = {
        "base": transformers.AutoModel,
        "classification": transformers.AutoModelForSequenceClassification,
        "mlm": transformers.AutoModelForMaskedLM,
    }[kind]
    model = from_pretrained(src).eval()
    b = batch(100)
    with torch.no_grad():
        ref = auto.from_pretrained(src).eval()(**b)
        out = model(**b)
        ours = out.logits if kind != "base" else out.last_hidden
        theirs = ref.logits if kind != "base" else ref.last_hidden_state
        real = b["attention_mask"].bool() if kind != "classification" else None
        assert _max_diff(ours, theirs, real) <= 1e-5

        out_dir = export_hf(model, tmp_path / "export", tokenizer_dir=minilm_path)
        reloaded = auto.from_pretrained(out_dir).eval()(**b)
        back = reloaded.logits if kind != "base" else reloaded.last_hidden_state
        assert _max_diff(ours, back, real) <= 1e-5
    files = sorted(os.listdir(out_dir))
    assert {"model.safetensors", "config.json", "tokenizer.json", "vocab.txt"} <= set(files)
    assert not [f for f in files if ".tmp-" in f]
    assert (out_dir / "tokenizer.json").read_bytes() == (minilm_path / "tokenizer.json").read_bytes()
    arch = json.loads((out_dir / "config.json").read_text())["architectures"][0]
    assert (
        arch
        == {"base": "BertModel", "classification": "BertForSequenceClassification", "mlm": "BertForMaskedLM"}[
            kind
        ]
    )
    # gkd reads its own export back bit for bit.
    again = from_pretrained(out_dir)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


@pytest.mark.parametrize("tie", [False, True])
def test_llama_export_loads_in_transformers(tie: bool, tmp_path, batch, decoder_cfg) -> None:
    from gkd.models import build_model

    model = build_model(decoder_cfg(tie_word_embeddings=tie, vocab_size=90), seed=5).eval()
    out_dir = export_hf(model, tmp_path / "llama")
    assert "lm_head.weight" in hf_state_dict(model) or tie
    ref = _llama(out_dir)
    b = batch(90)
    with torch.no_grad():
        ours = model(b["input_ids"], b["attention_mask"]).logits
        theirs = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert _max_diff(ours, theirs, b["attention_mask"].bool()) <= 1e-5
    assert ref.config.tie_word_embeddings is tie and ref.config.num_key_value_heads == 2


def test_sharded_index_checkpoint(tiny_llama_dir, tmp_path, batch) -> None:
    _llama(tiny_llama_dir).save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    b = batch(128)
    with torch.no_grad():
        a = from_pretrained(tiny_llama_dir).eval()(b["input_ids"], b["attention_mask"]).logits
        c = from_pretrained(tmp_path).eval()(b["input_ids"], b["attention_mask"]).logits
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_strict_loading_reports_mismatches(tiny_bert_dirs, tiny_llama_dir, tmp_path) -> None:
    from gkd.models import build_model

    cls_cfg = load_model_config(tiny_bert_dirs["base"], head="classification", num_labels=3)
    with pytest.raises(KeyError, match=r"missing \['classifier.weight', 'classifier.bias'\]"):
        load_hf_weights(build_model(cls_cfg), tiny_bert_dirs["base"])
    report = load_hf_weights(build_model(cls_cfg), tiny_bert_dirs["base"], strict=False)
    assert report.missing == ["classifier.weight", "classifier.bias"] and report.unexpected == []
    narrow = load_model_config(tiny_llama_dir).replace(ffn_hidden_size=48)
    with pytest.raises(
        ValueError, match=r"mlp.linear_fc1.weight: .* local shape \(192, 64\), model expects \(96, 64\)"
    ):
        load_hf_weights(build_model(narrow), tiny_llama_dir)
    with pytest.raises(ValueError, match="checkpoint has 128 vocabulary rows, the model 64"):
        load_hf_weights(build_model(load_model_config(tiny_llama_dir).replace(vocab_size=64)), tiny_llama_dir)
    (tmp_path / "config.json").write_bytes((tiny_llama_dir / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        from_pretrained(tmp_path)


def test_ranks_read_only_their_part_of_sharded_tensors(tiny_llama_dir) -> None:
    """Each TP rank reads its rows/columns through safetensors slices, never the full tensor."""
    from gkd.models.checkpoint import SafetensorsDir, _read_local
    from gkd.models.sharding import ShardKind

    class PartsOnly(SafetensorsDir):
        def get(self, name: str) -> torch.Tensor:
            raise AssertionError(f"full read of {name}")

    src, full = PartsOnly(tiny_llama_dir), SafetensorsDir(tiny_llama_dir)
    q = "model.layers.0.self_attn.q_proj.weight"
    o = "model.layers.0.self_attn.o_proj.weight"
    emb = "model.embed_tokens.weight"
    for rank in range(2):
        col = _read_local(src, q, ShardKind.COLUMN, rank, 2, torch.Size([32, 64]), 128)
        row = _read_local(src, o, ShardKind.ROW, rank, 2, torch.Size([64, 32]), 128)
        assert torch.equal(col, full.get(q).chunk(2, 0)[rank]) and torch.equal(
            row, full.get(o).chunk(2, 1)[rank]
        )
        # 128 rows over tp=3 → padded to 129, 43 per rank; the last rank gets one zero row.
        voc = _read_local(src, emb, ShardKind.VOCAB, rank + 1, 3, torch.Size([43, 64]), 128)
        expect = torch.cat([full.get(emb), torch.zeros(1, 64)])[43 * (rank + 1) : 43 * (rank + 2)]
        assert torch.equal(voc, expect)


def test_mlm_encoder_with_pooler_exports_a_loadable_checkpoint(tmp_path, batch) -> None:
    """A masked-LM encoder built with the default pooler: the export holds what BertForMaskedLM
    holds (no pooler), so gkd and transformers both load it back with the same logits."""
    from gkd.models import build_model
    from gkd.testing import tiny_config

    model = build_model(tiny_config("encoder", 2, task="masked_lm"), seed=4).eval()
    assert model.pooler is not None
    out_dir = export_hf(model, tmp_path / "mlm")
    again = from_pretrained(out_dir).eval()
    ref = transformers.BertForMaskedLM.from_pretrained(out_dir).eval()
    b = batch(100)
    with torch.no_grad():
        ours = model(b["input_ids"], b["attention_mask"]).logits
        assert torch.equal(again(b["input_ids"], b["attention_mask"]).logits, ours)
        theirs = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert _max_diff(ours, theirs, b["attention_mask"].bool()) <= 1e-5
