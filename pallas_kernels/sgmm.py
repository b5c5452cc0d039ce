"""SGMM: merge or switch one token's LoRA experts into the weights of ALL layers in one call.

LoRA-Switch's batch-1 decode path: a router picks k experts (ids, gates) once per token and
every adapted projection of every layer uses them. Instead of one small update per layer,
one kernel covers the stacked weight `W [M, d_in, N]` of a projection group:

* `sgmm_merge`:  out = W_base + sum_k g_k A[:, ids_k] @ B[:, ids_k]   (fresh output buffer)
* `sgmm_switch`: out = W - delta(old) + delta(new)                    (aliased to W: in place)

A group weight holds several projections side by side (q|k|v, gate|up); `members` places each
member's term (A's rank block s, B's columns [b_off, b_off+width)) in W's columns [w_off,
w_off+width) (see `_groups.py`); None is one member covering every column. One route serves
every layer and member.

`sgmm_merge` always starts from the pristine base, so the working weights carry exactly one
rounding. `sgmm_switch` only moves the weights by the difference, which touches the same
bytes but lets rounding errors pile up over many tokens in bf16/fp16 (see `drift.py`);
that is why merge is the recommended mode.

Kernel layout: grid (M, row blocks, column tiles). The job is a copy with a rank-k*r update on
the way, so the kernel is shaped like a copy: each program owns a column tile (wide: long
contiguous rows) and walks `row_steps` row tiles of it, loading the chosen experts' B tiles once
and only a thin [rows, r] slice of A per step; the read-once W stream is marked evict_first so the
A/B slices other programs reuse stay in L2. Each step loads its W tile, accumulates the update in
fp32 (tensor-core dots) and stores once in W's dtype. The switch runs the same kernel with 2k
terms (old ids with negated gates, then new ids). `row_steps=1` with small tiles (`block_in=64,
block_out=128, num_warps=4, num_stages=2`) gives one tile per program instead: the kernel
benchmark times that beside the default, the measurement that chooses between them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common as C
from ._groups import column_tiling, max_width, normalize_members
from .reference import sgmm_merge_reference, sgmm_switch_reference

__all__ = ["sgmm_merge", "sgmm_switch", "sgmm_merge_reference", "sgmm_switch_reference"]

_F32 = jnp.float32
ROWS_PER_PROGRAM = 512  # default row_steps * block_in: B tiles amortized over 512 rows of W


# ----------------------------------------------------------------------------- checks


def _check(W, A, B, routes, wname, members):
    """Shapes, dtypes and routes; returns the normalized members."""
    C.check_ndim(wname, W, 3, "[M, d_in, N]")
    C.check_ndim("A", A, 4, "[M, E, d_in, S*r]")
    C.check_ndim("B", B, 4, "[M, E, r, Nb]")
    C.check_float(wname, W)
    C.check_experts(A, B)
    M, d_in, N = W.shape
    C.check_dim("A", A, 0, M, f"M, layers of {wname}")
    C.check_dim("A", A, 2, d_in, f"d_in of {wname}")
    C.check_dim("B", B, 0, M, f"M, layers of {wname}")
    C.check_dim("B", B, 1, A.shape[1], "E, experts of A")
    if members is None:
        C.check_dim("B", B, 2, A.shape[3], "r, rank of A")
        C.check_dim("B", B, 3, N, f"N, columns of {wname}")
        members = ((0, 0, N),)
    else:
        members = normalize_members(members, N, B.shape[3], wname)
        S = len(members)
        if A.shape[3] % S:
            raise ValueError(f"A has shape {tuple(A.shape)}; expected its last dim to be S*r for the S={S} members")
        C.check_dim("B", B, 2, A.shape[3] // S, f"r = {A.shape[3]} rank columns of A / {S} members")
    E = A.shape[1]
    for ids_name, ids, gates_name, gates in routes:
        C.check_ndim(ids_name, ids, 1, "[k]")
        C.check_routing(ids_name, ids, gates_name, gates, ids.shape, E)
    return members


# ----------------------------------------------------------------------------- pallas


def _sgmm_kernel(ids_ref, gates_ref, w_ref, a_ref, b_ref, o_ref, *, n_terms, d_in, r, bm, bn, br, row_steps,
                 tiling, members):
    m, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    seg = tiling.segment(j, members, 1)
    cs = pl.ds(seg["col0"], bn)
    col_ok = seg["col0"] + jnp.arange(bn) < seg["end"]
    rank_ok = jnp.arange(br) < r
    lora = seg["lora"]  # False on columns no member covers: those are copied
    rank0 = seg["member"] * r
    experts = [ids_ref[t] for t in range(n_terms)]  # static: k (merge) or 2k (switch) terms
    gates = [gates_ref[t] for t in range(n_terms)]
    bs = [C.load(b_ref.at[m, e, pl.ds(0, br), pl.ds(seg["bcol0"], bn)], lora & rank_ok[:, None] & col_ok[None, :])
          for e in experts]

    def step(s, carry):
        row0 = (i * row_steps + s) * bm
        rs = pl.ds(row0, bm)
        row_ok = row0 + jnp.arange(bm) < d_in
        tile_ok = row_ok[:, None] & col_ok[None, :]
        acc = C.load(w_ref.at[m, rs, cs], tile_ok, eviction_policy="evict_first").astype(_F32)
        for e, g, b in zip(experts, gates, bs):
            a = C.load(a_ref.at[m, e, rs, pl.ds(rank0, br)], lora & row_ok[:, None] & rank_ok[None, :])
            acc = acc + g * C.dot(a, b)
        C.store(o_ref.at[m, rs, cs], acc.astype(o_ref.dtype), tile_ok)
        return carry

    jax.lax.fori_loop(0, row_steps, step, 0)


def _sgmm_pallas(W, A, B, ids, gates, members, *, in_place, interpret, block_in, block_out, row_steps, num_warps,
                 num_stages):
    M, d_in, N = W.shape
    E, r = A.shape[1], A.shape[3] // len(members)
    bm = C.tile(d_in, block_in, 64, "block_in")
    bn = C.tile(max_width(members, N), block_out, 256, "block_out")
    br = C.tile(r, None, C.next_pow2(r), "rank")
    if row_steps is None:
        row_steps = max(1, ROWS_PER_PROGRAM // bm)
    C.check_positive_int("row_steps", row_steps)
    for name, v in (("num_warps", num_warps), ("num_stages", num_stages)):
        if v is not None:
            C.check_positive_int(name, v)
    row_steps = min(row_steps, pl.cdiv(d_in, bm))
    tiling = column_tiling(members, N, bn)
    kernel = functools.partial(
        _sgmm_kernel, n_terms=ids.shape[0], d_in=d_in, r=r, bm=bm, bn=bn, br=br, row_steps=row_steps,
        tiling=tiling, members=members,
    )
    ids = jnp.clip(ids.astype(jnp.int32), 0, E - 1)  # never read outside A/B on bad ids
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(W.shape, W.dtype),
        grid=(M, pl.cdiv(d_in, bm * row_steps), tiling.tiles),
        input_output_aliases={2: 0} if in_place else {},
        interpret=interpret,
        compiler_params=C.compiler_params(num_warps=num_warps or 8, num_stages=num_stages or 2),
        name="sgmm_switch" if in_place else "sgmm_merge",
    )(ids, gates.astype(_F32), W, A, B)


# ----------------------------------------------------------------------------- xla


def _factors(A, B, ids, gates, members, N):
    """The update as one low-rank product a @ b: a [M, d_in, S*k*r] (gated A blocks, f32) and
    b [M, S*k*r, N] (each member's B at its own columns, zero elsewhere)."""
    M, _, d_in, Sr = A.shape
    r, k = Sr // len(members), ids.shape[0]
    g = gates.astype(_F32)[None, :, None, None]
    a_parts, b_parts = [], []
    for s, (w_off, b_off, width) in enumerate(members):
        a = jnp.take(A[..., s * r:(s + 1) * r], ids, axis=1).astype(_F32) * g  # [M, k, d_in, r]
        a_parts.append(a.transpose(0, 2, 1, 3).reshape(M, d_in, k * r))
        b = jnp.take(B[..., b_off:b_off + width], ids, axis=1).reshape(M, k * r, width).astype(_F32)
        b_parts.append(jnp.pad(b, ((0, 0), (0, 0), (w_off, N - w_off - width))) if width < N else b)
    return jnp.concatenate(a_parts, axis=2), jnp.concatenate(b_parts, axis=1)


def _add_low_rank(W, a, b):
    """(W + a @ b) in f32, one rounding. Written as dot-then-add so that XLA can update a
    donated W in place (the output has W's shape and dtype; the add is elementwise)."""
    prec = jax.lax.Precision.HIGHEST if W.dtype == _F32 else None
    upd = jnp.matmul(a, b, precision=prec, preferred_element_type=_F32)
    return (W.astype(_F32) + upd).astype(W.dtype)


def _merge_xla(W_base, A, B, ids, gates, members):
    return _add_low_rank(W_base, *_factors(A, B, ids, gates, members, W_base.shape[2]))


def _switch_xla(W, A, B, old_ids, old_gates, new_ids, new_gates, members):
    a_old, b_old = _factors(A, B, old_ids, -old_gates.astype(_F32), members, W.shape[2])
    a_new, b_new = _factors(A, B, new_ids, new_gates, members, W.shape[2])
    a = jnp.concatenate([a_old, a_new], axis=2)
    b = jnp.concatenate([b_old, b_new], axis=1)
    return _add_low_rank(W, a, b)


# ----------------------------------------------------------------------------- public

_KNOBS = """implementation: "pallas", "xla" or None (pallas on GPU, else xla). interpret: run Pallas
    interpreted (default: True off GPU). Pallas-only tuning knobs (None = default): block_in /
    block_out (power-of-two rows and columns per step), row_steps (row tiles one program walks),
    num_warps, num_stages."""


def sgmm_merge(
    W_base, A, B, ids, gates, *, members=None, implementation=None, interpret=None, block_in=None, block_out=None,
    row_steps=None, num_warps=None, num_stages=None,
):
    """Merge one route into the stacked weights of all M layers: W_base + sum_k g_k A[:,ids_k] @ B[:,ids_k].

    W_base [M, d_in, N]; A [M, E, d_in, S*r]; B [M, E, r, Nb] (one float dtype, W_base's or another); ids [k] int;
    gates [k] float (LoRA scale included); members: S static (w_off, b_off, width) triples placing
    each member's term, or None (one member, Nb = N). Returns a new [M, d_in, N] array in W_base's
    dtype; W_base is only read, so it stays pristine and the result has no drift.

    {knobs}
    """
    members = _check(W_base, A, B, [("ids", ids, "gates", gates)], "W_base", members)
    if C.resolve_implementation(implementation) == "xla":
        return _merge_xla(W_base, A, B, ids, gates, members)
    return _sgmm_pallas(
        W_base, A, B, ids, gates, members, in_place=False, interpret=C.resolve_interpret(interpret),
        block_in=block_in, block_out=block_out, row_steps=row_steps, num_warps=num_warps, num_stages=num_stages,
    )


def sgmm_switch(
    W, A, B, old_ids, old_gates, new_ids, new_gates, *, members=None, implementation=None, interpret=None,
    block_in=None, block_out=None, row_steps=None, num_warps=None, num_stages=None,
):
    """Switch experts in place: W - delta(old_ids, old_gates) + delta(new_ids, new_gates).

    Shapes and members as `sgmm_merge`. One rank-2kr update per layer and member, fp32
    accumulation, one rounding to W's dtype. The output is aliased to W (Pallas
    `input_output_aliases`; the XLA form is an elementwise add onto W), so under
    `jax.jit(..., donate_argnums=0)` no copy of W is made. Repeated switching accumulates rounding
    error in 16-bit dtypes; prefer `sgmm_merge` from a pristine base.

    {knobs}
    """
    routes = [("old_ids", old_ids, "old_gates", old_gates), ("new_ids", new_ids, "new_gates", new_gates)]
    members = _check(W, A, B, routes, "W", members)
    if C.resolve_implementation(implementation) == "xla":
        return _switch_xla(W, A, B, old_ids, old_gates, new_ids, new_gates, members)
    ids = jnp.concatenate([old_ids.astype(jnp.int32), new_ids.astype(jnp.int32)])
    gates = jnp.concatenate([-old_gates.astype(_F32), new_gates.astype(_F32)])
    return _sgmm_pallas(
        W, A, B, ids, gates, members, in_place=True, interpret=C.resolve_interpret(interpret),
        block_in=block_in, block_out=block_out, row_steps=row_steps, num_warps=num_warps, num_stages=num_stages,
    )


sgmm_merge.__doc__ = sgmm_merge.__doc__.format(knobs=_KNOBS)
sgmm_switch.__doc__ = sgmm_switch.__doc__.format(knobs=_KNOBS)
