"""Adapter parameters: their own NNX Variable types, fixed stacked shapes, and the `Adapter` module.

`AdapterParam` (expert A/B) and `RouterParam` (router weights) are siblings of `nnx.Param`, not
subclasses, so `nnx.Param` still means "base weights" and `TRAINABLE` selects exactly what an
optimizer should train and what an adapter checkpoint holds.

Experts are held per projection group, as the base weights are (`lsjax.model.GROUPS`): the
adapted members of a group share one shrink and one expand. The pure pytree (what
`adapted_forward` takes) is
    {"experts": {group: {"a": [L, E_g, d_in, S*r], "b": [L, E_g, r, Nb]}},
     "routers": {name: weight}}
where S is the group's adapted members (in group order), member s's A sits in rank columns
[s*r, (s+1)*r) and its B in columns [b_off_s, b_off_s + width_s) of Nb (the adapted members'
widths side by side); `member_layout` gives every member's (w_off, b_off, width). E_g = 1 for
plain LoRA and blockwise attention groups. Routers:
    switch:    {"switch": [d_in, E]}       at the input of the first adapted group of layer 0
    layerwise: {group: [L, d_in, S*E]}     one router per adapted projection, a group's side by side
    blockwise: {"ffn": [L, hidden, E]}     one per FFN block, on the mlp-normed input
    lora:      {}
Files and PEFT keep one tensor per projection; `per_projection` / `grouped` convert. Shapes depend
only on the configs, so new expert values, routes or loaded adapters never recompile.
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
from lsjax.config import PROJECTION_GROUPS, ModelConfig


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
        return adapted_groups(adapter_config)
    if method == "blockwise":
        return ("ffn",)
    return ()


def adapted_members(adapter_config: AdapterConfig, group: str) -> tuple[str, ...]:
    """The group's members that the adapter targets, in group order."""
    return tuple(m for m in PROJECTION_GROUPS[group] if m in adapter_config.targets)


def adapted_groups(adapter_config: AdapterConfig) -> tuple[str, ...]:
    """Groups with at least one targeted member, in execution order."""
    return tuple(g for g in PROJECTION_GROUPS if adapted_members(adapter_config, g))


def member_layout(model_config: ModelConfig, adapter_config: AdapterConfig,
                  group: str) -> tuple[tuple[int, int, int], ...]:
    """(w_off, b_off, width) of each adapted member: where its term lands in the group's output,
    and where its B sits in the group's B."""
    columns = model_config.member_columns(group)
    layout, b_off = [], 0
    for member in adapted_members(adapter_config, group):
        w_off, width = columns[member]
        layout.append((w_off, b_off, width))
        b_off += width
    return tuple(layout)


def group_experts(adapter_config: AdapterConfig, group: str) -> int:
    """Experts stacked for one group: 1 for plain LoRA and blockwise attention groups."""
    return adapter_config.experts_for(PROJECTION_GROUPS[group][0])


def router_shapes(model_config: ModelConfig, adapter_config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    groups = model_config.group_shapes()
    L, E = model_config.num_layers, adapter_config.num_experts
    shapes = {}
    for name in router_names(adapter_config):
        if name == "switch":  # at the input of the first adapted group of layer 0
            shapes[name] = (groups[adapted_groups(adapter_config)[0]][0], E)
        elif name == "ffn":  # on the mlp-normed hidden state
            shapes[name] = (L, model_config.hidden_size, E)
        else:
            shapes[name] = (L, groups[name][0], len(adapted_members(adapter_config, name)) * E)
    return shapes


def adapter_shapes(model_config: ModelConfig, adapter_config: AdapterConfig) -> dict[str, Any]:
    """The shape of every adapter array, in the pure-pytree layout above."""
    L, r = model_config.num_layers, adapter_config.rank
    groups = model_config.group_shapes()
    experts = {}
    for g in adapted_groups(adapter_config):
        layout = member_layout(model_config, adapter_config, g)
        e = group_experts(adapter_config, g)
        experts[g] = {"a": (L, e, groups[g][0], len(layout) * r), "b": (L, e, r, sum(m[2] for m in layout))}
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
    shapes = adapter_shapes(model_config, adapter_config)
    keys = iter(jax.random.split(key, len(shapes["experts"]) + len(shapes["routers"])))
    experts = {g: {"a": init_a(next(keys), s["a"], adapter_config, dtype), "b": jnp.zeros(s["b"], dtype)}
               for g, s in shapes["experts"].items()}
    std = adapter_config.router.init_std
    routers = {n: (std * jax.random.normal(next(keys), s, jnp.float32)).astype(dtype)
               for n, s in shapes["routers"].items()}
    return {"experts": experts, "routers": routers}


def per_projection(model_config: ModelConfig, adapter_config: AdapterConfig, params: AdapterParams) -> AdapterParams:
    """The grouped pytree as one entry per projection (the file layout): experts
    `{proj: {"a": [L, E_p, d_in, r], "b": [L, E_p, r, d_out]}}`, layerwise routers `{proj: [L, d_in, E]}`."""
    r, E = adapter_config.rank, adapter_config.num_experts
    layerwise = adapter_config.method == "layerwise"
    experts, routers = {}, {} if layerwise else dict(params["routers"])
    for g in adapted_groups(adapter_config):
        a, b = params["experts"][g]["a"], params["experts"][g]["b"]
        for s, (member, (_, b_off, width)) in enumerate(zip(adapted_members(adapter_config, g),
                                                             member_layout(model_config, adapter_config, g))):
            experts[member] = {"a": a[..., s * r:(s + 1) * r], "b": b[..., b_off:b_off + width]}
            if layerwise:
                routers[member] = params["routers"][g][..., s * E:(s + 1) * E]
    return {"experts": experts, "routers": routers}


def grouped(model_config: ModelConfig, adapter_config: AdapterConfig, params: AdapterParams) -> AdapterParams:
    """The inverse of `per_projection` (numpy or jax arrays in, the same kind out)."""
    cat = np.concatenate if isinstance(next(iter(jax.tree.leaves(params)), None), np.ndarray) else jnp.concatenate
    layerwise = adapter_config.method == "layerwise"
    experts, routers = {}, {} if layerwise else dict(params["routers"])
    for g in adapted_groups(adapter_config):
        members = adapted_members(adapter_config, g)
        experts[g] = {"a": cat([params["experts"][m]["a"] for m in members], axis=-1),
                      "b": cat([params["experts"][m]["b"] for m in members], axis=-1)}
        if layerwise:
            routers[g] = cat([params["routers"][m] for m in members], axis=-1)
    return {"experts": experts, "routers": routers}


def check_params(model_config: ModelConfig, adapter_config: AdapterConfig, params: AdapterParams,
                 where: str = "adapter params") -> None:
    """Refuse a pytree whose keys or shapes do not match the configs, naming the first culprit."""
    want = flatten(adapter_shapes(model_config, adapter_config), is_leaf=lambda x: isinstance(x, tuple))
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
        got_shape = tuple(np.shape(got[name]))
        if got_shape != tuple(shape):
            raise AdapterError(f"{where}: {name!r} has shape {list(got_shape)}; expected {list(shape)}")


def per_projection_shapes(model_config: ModelConfig, adapter_config: AdapterConfig) -> dict[str, Any]:
    """Shapes of the per-projection (file) layout that `per_projection` gives."""
    L, r, E = model_config.num_layers, adapter_config.rank, adapter_config.num_experts
    proj = model_config.projection_shapes()
    experts = {p: {"a": (L, adapter_config.experts_for(p), proj[p][0], r),
                   "b": (L, adapter_config.experts_for(p), r, proj[p][1])} for p in adapter_config.targets}
    routers = router_shapes(model_config, adapter_config)
    if adapter_config.method == "layerwise":
        routers = {p: (L, proj[p][0], E) for p in adapter_config.targets}
    return {"experts": experts, "routers": routers}


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

    per_row = False  # one adapter for every row of a batch (`lsjax.adapters.table.AdapterTable`: each row its own)

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

    def astype(self, dtype: Any) -> "Adapter":
        """This adapter with its experts and routers in `dtype` (itself when they are already): e.g.
        bfloat16 experts beside float32 weights, half the bytes a decode step reads for them."""
        if all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(self.arrays())):
            return self
        arrays = jax.tree.map(lambda x: x.astype(dtype), self.arrays())
        return type(self).from_arrays(self.model_config, self.config, arrays)

    @classmethod
    def from_arrays(cls, model_config: ModelConfig, adapter_config: AdapterConfig,
                    params: AdapterParams) -> "Adapter":
        check_params(model_config, adapter_config, params)
        dtype = jax.tree.leaves(params["experts"])[0].dtype
        adapter = nnx.eval_shape(lambda: cls(model_config, adapter_config, rngs=nnx.Rngs(0), dtype=dtype))
        nnx.update(adapter, jax.tree.map(jnp.asarray, params))
        return adapter
