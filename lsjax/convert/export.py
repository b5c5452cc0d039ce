"""Export lsjax params as a Hugging Face folder that transformers loads.

`config.json` (the source's own, when given, else one built from `ModelConfig`) and
`model.safetensors` with HF names in torch's `[out, in]` layout, the tokenizer files beside them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from lsjax.config import ModelConfig
from lsjax.convert.assemble import GLOBAL_NAMES, LAYER_NAMES
from lsjax.model import Params, to_projections
from lsjax.quant import refuse_quantized

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def hf_config_dict(model_config: ModelConfig, dtype: Any = np.float32) -> dict[str, Any]:
    """A transformers `config.json` for `model_config` (when the source's own is not at hand)."""
    c = model_config
    rope: dict[str, Any] = {"rope_type": c.rope.type, "rope_theta": c.rope.theta}
    if c.rope.type in ("linear", "llama3"):
        rope["factor"] = c.rope.factor
    if c.rope.type == "llama3":
        rope.update(low_freq_factor=c.rope.low_freq_factor, high_freq_factor=c.rope.high_freq_factor,
                    original_max_position_embeddings=c.rope.original_max_position_embeddings)
    out = {"architectures": [ARCHITECTURES[c.model_type]], "model_type": c.model_type,
           "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
           "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
           "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
           "tie_word_embeddings": c.tie_word_embeddings, "rope_theta": c.rope.theta,
           "rope_scaling": None if c.rope.type == "default" else rope, "attention_bias": False, "mlp_bias": False,
           "bos_token_id": c.bos_token_id, "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple)
           else c.eos_token_id, "pad_token_id": c.pad_token_id, "torch_dtype": np.dtype(dtype).name}
    if c.model_type == "mistral":
        out["sliding_window"] = c.sliding_window
    return out


def export_hf(folder: str | Path, model_config: ModelConfig, params: Params, hf_config: dict | None = None,
              tokenizer_files: dict[str, bytes | str] | None = None) -> Path:
    """Write `params` (`model.params()`'s layout) as an HF folder: config.json, model.safetensors (HF
    names, `[out, in]`), tokenizer."""
    refuse_quantized(params, "export writes float weights")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = to_projections(model_config, jax.tree.map(np.asarray, params))
    tensors = {}
    for suffix, (key, transpose) in LAYER_NAMES.items():
        for i in range(model_config.num_layers):
            value = params["layers"][key][i]
            tensors[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(value.T if transpose else value)
    for name, (key, transpose) in GLOBAL_NAMES.items():
        if key in params:
            value = params[key]
            tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    dtype = params["embed"].dtype
    config = dict(hf_config) if hf_config else hf_config_dict(model_config, dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name, data in (tokenizer_files or {}).items():
        (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return folder
