"""Partition rules: which mesh axes split which parameter dimensions.

The mesh has axes (data, fsdp, tensor); any may be absent or of size 1. A rule names an axis per
dimension; an axis the mesh lacks, or that does not divide the dimension, falls back to replication
on that dimension, so one rule set serves every mesh shape.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Column-parallel projections split d_out over `tensor`, row-parallel ones split d_in.
PARAM_RULES: dict[str, tuple[str | None, ...]] = {
    "embed": ("tensor", "fsdp"),
    "lm_head": ("fsdp", "tensor"),
    "norm": (None,),
    "layers/attn_norm": (None, None),
    "layers/mlp_norm": (None, None),
    "layers/q": (None, "fsdp", "tensor"),
    "layers/k": (None, "fsdp", "tensor"),
    "layers/v": (None, "fsdp", "tensor"),
    "layers/gate": (None, "fsdp", "tensor"),
    "layers/up": (None, "fsdp", "tensor"),
    "layers/o": (None, "tensor", "fsdp"),
    "layers/down": (None, "tensor", "fsdp"),
}


def fit_spec(rule: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """The rule's spec with every axis that the mesh lacks or that does not divide its dim dropped."""
    axes = []
    for axis, dim in zip(rule, shape):
        size = mesh.shape.get(axis, 0) if axis else 0
        axes.append(axis if size > 1 and dim % size == 0 else None)
    return P(*axes)


def param_shardings(shapes: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """NamedShardings for a nested dict of shapes (or arrays) in the lsjax params layout."""

    def one(path, leaf):
        key = "/".join(str(getattr(p, "key", p)) for p in path)
        shape = tuple(getattr(leaf, "shape", leaf))
        rule = PARAM_RULES.get(key, (None,) * len(shape))
        return NamedSharding(mesh, fit_spec(rule, shape, mesh))

    return jax.tree_util.tree_map_with_path(one, shapes, is_leaf=lambda x: isinstance(x, tuple))


# Adapter arrays (lsjax.adapters layout): expert A [L, E, d_in, r] splits d_in over fsdp, B
# [L, E, r, d_out] splits d_out over tensor (as the base projection it adapts); routers replicate.
ADAPTER_RULES: dict[str, tuple[str | None, ...]] = {
    "a": (None, None, "fsdp", None),
    "b": (None, None, None, "tensor"),
}


def adapter_shardings(params: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """NamedShardings for an adapter pytree {"experts": {proj: {"a", "b"}}, "routers": {...}}."""

    def one(path, leaf):
        keys = [str(getattr(p, "key", p)) for p in path]
        shape = tuple(getattr(leaf, "shape", leaf))
        rule = ADAPTER_RULES.get(keys[-1], ()) if keys[0] == "experts" else ()
        return NamedSharding(mesh, fit_spec(rule or (None,) * len(shape), shape, mesh))

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, tuple))
