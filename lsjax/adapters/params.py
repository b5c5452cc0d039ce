"""Adapter parameters: their own NNX Variable types, fixed stacked shapes, and the `Adapter` module.

`AdapterParam` (expert A/B) and `RouterParam` (router weights) are siblings of `nnx.Param`, not
subclasses, so `nnx.Param` still means "base weights" and `TRAINABLE` selects exactly what an
optimizer should train and what an adapter checkpoint holds.

The pure pytree (what `adapted_forward` takes) is
    {"experts": {proj: {"a": [L, E_p, d_in, r], "b": [L, E_p, r, d_out]}},
     "routers": {name: weight}}
with E_p = 1 for plain LoRA (and blockwise attention targets), and routers
    switch:    {"switch": [d_in, E]}    at the input of the first adapted projection of layer 0
    layerwise: {proj: [L, d_in, E]}     one per adapted projection
    blockwise: {"ffn": [L, hidden, E]}  one per FFN block, on the mlp-normed input
    lora:      {}
Shapes depend only on the configs, so new expert values, routes or loaded adapters never recompile.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsjax.adapters.config import AdapterConfig
from lsjax.adapters.errors import AdapterError
from lsjax.config import ModelConfig


class AdapterParam(nnx.Variable):
    """A LoRA expert weight (A or B), trained; the base model's `nnx.Param`s stay frozen."""


class RouterParam(nnx.Variable):
    """A router weight (Linear d_in -> E, no bias), trained with the experts."""


TRAINABLE = nnx.Any(AdapterParam, RouterParam)

AdapterParams = dict[str, Any]


def router_names(adapter_config: AdapterConfig) -> tuple[str, ...]:
    method = adapter_config.method
    if method == "switch":
        return ("switch",)
    if method == "layerwise":
        return adapter_config.targets
    if method == "blockwise":
        return ("ffn",)
    return ()


def router_shapes(model_config: ModelConfig, adapter_config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    proj = model_config.projection_shapes()
    L, E = model_config.num_layers, adapter_config.num_experts
    shapes = {}
    for name in router_names(adapter_config):
        if name == "switch":  # at the input of the first adapted projection of layer 0
            shapes[name] = (proj[adapter_config.targets[0]][0], E)
        elif name == "ffn":  # on the mlp-normed hidden state
            shapes[name] = (L, model_config.hidden_size, E)
        else:
            shapes[name] = (L, proj[name][0], E)
    return shapes


def param_shapes(model_config: ModelConfig, adapter_config: AdapterConfig) -> dict[str, Any]:
    """The shape of every adapter array, in the pure-pytree layout above."""
    L, r = model_config.num_layers, adapter_config.rank
    experts = {}
    for p in adapter_config.targets:
        d_in, d_out = model_config.projection_shapes()[p]
        e = adapter_config.experts_for(p)
        experts[p] = {"a": (L, e, d_in, r), "b": (L, e, r, d_out)}
    return {"experts": experts, "routers": router_shapes(model_config, adapter_config)}


def init_a(key: jax.Array, shape: tuple[int, ...], adapter_config: AdapterConfig, dtype: Any) -> jax.Array:
    """A's init, as PEFT does it: kaiming-uniform(a=sqrt(5)) -> U(+-1/sqrt(d_in)); gaussian -> N(0, 1/r)."""
    if adapter_config.init == "gaussian":
        return (jax.random.normal(key, shape, jnp.float32) / adapter_config.rank).astype(dtype)
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def init_params(model_config: ModelConfig, adapter_config: AdapterConfig, key: jax.Array,
                dtype: Any = jnp.float32) -> AdapterParams:
    """Fresh adapter arrays (A random, B zero, routers normal(init_std)) as a pure pytree."""
    shapes = param_shapes(model_config, adapter_config)
    keys = iter(jax.random.split(key, len(shapes["experts"]) + len(shapes["routers"])))
    experts = {p: {"a": init_a(next(keys), s["a"], adapter_config, dtype), "b": jnp.zeros(s["b"], dtype)}
               for p, s in shapes["experts"].items()}
    std = adapter_config.router.init_std
    routers = {n: (std * jax.random.normal(next(keys), s, jnp.float32)).astype(dtype)
               for n, s in shapes["routers"].items()}
    return {"experts": experts, "routers": routers}


def check_params(model_config: ModelConfig, adapter_config: AdapterConfig, params: AdapterParams,
                 where: str = "adapter params") -> None:
    """Refuse a pytree whose keys or shapes do not match the configs, naming the first culprit."""
    want = flatten(param_shapes(model_config, adapter_config), is_leaf=lambda x: isinstance(x, tuple))
    try:
        got = flatten(params)
    except (AttributeError, TypeError):
        raise AdapterError(f"{where}: expected a nested dict {{'experts': ..., 'routers': ...}}") from None
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        raise AdapterError(f"{where}: missing {missing[0]!r} (needed by method {adapter_config.method!r}, "
                           f"targets {list(adapter_config.targets)}){_more(missing)}")
    if extra:
        raise AdapterError(f"{where}: unexpected {extra[0]!r} (not used by method {adapter_config.method!r}, "
                           f"targets {list(adapter_config.targets)}){_more(extra)}")
    for name, shape in want.items():
        got_shape = tuple(getattr(got[name], "shape", None) or np.shape(got[name]))  # LayerTuple has .shape
        if got_shape != tuple(shape):
            raise AdapterError(f"{where}: {name!r} has shape {list(got_shape)}; expected {list(shape)}")


def flatten(tree: dict[str, Any], is_leaf=None, prefix: str = "") -> dict[str, Any]:
    """{"experts": {"q": {"a": x}}} -> {"experts/q/a": x}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not (is_leaf and is_leaf(value)):
            out.update(flatten(value, is_leaf, name + "/"))
        else:
            out[name] = value
    return out


def _more(names: list[str]) -> str:
    return f" and {len(names) - 1} more" if len(names) > 1 else ""


class Adapter(nnx.Module):
    """The adapter as an NNX module: experts as `AdapterParam`, routers as `RouterParam`.

    `Adapter(model_config, adapter_config, rngs=nnx.Rngs(0))`; `adapter.arrays()` gives the pure
    pytree for `adapted_forward`; `nnx.state(adapter, TRAINABLE)` is what an optimizer trains.
    """

    def __init__(self, model_config: ModelConfig, adapter_config: AdapterConfig, *, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32):
        self.model_config, self.config = model_config, adapter_config
        arrays = init_params(model_config, adapter_config, rngs.params(), dtype)
        self.experts = nnx.Dict({p: nnx.Dict(a=AdapterParam(v["a"]), b=AdapterParam(v["b"]))
                                 for p, v in arrays["experts"].items()})
        self.routers = nnx.Dict({n: RouterParam(v) for n, v in arrays["routers"].items()})

    def arrays(self) -> AdapterParams:
        return {"experts": {p: {"a": e["a"][...], "b": e["b"][...]} for p, e in self.experts.items()},
                "routers": {n: r[...] for n, r in self.routers.items()}}

    def load_arrays(self, params: AdapterParams) -> None:
        """Replace the values in place (same shapes, so jitted functions do not recompile)."""
        check_params(self.model_config, self.config, params)
        for p, e in self.experts.items():
            e["a"][...] = jnp.asarray(params["experts"][p]["a"], e["a"][...].dtype)
            e["b"][...] = jnp.asarray(params["experts"][p]["b"], e["b"][...].dtype)
        for n, r in self.routers.items():
            r[...] = jnp.asarray(params["routers"][n], r[...].dtype)

    @classmethod
    def from_arrays(cls, model_config: ModelConfig, adapter_config: AdapterConfig,
                    params: AdapterParams) -> "Adapter":
        check_params(model_config, adapter_config, params)
        dtype = jax.tree.leaves(params["experts"])[0].dtype
        adapter = nnx.eval_shape(lambda: cls(model_config, adapter_config, rngs=nnx.Rngs(0), dtype=dtype))
        nnx.update(adapter, jax.tree.map(jnp.asarray, params))
        return adapter
