"""SGMM: merge or switch one token's LoRA experts into the weights of ALL layers in one call.

LoRA-Switch's batch-1 decode path: a router picks k experts (ids, gates) once per token and
every adapted projection of every layer uses them. Instead of one small update per layer,
one kernel covers the stacked weight `W [M, d_in, d_out]` of a projection kind:

* `sgmm_merge`:  out = W_base + sum_k g_k A[:, ids_k] @ B[:, ids_k]   (fresh output buffer)
* `sgmm_switch`: out = W - delta(old) + delta(new)                    (aliased to W: in place)

`sgmm_merge` always starts from the pristine base, so the working weights carry exactly one
rounding. `sgmm_switch` only moves the weights by the difference, which touches the same
bytes but lets rounding errors pile up over many tokens in bf16/fp16 (see `drift.py`);
that is why merge is the recommended mode.

Kernel layout: grid (M, d_in tiles, d_out tiles); each program loads its W tile, gathers the
chosen experts by reading the expert ids from a small int32 input and indexing the stacked
A/B refs, accumulates the rank-(terms x r) update in float32, and stores once in W's dtype.
The switch runs the same kernel with 2k terms (old ids with negated gates, then new ids),
i.e. one rank-2kr update per tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common as C
from .reference import sgmm_merge_reference, sgmm_switch_reference

__all__ = ["sgmm_merge", "sgmm_switch", "sgmm_merge_reference", "sgmm_switch_reference"]

_F32 = jnp.float32


# ----------------------------------------------------------------------------- checks


def _check(W, A, B, routes, wname):
    C.check_ndim(wname, W, 3, "[M, d_in, d_out]")
    C.check_ndim("A", A, 4, "[M, E, d_in, r]")
    C.check_ndim("B", B, 4, "[M, E, r, d_out]")
    C.check_float(wname, W)
    C.check_same_dtype(wname, W, A=A, B=B)
    M, d_in, d_out = W.shape
    C.check_dim("A", A, 0, M, f"M, layers of {wname}")
    C.check_dim("A", A, 2, d_in, f"d_in of {wname}")
    C.check_dim("B", B, 0, M, f"M, layers of {wname}")
    C.check_dim("B", B, 1, A.shape[1], "E, experts of A")
    C.check_dim("B", B, 2, A.shape[3], "r, rank of A")
    C.check_dim("B", B, 3, d_out, f"d_out of {wname}")
    E = A.shape[1]
    for ids_name, ids, gates_name, gates in routes:
        C.check_ndim(ids_name, ids, 1, "[k]")
        C.check_routing(ids_name, ids, gates_name, gates, ids.shape, E)


# ----------------------------------------------------------------------------- pallas


def _sgmm_kernel(ids_ref, gates_ref, w_ref, a_ref, b_ref, o_ref, *, n_terms, d_in, d_out, r, bm, bn, br):
    m, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = i * bm + jnp.arange(bm)
    cols = j * bn + jnp.arange(bn)
    rank = jnp.arange(br)
    row_ok, col_ok, rank_ok = rows < d_in, cols < d_out, rank < r
    tile_ok = row_ok[:, None] & col_ok[None, :]
    rs, cs, ks = pl.ds(i * bm, bm), pl.ds(j * bn, bn), pl.ds(0, br)

    acc = C.load(w_ref.at[m, rs, cs], tile_ok).astype(_F32)
    for t in range(n_terms):  # static: k (merge) or 2k (switch) terms
        e, g = ids_ref[t], gates_ref[t]
        a = C.load(a_ref.at[m, e, rs, ks], row_ok[:, None] & rank_ok[None, :])
        b = C.load(b_ref.at[m, e, ks, cs], rank_ok[:, None] & col_ok[None, :])
        acc = acc + g * C.dot(a, b)
    C.store(o_ref.at[m, rs, cs], acc.astype(o_ref.dtype), tile_ok)


def _sgmm_pallas(W, A, B, ids, gates, *, in_place, interpret, block_in, block_out):
    M, d_in, d_out = W.shape
    E, r = A.shape[1], A.shape[3]
    bm = C.tile(d_in, block_in, 64, "block_in")
    bn = C.tile(d_out, block_out, 128, "block_out")
    br = C.tile(r, None, C.next_pow2(r), "rank")
    kernel = functools.partial(
        _sgmm_kernel, n_terms=ids.shape[0], d_in=d_in, d_out=d_out, r=r, bm=bm, bn=bn, br=br
    )
    ids = jnp.clip(ids.astype(jnp.int32), 0, E - 1)  # never read outside A/B on bad ids
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(W.shape, W.dtype),
        grid=(M, pl.cdiv(d_in, bm), pl.cdiv(d_out, bn)),
        input_output_aliases={2: 0} if in_place else {},
        interpret=interpret,
        compiler_params=C.compiler_params(num_warps=4, num_stages=2),
        name="sgmm_switch" if in_place else "sgmm_merge",
    )(ids, gates.astype(_F32), W, A, B)


# ----------------------------------------------------------------------------- xla


def _factors(A, B, ids, gates):
    """Gathered low-rank factors: (sum of g_k A_k) as [M, d_in, k*r] (f32) and B as [M, k*r, d_out]."""
    M, _, d_in, r = A.shape
    k = ids.shape[0]
    a = jnp.take(A, ids, axis=1).astype(_F32) * gates.astype(_F32)[None, :, None, None]
    a = a.transpose(0, 2, 1, 3).reshape(M, d_in, k * r)
    b = jnp.take(B, ids, axis=1).reshape(M, k * r, B.shape[3]).astype(_F32)
    return a, b


def _add_low_rank(W, a, b):
    """(W + a @ b) in f32, one rounding. Written as dot-then-add so that XLA can update a
    donated W in place (the output has W's shape and dtype; the add is elementwise)."""
    prec = jax.lax.Precision.HIGHEST if W.dtype == _F32 else None
    upd = jnp.matmul(a, b, precision=prec, preferred_element_type=_F32)
    return (W.astype(_F32) + upd).astype(W.dtype)


def _merge_xla(W_base, A, B, ids, gates):
    return _add_low_rank(W_base, *_factors(A, B, ids, gates))


def _switch_xla(W, A, B, old_ids, old_gates, new_ids, new_gates):
    a_old, b_old = _factors(A, B, old_ids, -old_gates.astype(_F32))
    a_new, b_new = _factors(A, B, new_ids, new_gates)
    a = jnp.concatenate([a_old, a_new], axis=2)  # [M, d_in, 2kr]
    b = jnp.concatenate([b_old, b_new], axis=1)  # [M, 2kr, d_out]
    return _add_low_rank(W, a, b)


# ----------------------------------------------------------------------------- public


def sgmm_merge(W_base, A, B, ids, gates, *, implementation=None, interpret=None, block_in=None, block_out=None):
    """Merge one route into the stacked weights of all M layers: W_base + sum_k g_k A[:,ids_k] @ B[:,ids_k].

    W_base [M, d_in, d_out]; A [M, E, d_in, r]; B [M, E, r, d_out] (same dtype as W_base);
    ids [k] int; gates [k] float. Returns a new [M, d_in, d_out] array in W_base's dtype;
    W_base is only read, so it stays pristine and the result has no drift.

    implementation: "pallas", "xla" or None (pallas on GPU, else xla). interpret: run Pallas
    interpreted (default: True off GPU). block_in/block_out: power-of-two tile sizes.
    """
    _check(W_base, A, B, [("ids", ids, "gates", gates)], "W_base")
    if C.resolve_implementation(implementation) == "xla":
        return _merge_xla(W_base, A, B, ids, gates)
    return _sgmm_pallas(
        W_base, A, B, ids, gates, in_place=False, interpret=C.resolve_interpret(interpret),
        block_in=block_in, block_out=block_out,
    )


def sgmm_switch(
    W, A, B, old_ids, old_gates, new_ids, new_gates, *, implementation=None, interpret=None,
    block_in=None, block_out=None,
):
    """Switch experts in place: W - delta(old_ids, old_gates) + delta(new_ids, new_gates).

    One rank-2kr update per layer, fp32 accumulation, one rounding to W's dtype. The output
    is aliased to W (Pallas `input_output_aliases`; the XLA form is an elementwise add onto
    W), so under `jax.jit(..., donate_argnums=0)` no copy of W is made. Repeated switching
    accumulates rounding error in 16-bit dtypes; prefer `sgmm_merge` from a pristine base.
    """
    _check(W, A, B, [("old_ids", old_ids, "old_gates", old_gates), ("new_ids", new_ids, "new_gates", new_gates)], "W")
    if C.resolve_implementation(implementation) == "xla":
        return _switch_xla(W, A, B, old_ids, old_gates, new_ids, new_gates)
    ids = jnp.concatenate([old_ids.astype(jnp.int32), new_ids.astype(jnp.int32)])
    gates = jnp.concatenate([-old_gates.astype(_F32), new_gates.astype(_F32)])
    return _sgmm_pallas(
        W, A, B, ids, gates, in_place=True, interpret=C.resolve_interpret(interpret),
        block_in=block_in, block_out=block_out,
    )
