"""The adapted forward: base weights untouched, every projection group gets `x @ W + routed LoRA term`.

Routes are data, decided where the method says and handed to the products:
- `switch`: one router decides each token's experts before the adapted layers run, on the input of
  layer 0's first adapted group (the groups before it are plain, so `switch_route` computes that
  input with the plain layer); every adapted group of every layer uses that route.
- `layerwise`: a router for every adapted projection, on that projection's input (a group's
  members side by side: one router product).
- `blockwise`: a router on each FFN block's input (`gate_up`'s), whose route `down` reuses;
  attention groups are plain LoRA.
- `lora`: one adapter, no router.
`AdaptedProducts` is one layer's `lsjax.model.Products`: a frozen value built per layer, whose
`route` and products are pure functions of (weights, input, route). Router statistics come back
from the layers as values and become the aux losses (`AdapterAux`).

A group's routed term is one shrink and one expand (`lsjax.adapters.routing.group_term`), or with
`Computation.FUSED` one call of the backend's fused kernel (`lsjax.backends`); the caller's
`TermForm` says which (training and prefill: dense, the default; decode: the strategy's choice).
Over held (per-layer) layers the experts stay stacked and each layer reads its own by a static
index; a switch route's chosen experts are gathered once per step for all layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lsjax.adapters.config import AdapterConfig, Method
from lsjax.adapters.errors import AdapterError
from lsjax.adapters.params import Adapter, AdapterParams, adapted_groups, check_params, member_layout
from lsjax.adapters.routing import (
    Computation,
    RouterStats,
    Routing,
    TermForm,
    chosen_experts,
    group_term,
    member_route,
    place,
    router_logits,
    router_stats,
    top_k_route,
)
from lsjax.adapters.table import RowChoice
from lsjax.backend_interface import Backend
from lsjax.backends import XLA
from lsjax.config import ModelConfig
from lsjax.decode import KVCache, cached_inputs, grown_cache
from lsjax.layers import Layers, run_layers
from lsjax.model import (
    GROUPS,
    Llama,
    Params,
    decoder_layer,
    embed_tokens,
    lm_logits,
    rms_norm,
    sequence_inputs,
    stack_layers,
)

SWITCH_KEY = len(GROUPS)  # the switch router's jitter key: past every group's


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AdapterAux:
    """Router losses and statistics, averaged over all routers (and layers) of the forward.

    loss = aux_loss_coef * load_balance + z_loss_coef * z_loss: add it to the LM loss.
    routing: the switch route `[B, S, k]` (None for other methods), reusable by decoding.
    With no router (`lora`) everything is zero.
    """

    loss: jax.Array
    load_balance: jax.Array
    z_loss: jax.Array
    entropy: jax.Array
    load: jax.Array  # [E]
    routing: Routing | None = None


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static facts of an adapter on a base model: its adapted groups and their members' places."""

    groups: tuple[str, ...]
    members: dict[str, tuple[tuple[int, int, int], ...]]
    widths: dict[str, int]

    @classmethod
    def of(cls, model_config: ModelConfig, config: AdapterConfig) -> "Layout":
        groups = adapted_groups(config)
        shapes = model_config.group_shapes()
        return cls(groups, {g: member_layout(model_config, config, g) for g in groups},
                   {g: shapes[g][1] for g in groups})


def decide(config: AdapterConfig, x: jax.Array, weight: jax.Array, *, members: int = 1,
           valid: jax.Array | None = None, key: jax.Array | None = None, choice: RowChoice | None = None
           ) -> tuple[Routing, tuple[RouterStats, ...] | None]:
    """One router product on `x [B, S, d]`: the route (`[B, S, k]`, or with `members` routers side
    by side, layer-wise, `[B, S, members, k]`) and each router's statistics over `valid` tokens
    (None without `valid`: inference). With `choice` (an `AdapterTable`'s rows, inference) each
    row chooses among its own adapter's experts, keeps its own k and carries its own scale."""
    logits = router_logits(x, weight, config.router.jitter, key)
    if config.method == Method.LAYERWISE:
        logits = logits.reshape(*logits.shape[:-1], members, -1)
    if choice is not None:
        route, _ = top_k_route(choice.mask(logits), config.top_k)
        return choice.narrow(route), None
    route, probs = top_k_route(logits, config.top_k)
    if valid is None:
        return route, None
    if config.method != Method.LAYERWISE:
        return route, (router_stats(logits, probs, route.ids, valid),)
    return route, tuple(router_stats(logits[..., m, :], probs[..., m, :], route.ids[..., m, :], valid)
                        for m in range(members))


@dataclasses.dataclass(frozen=True)
class InputProbe:
    """Plain products that report the input of `group` (in place of router statistics): the
    layer run up to that input and no further (XLA drops the rest)."""

    group: str
    backend: Backend = XLA

    def route(self, group: str, x: jax.Array, block: Any) -> tuple[None, jax.Array | None]:
        return None, (x if group == self.group else None)

    def __call__(self, group: str, x: jax.Array, w: jax.Array, route: Any) -> jax.Array:
        return self.backend(group, x, w)


def switch_route(model_config: ModelConfig, config: AdapterConfig, layers: Layers, router: jax.Array,
                 x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, kv: tuple | None = None, *,
                 valid: jax.Array | None = None, key: jax.Array | None = None, choice: RowChoice | None = None
                 ) -> tuple[Routing, tuple[RouterStats, ...] | None]:
    """The switch route `[B, S, k]` of tokens whose embeddings are `x [B, S, D]`, decided once for
    all layers, and its statistics: the router reads the input of layer 0's first adapted group.

    Layer 0's groups before that one are plain, so its input is the plain layer's (`cos`, `sin`,
    `mask` and `kv` as `lsjax.model.decoder_layer` takes them; only a first group past `qkv`
    reads attention): with `qkv` first it is the attention-normed embedding. `choice`: as `decide`.
    """
    first, w = adapted_groups(config)[0], layers.layer(0)
    if first == "qkv":  # the input of layer 0's first products: no need to trace the layer
        h = rms_norm(x, w["attn_norm"], model_config.rms_norm_eps)
    else:
        h = decoder_layer(model_config, w, x, cos, sin, mask, InputProbe(first), kv=kv)[2][first]
    return decide(config, h, router, valid=valid, key=key, choice=choice)


@dataclasses.dataclass(frozen=True)
class AdaptedProducts:
    """One layer's products with the adapter's terms (an `lsjax.model.Products`).

    experts: this layer's `{group: {"a", "b"}}` (`layer` None: a scan's slice) or stacked on the layer
        axis with `layer` this layer's static index (held layers: read in place).
    routers: this layer's routers (layer-wise: per group; block-wise: "ffn"); switch: none.
    switch: the switch route, decided before the layers (`switch_route`).
    chosen: with a switch route gathered once per step, each group's `(a, b)` of this layer's chosen experts.
    valid: `[B, S]` tokens that count in router statistics (None: inference, no statistics).
    key, train: adapter dropout and router jitter when training.
    """

    config: AdapterConfig
    layout: Layout
    experts: dict
    routers: dict
    layer: int | None = None
    switch: Routing | None = None
    chosen: dict | None = None
    valid: jax.Array | None = None
    key: jax.Array | None = None
    train: bool = False
    backend: Backend = XLA
    form: TermForm = TermForm()

    def route(self, group: str, x: jax.Array, block: Routing | None) -> tuple[Routing | None, Any]:
        method = self.config.method
        if method == Method.SWITCH:
            return member_route(self.switch), None
        if method == Method.LAYERWISE and group in self.layout.groups:
            return decide(self.config, x, self.routers[group], members=len(self.layout.members[group]),
                          valid=self.valid, key=self._key(group, 1))
        if method == Method.BLOCKWISE and group == "gate_up":  # the FFN block's route, on its input
            route, stats = decide(self.config, x, self.routers["ffn"], valid=self.valid, key=self._key(group, 1))
            return member_route(route), stats
        if method == Method.BLOCKWISE and group == "down":
            return block, None
        return None, None

    def __call__(self, group: str, x: jax.Array, w: jax.Array, route: Routing | None) -> jax.Array:
        if group not in self.layout.groups:
            return self.backend(group, x, w)
        if self.form.computation == Computation.FUSED:  # one call: x @ W plus each row's own experts
            return self._fused(group, x, w, route)
        a, b = self.experts[group]["a"], self.experts[group]["b"]
        if self.layer is not None:
            a, b = a[self.layer], b[self.layer]
        chosen = None if self.chosen is None else self.chosen[group]
        term = group_term(self._dropout(group, x), a, b, route, self.config.scale, self.layout.members[group],
                          self.form.computation, chosen, self.form.one_expand)
        return self.backend(group, x, w) + place(term, self.layout.members[group], self.layout.widths[group])

    def _fused(self, group: str, x: jax.Array, w: jax.Array, route: Routing | None) -> jax.Array:
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        a, b = self.experts[group]["a"], self.experts[group]["b"]
        if self.layer is None:
            a, b, layer = a[None], b[None], 0
        else:
            layer = self.layer
        if route is None:  # plain LoRA: expert 0 with gate 1
            ids = jnp.zeros((rows.shape[0], 1, 1), jnp.int32)
            gates = jnp.full((rows.shape[0], 1, 1), self.config.scale, jnp.float32)
        else:
            ids = route.ids.reshape(rows.shape[0], *route.ids.shape[-2:])
            gates = (self.config.scale * route.gates.reshape(ids.shape)).astype(jnp.float32)
        y = self.backend.fused(rows, w, a, b, ids, gates, members=self.layout.members[group], layer=layer)
        return y.reshape(*lead, w.shape[-1])

    def _dropout(self, group: str, x: jax.Array) -> jax.Array:
        p = self.config.dropout
        key = self._key(group, 0) if p > 0 else None
        if key is None:
            return x
        keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
        return jnp.where(keep, x / (1.0 - p), 0).astype(x.dtype)

    def _key(self, group: str, use: int) -> jax.Array | None:
        """One key per group input (dropout: one mask for the group's shared input) and use."""
        if not self.train or self.key is None:
            return None
        return jax.random.fold_in(self.key, 2 * GROUPS.index(group) + use)


def _layer_routers(config: AdapterConfig, params: AdapterParams) -> dict:
    """The routers stacked on the layer axis (run with the layers); switch's is global."""
    return {} if config.method == Method.SWITCH else params["routers"]


def _run_layers(model_config: ModelConfig, base_params: Params, config: AdapterConfig, params: AdapterParams,
                x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, valid: jax.Array | None, *,
                key: jax.Array | None, train: bool, cache: KVCache | None = None, backend: Backend = XLA,
                form: TermForm = TermForm(), choice: RowChoice | None = None):
    """Run all decoder layers, scanned over stacked base layers or looped over held ones (then the
    experts stay stacked and each layer indexes them statically). Returns x, the routers' stats
    (a list of `RouterStats`), the switch route and each layer's new (k, v)."""
    L, layers = model_config.num_layers, base_params["layers"]
    layout = Layout.of(model_config, config)
    held = not layers.stacked
    route, stats, chosen = None, [], None
    if config.method == Method.SWITCH:
        switch_key = None if key is None or not train else jax.random.fold_in(key, SWITCH_KEY)
        kv0 = None if cache is None else (cache.k.layer(0), cache.v.layer(0), cache.length)
        route, switch_stats = switch_route(model_config, config, layers, params["routers"]["switch"], x, cos, sin,
                                           mask, kv0, valid=valid, key=switch_key, choice=choice)
        stats.extend(switch_stats or ())
        if held and form.computation == Computation.GATHERED and form.gather_once:  # one gather, all layers
            chosen = {g: chosen_experts(e["a"], e["b"], route.ids) for g, e in params["experts"].items()}
    xs = (Layers.of_stacked(_layer_routers(config, params)),
          None if key is None else Layers.of_stacked(jax.random.split(key, L)),
          None if cache is None else cache.k, None if cache is None else cache.v,
          None if held else Layers.of_stacked(params["experts"]))

    def body(x, layer):
        index, w, (routers, layer_key, k, v, experts) = layer
        products = AdaptedProducts(
            config, layout, params["experts"] if held else experts, routers, layer=index if held else None,
            switch=route, chosen=None if chosen is None else {g: (a[index], b[index]) for g, (a, b) in chosen.items()},
            valid=valid, key=layer_key, train=train, backend=backend, form=form)
        kv = None if cache is None else (k, v, cache.length)
        x, new_kv, layer_stats = decoder_layer(model_config, w, x, cos, sin, mask, products, kv=kv)
        return x, (layer_stats, new_kv)

    x, ys = run_layers(body, x, layers, xs)
    layer_stats = ys.item(0).as_stacked().tree  # {group: (RouterStats [L, ...], ...) or None}
    for group in GROUPS:
        stats.extend(layer_stats[group] or ())
    return x, stats, route, ys.item(1)


def _aux(config: AdapterConfig, stats: list[RouterStats], route: Routing | None) -> AdapterAux:
    E = config.num_experts
    if not stats:
        zero = jnp.zeros((), jnp.float32)
        return AdapterAux(zero, zero, zero, zero, jnp.zeros((E,), jnp.float32), route)
    # per router: a leading layer axis (layerwise, blockwise) or none (switch, decided before the layers)
    lb = jnp.mean(jnp.concatenate([jnp.ravel(s.load_balance) for s in stats]))
    z = jnp.mean(jnp.concatenate([jnp.ravel(s.z_loss) for s in stats]))
    ent = jnp.mean(jnp.concatenate([jnp.ravel(s.entropy) for s in stats]))
    load = jnp.mean(jnp.concatenate([s.load.reshape(-1, E) for s in stats]), axis=0)
    loss = config.router.aux_loss_coef * lb + config.router.z_loss_coef * z
    return AdapterAux(loss, lb, z, ent, load, route)


def _needs_key(config: AdapterConfig) -> bool:
    return config.dropout > 0 or (config.method != "lora" and config.router.jitter > 0)


def adapted_forward(model_config: ModelConfig, base_params: Params, adapter_config: AdapterConfig,
                    adapter_params: AdapterParams, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                    *, positions: jax.Array | None = None, rng: jax.Array | None = None,
                    train: bool = False, last: int | None = None, form: TermForm = TermForm(),
                    segment_ids: jax.Array | None = None, visibility: jax.Array | None = None
                    ) -> tuple[jax.Array, AdapterAux]:
    """The base model's logits with the adapter attached, and the router aux. Pure; jit it with
    both configs static.

    Args:
        model_config, base_params, input_ids, attention_mask, positions, last, segment_ids, visibility: as
            `lsjax.model.forward` (`input_ids [B, S]`, `attention_mask [B, S]`; packed rows: `segment_ids`;
            rows sharing a prefix: `visibility [B, S, S]` with `positions`).
        adapter_config: the adapter's `AdapterConfig` (static).
        adapter_params: `adapter.arrays()`: `experts[group]` with `a [L, E, d_in, S*r]` and
            `b [L, E, r, Nb]`, and `routers` (switch: `[D, E]`; layer-wise and block-wise: per layer).
        rng, train: `train=True` turns on adapter dropout and router jitter (both need `rng`).
        form: (static) how the routed terms are computed (`TermForm`; dense by default).

    Returns:
        `(logits [B, S, V] fp32 (or [B, last, V]), AdapterAux)`: the router losses to add to the
        LM loss, the statistics and, for switch, the route `[B, S, k]`.
    """
    check_params(model_config, adapter_config, adapter_params)
    if train and _needs_key(adapter_config) and rng is None:
        raise AdapterError("train=True with dropout or router jitter needs rng= (a jax PRNG key)")
    input_ids, attention_mask, cos, sin, mask = sequence_inputs(model_config, input_ids, attention_mask, positions,
                                                                segment_ids, visibility)
    base_params = stack_layers(base_params)  # a scan over the layers: compile time flat in depth
    x = embed_tokens(base_params, input_ids)
    x, stats, route, _ = _run_layers(model_config, base_params, adapter_config, adapter_params, x, cos, sin, mask,
                                     attention_mask, key=rng if train else None, train=train, form=form)
    return lm_logits(model_config, base_params, x if last is None else x[:, -last:]), _aux(adapter_config, stats, route)


def adapted_forward_cached(model_config: ModelConfig, base_params: Params, adapter_config: AdapterConfig,
                           adapter_params: AdapterParams, input_ids: jax.Array, attention_mask: jax.Array,
                           positions: jax.Array, cache: KVCache, backend: Backend = XLA,
                           form: TermForm = TermForm(), choice: RowChoice | None = None
                           ) -> tuple[jax.Array, KVCache, AdapterAux]:
    """`lsjax.decode.forward_cached` with the adapter (inference: no dropout, no jitter).

    Every method, switch included: a decode step's route is decided from that token's own
    layer-0 input, exactly as in the full forward. `backend` (static, `lsjax.backends`) runs the
    products, and with `Computation.FUSED` in `form` (static) its fused kernel. `choice`: the rows'
    adapters in an `lsjax.adapters.table.AdapterTable` (whose `adapter_config` and arrays are given).
    """
    check_params(model_config, adapter_config, adapter_params)
    all_positions, all_valid, cos, sin, mask = cached_inputs(model_config, cache, attention_mask, positions)
    x = embed_tokens(base_params, input_ids)
    x, stats, route, kv = _run_layers(model_config, base_params, adapter_config, adapter_params, x, cos, sin,
                                      mask, attention_mask.astype(jnp.bool_), key=None, train=False, cache=cache,
                                      backend=backend, form=form, choice=choice)
    logits = lm_logits(model_config, base_params, x, backend)
    new_cache = grown_cache(cache, kv, all_positions, all_valid, input_ids.shape[1])
    return logits, new_cache, _aux(adapter_config, stats, route)


def project_hooks(model_config: ModelConfig, adapter_config: AdapterConfig, adapter_params: AdapterParams,
                  route: Routing | None = None, form: TermForm = TermForm()):
    """`(products, layer_extras)` for `lsjax.model.forward` / `lsjax.decode.forward_cached`.

    Inference only (no stats, no dropout). `switch` needs its route decided beforehand (e.g.
    `aux.routing` of a forward over the same tokens, or `switch_route`).
    """
    if adapter_config.method == Method.SWITCH and route is None:
        raise AdapterError("method 'switch' needs route= for project_hooks (its router runs once, before the "
                           "layers; use adapted_forward / adapted_forward_cached, or switch_route, to decide it)")
    extras = Layers.of_stacked({"experts": adapter_params["experts"],
                                "routers": _layer_routers(adapter_config, adapter_params)})
    layout = Layout.of(model_config, adapter_config)

    def products(index, layer_extras):
        del index  # the extras are this layer's slices
        return AdaptedProducts(adapter_config, layout, layer_extras["experts"], layer_extras["routers"],
                               switch=route, form=form)
    return products, extras


class AdaptedLlama(nnx.Module):
    """A base `Llama` (nnx.Param, frozen) with an `Adapter` (AdapterParam / RouterParam) attached.

    `model(ids, mask, rng=..., train=...)` -> `(logits, aux)`. Train only the adapter with
    `nnx.Optimizer(model, tx, wrt=TRAINABLE)` or `nnx.grad(..., argnums=nnx.DiffState(0, TRAINABLE))`.
    """

    def __init__(self, base: Llama, adapter: Adapter):
        if adapter.model_config != base.config:
            raise AdapterError(f"adapter was built for {adapter.model_config}, not for this base model {base.config}")
        self.base, self.adapter = base, adapter

    @classmethod
    def create(cls, base: Llama, adapter_config: AdapterConfig, *, rngs: nnx.Rngs) -> "AdaptedLlama":
        return cls(base, Adapter(base.config, adapter_config, rngs=rngs, dtype=base.dtype))

    def __call__(self, input_ids, attention_mask=None, *, positions=None, rng=None,
                 train: bool = False) -> tuple[jax.Array, AdapterAux]:
        return adapted_forward(self.base.config, self.base.params(), self.adapter.config, self.adapter.arrays(),
                               input_ids, attention_mask, positions=positions, rng=rng, train=train)
