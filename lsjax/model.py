"""Llama-family decoder: a pure functional core and a thin Flax NNX module around it.

Weights are held the way a decode step reads them. Projections that share an input are one
product: `qkv [d, q + k + v]` (q, k and v side by side) and `gate_up [d, 2 f]`, with `o` and
`down` alone (`PROJECTION_GROUPS`). `params["layers"]` is a `lsjax.layers.Layers`, whose declared
layout says how the layers run: held per layer (the model's own arrays; decoding reads every
weight in place), or stacked for a scan (full-sequence forwards stack held layers inside the
jitted call: compile time flat in depth).

The pure functions (`forward`, `decoder_layer`, `rms_norm`, `apply_rope`, `attention`) take a plain
dict of arrays, so they compose with jit, shard_map and pmap. A layer's four products go through
`Products`: `BaseProducts` runs them on a backend (`lsjax.backends`: XLA, a Pallas kernel, the CPU
native library), and the adapters' products add their routed terms, each product given its route
as an argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsjax.backend_interface import Backend
from lsjax.backends import XLA
from lsjax.config import PROJECTION_GROUPS, ModelConfig
from lsjax.layers import Layers, run_layers
from lsjax.quant import is_quantized

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
GROUPS = tuple(PROJECTION_GROUPS)  # ("qkv", "o", "gate_up", "down"), in execution order
GROUP_OF = {member: group for group, members in PROJECTION_GROUPS.items() for member in members}
LAYER_NORMS = ("attn_norm", "mlp_norm")
LAYER_WEIGHTS = ("attn_norm", "qkv", "o", "mlp_norm", "gate_up", "down")

Params = dict[str, Any]  # embed, layers (a `lsjax.layers.Layers` of per-layer dicts), norm[, lm_head]


# -- building blocks --------------------------------------------------------------------------
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as HF computes it: normalise in fp32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin `[B, S, head_dim]` for integer positions `[B, S]` (fp32, rotate-half layout)."""
    inv_freq = jnp.asarray(config.rope.inverse_frequencies(config.head_dim), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x [B, S, heads, head_dim]` by the tables `[B, S, head_dim]`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def visibility_mask(config: ModelConfig, q_positions: jax.Array, k_positions: jax.Array,
                   k_valid: jax.Array) -> jax.Array:
    """Boolean `[B, S, T]`: key t is visible to query s (valid, causal, inside the sliding window)."""
    qp, kp = q_positions[:, :, None], k_positions[:, None, :]
    allowed = k_valid[:, None, :] & (kp <= qp)
    if config.sliding_window is not None:
        allowed &= kp > qp - config.sliding_window
    return allowed


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q `[B,S,H,D]`, k/v `[KV*B,T,D]` (`kv_rows`: kv head h of row b at
    h*B + b), mask `[B,S,T]` -> `[B,S,H,D]`.

    Keys and values are in the KV cache's layout, so both products are plain batched matmuls over
    the KV*B (kv head, row) pairs and no step transposes the cache; kv heads lead so that a mesh
    splits the cache over them in contiguous blocks. Scores and softmax in fp32; a query with no
    visible key (padding) gets zeros, not NaN.
    """
    b, s, h, d = q.shape
    t = k.shape[1]
    kv = k.shape[0] // b
    g = h // kv
    # each (kv head, row) is one plain product of its g * s query rows with the keys, whose output
    # [kv*b, g*s, t] is already the layout the mask and softmax read: no transposed copy of the
    # scores (an einsum over separate g and s axes made XLA:CPU copy them; docs/perf.md)
    q = q.reshape(b, s, kv, g, d).transpose(2, 0, 3, 1, 4).reshape(kv * b, g * s, d)
    batch = ((0,), (0,))
    scores = jax.lax.dot_general(q, k, (((2,), (2,)), batch), preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = scores.reshape(kv, b, g, s, t)
    mask = mask[None, :, None, :, :]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0).astype(v.dtype).reshape(kv * b, g * s, t)
    out = jax.lax.dot_general(probs, v, (((2,), (1,)), batch))
    return out.reshape(kv, b, g, s, d).transpose(1, 3, 0, 2, 4).reshape(b, s, h, d)


def kv_rows(x: jax.Array) -> jax.Array:
    """Keys or values `[B, S, KV, D]` in the cache's layout `[KV*B, S, D]` (kv head h of row b at h*B + b)."""
    b, s, kv, d = x.shape
    return x.transpose(2, 0, 1, 3).reshape(kv * b, s, d)


def write_columns(buffer: jax.Array, new: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """`new` written into `buffer` from column `index` along `axis`: one index for every row, or one
    per row (`[B]`, rows on axis 0: each row of a serving engine's cache has its own length)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(buffer, new, index, axis=axis)
    return jax.vmap(lambda b, n, i: jax.lax.dynamic_update_slice_in_dim(b, n, i, axis=axis - 1))(buffer, new, index)


def write_kv(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """A cache buffer `[KV*B, T, D]` with `new` `[KV*B, S, D]` (`kv_rows`) written from column `index`
    (one, or one per row `[B]`).

    Rows and kv heads share the buffer's first axis so that no axis is 1 at batch 1: XLA:CPU copied
    a `[1, KV, T, D]` buffer four times a step instead of updating it in place (docs/perf.md).
    """
    heads = cache.shape[0] // (1 if jnp.ndim(index) == 0 else index.shape[0])
    per_pair = index if jnp.ndim(index) == 0 else jnp.tile(index, heads)  # never a reshape of the buffer
    return write_columns(cache, new, per_pair, axis=1)


class Products(Protocol):
    """How one layer's products run: x @ w on a backend, plus whatever an adapter adds.

    Routing is data: `decoder_layer` asks for each product's route at that product's input and
    hands it to the product; nothing is remembered between calls, so the order of the calls
    cannot change a route.
    """

    def route(self, group: str, x: jax.Array, block: Any) -> tuple[Any, Any]:
        """`(route, router stats)` of `group`'s product from its input `x` (`(None, None)` without a
        router). `block` is the route taken at `gate_up`'s input, given to `down` (an FFN block's route)."""

    def __call__(self, group: str, x: jax.Array, w: jax.Array, route: Any) -> jax.Array:
        """x @ w plus the group's term under `route`, `[..., N]`."""


@dataclasses.dataclass(frozen=True)
class BaseProducts:
    """The plain backbone's products on a backend: no route, no term."""

    backend: Backend = XLA

    def route(self, group: str, x: jax.Array, block: Any) -> tuple[Any, Any]:
        return None, None

    def __call__(self, group: str, x: jax.Array, w: jax.Array, route: Any) -> jax.Array:
        return self.backend(group, x, w)


PLAIN = BaseProducts()


def decoder_layer(config: ModelConfig, w: Params, x: jax.Array, cos: jax.Array, sin: jax.Array,
                  mask: jax.Array, products: Products = PLAIN,
                  kv: tuple[jax.Array, jax.Array, jax.Array] | None = None):
    """One pre-norm block: x + attn(norm(x)), then + SwiGLU(norm(x)). `w` holds one layer's weights.

    Four products: `qkv`, `o`, `gate_up`, `down`, each given the route `products.route` decides at
    its input. Without `kv`, attends over the block's own tokens. With `kv = (k_cache [KV*B,T,D],
    v_cache, write_index)`, writes this block's keys/values into the cache at `write_index` (one, or
    one per row), attends over the whole cache (mask `[B,S,T]`).

    Returns `(x [B, S, D], (k_cache, v_cache) or None, stats)`: `stats` maps each group to what
    `products.route` reported at its input (router statistics; None where no router read it).
    """
    stats = {}

    def product(group: str, x: jax.Array, block: Any = None) -> tuple[jax.Array, Any]:
        route, stats[group] = products.route(group, x, block)
        return products(group, x, w[group], route), route

    b, s, _ = x.shape
    h = rms_norm(x, w["attn_norm"], config.rms_norm_eps)
    qkv, _ = product("qkv", h)
    q, k, v = jnp.split(qkv, [config.q_size, config.q_size + config.kv_size], axis=-1)
    q = q.reshape(b, s, config.num_heads, config.head_dim)
    k = k.reshape(b, s, config.num_kv_heads, config.head_dim)
    v = v.reshape(b, s, config.num_kv_heads, config.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = kv_rows(k), kv_rows(v)  # [KV*B, S, D]
    new_kv = None
    if kv is not None:
        k_cache, v_cache, index = kv
        k = k_cache = write_kv(k_cache, k.astype(k_cache.dtype), index)
        v = v_cache = write_kv(v_cache, v.astype(v_cache.dtype), index)
        new_kv = (k_cache, v_cache)
    attn = attention(q, k, v, mask).reshape(b, s, config.q_size)
    out, _ = product("o", attn)
    x = x + out
    h = rms_norm(x, w["mlp_norm"], config.rms_norm_eps)
    gate_up, block = product("gate_up", h)
    gate, up = jnp.split(gate_up, 2, axis=-1)
    down, _ = product("down", jax.nn.silu(gate) * up, block)
    return x + down, new_kv, stats


def split_layers(params: Params) -> Params:
    """`params` with `layers` per layer (the held layout)."""
    return {**params, "layers": params["layers"].as_layers()}


def stack_layers(params: Params) -> Params:
    """`params` with `layers` stacked (a copy when held per layer: for scans)."""
    return {**params, "layers": params["layers"].as_stacked()}


def embed_tokens(params: Params, input_ids: jax.Array) -> jax.Array:
    embed = params["embed"]
    if is_quantized(embed):  # only the rows taken are dequantized
        return embed.rows(input_ids)
    return jnp.take(embed, input_ids, axis=0)


def lm_logits(config: ModelConfig, params: Params, h: jax.Array, backend: Backend | None = None) -> jax.Array:
    """Final norm and vocabulary projection through `backend.logits` (XLA by default); fp32 `[B, S, V]`.

    A tied head reads `embed [V, D]` as it is: `h @ embed.T` made XLA copy the transposed embedding.
    """
    h = rms_norm(h, params["norm"], config.rms_norm_eps)
    backend = XLA if backend is None else backend
    if config.tie_word_embeddings:
        return backend.logits(h, params["embed"], transposed=True)
    return backend.logits(h, params["lm_head"], transposed=False)


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions that skip padding: 0 at each sequence's first real token (left or right padding)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 where each packed example (a run of equal segment ids) starts."""
    index = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[..., :1], jnp.bool_),
                              segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)


def sequence_inputs(config: ModelConfig, input_ids, attention_mask=None, positions=None, segment_ids=None,
                    visibility=None):
    """`(input_ids, attention_mask, cos, sin, visibility)` of a whole-sequence forward (no cache).

    `segment_ids [B, S]` (packed rows: 1, 2, ... per example, 0 for padding) stand in for the
    attention mask: a token sees only its own example, and positions restart with each example.
    `visibility [B, S, S]` (query, key; a real token sees itself) says outright which tokens each
    token sees, for rows whose sequences share a prefix (a document's answers after one context,
    each seeing the context and itself only); it needs `positions` and replaces the other two.
    """
    input_ids = jnp.asarray(input_ids)
    if visibility is not None:
        if attention_mask is not None or segment_ids is not None or positions is None:
            raise ValueError("visibility needs positions and stands in for attention_mask and segment_ids")
        visibility = jnp.asarray(visibility).astype(jnp.bool_)
        attention_mask = jnp.diagonal(visibility, axis1=1, axis2=2)
    if segment_ids is not None:
        if attention_mask is not None:
            raise ValueError("give segment_ids or attention_mask, not both (segment 0 is padding)")
        segment_ids = jnp.asarray(segment_ids)
        attention_mask = segment_ids > 0
        if positions is None:
            positions = segment_positions(segment_ids)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
    attention_mask = jnp.asarray(attention_mask).astype(jnp.bool_)
    if positions is None:
        positions = default_positions(attention_mask)
    cos, sin = rope_tables(config, positions)
    visible = visibility_mask(config, positions, positions, attention_mask)
    if segment_ids is not None:
        visible &= segment_ids[:, :, None] == segment_ids[:, None, :]
    if visibility is not None:
        visible &= visibility
    return input_ids, attention_mask, cos, sin, visible


def forward(config: ModelConfig, params: Params, input_ids: jax.Array,
            attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
            products: Callable[[Any, Any], Products] | None = None, layer_extras: Layers | None = None,
            last: int | None = None, segment_ids: jax.Array | None = None,
            visibility: jax.Array | None = None) -> jax.Array:
    """The logits of a full sequence.

    Args:
        config: the model's `ModelConfig` (static under jit).
        params: `model.params()`: `embed [V, D]`, `layers` (a `Layers` of `attn_norm [D]`, `qkv [D, q+k+v]`,
            `o [q, D]`, `mlp_norm [D]`, `gate_up [D, 2F]`, `down [F, D]`), `norm [D]`, `lm_head [D, V]` if untied.
        input_ids: `[B, S]` int token ids.
        attention_mask: `[B, S]` (1 = token, 0 = padding); default all tokens.
        positions: `[B, S]` int; default each row's count of real tokens before it (padding never shifts RoPE).
        segment_ids: `[B, S]` int, instead of `attention_mask`, for rows packed with several examples
            (`sequence_inputs`).
        visibility: `[B, S, S]` bool (query, key), with `positions`, instead of both: rows of sequences
            that share a prefix (`sequence_inputs`).
        products, layer_extras: the adapter hook: `products(layer index, layer_extras' slice) -> Products`
            for every layer (default: the plain products on XLA).
        last: (static) the logits of the last `last` positions only (scoring needs few, and the
            vocabulary projection of every position is the largest tensor of a forward).

    Returns:
        fp32 logits `[B, S, V]` (`[B, last, V]` with `last`). The layers are scanned (held ones are
        stacked first, inside the caller's jit): compile time flat in depth.
    """
    input_ids, _, cos, sin, mask = sequence_inputs(config, input_ids, attention_mask, positions, segment_ids,
                                                   visibility)
    params = stack_layers(params)
    x = embed_tokens(params, input_ids)

    def body(x, layer):
        index, w, (extras,) = layer
        hook = PLAIN if products is None else products(index, extras)
        return decoder_layer(config, w, x, cos, sin, mask, hook)[0], None

    x, _ = run_layers(body, x, params["layers"], (layer_extras,))
    return lm_logits(config, params, x if last is None else x[:, -last:])


# -- parameters -------------------------------------------------------------------------------
def param_shapes(config: ModelConfig, stacked: bool = False) -> dict[str, Any]:
    """Shape of every parameter in the held layout (grouped products, one dict per layer), or with
    `stacked` the scan layout (one `[L, ...]` array per name); `layers` is a `Layers` of shapes."""
    d = config.hidden_size
    layer = {group: shape for group, shape in config.group_shapes().items()}
    layer.update(attn_norm=(d,), mlp_norm=(d,))
    layers = Layers.of_stacked({name: (config.num_layers, *shape) for name, shape in layer.items()}) if stacked \
        else Layers.of_layers(dict(layer) for _ in range(config.num_layers))
    shapes: dict[str, Any] = {"embed": (config.vocab_size, d), "layers": layers, "norm": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (d, config.vocab_size)
    return shapes


def is_shape(node: Any) -> bool:
    """A shape tuple in a `param_shapes` tree (a leaf), as opposed to the tuple of layers."""
    return isinstance(node, tuple) and all(isinstance(n, int) for n in node)


class DecoderLayer(nnx.Module):
    """One layer's weights, each its own `nnx.Param`."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], rngs: nnx.Rngs, dtype: Any):
        init = nnx.initializers.normal(0.02)
        for name in LAYER_WEIGHTS:
            if name in LAYER_NORMS:
                value = jnp.ones(shapes[name], dtype)
            else:
                value = init(rngs.params(), shapes[name], dtype)
            setattr(self, name, nnx.Param(value))

    def arrays(self) -> Params:
        return {name: getattr(self, name).get_value() for name in LAYER_WEIGHTS}


class Llama(nnx.Module):
    """Flax NNX Llama-family causal LM. `model(input_ids, attention_mask)` -> fp32 logits.

    `Llama(config, rngs=nnx.Rngs(0))` gives random weights (tests, benchmarks at a named shape);
    `lsjax.load(ckpt)` gives converted ones.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        shapes = param_shapes(config)
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Param(init(rngs.params(), shapes["embed"], dtype))
        self.layers = nnx.List([DecoderLayer(layer, rngs, dtype) for layer in shapes["layers"].tree])
        self.norm = nnx.Param(jnp.ones(shapes["norm"], dtype))
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(init(rngs.params(), shapes["lm_head"], dtype))

    @property
    def dtype(self):
        return self.embed.get_value().dtype

    def params(self) -> Params:
        """The weights as the nested dict of arrays that the pure functions take (no copies)."""
        out = {"embed": self.embed.get_value(), "layers": Layers.of_layers(layer.arrays() for layer in self.layers),
               "norm": self.norm.get_value()}
        if not self.config.tie_word_embeddings:
            out["lm_head"] = self.lm_head.get_value()
        return out

    def __call__(self, input_ids, attention_mask=None, positions=None) -> jax.Array:
        return forward(self.config, self.params(), input_ids, attention_mask, positions)


def abstract_model(config: ModelConfig, dtype: Any = jnp.float32) -> Llama:
    """A `Llama` whose params are shape/dtype placeholders: no memory, filled by `model_from_params`."""
    return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), dtype=dtype))


def model_from_params(config: ModelConfig, params: Params) -> Llama:
    """A `Llama` holding exactly these arrays (held layout; stacked layers are split first)."""
    params = split_layers(params)
    model = abstract_model(config, params["embed"].dtype)
    model.embed = nnx.Param(params["embed"])
    model.norm = nnx.Param(params["norm"])
    if not config.tie_word_embeddings:
        model.lm_head = nnx.Param(params["lm_head"])
    for module, arrays in zip(model.layers, params["layers"].tree):
        for name in LAYER_WEIGHTS:
            setattr(module, name, nnx.Param(arrays[name]))
    return model


def count_params(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def from_projections(config: ModelConfig, params: Params) -> Params:
    """Params with one stacked `[L, d_in, d_out]` array per projection (the checkpoint's and
    Hugging Face's order) in the held layout: grouped products, one dict per layer. Numpy in, numpy out."""
    layers = params["layers"]
    xp = np if isinstance(layers["q"], np.ndarray) else jnp
    held = []
    for i in range(config.num_layers):
        layer = {name: layers[name][i] for name in LAYER_NORMS}
        for group, members in PROJECTION_GROUPS.items():
            layer[group] = layers[members[0]][i] if len(members) == 1 else \
                xp.concatenate([layers[m][i] for m in members], axis=-1)
        held.append(layer)
    return {**params, "layers": Layers.of_layers(held)}


def to_projections(config: ModelConfig, params: Params) -> Params:
    """The inverse of `from_projections`: one stacked array per projection (for export)."""
    layers = split_layers(params)["layers"].tree
    xp = np if isinstance(layers[0]["qkv"], np.ndarray) else jnp
    out = {name: xp.stack([layer[name] for layer in layers]) for name in LAYER_NORMS}
    for group in PROJECTION_GROUPS:
        stacked_group = xp.stack([layer[group] for layer in layers])
        for member, (start, width) in config.member_columns(group).items():
            out[member] = stacked_group[..., start:start + width]
    return {**params, "layers": out}
