"""The real all-MiniLM-L6-v2 teacher reproduces transformers' own outputs."""

from __future__ import annotations

import pytest
import torch

from gkd.models import Tokenizer, from_pretrained

SENTENCES = [
    "A man is playing guitar.",
    "Someone plays an instrument.",
    "The stock market fell sharply today after the announcement.",
    "Cats sleep.",
]

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def teacher_and_reference(minilm_path):
    transformers = pytest.importorskip("transformers")
    teacher = from_pretrained(minilm_path).eval()
    batch = Tokenizer.from_dir(minilm_path, 128).encode(SENTENCES)
    names = {"embeddings", "pooled", "layers.3.attention.probs"} | {f"layers.{i}.output" for i in range(6)}
    with torch.no_grad():
        with teacher.capture(names) as feats:
            out = teacher(**batch)
        hf = transformers.AutoModel.from_pretrained(str(minilm_path), attn_implementation="eager").eval()
        ref = hf(**batch, output_hidden_states=True, output_attentions=True)
    return teacher, batch, feats, out, ref


def test_checkpoint_shape_and_parameter_count(teacher_and_reference) -> None:
    teacher, batch, *_ = teacher_and_reference
    cfg = teacher.model_config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size) == (6, 384, 12, 30522)
    assert teacher.num_parameters() == 22_713_216  # the count transformers reports
    mask = batch["attention_mask"]
    assert mask.shape[0] == 4 and bool((mask.sum(1) < mask.shape[1]).any())  # the batch is padded


def test_hidden_states_match_transformers(teacher_and_reference) -> None:
    _, batch, feats, out, ref = teacher_and_reference
    real = batch["attention_mask"].bool()
    ours = [feats["embeddings"]] + [feats[f"layers.{i}.output"] for i in range(6)]
    diffs = [float((a - b)[real].abs().max()) for a, b in zip(ours, ref.hidden_states, strict=True)]
    assert max(diffs) <= 1e-4, diffs
    assert float((out.last_hidden - ref.last_hidden_state)[real].abs().max()) <= 1e-4
    assert float((out.pooled - ref.pooler_output).abs().max()) <= 1e-4


def test_attention_probabilities_match_transformers(teacher_and_reference) -> None:
    _, _, feats, _, ref = teacher_and_reference
    assert float((feats["layers.3.attention.probs"] - ref.attentions[3]).abs().max()) <= 1e-5


def test_mean_pooled_embeddings_are_meaningful(teacher_and_reference) -> None:
    _, batch, _, out, _ = teacher_and_reference
    m = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((out.last_hidden * m).sum(1) / m.sum(1), dim=-1)
    related, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert related > 0.4 and related > unrelated + 0.2
