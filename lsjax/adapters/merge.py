"""Fold a plain LoRA into the base weights, for decoding (`merged`) and for export.

Only `lora` merges statically: routed experts depend on each token, so their merge is a decode
strategy (per-token switching), not an export.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from lsjax.adapters.config import AdapterConfig
from lsjax.adapters.errors import AdapterError
from lsjax.adapters.params import AdapterParams, adapted_groups, check_params, member_layout
from lsjax.adapters.routing import place
from lsjax.config import ModelConfig
from lsjax.convert.export import export_hf
from lsjax.layers import Layers
from lsjax.model import Params, split_layers
from lsjax.quant import refuse_quantized


def merge_lora(model_config: ModelConfig, base_params: Params, adapter_config: AdapterConfig,
               adapter_params: AdapterParams) -> Params:
    """Held-layout params with W + (alpha / r) * A @ B in every adapted group (fp32, cast back);
    every other array is the base's own (not copied)."""
    if adapter_config.method != "lora":
        raise AdapterError(f"only method 'lora' merges into fixed weights; method={adapter_config.method!r} "
                           f"routes each token to its own experts")
    check_params(model_config, adapter_config, adapter_params)
    refuse_quantized(base_params, "a merge writes the adapter into the weights")
    r, hi = adapter_config.rank, jax.lax.Precision.HIGHEST
    layers = [dict(layer) for layer in split_layers(base_params)["layers"].tree]
    for group in adapted_groups(adapter_config):
        members = member_layout(model_config, adapter_config, group)
        a_all = jnp.asarray(adapter_params["experts"][group]["a"], jnp.float32)[:, 0]
        b_all = jnp.asarray(adapter_params["experts"][group]["b"], jnp.float32)[:, 0]
        for i, layer in enumerate(layers):
            w = layer[group]
            delta = jnp.concatenate([jnp.matmul(a_all[i, :, s * r:(s + 1) * r], b_all[i, :, b_off:b_off + width],
                                                precision=hi) for s, (_, b_off, width) in enumerate(members)], axis=-1)
            delta = place(delta, members, w.shape[-1])
            layer[group] = (jnp.asarray(w, jnp.float32) + adapter_config.scale * delta).astype(w.dtype)
    return {**base_params, "layers": Layers.of_layers(layers)}


def export_merged_hf(folder: str | Path, model_config: ModelConfig, base_params: Params,
                     adapter_config: AdapterConfig, adapter_params: AdapterParams, **kwargs) -> Path:
    """The base with a plain LoRA merged in, as an HF folder (see `lsjax.convert.export.export_hf`)."""
    merged = merge_lora(model_config, base_params, adapter_config, adapter_params)
    return export_hf(folder, model_config, merged, **kwargs)
