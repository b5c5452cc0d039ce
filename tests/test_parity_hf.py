"""Logit parity with transformers (PyTorch CPU, fp32) through the real path: HF folder -> convert
-> orbax checkpoint -> lsjax.load -> model(ids, mask)."""

import numpy as np
import pytest
from tiny import hf_logits, make_hf_model, ragged_batch

import lsjax
from lsjax.convert import convert_hf

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

CASES = {
    "llama-untied": dict(model_type="llama", tie_word_embeddings=False),
    "llama-tied": dict(model_type="llama", tie_word_embeddings=True),
    "llama3-rope-scaling": dict(model_type="llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "linear-rope-scaling": dict(model_type="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral-sliding-window": dict(model_type="mistral", sliding_window=7),
    "gqa-mha": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4),
    "gqa-4to1": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=1),
    "gqa-6to2-headdim": dict(model_type="llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                             head_dim=16),
    "sharded-index": dict(model_type="llama", shard_size="40KB", num_hidden_layers=3),
}


@pytest.mark.parametrize("pad_side", ["right", "left"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case, pad_side):
    kwargs = dict(CASES[case])
    hf_model = make_hf_model(tmp_path / "hf", **kwargs)
    if case == "sharded-index":
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    model, _ = lsjax.load(tmp_path / "ckpt")

    ids, mask, seqs = ragged_batch([13, 5, 9], pad_side=pad_side, seed=len(case))
    logits = np.asarray(model(ids, attention_mask=mask))
    assert logits.shape == (3, 13, hf_model.config.vocab_size)
    for row, seq in enumerate(seqs):
        got = logits[row][mask[row].astype(bool)]
        want = hf_logits(hf_model, seq)
        assert np.abs(got - want).max() <= 1e-4, case
