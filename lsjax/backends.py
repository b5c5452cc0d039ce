"""Backends: how the products of a step run. One object, handed to the pure functions.

Every backend implements `lsjax.backend_interface.Backend`: the plain product of a projection
group, the fused product with each row's routed LoRA term, the all-layer merge of the `merged`
strategy, the vocabulary head and a one-time preparation of the arrays. It computes; it decides nothing about
strategy. What the strategy needs to know to decide how routed terms are formed it reads from the
backend's declared `Traits` (`lsjax.strategies.term_form`, their one reader). Backends are frozen
dataclasses: hashable, so they are static arguments under jit.

- `XlaBackend` ("xla"): XLA's own products everywhere; every platform.
- `PallasBackend` ("pallas"): `fused` is `pallas_kernels.routed_group_matmul`, `merge` is
  `pallas_kernels.sgmm_merge`, and a quantized weight's product at decode rows is
  `pallas_kernels.quantized_matmul` (Triton on a GPU, interpreted elsewhere); other products stay on XLA.
- "native": `lsjax.native`'s multi-threaded CPU custom calls (fp32, up to 16 rows), loaded only
  when asked for or chosen by `auto`; every product falls back to XLA where it cannot run.
- "hybrid": XLA's products, with the native library's routed term added into a group's product
  (`fused`): where XLA:CPU's products are the faster base.

"auto" is chosen by timing the candidates on this machine (`lsjax.autotune`, which a
`lsjax.decoder.Decoder` asks). `resolve_backend(None)` keeps a static rule for where nothing can be
timed (abstract, traced or multi-device arrays): the native library on a CPU when it is built and
the weights are fp32 on one device, XLA elsewhere (the one route every platform compiles).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lsjax import native
from lsjax.backend_interface import Backend, Traits, float_weight, xla_logits
from lsjax.errors import ConfigError
from lsjax.quant import Scheme, is_quantized, product
from pallas_kernels import quantized_matmul, routed_group_matmul, sgmm_merge
from pallas_kernels.quantized import MAX_ROWS as QUANTIZED_MAX_ROWS

BACKENDS = ("auto", "xla", "native", "hybrid", "pallas")


@dataclasses.dataclass(frozen=True)
class XlaBackend:
    """XLA's products; `fused` and `merge` are XLA expressions (`pallas_kernels`' "xla" forms).

    Its default traits ask for the routed term's forms with the fewest operations (what a GPU
    wants); on XLA:CPU, where a slice of a gathered buffer or a masked product feeds the next
    product slowly, `resolve_backend` declares both off (docs/perf.md).
    """

    name: str = "xla"
    traits: Traits = Traits()

    def __call__(self, group: str, x: jax.Array, w: jax.Array) -> jax.Array:
        del group
        return product(x, w)

    def fused(self, x, w, a, b, ids, gates, *, members, layer):
        return routed_group_matmul(x, float_weight(w, x), a, b, ids, gates, members=members, layer=layer,
                                   implementation="xla")

    def merge(self, w, a, b, ids, gates, *, members):
        return sgmm_merge(w, a, b, ids, gates, members=members, implementation="xla")

    def logits(self, h: jax.Array, weight: jax.Array, transposed: bool) -> jax.Array:
        return xla_logits(h, weight, transposed)

    def prepare(self, arrays: Any) -> dict[str, Any]:
        del arrays
        return {}


@dataclasses.dataclass(frozen=True)
class PallasBackend(XlaBackend):
    """XLA's products; one Pallas kernel per group for the fused routed term, and one per group for
    the merged step's all-layer merge (the kernels this backend exists to run: `fused` is its form)."""

    name: str = "pallas"
    traits: Traits = Traits(fused_is_faster=True)
    interpret: bool | None = None  # None: native on a GPU, interpreted elsewhere

    def __call__(self, group: str, x: jax.Array, w: jax.Array) -> jax.Array:
        """A quantized weight's product at a decode step's few rows: the W8A16 / W4A16 kernel, which
        reads the integers once and widens them in registers; anything else on XLA."""
        rows = math.prod(x.shape[:-1])
        if not (is_quantized(w) and w.axis == -2 and w.ndim == 2 and rows <= QUANTIZED_MAX_ROWS):
            return super().__call__(group, x, w)
        y = quantized_matmul(x.reshape(rows, x.shape[-1]), w.q, w.scale, w.offset,
                             bits=8 if w.scheme == Scheme.INT8 else 4, group=w.group, implementation="pallas",
                             interpret=self.interpret)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def fused(self, x, w, a, b, ids, gates, *, members, layer):
        return routed_group_matmul(x, float_weight(w, x), a, b, ids, gates, members=members, layer=layer,
                                   implementation="pallas", interpret=self.interpret)

    def merge(self, w, a, b, ids, gates, *, members):
        return sgmm_merge(w, a, b, ids, gates, members=members, implementation="pallas", interpret=self.interpret)


@dataclasses.dataclass(frozen=True)
class HybridBackend(XlaBackend):
    """XLA's products and head; `fused` is XLA's product of the group with the native library's
    routed term added into it (one custom call per group): for machines where XLA:CPU's own
    products are the faster base (`lsjax.autotune` times it against both)."""

    name: str = "hybrid"
    traits: Traits = Traits(fused_is_faster=True, fused_prefill_rows=native.MAX_ROUTED_ROWS, gather_once=False,
                            one_expand=False)

    def fused(self, x, w, a, b, ids, gates, *, members, layer):
        return native.routed_group(x, w, a, b, ids, gates, layer=layer, members=members, otherwise=super().fused,
                                   product=product)


XLA = XlaBackend()
XLA_CPU = XlaBackend(traits=Traits(gather_once=False, one_expand=False))


def xla_backend() -> Backend:
    """XLA with the routed-term forms measured fastest on this platform."""
    return XLA_CPU if jax.default_backend() == "cpu" else XLA


def native_backend(**options) -> Backend:
    """The `lsjax.native` backend (imported only here, so nothing else depends on the library)."""
    from lsjax.native.backend import NativeBackend

    return NativeBackend(**options)


def hybrid_backend() -> Backend:
    """XLA's products with the `lsjax.native` routed term (`HybridBackend`)."""
    return HybridBackend()


def resolve_backend(backend: Backend | str | None = None, dtype: Any = jnp.float32,
                    sharded: bool = False) -> Backend:
    """A backend object from a name ("auto", "xla", "native", "hybrid", "pallas"), None ("auto") or an object.

    "auto" here is the static rule, the fallback where `lsjax.autotune` cannot time the candidates:
    the native CPU library on a CPU when it is built, `dtype` is float32 and the weights sit on one
    device (its custom calls are single-device), else XLA. Naming "native" or "hybrid" where the
    library cannot run is an error that says why.
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
    if name in ("native", "hybrid"):
        if reason is not None:
            raise ConfigError(f"backend={name!r} cannot run: {reason}")
        return native_backend() if name == "native" else hybrid_backend()
    if reason is None and jnp.dtype(dtype) == jnp.float32 and not sharded:
        return native_backend()
    return xla_backend()
