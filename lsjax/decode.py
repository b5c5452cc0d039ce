"""KV-cache decoding: the pure `prefill` / `decode_step` functions (`lsjax.generate` drives them).

Prompts are left-padded so every row writes the same cache slot each step; each row's positions
count only its real tokens, so padding never shifts RoPE. All functions are pure and jit-able
(config and backend are hashable frozen dataclasses: pass them as static arguments or close over
them). Over the held (split) layout a step loops over the layers' own arrays and the cache holds
one buffer per layer, updated in place; stacked params and cache take a scan instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lsjax.backend_interface import Backend
from lsjax.backends import XLA
from lsjax.config import ModelConfig
from lsjax.errors import ConfigError
from lsjax.layers import Layers, run_layers
from lsjax.model import (
    BaseProducts,
    Params,
    Products,
    decoder_layer,
    default_positions,
    embed_tokens,
    lm_logits,
    rope_tables,
    visibility_mask,
    write_columns,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys/values, each slot's position and validity `[B, T]`, slots used (one count for every
    row, or one per row `[B]`: a serving engine's rows each have their own), and with an
    `lsjax.adapters.table.AdapterTable`, each row's adapter slot `[B]` (None: one adapter, or none,
    for every row).

    k / v are `Layers` of `[KV*B, T, D]` arrays (kv head h of row b at h*B + b: attention reads
    them without a transpose, and a mesh splits them over kv heads in contiguous blocks), in the
    layout of the params they go with: per layer for held params (a step updates each layer's
    buffer in place), stacked `[L, KV*B, T, D]` for stacked ones (a scan).
    """

    k: Layers
    v: Layers
    positions: jax.Array
    valid: jax.Array
    length: jax.Array
    adapter: jax.Array | None = None

    @property
    def capacity(self) -> int:
        return self.positions.shape[1]


def init_cache(config: ModelConfig, batch: int, capacity: int, dtype: Any = jnp.float32,
               stacked: bool = False) -> KVCache:
    """An empty cache: one buffer per layer (goes with held params), or `stacked` (stacked params)."""
    shape = (config.num_kv_heads * batch, capacity, config.head_dim)
    if stacked:
        k = Layers.of_stacked(jnp.zeros((config.num_layers, *shape), dtype))
        v = Layers.of_stacked(jnp.zeros((config.num_layers, *shape), dtype))
    else:
        k = Layers.of_layers(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        v = Layers.of_layers(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(k=k, v=v,
                   positions=jnp.zeros((batch, capacity), jnp.int32),
                   valid=jnp.zeros((batch, capacity), jnp.bool_), length=jnp.zeros((), jnp.int32))


def cache_shardings(cache: KVCache, mesh: Mesh) -> KVCache:
    """Where `cache` lives on `mesh` (a pytree of NamedShardings shaped like it): each k / v buffer's
    (kv head, row) axis split over `tensor` in contiguous blocks, so kv heads first and a head's rows
    only past as many devices as kv heads (where `tensor` does not divide the axis, replicated);
    positions, validity, lengths and adapter slots, which every device reads, replicated."""
    tensor = mesh.shape.get("tensor", 1)
    axis = 1 if cache.k.stacked else 0
    whole = NamedSharding(mesh, PartitionSpec())

    def buffer(x):  # no trailing Nones: a compiled function's outputs carry the spec in that form
        split = tensor > 1 and x.shape[axis] % tensor == 0
        return NamedSharding(mesh, PartitionSpec(*[None] * axis, "tensor") if split else PartitionSpec())

    def each(layers: Layers) -> Layers:
        return Layers(jax.tree.map(buffer, layers.tree), layers.stacked)

    return KVCache(each(cache.k), each(cache.v), whole, whole, whole, None if cache.adapter is None else whole)


def pinned(cache: KVCache, mesh: Mesh | None) -> KVCache:
    """`cache` held where `cache_shardings` says (inside a jitted function; `mesh` None: unchanged), so
    that a function's output state is placed as its input was and the next call compiles nothing new."""
    return cache if mesh is None else jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))


def cached_inputs(config: ModelConfig, cache: KVCache, attention_mask: jax.Array, positions: jax.Array):
    """`(all_positions, all_valid, cos, sin, visibility [B, S, T])` of new tokens written at `cache.length`."""
    index = cache.length
    all_positions = write_columns(cache.positions, positions.astype(jnp.int32), index, axis=1)
    all_valid = write_columns(cache.valid, attention_mask.astype(jnp.bool_), index, axis=1)
    cos, sin = rope_tables(config, positions)
    return all_positions, all_valid, cos, sin, visibility_mask(config, positions, all_positions, all_valid)


def forward_cached(config: ModelConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array,
                   positions: jax.Array, cache: KVCache, products: Callable[[Any, Any], Products] | None = None,
                   layer_extras: Layers | None = None, backend: Backend = XLA) -> tuple[jax.Array, KVCache]:
    """Run `[B, S]` new tokens against the cache; returns logits `[B, S, V]` and the grown cache.

    Adapters plug in as in `lsjax.model.forward`: `products(layer index, layer_extras' slice)`.
    `backend` (static, `lsjax.backends`) runs the plain products and the vocabulary head.
    """
    index = cache.length
    all_positions, all_valid, cos, sin, mask = cached_inputs(config, cache, attention_mask, positions)
    plain = BaseProducts(backend)

    def body(x, layer):
        i, w, (k, v, extras) = layer
        hook = plain if products is None else products(i, extras)
        x, kv, _ = decoder_layer(config, w, x, cos, sin, mask, hook, kv=(k, v, index))
        return x, kv

    x, kv = run_layers(body, embed_tokens(params, input_ids), params["layers"], (cache.k, cache.v, layer_extras))
    logits = lm_logits(config, params, x, backend)
    return logits, grown_cache(cache, kv, all_positions, all_valid, input_ids.shape[1])


def grown_cache(cache: KVCache, kv: Layers, positions: jax.Array, valid: jax.Array, new: int) -> KVCache:
    """The cache after `new` tokens; `kv` (each layer's `(k, v)`) kept in the layout of `cache`."""
    k, v = kv.item(0).in_layout_of(cache.k), kv.item(1).in_layout_of(cache.v)
    return KVCache(k, v, positions, valid, cache.length + new, cache.adapter)


def prefill(config: ModelConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array,
            cache: KVCache, backend: Backend = XLA, every: bool = False) -> tuple[jax.Array, KVCache]:
    """Left-padded prompts into the cache.

    Args:
        config, params: as `lsjax.model.forward` (params in the held, per-layer layout).
        input_ids: `[B, S]` int, each prompt flush right (`left_pad`).
        attention_mask: `[B, S]` bool, True at real tokens.
        cache: a `KVCache` (`init_cache`) with room for S more columns; it may already hold the
            start of the prompts (a long prompt prefilled in chunks). Donate it under jit.
        backend: (static) what runs the products (`lsjax.backends`).
        every: (static) the logits of every position instead of the last (scoring a prompt).

    Returns:
        `(logits [B, V] fp32 of each prompt's last token (every: [B, S, V]), the cache holding the prompts)`.
    """
    logits, cache = forward_cached(config, params, input_ids, attention_mask, prompt_positions(attention_mask, cache),
                                   cache, backend=backend)
    return (logits if every else logits[:, -1]), cache


def next_positions(cache: KVCache) -> jax.Array:
    """`[B, 1]` position of each row's next token: its count of real tokens so far."""
    return jnp.sum(cache.valid, axis=1, dtype=jnp.int32)[:, None]


def prompt_positions(attention_mask: jax.Array, cache: KVCache) -> jax.Array:
    """`[B, S]` positions of prompt tokens written after the real tokens the cache already holds."""
    return next_positions(cache) + default_positions(attention_mask)


def decode_step(config: ModelConfig, params: Params, tokens: jax.Array, cache: KVCache,
                backend: Backend = XLA) -> tuple[jax.Array, KVCache]:
    """One new token per row.

    Args:
        config, params, backend: as `prefill`.
        tokens: `[B]` int, each row's next token; its position is the row's count of real tokens so far.
        cache: the `KVCache` of the previous step (donate it under jit).

    Returns:
        `(logits [B, V] fp32 for the token after it, the cache with it written)`.
    """
    positions = next_positions(cache)
    logits, cache = forward_cached(config, params, tokens[:, None], jnp.ones_like(positions, jnp.bool_),
                                   positions, cache, backend=backend)
    return logits[:, 0], cache


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0,
             width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask `[B, width]` with each prompt flush right (width: the longest by default)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("prompts must be a non-empty list of non-empty token id lists")
    width = width or max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.bool_)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, True
    return ids, mask
