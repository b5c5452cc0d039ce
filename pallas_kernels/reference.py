"""Pure-jnp references: the definitions the kernels are tested against.

Written for clarity, not speed: everything is lifted to float32 at HIGHEST precision, the
expert terms are summed one by one, and the result is cast to the weight (or input) dtype
once at the end, exactly the rounding the kernels promise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def lora_delta_reference(A, B, ids, gates, members=None, d_out=None):
    """sum_k g_k A[:, ids_k] @ B[:, ids_k] in float32, [M, d_in, d_out]; A [M,E,d_in,S*r], B [M,E,r,Nb].

    members None: one member covering every column (d_out = Nb). Otherwise member s's term
    (A's rank block s, B's columns [b_off, b_off+width)) lands in columns [w_off, w_off+width) of
    a [M, d_in, d_out] delta that is zero elsewhere; one route (ids, gates [k]) for every member.
    """
    if members is None:
        members, d_out = whole_output(B.shape[3]), B.shape[3]
    r = A.shape[3] // len(members)
    delta = jnp.zeros((A.shape[0], A.shape[2], d_out), jnp.float32)
    for s, (w_off, b_off, width) in enumerate(members):
        for j in range(ids.shape[0]):
            a = A[:, ids[j], :, s * r:(s + 1) * r].astype(jnp.float32)
            b = B[:, ids[j], :, b_off:b_off + width].astype(jnp.float32)
            term = gates[j].astype(jnp.float32) * jnp.matmul(a, b, precision=_HI)
            delta = delta.at[:, :, w_off:w_off + width].add(term)
    return delta


def sgmm_merge_reference(W_base, A, B, ids, gates, members=None):
    """W_base + sum_k g_k A[:, ids_k] @ B[:, ids_k] (placed by members), fp32, cast to W's dtype."""
    out = W_base.astype(jnp.float32) + lora_delta_reference(A, B, ids, gates, members, W_base.shape[2])
    return out.astype(W_base.dtype)


def sgmm_switch_reference(W, A, B, old_ids, old_gates, new_ids, new_gates, members=None):
    """W - delta(old) + delta(new); both deltas in fp32, one rounding to W's dtype."""
    n = W.shape[2]
    upd = (lora_delta_reference(A, B, new_ids, new_gates, members, n)
           - lora_delta_reference(A, B, old_ids, old_gates, members, n))
    return (W.astype(jnp.float32) + upd).astype(W.dtype)


def whole_output(d_out: int) -> tuple[tuple[int, int, int], ...]:
    """The `members` of a projection that is one member: its routed term covers every column."""
    return ((0, 0, int(d_out)),)


def routed_group_matmul_reference(x, W, A, B, ids, gates, members, layer=None):
    """A projection group (q|k|v, gate|up, or one projection) plus each row's routed LoRA experts.

    x [T, d_in]; W [d_in, N] (the group's members side by side); A [E, d_in, S*r] (member s's A in
    rank columns [s*r, (s+1)*r)); B [E, r, Nb] (member s's B in columns [b_off_s, b_off_s + w_s));
    ids / gates [T, S_r, k] with S_r = 1 (one route for every member) or S (a route per member).
    members: S static triples (w_off, b_off, width); member s's term lands in y[:, w_off:w_off+width].

        y[t] = x[t] @ W + sum_s sum_j g[t,s,j] * (x[t] @ A[e][:, s-th rank block]) @ B[e][:, s-th columns],
        e = ids[t, s, j]   (s -> 0 when S_r = 1)

    With `layer`, A/B carry a leading stacked-layer axis and `layer` picks one (W is always one
    layer's). fp32 at HIGHEST, one rounding to x's dtype at the end.
    """
    if layer is not None:
        A, B = A[layer], B[layer]
    S, r = len(members), A.shape[-1] // len(members)
    xf = x.astype(jnp.float32)
    y = jnp.matmul(xf, W.astype(jnp.float32), precision=_HI)
    for s, (w_off, b_off, width) in enumerate(members):
        route = s if ids.shape[1] == S else 0
        for j in range(ids.shape[2]):
            e = ids[:, route, j]
            a = A[e][:, :, s * r:(s + 1) * r].astype(jnp.float32)          # [T, d_in, r]
            b = B[e][:, :, b_off:b_off + width].astype(jnp.float32)        # [T, r, width]
            xa = jnp.einsum("td,tdr->tr", xf, a, precision=_HI)
            term = gates[:, route, j, None].astype(jnp.float32) * jnp.einsum("tr,trw->tw", xa, b, precision=_HI)
            y = y.at[:, w_off:w_off + width].add(term)
    return y.astype(x.dtype)


def quantized_matmul_reference(x, q, scale, offset, bits, group):
    """x @ W in float32 for W = scale * v + offset per group of `group` along K (`quantized.py`):
    v = q (8-bit), or q's low and high nibbles interleaved along K (4-bit). Cast to x's dtype."""
    if bits == 4:
        v = jnp.zeros((2 * q.shape[0], q.shape[1]), jnp.float32)
        v = v.at[0::2].set((q & 0xF).astype(jnp.float32)).at[1::2].set((q >> 4).astype(jnp.float32))
    else:
        v = q.astype(jnp.float32)
    def per_k(a):  # [K/group, N] -> [K, N]
        return jnp.repeat(a.astype(jnp.float32), group, axis=0)

    w = per_k(scale) * v + (0.0 if offset is None else per_k(offset))
    return jnp.matmul(x.astype(jnp.float32), w, precision=_HI).astype(x.dtype)
