"""The adapted forward: base weights untouched, every projection gets `x @ W + routed LoRA term`.

One `LayerProject` per layer is the `project(kind, x, w)` hook of `lsjax.model.decoder_layer`; it
sees every projection call in execution order (q, k, v, o, gate, up, down), so it can put a
router exactly at the input it belongs to:
- `switch`: at the first adapted projection of layer 0 the router decides each token's experts
  once; the route rides in the scan carry and every adapted projection of every layer reuses it
  (a `lax.cond` on the layer index runs the router in layer 0 only, so the scan body is uniform:
  no peeled layer, no sliced weight stacks, no concatenated KV cache).
- `layerwise`: a router at the input of every adapted projection of every layer.
- `blockwise`: a router on the mlp-normed input (the `gate` call) of every layer, shared by the
  FFN targets; attention targets are plain LoRA.
- `lora`: one adapter, no router.
The same hook runs through `lsjax.model.forward` and `lsjax.decode.forward_cached`
(`project_hooks`), and `adapted_forward_cached` runs every method over a KV cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsjax.adapters.config import FFN, AdapterConfig
from lsjax.adapters.errors import AdapterError
from lsjax.adapters.params import Adapter, AdapterParams, check_params
from lsjax.adapters.routing import RouterStats, Routing, lora_term, router_logits, router_stats, top_k_route
from lsjax.config import ModelConfig
from lsjax.decode import KVCache, cached_inputs, grown_cache
from lsjax.model import (PROJECTIONS, Llama, Params, decoder_layer, embed_tokens, lm_logits, run_layers,
                         sequence_inputs, stacked)


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


class LayerProject:
    """`project(kind, x, w)` of one layer: base matmul plus the adapter term; records router stats.

    `experts` / `routers` are this layer's slices. For `switch`, `route` is the route carried from
    earlier layers and `first` (a traced bool) says whether this layer decides it: a `lax.cond`
    runs `switch_router` only in layer 0, so every layer has the same body and the scan stays the
    base model's scan. Python state lives only for one trace of one layer body.
    """

    def __init__(self, config: AdapterConfig, experts: dict, routers: dict, *, route: Routing | None = None,
                 first: jax.Array | None = None, switch_router: jax.Array | None = None,
                 valid: jax.Array | None = None, key: jax.Array | None = None, train: bool = False,
                 native: bool = False):
        self.config, self.experts, self.routers = config, experts, routers
        self.native = native
        self.route, self.first, self.switch_router = route, first, switch_router
        self.valid, self.key, self.train = valid, key, train
        self.switch_done = False
        self.block_route: Routing | None = None
        self.stats: list[RouterStats] = []

    def __call__(self, kind: str, x: jax.Array, w: jax.Array) -> jax.Array:
        cfg = self.config
        self._enter_block(kind, x)
        if kind not in cfg.targets:
            return self._matmul(x, w)
        return self._adapted(kind, x, w, self._route_for(kind, x))

    def group(self, kinds: tuple[str, ...], x: jax.Array, ws: list[jax.Array]) -> list[jax.Array]:
        """Several projections of one input (`lsjax.model.project_group`), the same values as one call
        each. With native matvecs their base products run as one call, and under `fused` with one
        route for all of them (switch, lora, blockwise's FFN) their routed terms too."""
        cfg = self.config
        if not self.native:
            return [self(kind, x, w) for kind, w in zip(kinds, ws)]
        from lsjax.native import matmul_group

        for kind in kinds:
            self._enter_block(kind, x)
        routes = {kind: self._route_for(kind, x) for kind in kinds if kind in cfg.targets}
        if cfg.computation == "fused" and len(routes) == len(kinds) > 1 and \
                all(r is routes[kinds[0]] for r in routes.values()):
            return fused_project_group(x, ws, [self.experts[k]["a"] for k in kinds],
                                       [self.experts[k]["b"] for k in kinds], routes[kinds[0]], cfg.scale)
        if cfg.computation == "fused":
            return [self._adapted(k, x, w, routes[k]) if k in routes else self._matmul(x, w) for k, w in zip(kinds, ws)]
        bases = matmul_group(x, ws)
        return [base + self._term(k, x, routes[k]) if k in routes else base for k, base in zip(kinds, bases)]

    def _enter_block(self, kind: str, x: jax.Array) -> None:
        """Blockwise routes once per FFN block, on the block's input (gate's), adapted or not."""
        if self.config.method == "blockwise" and kind == "gate":
            self.block_route = self._decide(x, self.routers["ffn"], kind)

    def _adapted(self, kind: str, x: jax.Array, w: jax.Array, route: Routing | None) -> jax.Array:
        a, b = self.experts[kind]["a"], self.experts[kind]["b"]
        if self.config.computation == "fused":  # one kernel: x @ W plus each row's own experts
            return fused_project(x, w, a, b, route, self.config.scale, self.native)
        return self._matmul(x, w) + self._term(kind, x, route)

    def _term(self, kind: str, x: jax.Array, route: Routing | None) -> jax.Array:
        cfg = self.config
        a, b = self.experts[kind]["a"], self.experts[kind]["b"]
        return lora_term(self._dropout(kind, x), a, b, route, cfg.scale, cfg.computation).astype(x.dtype)

    def _matmul(self, x: jax.Array, w: jax.Array) -> jax.Array:
        if self.native:
            from lsjax.native import matmul

            return matmul(x, w)
        return x @ w

    def _route_for(self, kind: str, x: jax.Array) -> Routing | None:
        method = self.config.method
        if method == "switch":
            if not self.switch_done and self.first is not None:  # the first adapted projection
                self._decide_switch(x, kind)
            self.switch_done = True
            if self.route is None:
                raise AdapterError("method 'switch' needs a route decided in layer 0 or given (route=)")
            return self.route
        if method == "layerwise":
            return self._decide(x, self.routers[kind], kind)
        if method == "blockwise" and kind in FFN:
            return self.block_route
        return None

    def _decide_switch(self, x: jax.Array, kind: str) -> None:
        """Layer 0 runs the router; later layers keep the carried route (zero stats, dropped later)."""
        carried = self.route

        def decide(x):
            return self._route(x, self.switch_router, kind)

        def keep(x):
            zero = jnp.zeros((), jnp.float32)
            return carried, RouterStats(zero, zero, zero, jnp.zeros((self.config.num_experts,), jnp.float32))

        if isinstance(self.first, (bool, np.bool_)):  # unrolled layers: the layer index is static, no cond
            self.route, stats = decide(x) if self.first else keep(x)
        else:
            self.route, stats = jax.lax.cond(self.first, decide, keep, x)
        self.stats.append(stats)

    def _decide(self, x: jax.Array, weight: jax.Array, kind: str) -> Routing:
        route, stats = self._route(x, weight, kind)
        if stats is not None:
            self.stats.append(stats)
        return route

    def _route(self, x: jax.Array, weight: jax.Array, kind: str) -> tuple[Routing, RouterStats | None]:
        """The route of one router, and its stats unless no `valid` mask was given (hooks)."""
        router = self.config.router
        key = self._key(kind, 1) if router.jitter > 0 else None
        logits = router_logits(x, weight, router.jitter, key)
        route, probs = top_k_route(logits, self.config.top_k)
        stats = None if self.valid is None else router_stats(logits, probs, route.ids, self.valid)
        return route, stats

    def _dropout(self, kind: str, x: jax.Array) -> jax.Array:
        p = self.config.dropout
        key = self._key(kind, 0) if p > 0 else None
        if key is None:
            return x
        keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
        return jnp.where(keep, x / (1.0 - p), 0).astype(x.dtype)

    def _key(self, kind: str, use: int) -> jax.Array | None:
        if not self.train or self.key is None:
            return None
        return jax.random.fold_in(self.key, 2 * PROJECTIONS.index(kind) + use)


def fused_project(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, route: Routing | None,
                  scale: float, native: bool = False, implementation: str | None = None) -> jax.Array:
    """`x @ w + routed LoRA` in one kernel: `pallas_kernels.routed_lora_matmul` (`implementation`
    None: Pallas on GPU, XLA elsewhere), or with `native` `lsjax.native.routed_matmul` where it
    applies (decode on CPU).

    On an H100 this Pallas form (7B decode: 8.2 ms/token) beat XLA's `x @ w` followed by
    `routed_lora_add` (17.0 ms: each of its programs walks all of d_in, a latency-bound chain),
    docs/perf.md.
    """
    from pallas_kernels import routed_lora_matmul

    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    ids, gates = _route_arrays(route, rows.shape[0], scale)
    if native:
        from lsjax.native import routed_matmul

        y = routed_matmul(rows, w, a, b, ids, gates, otherwise=routed_lora_matmul)
    else:
        y = routed_lora_matmul(rows, w, a, b, ids, gates, implementation=implementation)
    return y.reshape(*lead, w.shape[-1])


def _route_arrays(route: Routing | None, rows: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """`ids`, `gates [rows, J]` of a route (None, plain LoRA: expert 0 with gate 1), scale folded in."""
    if route is None:
        return jnp.zeros((rows, 1), jnp.int32), jnp.full((rows, 1), scale, jnp.float32)
    return route.ids.reshape(rows, -1), (scale * route.gates.reshape(rows, -1)).astype(jnp.float32)


def fused_project_group(x: jax.Array, ws: list[jax.Array], as_: list[jax.Array], bs: list[jax.Array],
                        route: Routing | None, scale: float) -> list[jax.Array]:
    """`[fused_project(x, w, a, b, route, scale, native=True) ...]` over one input and one route, as
    one `lsjax.native.routed_matmul_group` call where it applies."""
    from lsjax.native import routed_matmul_group
    from pallas_kernels import routed_lora_matmul

    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    ids, gates = _route_arrays(route, rows.shape[0], scale)
    ys = routed_matmul_group(rows, ws, as_, bs, ids, gates, otherwise=routed_lora_matmul)
    return [y.reshape(*lead, w.shape[-1]) for y, w in zip(ys, ws)]


def _layer_routers(config: AdapterConfig, params: AdapterParams) -> dict:
    """The routers stacked on the layer axis (scanned with the layers); switch's is global."""
    return {} if config.method == "switch" else params["routers"]


def _run_layers(model_config: ModelConfig, base_params: Params, config: AdapterConfig, params: AdapterParams,
                x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, valid: jax.Array, *,
                key: jax.Array | None, train: bool, cache: KVCache | None = None, native: bool = False):
    """Run all decoder layers (scanned, or unrolled over split base layers); returns x, the routers' stats, the switch route and the new (k, v)."""
    L, switch = model_config.num_layers, config.method == "switch"
    xs = {"experts": params["experts"], "routers": _layer_routers(config, params),
          "key": None if key is None else jax.random.split(key, L),
          "kv": None if cache is None else (cache.k, cache.v),
          "first": np.arange(L) == 0 if switch else None}  # numpy: static per layer when unrolled
    b, s = x.shape[:2]
    no_route = Routing(jnp.zeros((b, s, config.top_k), jnp.int32), jnp.zeros((b, s, config.top_k), jnp.float32))

    def body(carry, layer):
        (x, route), (w, xs) = carry, layer
        project = LayerProject(config, xs["experts"], xs["routers"], route=route, first=xs["first"],
                               switch_router=params["routers"].get("switch"), valid=valid, key=xs["key"],
                               train=train, native=native)
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
                    train: bool = False, last: int | None = None) -> tuple[jax.Array, AdapterAux]:
    """Logits `[B, S, V]` of the base model with the adapter attached, and the router aux.

    `train=True` turns on adapter dropout and router jitter (both need `rng`). `last` (static):
    logits of the last `last` positions only, as in `lsjax.model.forward`. Pure and jit-able
    with both configs static.
    """
    check_params(model_config, adapter_config, adapter_params)
    if train and _needs_key(adapter_config) and rng is None:
        raise AdapterError("train=True with dropout or router jitter needs rng= (a jax PRNG key)")
    input_ids, attention_mask, cos, sin, mask = sequence_inputs(model_config, input_ids, attention_mask, positions)
    x = embed_tokens(base_params, input_ids)
    x, stats, route, _ = _run_layers(model_config, base_params, adapter_config, adapter_params, x, cos, sin, mask,
                                     attention_mask, key=rng if train else None, train=train)
    return lm_logits(model_config, base_params, x if last is None else x[:, -last:]), _aux(adapter_config, stats, route)


def adapted_forward_cached(model_config: ModelConfig, base_params: Params, adapter_config: AdapterConfig,
                           adapter_params: AdapterParams, input_ids: jax.Array, attention_mask: jax.Array,
                           positions: jax.Array, cache: KVCache, native: bool = False
                           ) -> tuple[jax.Array, KVCache, AdapterAux]:
    """`lsjax.decode.forward_cached` with the adapter (inference: no dropout, no jitter).

    Every method, switch included: a decode step's route is decided from that token's own
    layer-0 input, exactly as in the full forward. `native` (static): as in `forward_cached`; the
    `fused` computation then runs `lsjax.native.routed_matmul`.
    """
    check_params(model_config, adapter_config, adapter_params)
    all_positions, all_valid, cos, sin, mask = cached_inputs(model_config, cache, attention_mask, positions)
    x = embed_tokens(base_params, input_ids)
    x, stats, route, (k, v) = _run_layers(model_config, base_params, adapter_config, adapter_params, x, cos, sin,
                                          mask, attention_mask.astype(jnp.bool_), key=None, train=False, cache=cache,
                                          native=native)
    logits = lm_logits(model_config, base_params, x, native)
    new_cache = grown_cache(cache, k, v, all_positions, all_valid, input_ids.shape[1])
    return logits, new_cache, _aux(adapter_config, stats, route)


def project_hooks(adapter_config: AdapterConfig, adapter_params: AdapterParams, route: Routing | None = None):
    """`(project_factory, layer_extras)` for `lsjax.model.forward` / `lsjax.decode.forward_cached`.

    Inference only (no stats, no dropout). `switch` needs the route decided beforehand (e.g.
    `aux.routing` of a forward over the same tokens), since a plain scan has no first layer.
    """
    if adapter_config.method == "switch" and route is None:
        raise AdapterError("method 'switch' needs route= for project_hooks (its router runs once, in layer 0; "
                           "use adapted_forward / adapted_forward_cached to decide it)")
    extras = {"experts": adapter_params["experts"], "routers": _layer_routers(adapter_config, adapter_params)}

    def factory(layer_extras):
        return LayerProject(adapter_config, layer_extras["experts"], layer_extras["routers"], route=route)
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
