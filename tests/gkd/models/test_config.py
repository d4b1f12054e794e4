"""ModelConfig: validation, HF config round trips, megatron config mapping."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gkd.models import ModelConfig


def test_validation_quotes_the_offending_values(encoder_cfg) -> None:
    with pytest.raises(
        ValueError, match=r"num_attention_heads \(6\) must be a multiple of num_kv_heads \(4\)"
    ):
        ModelConfig(
            family="decoder",
            vocab_size=10,
            hidden_size=48,
            num_layers=1,
            num_attention_heads=6,
            num_kv_heads=4,
            ffn_hidden_size=8,
            hidden_act="silu",
            head="lm",
        )
    with pytest.raises(ValueError, match=r"head \('lm'\) must be one of"):
        encoder_cfg(head="lm")
    with pytest.raises(ValueError, match="needs add_pooler=True"):
        encoder_cfg(head="classification", add_pooler=False)
    with pytest.raises(
        ValueError, match=r"hidden_size \(65\) must be a multiple of num_attention_heads \(4\)"
    ):
        encoder_cfg(hidden_size=65)
    with pytest.raises(ValueError, match="SwiGLU"):
        ModelConfig(
            family="decoder",
            vocab_size=10,
            hidden_size=8,
            num_layers=1,
            num_attention_heads=2,
            ffn_hidden_size=8,
            hidden_act="gelu",
        )


def test_transformer_config_checks_tp_divisibility(decoder_cfg) -> None:
    cfg = decoder_cfg()
    tc = cfg.to_transformer_config(2)
    assert (tc.num_query_groups, tc.kv_channels, tc.normalization, tc.gated_linear_unit) == (
        2,
        16,
        "RMSNorm",
        True,
    )
    assert tc.add_bias_linear is False and tc.use_cpu_initialization is True
    with pytest.raises(ValueError, match=r"num_kv_heads \(2\) must be a multiple of tp \(4\)"):
        cfg.to_transformer_config(4)
    assert cfg.padded_vocab_size(3) == 129 and cfg.padded_vocab_size(2) == 128


def test_non_fp32_refused_without_cuda(encoder_cfg) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: bf16 is allowed")
    with pytest.raises(ValueError, match="needs CUDA"):
        encoder_cfg(dtype="bfloat16").to_transformer_config(1)


def test_from_hf_bert_config(minilm_path) -> None:
    from gkd.models import read_hf_config

    cfg = ModelConfig.from_hf_config(read_hf_config(minilm_path))
    assert (cfg.family, cfg.head, cfg.add_pooler) == ("encoder", "none", True)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_attention_heads, cfg.ffn_hidden_size) == (
        384,
        6,
        12,
        1536,
    )
    assert (cfg.vocab_size, cfg.norm_eps, cfg.type_vocab_size) == (30522, 1e-12, 2)
    assert cfg.extra_hf == {}


def test_from_hf_llama_config_reads_both_rope_spellings() -> None:
    base = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    old = ModelConfig.from_hf_config({**base, "rope_theta": 777.0})
    new = ModelConfig.from_hf_config(
        {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 777.0}}
    )
    assert old == new
    assert (old.head, old.kv_heads, old.rope_theta, old.tie_word_embeddings) == ("lm", 2, 777.0, True)
    with pytest.raises(ValueError, match="RoPE scaling 'llama3'"):
        ModelConfig.from_hf_config({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        ModelConfig.from_hf_config({"model_type": "gpt2"})


@pytest.mark.parametrize("head", ["none", "mlm", "classification"])
def test_encoder_hf_round_trip(encoder_cfg, head: str) -> None:
    transformers = pytest.importorskip("transformers")
    labels = {"num_labels": 3, "id2label": {0: "a", 1: "b", 2: "c"}} if head == "classification" else {}
    cfg = encoder_cfg(head=head, add_pooler=head != "mlm", **labels)
    hf = cfg.to_hf_config()
    assert ModelConfig.from_hf_config(hf) == cfg
    built = transformers.BertConfig.from_dict(hf)
    assert (built.hidden_size, built.num_hidden_layers, built.intermediate_size) == (64, 2, 128)


def test_decoder_hf_round_trip(decoder_cfg) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = decoder_cfg(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = cfg.to_hf_config()
    assert ModelConfig.from_hf_config(hf) == cfg
    built = transformers.LlamaConfig.from_dict(hf)
    assert (built.num_key_value_heads, built.head_dim, built.tie_word_embeddings) == (2, 16, False)
    assert dataclasses.replace(cfg, num_layers=1).num_layers == 1


def test_transformer_config_raises_no_deprecation_warning(encoder_cfg, decoder_cfg) -> None:
    # megatron 0.16 warns about its own default cuda_graph_scope="full"; gkd passes [] instead.
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder_cfg().to_transformer_config(1)
        decoder_cfg().to_transformer_config(1)
    assert [str(w.message) for w in caught] == []
