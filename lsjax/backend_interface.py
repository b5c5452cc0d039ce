"""The backend interface: what every backend (`lsjax.backends`, `lsjax.native`) implements and declares.

A backend computes; how a routed term is formed is the strategy's decision (`lsjax.strategies`),
made from the backend's declared `Traits`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from lsjax.quant import is_quantized

Members = tuple[tuple[int, int, int], ...]  # each adapted member's (output offset, B offset, width)


@dataclasses.dataclass(frozen=True)
class Traits:
    """What a backend declares about itself; `lsjax.strategies` reads it to decide how routed terms are formed.

    fused_is_faster: at decode its `fused` beats the plain product plus a routed term in XLA ops
        (so the static `auto` rule, used where nothing can be timed, picks `fused`).
    fused_prefill_rows: prefill chunks of at most this many tokens run `fused` too (else dense).
    gather_once, one_expand: which XLA forms of a separate routed term run faster where this
        backend's XLA ops run (`lsjax.adapters.routing.TermForm`).
    """

    fused_is_faster: bool = False
    fused_prefill_rows: int = 0
    gather_once: bool = True
    one_expand: bool = True


class Backend(Protocol):
    """The interface every backend implements. Arrays: x `[T, d_in]`; a group's weight w `[d_in, N]`
    (float, or a `lsjax.quant.QuantizedWeight`: every method but `merge` takes one);
    its experts stacked on the layer axis, a `[L, E, d_in, S*r]`, b `[L, E, r, Nb]`; ids `[T, R, k]`
    int32 and gates `[T, R, k]` fp32 (LoRA scale folded in), R routes per row (1, or one per member)."""

    name: str
    traits: Traits

    def __call__(self, group: str, x: jax.Array, w: jax.Array) -> jax.Array:
        """x @ w for one projection group `[..., N]` (what `lsjax.model.BaseProducts` runs)."""

    def fused(self, x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array, gates: jax.Array, *,
              members: Members, layer: int | jax.Array) -> jax.Array:
        """x @ w plus each row's routed LoRA term from layer `layer`'s experts, `[T, N]`, in one call."""

    def merge(self, w: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array, gates: jax.Array, *,
              members: Members) -> jax.Array:
        """w `[L, d_in, N]` + sum_k gates_k A[:, ids_k] @ B[:, ids_k] for every layer: one route (ids, gates `[k]`)."""

    def logits(self, h: jax.Array, weight: jax.Array, transposed: bool) -> jax.Array:
        """The vocabulary head in fp32: h @ weight, or h @ weight.T for a tied embedding."""

    def prepare(self, arrays: Any) -> dict[str, Any]:
        """Once per `Generator`, on the arrays it decodes from (e.g. page placement); returns facts to report."""


def float_weight(w: Any, x: jax.Array) -> jax.Array:
    """`w` as a float array in x's type: a `lsjax.quant.QuantizedWeight` dequantized (inside the
    caller's jit, where XLA fuses the dequantization into the product that reads it), else `w`."""
    return w.dequantize(x.dtype) if is_quantized(w) else w


def xla_logits(h: jax.Array, weight: Any, transposed: bool) -> jax.Array:
    weight = float_weight(weight, h)
    spec = "...d,vd->...v" if transposed else "...d,dv->...v"
    return jnp.einsum(spec, h, weight, preferred_element_type=jnp.float32)
