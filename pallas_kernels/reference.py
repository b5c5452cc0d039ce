"""Pure-jnp references: the definitions the kernels are tested against.

Written for clarity, not speed: everything is lifted to float32 at HIGHEST precision, the
expert terms are summed one by one, and the result is cast to the weight (or input) dtype
once at the end, exactly the rounding the kernels promise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def lora_delta_reference(A, B, ids, gates):
    """sum_k g_k A[:, ids_k] @ B[:, ids_k] in float32; A [M,E,d_in,r], B [M,E,r,d_out] -> [M,d_in,d_out]."""
    delta = jnp.zeros((A.shape[0], A.shape[2], B.shape[3]), jnp.float32)
    for j in range(ids.shape[0]):
        a = A[:, ids[j]].astype(jnp.float32)
        b = B[:, ids[j]].astype(jnp.float32)
        delta = delta + gates[j].astype(jnp.float32) * jnp.matmul(a, b, precision=_HI)
    return delta


def sgmm_merge_reference(W_base, A, B, ids, gates):
    """W_base + sum_k g_k A[:, ids_k] @ B[:, ids_k], fp32 accumulation, cast to W's dtype."""
    out = W_base.astype(jnp.float32) + lora_delta_reference(A, B, ids, gates)
    return out.astype(W_base.dtype)


def sgmm_switch_reference(W, A, B, old_ids, old_gates, new_ids, new_gates):
    """W - delta(old) + delta(new); both deltas in fp32, one rounding to W's dtype."""
    upd = lora_delta_reference(A, B, new_ids, new_gates) - lora_delta_reference(A, B, old_ids, old_gates)
    return (W.astype(jnp.float32) + upd).astype(W.dtype)


def routed_lora_matmul_reference(x, W, A, B, ids, gates, layer=None):
    """y[t] = x[t] @ W + sum_k g[t,k] (x[t] @ A[ids[t,k]]) @ B[ids[t,k]], fp32, cast to x's dtype.

    With `layer`, W/A/B carry a leading stacked-layer axis and `layer` picks one.
    """
    if layer is not None:
        W, A, B = W[layer], A[layer], B[layer]
    xf = x.astype(jnp.float32)
    y = jnp.matmul(xf, W.astype(jnp.float32), precision=_HI)
    for j in range(ids.shape[1]):
        a = A[ids[:, j]].astype(jnp.float32)  # [T, d_in, r]
        b = B[ids[:, j]].astype(jnp.float32)  # [T, r, d_out]
        xa = jnp.einsum("td,tdr->tr", xf, a, precision=_HI)
        y = y + gates[:, j, None].astype(jnp.float32) * jnp.einsum("tr,tro->to", xa, b, precision=_HI)
    return y.astype(x.dtype)
