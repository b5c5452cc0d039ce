"""Partition rules: which mesh axes split which parameter dimensions.

The mesh has axes (data, fsdp, tensor); any may be absent or of size 1. A rule names an axis per
dimension; an axis the mesh lacks, or that does not divide the dimension, falls back to replication
on that dimension, so one rule set serves every mesh shape.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lsjax.errors import ConfigError

# Column-parallel products split d_out over `tensor`, row-parallel ones split d_in. Rules name the
# dims of one layer's weight; a stacked `[L, ...]` array (a checkpoint's) gets a leading None.
PARAM_RULES: dict[str, tuple[str | None, ...]] = {
    "embed": ("tensor", "fsdp"),
    "lm_head": ("fsdp", "tensor"),
    "norm": (None,),
    "layers/attn_norm": (None,),
    "layers/mlp_norm": (None,),
    "layers/qkv": ("fsdp", "tensor"),
    "layers/gate_up": ("fsdp", "tensor"),
    "layers/o": ("tensor", "fsdp"),
    "layers/down": ("tensor", "fsdp"),
    "layers/q": ("fsdp", "tensor"),
    "layers/k": ("fsdp", "tensor"),
    "layers/v": ("fsdp", "tensor"),
    "layers/gate": ("fsdp", "tensor"),
    "layers/up": ("fsdp", "tensor"),
}


def fit_spec(rule: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """The rule's spec with every axis that the mesh lacks or that does not divide its dim dropped."""
    axes = []
    for axis, dim in zip(rule, shape):
        size = mesh.shape.get(axis, 0) if axis else 0
        axes.append(axis if size > 1 and dim % size == 0 else None)
    return P(*axes)


def param_rule(path, shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """The rule of one param, by its name (layer indices dropped: `layers/3/qkv` is `layers/qkv`)."""
    key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path
                   if not isinstance(getattr(p, "idx", None), int))
    rule = PARAM_RULES.get(key, ())
    if len(shape) == len(rule) + 1:  # stacked on the layer axis
        rule = (None, *rule)
    return rule if len(rule) == len(shape) else (None,) * len(shape)


def param_shardings(shapes: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """NamedShardings for a nested dict of shapes (or arrays) in either lsjax params layout."""

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", leaf))
        return NamedSharding(mesh, fit_spec(param_rule(path, shape), shape, mesh))

    return jax.tree_util.tree_map_with_path(one, shapes, is_leaf=_is_shape)


def _is_shape(node) -> bool:
    return isinstance(node, tuple) and all(isinstance(n, int) for n in node)


# Adapter arrays (lsjax.adapters layout): expert A [L, E, d_in, r] splits d_in over fsdp, B
# [L, E, r, d_out] splits d_out over tensor (as the base projection it adapts); routers replicate.
ADAPTER_RULES: dict[str, tuple[str | None, ...]] = {
    "a": (None, None, "fsdp", None),
    "b": (None, None, None, "tensor"),
}


def adapter_shardings(params: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """NamedShardings for an adapter pytree {"experts": {group: {"a", "b"}}, "routers": {...}}."""

    def one(path, leaf):
        keys = [str(getattr(p, "key", p)) for p in path]
        shape = tuple(getattr(leaf, "shape", leaf))
        rule = ADAPTER_RULES.get(keys[-1], ()) if keys[0] == "experts" else ()
        return NamedSharding(mesh, fit_spec(rule or (None,) * len(shape), shape, mesh))

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_shape)


def tensor_mesh(devices: int) -> Mesh | None:
    """A (data, fsdp, tensor) mesh of this process's first `devices` devices along `tensor` (None for
    one device: nothing to split)."""
    available = jax.devices()
    if not isinstance(devices, int) or devices < 1 or devices > len(available):
        raise ConfigError(f"tensor parallel {devices!r}: this process sees {len(available)} "
                          f"{available[0].platform} device(s); expected 1 to {len(available)} (on a CPU, XLA_FLAGS="
                          f"--xla_force_host_platform_device_count=N makes N)", "tensor_parallel")
    if devices == 1:
        return None
    return Mesh(np.array(available[:devices]).reshape(1, 1, devices), ("data", "fsdp", "tensor"))


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """`jax.distributed.initialize` from arguments or LSJAX_COORDINATOR / LSJAX_NUM_PROCESSES /
    LSJAX_PROCESS_ID; does nothing (returns False) when no coordinator is given."""
    coordinator = coordinator or os.environ.get("LSJAX_COORDINATOR")
    if not coordinator:
        return False
    try:
        num_processes = int(num_processes if num_processes is not None else os.environ["LSJAX_NUM_PROCESSES"])
        process_id = int(process_id if process_id is not None else os.environ["LSJAX_PROCESS_ID"])
    except KeyError as e:
        raise ConfigError(f"a coordinator was given but not {e.args[0]} (or --num-processes/--process-id)") from None
    except ValueError as e:
        raise ConfigError(f"num_processes / process_id must be integers ({e})") from None
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"process_id={process_id} is invalid; expected an integer in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process collectives
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True
