"""Backends: how the products of a decode step run. One object, handed to the pure functions.

A backend is called like `project(group, x, w)` for a plain product, and offers
    fused(x, w, a, b, ids, gates, *, members, layer)   x @ w plus each row's routed LoRA term, one call
    merge(w, a, b, ids, gates, *, members)             w + sum_k g_k A_k @ B_k for every layer of a stacked
                                                       group, one route (the `merged` switch step)
    logits(h, weight, transposed)                      the vocabulary head, fp32
    prepare(arrays)                                    once per `Generator` (e.g. page placement)
with the group's experts stacked on the layer axis (`a [L, E, d_in, S*r]`, `b [L, E, r, Nb]`) and
`members` placing each adapted member's term (`pallas_kernels.routed_group_matmul_reference`).
Backends are frozen dataclasses: hashable, so they are static arguments under jit.

- `XlaBackend` ("xla"): XLA's own products everywhere; every platform.
- `PallasBackend` ("pallas"): `fused` is `pallas_kernels.routed_group_matmul` and `merge` is
  `pallas_kernels.sgmm_merge` (Triton on a GPU, interpreted elsewhere); plain products stay on XLA.
- "native": `lsjax.native`'s multi-threaded CPU custom calls (fp32, up to 16 rows), loaded only
  when asked for or chosen by `auto`; every product falls back to XLA where it cannot run.

`resolve_backend(None)` ("auto") picks by platform: the native library on a CPU when it is built
and the weights are fp32 (XLA:CPU runs a matvec on one core; docs/perf.md); XLA elsewhere, the one
route every platform compiles, until a GPU measurement of the Pallas kernels says otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lsjax.errors import ConfigError
from pallas_kernels import routed_group_matmul, sgmm_merge

BACKENDS = ("auto", "xla", "native", "pallas")


@dataclasses.dataclass(frozen=True)
class XlaBackend:
    """XLA's products; `fused` is the routed term as one XLA expression after the product.

    How `unmerged` forms a group's routed term in XLA ops: `gather_once` gathers a switch route's
    chosen experts once per step for every layer (each layer then reads its slice), else each layer
    gathers its own; `one_expand` expands unequal members (q|k|v with grouped-query heads) in one
    product over every column masked to its member, else one product per member. The defaults are
    the fewest operations (what a GPU wants); on XLA:CPU, where a slice of a gathered buffer or a
    masked product feeds the next product slowly, `resolve_backend` turns both off (docs/perf.md).
    """

    name: str = "xla"
    prefers_fused: bool = False  # `auto` strategy: the routed term as separate XLA ops (`unmerged`)
    fused_rows: int = 0  # `fused` prefills of at most this many tokens run `fused` too (else dense)
    gather_once: bool = True
    one_expand: bool = True

    def __call__(self, group: str, x: jax.Array, w: jax.Array) -> jax.Array:
        del group
        return x @ w

    def fused(self, x, w, a, b, ids, gates, *, members, layer):

        return routed_group_matmul(x, w, a, b, ids, gates, members=members, layer=layer, implementation="xla")

    def merge(self, w, a, b, ids, gates, *, members):
        return sgmm_merge(w, a, b, ids, gates, members=members, implementation="xla")

    def logits(self, h: jax.Array, weight: jax.Array, transposed: bool) -> jax.Array:
        spec = "...d,vd->...v" if transposed else "...d,dv->...v"
        return jnp.einsum(spec, h, weight, preferred_element_type=jnp.float32)

    def prepare(self, arrays: Any) -> dict[str, Any]:
        del arrays
        return {}


@dataclasses.dataclass(frozen=True)
class PallasBackend(XlaBackend):
    """XLA's products; one Pallas kernel per group for the fused routed term, and one per group for
    the merged step's all-layer merge."""

    name: str = "pallas"
    prefers_fused: bool = True
    interpret: bool | None = None  # None: native on a GPU, interpreted elsewhere

    def fused(self, x, w, a, b, ids, gates, *, members, layer):

        return routed_group_matmul(x, w, a, b, ids, gates, members=members, layer=layer, implementation="pallas",
                                   interpret=self.interpret)

    def merge(self, w, a, b, ids, gates, *, members):
        return sgmm_merge(w, a, b, ids, gates, members=members, implementation="pallas", interpret=self.interpret)


XLA = XlaBackend()
XLA_CPU = XlaBackend(gather_once=False, one_expand=False)


def xla_backend() -> XlaBackend:
    """XLA with the routed-term forms measured fastest on this platform."""
    return XLA_CPU if jax.default_backend() == "cpu" else XLA


def native_backend(**options):
    """The `lsjax.native` backend (imported only here, so nothing else depends on the library)."""
    from lsjax.native.backend import NativeBackend

    return NativeBackend(**options)


def resolve_backend(backend: Any = None, dtype: Any = jnp.float32, sharded: bool = False) -> Any:
    """A backend object from a name ("auto", "xla", "native", "pallas"), None ("auto") or an object.

    "auto": the native CPU library on a CPU when it is built, `dtype` is float32 and the weights
    sit on one device (its custom calls are single-device), else XLA. Naming "native" where it
    cannot run is an error that says why.
    """
    if backend is not None and not isinstance(backend, str):
        return backend
    name = backend or "auto"
    if name not in BACKENDS:
        raise ConfigError(f"backend={name!r} is not supported; expected one of {BACKENDS} or a backend object")
    if name == "xla":
        return xla_backend()
    if name == "pallas":
        return PallasBackend()
    from lsjax.native import unavailable_reason

    reason = unavailable_reason()
    if name == "native":
        if reason is not None:
            raise ConfigError(f"backend='native' cannot run: {reason}")
        return native_backend()
    if reason is None and jnp.dtype(dtype) == jnp.float32 and not sharded:
        return native_backend()
    return xla_backend()
