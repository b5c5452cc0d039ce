"""The adapted forward: base weights untouched, every projection group gets `x @ W + routed LoRA term`.

One `LayerProject` per layer is the `project(group, x, w)` hook of `lsjax.model.decoder_layer`; it
sees every group call in execution order (qkv, o, gate_up, down), so it can put a router exactly
at the input it belongs to:
- `switch`: at the first adapted group of layer 0 the router decides each token's experts once;
  the route rides in the carry and every adapted group of every layer reuses it (in a scan, a
  `lax.cond` on the layer index runs the router in layer 0 only, so the body stays uniform).
- `layerwise`: a router for every adapted projection (a group's side by side: one router product).
- `blockwise`: a router on the mlp-normed input (the `gate_up` call) of every layer, shared by the
  FFN groups; attention groups are plain LoRA.
- `lora`: one adapter, no router.
A group's routed term is one shrink and one expand (`lsjax.adapters.routing.group_term`), or with
`Computation.FUSED` one call of the backend's fused kernel (`lsjax.backends`); the caller's
`TermForm` says which (training and prefill: dense, the default; decode: the strategy's
choice). Over split layers (decoding) the experts stay stacked and each layer reads its own by a
static index; a switch route's chosen experts are gathered once per step for all layers
(`ChosenExperts`).
The same hook runs through `lsjax.model.forward` and `lsjax.decode.forward_cached`
(`project_hooks`), and `adapted_forward_cached` runs every method over a KV cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsjax.adapters.config import AdapterConfig
from lsjax.adapters.errors import AdapterError
from lsjax.adapters.params import Adapter, AdapterParams, adapted_groups, check_params, member_layout
from lsjax.adapters.routing import (
    Computation,
    RouterStats,
    Routing,
    chosen_experts,
    group_term,
    member_route,
    place,
    router_logits,
    router_stats,
    TermForm,
    top_k_route,
)
from lsjax.backend_interface import Backend
from lsjax.backends import XLA
from lsjax.config import ModelConfig
from lsjax.decode import KVCache, cached_inputs, grown_cache
from lsjax.model import (
    GROUPS,
    Llama,
    Params,
    decoder_layer,
    embed_tokens,
    lm_logits,
    run_layers,
    sequence_inputs,
    stack_layers,
    stacked,
)

FFN_GROUPS = ("gate_up", "down")


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


class ChosenExperts:
    """The experts a switch route picks, gathered once per step for every layer of every group.

    Decoding over split layers keeps the experts stacked (`[L, E, ...]`); the first group that
    asks (after layer 0 decided the route) gathers each group's chosen A and B for all layers in
    one gather each, and every layer then reads its own slice of that small buffer."""

    def __init__(self, experts: dict):
        self.experts = experts
        self.chosen: dict[str, tuple[jax.Array, jax.Array]] = {}

    def get(self, group: str, route: Routing, layer: int) -> tuple[jax.Array, jax.Array]:
        if not self.chosen:
            self.chosen = {g: chosen_experts(e["a"], e["b"], route.ids) for g, e in self.experts.items()}
        a, b = self.chosen[group]
        return a[layer], b[layer]


class LayerProject:
    """`project(group, x, w)` of one layer: the group's product plus its adapter term; records router stats.

    `experts` / `routers` are this layer's slices (`layer` None, inside a scan) or stacked on the
    layer axis with `layer` this layer's static index (a loop over split layers). For `switch`,
    `route` is the route carried from earlier layers and `first` says whether this layer decides
    it (a traced bool in a scan: `lax.cond`). Python state lives only for one trace of one layer.
    """

    def __init__(self, config: AdapterConfig, layout: Layout, experts: dict, routers: dict, *,
                 layer: int | None = None, route: Routing | None = None, first: Any = None,
                 switch_router: jax.Array | None = None, valid: jax.Array | None = None,
                 key: jax.Array | None = None, train: bool = False, backend: Backend = XLA,
                 chosen: ChosenExperts | None = None, form: TermForm = TermForm()):
        self.config, self.layout, self.experts, self.routers = config, layout, experts, routers
        self.layer, self.backend, self.chosen, self.form = layer, backend, chosen, form
        self.route, self.first, self.switch_router = route, first, switch_router
        self.valid, self.key, self.train = valid, key, train
        self.switch_done = False
        self.block_route: Routing | None = None
        self.stats: list[RouterStats] = []

    def __call__(self, group: str, x: jax.Array, w: jax.Array) -> jax.Array:
        if self.config.method == "blockwise" and group == "gate_up":  # route the FFN block on its input
            self.block_route = self._decide(x, self.routers["ffn"], group)
        if group not in self.layout.groups:
            return self.backend(group, x, w)
        route = self._route_for(group, x)
        if self.form.computation == Computation.FUSED:  # one call: x @ W plus each row's own experts
            return self._fused(group, x, w, route)
        term = self._term(group, x, route)
        return self.backend(group, x, w) + place(term, self.layout.members[group], self.layout.widths[group])

    def _stacked(self, group: str) -> tuple[jax.Array, jax.Array, int]:
        """The group's experts with a layer axis, and this layer's index into it."""
        a, b = self.experts[group]["a"], self.experts[group]["b"]
        if self.layer is None:
            return a[None], b[None], 0
        return a, b, self.layer

    def _term(self, group: str, x: jax.Array, route: Routing | None) -> jax.Array:
        a, b = self.experts[group]["a"], self.experts[group]["b"]
        chosen = None
        if self.layer is not None:
            if self.chosen is not None:  # gathered once per step for every layer (`ChosenExperts`)
                chosen = self.chosen.get(group, self.route, self.layer)
            a, b = a[self.layer], b[self.layer]
        return group_term(self._dropout(group, x), a, b, route, self.config.scale, self.layout.members[group],
                          self.form.computation, chosen, self.form.one_expand)

    def _fused(self, group: str, x: jax.Array, w: jax.Array, route: Routing | None) -> jax.Array:
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        a, b, layer = self._stacked(group)
        if route is None:  # plain LoRA: expert 0 with gate 1
            ids = jnp.zeros((rows.shape[0], 1, 1), jnp.int32)
            gates = jnp.full((rows.shape[0], 1, 1), self.config.scale, jnp.float32)
        else:
            ids = route.ids.reshape(rows.shape[0], *route.ids.shape[-2:])
            gates = (self.config.scale * route.gates.reshape(ids.shape)).astype(jnp.float32)
        y = self.backend.fused(rows, w, a, b, ids, gates, members=self.layout.members[group], layer=layer)
        return y.reshape(*lead, w.shape[-1])

    def _route_for(self, group: str, x: jax.Array) -> Routing | None:
        method = self.config.method
        if method == "switch":
            if not self.switch_done and self.first is not None:  # the first adapted group
                self._decide_switch(x, group)
            self.switch_done = True
            if self.route is None:
                raise AdapterError("method 'switch' needs a route decided in layer 0 or given (route=)")
            return member_route(self.route)
        if method == "layerwise":
            return self._decide(x, self.routers[group], group, members=len(self.layout.members[group]))
        if method == "blockwise" and group in FFN_GROUPS:
            return member_route(self.block_route)
        return None

    def _decide_switch(self, x: jax.Array, group: str) -> None:
        """Layer 0 runs the router; later layers keep the carried route (zero stats, dropped later)."""
        carried = self.route

        def decide(x):
            route, stats = self._route(x, self.switch_router, group)
            return route, (stats[0] if stats else None)

        def keep(x):
            if self.valid is None:
                return carried, None
            zero = jnp.zeros((), jnp.float32)
            return carried, RouterStats(zero, zero, zero, jnp.zeros((self.config.num_experts,), jnp.float32))

        if isinstance(self.first, (bool, np.bool_)):  # a loop over layers: the layer index is static, no cond
            self.route, stats = decide(x) if self.first else keep(x)
        else:
            self.route, stats = jax.lax.cond(self.first, decide, keep, x)
        if self.valid is not None:
            self.stats.append(stats)

    def _decide(self, x: jax.Array, weight: jax.Array, group: str, members: int = 1) -> Routing:
        route, stats = self._route(x, weight, group, members)
        self.stats.extend(stats)
        return route

    def _route(self, x: jax.Array, weight: jax.Array, group: str, members: int = 1
               ) -> tuple[Routing, list[RouterStats]]:
        """The route of one router product (layerwise: `members` routers side by side, a
        `[..., members, k]` route) and each router's stats (none without a `valid` mask: hooks)."""
        router = self.config.router
        key = self._key(group, 1) if router.jitter > 0 else None
        logits = router_logits(x, weight, router.jitter, key)
        if self.config.method == "layerwise":
            logits = logits.reshape(*logits.shape[:-1], members, -1)
        route, probs = top_k_route(logits, self.config.top_k)
        if self.valid is None:
            return route, []
        if logits.ndim == 3:
            return route, [router_stats(logits, probs, route.ids, self.valid)]
        return route, [router_stats(logits[..., m, :], probs[..., m, :], route.ids[..., m, :], self.valid)
                       for m in range(members)]

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
    """The routers stacked on the layer axis (scanned with the layers); switch's is global."""
    return {} if config.method == "switch" else params["routers"]


def _run_layers(model_config: ModelConfig, base_params: Params, config: AdapterConfig, params: AdapterParams,
                x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, valid: jax.Array | None, *,
                key: jax.Array | None, train: bool, cache: KVCache | None = None, backend: Backend = XLA,
                form: TermForm = TermForm()):
    """Run all decoder layers: scanned over stacked base layers, or a loop over split ones (then the
    experts stay stacked and each layer indexes them statically). Returns x, the routers' stats,
    the switch route and the new (k, v)."""
    L, switch = model_config.num_layers, config.method == "switch"
    layout = Layout.of(model_config, config)
    loop = not isinstance(base_params["layers"], dict)
    xs = {"routers": _layer_routers(config, params),
          "key": None if key is None else jax.random.split(key, L),
          "kv": None if cache is None else (cache.k, cache.v),
          "first": np.arange(L) == 0 if switch else None,  # numpy: static per layer in a loop
          "layer": np.arange(L) if loop else None,
          "experts": None if loop else params["experts"]}
    once = loop and switch and form.computation == Computation.GATHERED and form.gather_once
    chosen = ChosenExperts(params["experts"]) if once else None
    b, s = x.shape[:2]
    no_route = Routing(jnp.zeros((b, s, config.top_k), jnp.int32), jnp.zeros((b, s, config.top_k), jnp.float32))

    def body(carry, layer):
        (x, route), (w, xs) = carry, layer
        experts = params["experts"] if loop else xs["experts"]
        index = None if xs["layer"] is None else int(xs["layer"])
        project = LayerProject(config, layout, experts, xs["routers"], layer=index, route=route, first=xs["first"],
                               switch_router=params["routers"].get("switch"), valid=valid, key=xs["key"],
                               train=train, backend=backend, chosen=chosen, form=form)
        if cache is None:
            x, kv = decoder_layer(model_config, w, x, cos, sin, mask, project), None
        else:
            x, kv = decoder_layer(model_config, w, x, cos, sin, mask, project, kv=(*xs["kv"], cache.length))
        return (x, project.route), (project.stats, kv)

    (x, route), (stats, kv) = run_layers(body, (x, no_route if switch else None), base_params["layers"], xs)
    stats = stacked(stats)
    if switch:  # only layer 0 ran the router
        stats = [jax.tree.map(lambda a: a[0], st) for st in stats]
    return x, stats, route, kv


def _aux(config: AdapterConfig, stats: list[RouterStats], route: Routing | None) -> AdapterAux:
    E = config.num_experts
    if not stats:
        zero = jnp.zeros((), jnp.float32)
        return AdapterAux(zero, zero, zero, zero, jnp.zeros((E,), jnp.float32), route)
    # per router: a leading layer axis (layerwise, blockwise) or none (switch, taken from layer 0)
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
                    train: bool = False, last: int | None = None, form: TermForm = TermForm()
                    ) -> tuple[jax.Array, AdapterAux]:
    """The base model's logits with the adapter attached, and the router aux. Pure; jit it with
    both configs static.

    Args:
        model_config, base_params, input_ids, attention_mask, positions, last: as
            `lsjax.model.forward` (`input_ids [B, S]`, `attention_mask [B, S]`).
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
    input_ids, attention_mask, cos, sin, mask = sequence_inputs(model_config, input_ids, attention_mask, positions)
    base_params = stack_layers(base_params)  # a scan over the layers: compile time flat in depth
    x = embed_tokens(base_params, input_ids)
    x, stats, route, _ = _run_layers(model_config, base_params, adapter_config, adapter_params, x, cos, sin, mask,
                                     attention_mask, key=rng if train else None, train=train, form=form)
    return lm_logits(model_config, base_params, x if last is None else x[:, -last:]), _aux(adapter_config, stats, route)


def adapted_forward_cached(model_config: ModelConfig, base_params: Params, adapter_config: AdapterConfig,
                           adapter_params: AdapterParams, input_ids: jax.Array, attention_mask: jax.Array,
                           positions: jax.Array, cache: KVCache, backend: Backend = XLA,
                           form: TermForm = TermForm()) -> tuple[jax.Array, KVCache, AdapterAux]:
    """`lsjax.decode.forward_cached` with the adapter (inference: no dropout, no jitter).

    Every method, switch included: a decode step's route is decided from that token's own
    layer-0 input, exactly as in the full forward. `backend` (static, `lsjax.backends`) runs the
    products, and with `Computation.FUSED` in `form` (static) its fused kernel.
    """
    check_params(model_config, adapter_config, adapter_params)
    all_positions, all_valid, cos, sin, mask = cached_inputs(model_config, cache, attention_mask, positions)
    x = embed_tokens(base_params, input_ids)
    x, stats, route, (k, v) = _run_layers(model_config, base_params, adapter_config, adapter_params, x, cos, sin,
                                          mask, attention_mask.astype(jnp.bool_), key=None, train=False, cache=cache,
                                          backend=backend, form=form)
    logits = lm_logits(model_config, base_params, x, backend)
    new_cache = grown_cache(cache, k, v, all_positions, all_valid, input_ids.shape[1])
    return logits, new_cache, _aux(adapter_config, stats, route)


def project_hooks(model_config: ModelConfig, adapter_config: AdapterConfig, adapter_params: AdapterParams,
                  route: Routing | None = None, form: TermForm = TermForm()):
    """`(project_factory, layer_extras)` for `lsjax.model.forward` / `lsjax.decode.forward_cached`.

    Inference only (no stats, no dropout). `switch` needs the route decided beforehand (e.g.
    `aux.routing` of a forward over the same tokens), since a plain scan has no first layer.
    """
    if adapter_config.method == "switch" and route is None:
        raise AdapterError("method 'switch' needs route= for project_hooks (its router runs once, in layer 0; "
                           "use adapted_forward / adapted_forward_cached to decide it)")
    extras = {"experts": adapter_params["experts"], "routers": _layer_routers(adapter_config, adapter_params)}

    layout = Layout.of(model_config, adapter_config)

    def factory(layer_extras):
        return LayerProject(adapter_config, layout, layer_extras["experts"], layer_extras["routers"], route=route,
                            form=form)
    return factory, extras


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
