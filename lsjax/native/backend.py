"""The CPU native library as a `lsjax.backends` backend: its products, fused routed term and head.

Every call runs the native code where it can (the library built, a CPU, fp32, at most
`lsjax.native.MAX_ROWS` rows, or `MAX_ROUTED_ROWS` for the routed group: decoding and short prefill
chunks) and XLA's form otherwise, so a step over any input still runs. `prepare` asks the kernel
to back the decoded arrays with huge pages (`hugepages`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lsjax import native
from lsjax.backend_interface import Traits, float_weight, xla_logits
from lsjax.quant import is_quantized
from lsjax.native import hugepages
from pallas_kernels import routed_group_matmul, sgmm_merge


def _xla_fused(x, w, a, b, ids, gates, *, layer, members):
    return routed_group_matmul(x, float_weight(w, x), a, b, ids, gates, members=members, layer=layer,
                               implementation="xla")


@dataclasses.dataclass(frozen=True)
class NativeBackend:
    """`lsjax.native`'s multi-threaded CPU custom calls (`lsjax.backends.Backend`); `fused` is its
    routed kernel, measured faster on a CPU than a separate routed term (docs/perf.md), and short
    prefill chunks run it too; a separate routed term takes XLA:CPU's faster forms."""

    name: str = "native"
    traits: Traits = Traits(fused_is_faster=True, fused_prefill_rows=native.MAX_ROUTED_ROWS, gather_once=False,
                            one_expand=False)
    huge_pages: bool = True  # back the decoded arrays with transparent huge pages where the OS allows

    def __call__(self, group: str, x: jax.Array, w: jax.Array) -> jax.Array:
        del group
        if is_quantized(w):
            return native.quantized_matmul(x, w)
        return native.matmul(x, w)

    def fused(self, x, w, a, b, ids, gates, *, members, layer):
        return native.routed_group(x, w, a, b, ids, gates, layer=layer, members=members, otherwise=_xla_fused)

    def merge(self, w, a, b, ids, gates, *, members):
        return sgmm_merge(w, a, b, ids, gates, members=members, implementation="xla")

    def logits(self, h: jax.Array, weight: jax.Array, transposed: bool) -> jax.Array:
        if is_quantized(weight):
            return native.quantized_matmul(h, weight).astype(jnp.float32)
        if h.reshape(-1, h.shape[-1]).shape[0] > native.MAX_ROWS or h.dtype != jnp.float32:
            return xla_logits(h, weight, transposed)
        product = native.matmul_t if transposed else native.matmul
        return product(h, weight).astype(jnp.float32)

    def prepare(self, arrays: Any) -> dict[str, Any]:
        return {"huge_page_bytes": hugepages.collapse(arrays) if self.huge_pages else 0}
