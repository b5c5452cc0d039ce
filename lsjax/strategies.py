"""Decode strategies: how an adapter's routed term is computed while generating.

Each strategy yields two pure functions over a `bundle` of arrays (jit them, donate the cache):
    prefill(bundle, input_ids, attention_mask, cache) -> (last-token logits [B, V], cache)
    step(bundle, tokens [B], cache)                   -> (logits [B, V], cache)

- `unmerged`: base matmul + the chosen experts' low-rank term (XLA ops): gathered for a few rows,
  every expert masked by its gates from E / k rows on (`unmerged_computation`).
- `fused`: one kernel per projection, `x @ W + sum_k g_k (x @ A_k) @ B_k`, any batch, each row its
  own experts, never writing weights: `lsjax.native.routed_matmul` when decoding with native
  matvecs (CPU), else `pallas_kernels.routed_lora_matmul` (Pallas on GPU, XLA elsewhere).
- `merged`: the paper's way. `lora`: merged once, then the plain backbone. `switch`: per token,
  the router runs on layer 0's input, `pallas_kernels.sgmm_merge` builds W_base + delta for all
  layers of each projection kind (from the pristine base: no drift), then the plain backbone runs.
  One route per step, so batch 1 only.
- `auto`: `lora` -> merged (free after the one-time merge); otherwise `fused` with native matvecs
  (2-core CPU, SmolLM2 batch 1: 1.12x base against unmerged's 1.58x) and `unmerged` without them,
  the fastest on an H100 (7B bf16, batch 1: unmerged 1.27x base, fused 1.47x, merged 5.3x; batch 8:
  unmerged 1.28x, fused 2.46x; XLA's own matvec beats the Pallas kernel's; docs/perf.md).
Prefill always runs the training form (dense routed term), as in the paper.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lsjax.config import ModelConfig
from lsjax import decode
from lsjax.decode import forward_cached
from lsjax.errors import ConfigError
from lsjax.model import (PROJECTIONS, default_positions, embed_tokens, rms_norm, split_layers, split_stacked,
                         stack_layers)

STRATEGIES = ("unmerged", "merged", "fused", "auto")
ATTENTION_INPUTS = ("q", "k", "v")


def resolve_native(native: bool | None, dtype: Any) -> bool:
    """Whether decoding uses `lsjax.native`: None means when it is built, on CPU, for fp32 weights."""
    from lsjax import native as kernels

    if native is None:
        return kernels.available() and jnp.dtype(dtype) == jnp.float32
    if native and not kernels.available():
        raise ConfigError(f"native=True, but the native CPU matvecs cannot run: {kernels.unavailable_reason()}")
    return bool(native)


def resolve_strategy(strategy: str, adapter_config: Any | None, native: bool = False) -> str:
    """The concrete strategy for this adapter; refuses what cannot run."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is not supported; expected one of {STRATEGIES}")
    if adapter_config is None:
        return "base"
    method = adapter_config.method
    if strategy == "auto":
        if method == "lora":
            return "merged"
        return "fused" if native else "unmerged"
    if strategy == "merged":
        if method not in ("lora", "switch"):
            raise ConfigError(f"strategy 'merged' is for methods 'lora' and 'switch', not {method!r} "
                              f"(its routes are decided inside every layer); use 'unmerged' or 'fused'")
        if method == "switch" and first_target(adapter_config) not in ATTENTION_INPUTS:
            raise ConfigError("strategy 'merged' needs the switch router on layer 0's attention input "
                              f"(targets including q, k or v); got targets {adapter_config.targets}")
    return strategy


def first_target(adapter_config) -> str:
    return next(p for p in PROJECTIONS if p in adapter_config.targets)


def switch_route(model_config: ModelConfig, base: dict, adapter_config, adapter_params: dict, tokens: jax.Array):
    """The switch route of one decode step, from the attn-normed embedding layer 0 sees (q/k/v first)."""
    from lsjax.adapters.routing import router_logits, top_k_route

    x = embed_tokens(base, tokens[:, None])
    layers = base["layers"]
    norm = layers["attn_norm"][0] if isinstance(layers, dict) else layers[0]["attn_norm"]
    x = rms_norm(x, norm, model_config.rms_norm_eps)
    route, _ = top_k_route(router_logits(x, adapter_params["routers"]["switch"]), adapter_config.top_k)
    return route


def merged_switch_params(base: dict, adapter_config, adapter_params: dict, route) -> dict:
    """W_base + scale * sum_k g_k A_k B_k for all layers of each target kind: one sgmm call per kind."""
    from pallas_kernels import sgmm_merge

    ids, gates = route.ids[0, 0], (adapter_config.scale * route.gates[0, 0]).astype(jnp.float32)
    layers = dict(base["layers"])
    for kind in adapter_config.targets:
        e = adapter_params["experts"][kind]
        layers[kind] = sgmm_merge(layers[kind], e["a"], e["b"], ids, gates)
    return {**base, "layers": layers}


def build(model_config: ModelConfig, adapter_config, strategy: str, native: bool = False) -> tuple[Callable, Callable]:
    """(prefill, step) pure functions of `bundle = {"base": params, "adapter": arrays or None}`.

    `native`: decode matvecs through `lsjax.native` (multi-threaded CPU custom calls; `fused` then
    runs its routed kernel) wherever they apply, XLA elsewhere.
    """
    if strategy == "base" or (strategy == "merged" and adapter_config.method == "lora"):
        # lora merged: the bundle's base already holds W + scale * A @ B (see `prepare_bundle`)
        def prefill(bundle, ids, mask, cache):
            return decode.prefill(model_config, bundle["base"], ids, mask, cache, native)

        def step(bundle, tokens, cache):
            return decode.decode_step(model_config, bundle["base"], tokens, cache, native)
        return prefill, step

    from lsjax.adapters.methods import adapted_forward_cached

    prefill_config = adapter_config.replace(computation="dense")

    def prefill(bundle, ids, mask, cache):
        logits, cache, _ = adapted_forward_cached(model_config, bundle["base"], prefill_config, bundle["adapter"],
                                                  ids, mask, default_positions(mask), cache, native)
        return logits[:, -1], cache

    def adapted_step(bundle, tokens, cache):
        computation = "fused" if strategy == "fused" else unmerged_computation(adapter_config, tokens.shape[0])
        step_config = adapter_config.replace(computation=computation)
        positions = decode.next_positions(cache)
        logits, cache, _ = adapted_forward_cached(model_config, bundle["base"], step_config, bundle["adapter"],
                                                  tokens[:, None], jnp.ones_like(positions, jnp.bool_),
                                                  positions, cache, native)
        return logits[:, 0], cache

    if strategy != "merged":
        return prefill, adapted_step

    def merged_step(bundle, tokens, cache):
        route = switch_route(model_config, bundle["base"], adapter_config, bundle["adapter"], tokens)
        merged = merged_switch_params(bundle["base"], adapter_config, bundle["adapter"], route)
        positions = decode.next_positions(cache)
        logits, cache = forward_cached(model_config, merged, tokens[:, None], jnp.ones_like(positions, jnp.bool_),
                                       positions, cache, native=native)
        return logits[:, 0], cache

    return prefill, merged_step


def unmerged_computation(adapter_config, rows: int) -> str:
    """How `unmerged` computes a step's routed term for `rows` tokens (static under jit).

    `gathered` copies each row's k chosen experts out (`[rows, k, d, r]`) and reads them; once
    rows * k reaches E that is more bytes than all experts, and `dense` (every expert, masked by
    the gates: plain matmuls, no gather) is faster. H100, 7B bf16 (docs/perf.md): batch 8 1.27x
    base dense vs 1.65x gathered; batch 1 1.26x gathered vs 1.30x dense.
    """
    return "dense" if rows * adapter_config.top_k >= adapter_config.num_experts else "gathered"


def prepare_bundle(model_config: ModelConfig, base: dict, adapter_config, adapter_params: dict | None, strategy: str,
                   unroll: bool = True) -> dict:
    """The arrays the strategy's functions take.

    `lora` + merged folds the adapter in once. With `unroll`, base layers are split per layer
    (`lsjax.model.split_layers`): prefill and decode then run a Python loop over layers instead of
    a scan, which on XLA:CPU avoids copying every layer's weights each step. The merged switch
    strategy keeps the stacked layout its all-layers SGMM merge works on. `base` may come in either
    layout (an already split one is used as it is, so several Generators can share one copy).
    """
    if strategy == "merged" and adapter_config.method == "lora":
        from lsjax.adapters.merge import merge_lora

        base, adapter_params = jax.tree.map(jnp.asarray, merge_lora(model_config, stack_layers(base), adapter_config,
                                                                    adapter_params)), None
    if not unroll or (strategy == "merged" and adapter_config.method == "switch"):
        return {"base": stack_layers(base), "adapter": adapter_params}
    if adapter_params is not None and strategy in ("unmerged", "fused"):
        adapter_params = split_adapter(adapter_config, adapter_params)
    return {"base": split_layers(base), "adapter": adapter_params}


def split_adapter(adapter_config, adapter_params: dict) -> dict:
    """Experts (and per-layer routers) as `LayerTuple`s: the unrolled step reads each layer's arrays
    as they are instead of slicing stacked ones (which XLA:CPU copied every step). Switch's router
    is global and stays."""
    routers = adapter_params["routers"]
    if adapter_config.method != "switch":
        routers = split_stacked(routers)
    return {"experts": split_stacked(adapter_params["experts"]), "routers": routers}


@functools.lru_cache(maxsize=None)
def compiled(model_config: ModelConfig, adapter_config, strategy: str, native: bool = False):
    """Jitted (prefill, step) per (model, adapter config, strategy, native), shared by every Generator."""
    prefill, step = build(model_config, adapter_config, strategy, native)
    return jax.jit(prefill, donate_argnums=(3,)), jax.jit(step, donate_argnums=(2,))
