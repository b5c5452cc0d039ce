"""Routed LoRA matmul: base projection plus each row's own top-k LoRA experts, one kernel.

    y[t] = x[t] @ W + sum_k g[t,k] * (x[t] @ A[ids[t,k]]) @ B[ids[t,k]]

This is the `fused` decode strategy: it never writes weights, so its memory traffic is the
base weight read plus the chosen experts' A/B (about 1% extra at 7B, rank 16, top-2), and
it serves any batch with every row routed differently.

Pallas kernel: grid (row tiles, d_out tiles, d_in splits). A program first runs the base
`x @ W` over its share of the d_in tiles, then walks the E experts and, only for experts that
some row of its tile selected (a `lax.cond` on the ids, so unused experts cost no memory
traffic), computes `x @ A[e]` over the same share on tensor-core dots and adds
`(coef_e * xA) @ B[e]`, where coef_e[t] is the sum of row t's gates for expert e (0 for rows
that did not pick e). With several splits each program writes fp32 partial sums (the routed
term is linear in x, so the shares add up) and one sum finishes. Everything uses 2-D
power-of-two tiles, so it lowers to Triton for any E, r or d.

`routed_lora_add(y, x, ...)` runs the same kernel without W: it starts from y (XLA's own
matvec) and adds the routed term, writing over y.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common as C
from .reference import routed_lora_matmul_reference

__all__ = ["routed_lora_add", "routed_lora_matmul", "routed_lora_matmul_reference"]

_F32 = jnp.float32
DECODE_PROGRAMS = 256  # about two programs per SM of an H100 (132 SMs) for a small-T call


def _check(x, W, A, B, ids, gates, layer, y=None):
    """Shapes, dtypes and routes; W is None for `routed_lora_add`, which checks y instead."""
    stacked = layer is not None
    lead, lay = (1, "[L, ") if stacked else (0, "[")
    C.check_ndim("x", x, 2, "[T, d_in]")
    if W is not None:
        C.check_ndim("W", W, 2 + lead, lay + "d_in, d_out]")
    C.check_ndim("A", A, 3 + lead, lay + "E, d_in, r]")
    C.check_ndim("B", B, 3 + lead, lay + "E, r, d_out]")
    C.check_float("x", x)
    C.check_same_dtype("x", x, **({"W": W} if W is not None else {"y": y}), A=A, B=B)
    T, d_in = x.shape
    E, r, d_out = A.shape[lead], A.shape[-1], B.shape[-1]
    layers = A.shape[0]
    if W is not None:
        d_out, layers = W.shape[-1], W.shape[0]
        C.check_dim("W", W, lead, d_in, "d_in of x")
    if stacked:
        C.check_dim("A", A, 0, layers, "L, layers of W" if W is not None else "L, layers")
        C.check_dim("B", B, 0, layers, "L, layers of W" if W is not None else "L, layers of A")
    C.check_dim("A", A, lead + 1, d_in, "d_in of x")
    C.check_dim("B", B, lead, E, "E, experts of A")
    C.check_dim("B", B, lead + 1, r, "r, rank of A")
    if W is not None:
        C.check_dim("B", B, lead + 2, d_out, "d_out of W")
    if y is not None:
        C.check_ndim("y", y, 2, "[T, d_out]")
        C.check_dim("y", y, 0, T, "T, rows of x")
        C.check_dim("y", y, 1, d_out, "d_out of B")
    C.check_ndim("ids", ids, 2, "[T, k]")
    C.check_routing("ids", ids, "gates", gates, (T, ids.shape[1]), E)
    if stacked:
        if not jnp.issubdtype(jnp.result_type(layer), jnp.integer) or jnp.ndim(layer) != 0:
            raise ValueError(f"layer={layer!r} must be an integer scalar (index into the stacked axis)")
        value = C.concrete(layer)
        if value is not None and not 0 <= int(value) < layers:
            raise ValueError(f"layer={int(value)} is out of range; expected [0, {layers})")


# ----------------------------------------------------------------------------- pallas


def _routed_kernel(
    layer_ref, ids_ref, gates_ref, x_ref, base_ref, a_ref, b_ref, o_ref, *, T, d_in, d_out, E, r, k, bt, bk, bn, br,
    split_steps, add,
):
    ti, j, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lay = layer_ref[0]
    rows = ti * bt + jnp.arange(bt)
    cols = j * bn + jnp.arange(bn)
    rank = jnp.arange(br)
    row_ok, col_ok, rank_ok = rows < T, cols < d_out, rank < r
    ts, cs, ks = pl.ds(ti * bt, bt), pl.ds(j * bn, bn), pl.ds(0, br)
    first = part * split_steps  # this program's share of d_in: split_steps tiles of bk from here

    def x_tile(i):
        start = (first + i) * bk
        d_ok = start + jnp.arange(bk) < d_in
        return C.load(x_ref.at[ts, pl.ds(start, bk)], row_ok[:, None] & d_ok[None, :]), d_ok, start

    def base_step(i, acc):
        x, d_ok, start = x_tile(i)
        w = C.load(base_ref.at[lay, pl.ds(start, bk), cs], d_ok[:, None] & col_ok[None, :])
        return acc + C.dot(x, w)

    if add:  # base_ref is y [T, d_out]: start from it (no W read at all)
        acc = C.load(base_ref.at[ts, cs], row_ok[:, None] & col_ok[None, :]).astype(_F32)
    else:
        acc = jax.lax.fori_loop(0, split_steps, base_step, jnp.zeros((bt, bn), _F32))

    slot = [jnp.int32(s) for s in range(k)]  # traced scalars: interpret mode rejects Python ints here
    ids = [C.load(ids_ref.at[ts, s], row_ok, 0) for s in slot]
    gates = [C.load(gates_ref.at[ts, s], row_ok, 0.0) for s in slot]

    def add_expert(e, acc):
        picked = [(i == e) & row_ok for i in ids]
        coef = sum(jnp.where(p, g, 0.0) for p, g in zip(picked, gates))  # [bt] f32
        # Triton has no reduce_or: count the hits instead.
        used = sum(jnp.sum(p.astype(jnp.int32)) for p in picked) > 0

        def lora(acc):  # (x @ A) @ B is linear in x, so each d_in share adds its own part
            def a_step(i, xa):
                x, d_ok, start = x_tile(i)
                a = C.load(a_ref.at[lay, e, pl.ds(start, bk), ks], d_ok[:, None] & rank_ok[None, :])
                return xa + C.dot(x, a)

            xa = jax.lax.fori_loop(0, split_steps, a_step, jnp.zeros((bt, br), _F32))
            b = C.load(b_ref.at[lay, e, ks, cs], rank_ok[:, None] & col_ok[None, :]).astype(_F32)
            return acc + C.dot(xa * coef[:, None], b)

        return jax.lax.cond(used, lora, lambda acc: acc, acc)

    acc = jax.lax.fori_loop(0, E, add_expert, acc)
    mask = row_ok[:, None] & col_ok[None, :]
    if len(o_ref.shape) == 3:  # split over d_in: fp32 partial sums, added up outside
        C.store(o_ref.at[part, ts, cs], acc, mask)
    else:
        C.store(o_ref.at[ts, cs], acc.astype(o_ref.dtype), mask)


def _routed_pallas(x, W, A, B, ids, gates, layer, *, interpret, block_t, block_in, block_out, splits,
                   num_warps, num_stages, y=None):
    """`x @ W[layer] + routed term`, or with `y` (W unused) `y + routed term`, written over y."""
    T, d_in = x.shape
    _, E, _, r = A.shape
    d_out = B.shape[-1]
    add = y is not None
    # Decode (small T) reads W once, so the grid must spread that read over all the SMs: 128-wide
    # column tiles keep each row of a W tile one contiguous 256-byte run (bf16), and splitting d_in
    # (`splits` programs per column tile, fp32 partials summed outside) makes ~DECODE_PROGRAMS
    # programs. Tuned on an H100 at 7B shapes, T=1 (`python -m pallas_kernels.tune`, docs/perf.md).
    # Larger T wants taller row tiles so each W tile serves more rows.
    small = T <= 16
    bt = C.tile(T, block_t, 16 if small else 64, "block_t")
    # Adding to y runs unsplit, so each program walks all of d_in for x @ A: deeper steps shorten
    # that chain (H100, T=1: 256 deep took 0.09-0.18 ms per projection where 128 took 0.11-0.24).
    bk = C.tile(d_in, block_in, (256 if add else 128) if small else 64, "block_in")
    bn = C.tile(d_out, block_out, 128 if small else 64, "block_out")
    br = C.tile(r, None, C.next_pow2(r), "rank")
    steps = pl.cdiv(d_in, bk)
    if add:
        if splits not in (None, 1):
            raise ValueError(f"splits={splits!r}: adding to y runs unsplit (splits=1)")
        splits = 1
    if splits is None:
        splits = min(8, pl.cdiv(DECODE_PROGRAMS, pl.cdiv(d_out, bn))) if small else 1
    if not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits={splits!r} must be a positive integer (programs sharing d_in)")
    splits = min(splits, steps)
    split_steps = pl.cdiv(steps, splits)
    splits = pl.cdiv(steps, split_steps)
    kernel = functools.partial(
        _routed_kernel, T=T, d_in=d_in, d_out=d_out, E=E, r=r, k=ids.shape[1], bt=bt, bk=bk, bn=bn, br=br,
        split_steps=split_steps, add=add,
    )
    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    ids = jnp.clip(ids.astype(jnp.int32), 0, E - 1)
    out_shape = (T, d_out) if splits == 1 else (splits, T, d_out)
    out_dtype = y.dtype if add else (x.dtype if splits == 1 else _F32)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid=(pl.cdiv(T, bt), pl.cdiv(d_out, bn), splits),
        interpret=interpret,
        compiler_params=C.compiler_params(num_warps=num_warps or 4, num_stages=num_stages or 2),
        input_output_aliases={4: 0} if add else {},
        name="routed_lora_add" if add else "routed_lora_matmul",
    )(layer, ids, gates.astype(_F32), x, y if add else W, A, B)
    return out if splits == 1 else out.sum(0).astype(x.dtype)


# ----------------------------------------------------------------------------- xla


def _routed_term_xla(x, A, B, ids, gates, form="auto"):
    """sum_k g (x @ A[id_k]) @ B[id_k] in fp32. Gather the chosen experts per row while that is the
    smaller read (T*k <= E, e.g. decode); otherwise one dense pass over the E experts' low-rank
    factors, combined with a [T, E] gate matrix, beats materialising T*k copies of A and B.
    `form` ("gather"/"dense") forces one, for benchmarks."""
    T, k = ids.shape
    E = A.shape[0]
    prec = jax.lax.Precision.HIGHEST if x.dtype == _F32 else None
    dot = functools.partial(jnp.einsum, precision=prec, preferred_element_type=_F32)
    g = gates.astype(_F32)
    if form == "gather" or (form == "auto" and T * k <= E):
        xa = dot("td,tkdr->tkr", x, A[ids]) * g[..., None]
        return dot("tkr,tkro->to", xa, B[ids].astype(_F32))
    coef = jnp.zeros((T, E), _F32).at[jnp.arange(T)[:, None], ids].add(g)
    xa = dot("td,edr->ter", x, A) * coef[..., None]
    return dot("ter,ero->to", xa, B.astype(_F32))


def _routed_xla(x, W, A, B, ids, gates, form="auto"):
    prec = jax.lax.Precision.HIGHEST if x.dtype == _F32 else None
    y = jnp.einsum("td,do->to", x, W, precision=prec, preferred_element_type=_F32)
    return (y + _routed_term_xla(x, A, B, ids, gates, form)).astype(x.dtype)


# ----------------------------------------------------------------------------- public


def routed_lora_matmul(
    x, W, A, B, ids, gates, *, layer=None, implementation=None, interpret=None,
    block_t=None, block_in=None, block_out=None, splits=None, num_warps=None, num_stages=None,
):
    """y = x @ W + per-row routed LoRA experts; output in x's dtype, fp32 accumulation.

    x [T, d_in]; W [d_in, d_out]; A [E, d_in, r]; B [E, r, d_out]; ids/gates [T, k].
    With `layer` (int, may be traced), W/A/B are stacked [L, ...] and layer picks one inside
    the kernel, so a decode loop over layers never slices (copies) the stacked weights.

    implementation: "pallas", "xla" or None (pallas on GPU, else xla). interpret: run Pallas
    interpreted (default: True off GPU). block_t/block_in/block_out: power-of-two tiles;
    splits: programs sharing each column tile's d_in (fp32 partials, summed after the kernel);
    num_warps/num_stages: Triton's. Tiles and splits are Pallas-only tuning knobs.
    """
    _check(x, W, A, B, ids, gates, layer)
    impl = C.resolve_implementation(implementation)
    if impl == "xla":
        if layer is not None:
            W, A, B = W[layer], A[layer], B[layer]
        return _routed_xla(x, W, A, B, ids, gates)
    if layer is None:  # a free leading axis makes one kernel serve both forms
        W, A, B, layer = W[None], A[None], B[None], 0
    return _routed_pallas(
        x, W, A, B, ids, gates, layer, interpret=C.resolve_interpret(interpret),
        block_t=block_t, block_in=block_in, block_out=block_out, splits=splits, num_warps=num_warps,
        num_stages=num_stages,
    )


def routed_lora_add(y, x, A, B, ids, gates, *, layer=None, implementation=None, interpret=None,
                    block_t=None, block_in=None, block_out=None, num_warps=None):
    """y + sum_k g[t,k] (x[t] @ A[ids[t,k]]) @ B[ids[t,k]]: the routed term alone, added to a base
    projection computed elsewhere (XLA's own matvec), in y's dtype with fp32 accumulation.

    One kernel per projection instead of the gathered form's handful (gather A, x @ A, scale,
    gather B, dot, add). The Pallas kernel writes over y (aliased). Shapes as
    `routed_lora_matmul`, plus y [T, d_out]. Measured on an H100 at 7B, T=1 (docs/perf.md): the
    fewer launches do not pay, because every program walks all of d_in for x @ A: with the
    first tiles the projection plus this kernel took 3.1-3.3x XLA's `x @ W` where
    `routed_lora_matmul` (d_in split over programs) took 1.3-1.5x, and the decode step 3.0x the
    base; the sweep's best tiles (now the default) still leave 1.3-1.9x. Decoding does not use it.
    """
    _check(x, None, A, B, ids, gates, layer, y=y)
    impl = C.resolve_implementation(implementation)
    if impl == "xla":
        if layer is not None:
            A, B = A[layer], B[layer]
        return (y.astype(_F32) + _routed_term_xla(x, A, B, ids, gates)).astype(y.dtype)
    if layer is None:
        A, B, layer = A[None], B[None], 0
    return _routed_pallas(x, None, A, B, ids, gates, layer, interpret=C.resolve_interpret(interpret),
                          block_t=block_t, block_in=block_in, block_out=block_out, splits=None,
                          num_warps=num_warps, num_stages=None, y=y)
