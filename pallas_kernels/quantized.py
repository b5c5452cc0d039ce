"""Quantized matmul for decode (W8A16 / W4A16): `x @ W` with W held as integers in groups along K.

    W[k, n] = scale[k // group, n] * v[k, n] + offset[k // group, n]     (no offset: 0)

`bits=8`: `q` int8 `[K, N]`, v = q. `bits=4`: `q` uint8 `[K/2, N]` holding two values per byte
along K (v[2i] in the low nibble, v[2i+1] in the high one). Decoding reads every weight byte once
per token, so the product costs what its integers cost: a quarter (8-bit) or an eighth (4-bit) of
fp32's bytes, plus the scales.

Pallas kernel, GEMV form (few rows), grid (column tiles, K splits, row tiles). A program streams its
share of K in steps that never straddle a group (a step is a power of two dividing `group`), so each
step reads one row of scales (and offsets) for its columns; the integers are widened in registers,
never written back as floats. Products are broadcast multiplies into a `[rows, step, columns]` fp32
accumulator reduced once after the loop (no `tl.dot`: at a few rows there is nothing for tensor
cores to do, and the hot loop stays loads and FMAs). For 4-bit, x's even and odd columns are split
once before the kernel (a few KB), so the low and high nibbles each meet their own x tile with no
interleaving in registers. Split-K partial sums are added by one XLA reduction after the kernel.

The "xla" implementation dequantizes W in one expression feeding the product (XLA fuses it);
`reference.quantized_matmul_reference` is the definition both are tested against.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common as C

__all__ = ["quantized_matmul", "MAX_ROWS"]

_F32 = jnp.float32
MAX_ROWS = 16  # the GEMV form's rows per program; more rows are a prefill, which XLA's dequantized dot serves
TARGET_PROGRAMS = 396  # ~3 resident programs per SM of a 132-SM H100
MAX_SPLITS = 32
ACC_REGS = 64  # fp32 accumulator registers per thread the default tiles aim at


def _check(x, q, scale, offset, bits, group):
    C.check_ndim("x", x, 2, "[T, K]")
    C.check_ndim("q", q, 2, "[K, N] (8-bit) or [K/2, N] (4-bit, two values per byte)")
    C.check_float("x", x)
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r} is not supported; expected 8 or 4")
    T, K = x.shape
    want = jnp.int8 if bits == 8 else jnp.uint8
    if q.dtype != want:
        raise ValueError(f"q has dtype {q.dtype}; expected {jnp.dtype(want).name} for {bits}-bit weights")
    C.check_dim("q", q, 0, K if bits == 8 else K // 2, "K" if bits == 8 else "K/2, two 4-bit values per byte")
    if not isinstance(group, int) or group < 1 or K % group or (bits == 4 and group % 2):
        raise ValueError(f"group={group!r} must be a positive divisor of K={K}" + (", and even (4-bit)" if bits == 4
                                                                                      else ""))
    N = q.shape[1]
    for name, part in (("scale", scale), ("offset", offset)):
        if part is not None and tuple(part.shape) != (K // group, N):
            raise ValueError(f"{name} has shape {tuple(part.shape)}; expected {(K // group, N)} (K/group, N)")
    if jnp.dtype(scale.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"scale has dtype {scale.dtype}; expected a float dtype")


@dataclasses.dataclass(frozen=True)
class _Config:
    T: int
    K: int
    N: int
    pack: int  # values per byte of q: 1 (8-bit) or 2 (4-bit)
    group: int
    bt: int
    bk: int  # K values per step (a power of two dividing group)
    bn: int
    splits: int
    split_steps: int
    steps: int
    offset: bool
    num_warps: int


def _largest_pow2_divisor(n: int) -> int:
    return n & -n


def _configure(T, K, N, bits, group, offset, *, block_k=None, block_n=None, splits=None, num_warps=None) -> _Config:
    pack = 2 if bits == 4 else 1
    bt = C.next_pow2(min(T, MAX_ROWS))
    fits = _largest_pow2_divisor(group)
    if block_k is not None:
        C.check_pow2("block_k", block_k)
        if group % block_k or block_k < pack:
            raise ValueError(f"block_k={block_k} must divide group={group} (a step stays within one group)"
                             + (" and be at least 2 (4-bit)" if pack == 2 else ""))
    bk = block_k or min(fits, 64 * pack)
    num_warps = num_warps or 4
    rows = bk // pack
    default_n = C.prev_pow2(max(16, ACC_REGS * 32 * num_warps // (bt * rows)))
    bn = C.tile(N, block_n, min(default_n, 1024), "block_n")
    tiles = pl.cdiv(N, bn)
    steps = K // bk
    if splits is None:
        splits = max(1, min(MAX_SPLITS, round(TARGET_PROGRAMS / (tiles * pl.cdiv(T, bt)))))
    else:
        C.check_positive_int("splits", splits)
    split_steps = pl.cdiv(steps, min(splits, steps))
    splits = pl.cdiv(steps, split_steps)
    return _Config(T, K, N, pack, group, bt, bk, bn, splits, split_steps, steps, offset is not None, num_warps)


def _kernel(*refs, cfg: _Config):
    x_refs = refs[:cfg.pack]  # x (8-bit), or x's even and odd columns (4-bit)
    q_ref, s_ref = refs[cfg.pack], refs[cfg.pack + 1]
    o_ref = refs[cfg.pack + 2] if cfg.offset else None
    y_ref = refs[-1]
    j, part, ti = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bt, bn, rows = cfg.bt, cfg.bn, cfg.bk // cfg.pack
    rows_at, cols_at = pl.ds(ti * bt, bt), pl.ds(j * bn, bn)
    row_ok = ti * bt + jnp.arange(bt) < cfg.T
    col_ok = j * bn + jnp.arange(bn) < cfg.N

    def step(i, acc):
        s = part * cfg.split_steps + i
        live = s < cfg.steps  # past K (the last split's spare steps): every load masked, adding 0
        ok = jnp.full((rows,), live)
        at = pl.ds(s * rows, rows)  # this step's rows of q (and columns of each x part)
        w_mask = ok[:, None] & col_ok[None, :]
        g_at = pl.ds((s * cfg.bk) // cfg.group, 1)  # the one group this step lies in
        g_mask = jnp.full((1, 1), live) & col_ok[None, :]
        scale = C.load(s_ref.at[g_at, cols_at], g_mask).astype(_F32)
        shift = C.load(o_ref.at[g_at, cols_at], g_mask).astype(_F32) if cfg.offset else None
        q = C.load(q_ref.at[at, cols_at], w_mask, eviction_policy="evict_first")
        values = [q] if cfg.pack == 1 else [q & 0xF, q >> 4]
        for x_ref, v in zip(x_refs, values):
            w = v.astype(_F32) * scale
            if shift is not None:
                w = w + shift
            xt = C.load(x_ref.at[rows_at, at], row_ok[:, None] & ok[None, :]).astype(_F32)
            acc = acc + xt[:, :, None] * w[None, :, :]
        return acc

    acc = jax.lax.fori_loop(0, cfg.split_steps, step, jnp.zeros((bt, rows, bn), _F32))
    C.store(y_ref.at[part, rows_at, cols_at], acc.sum(axis=1), row_ok[:, None] & col_ok[None, :])


def _pallas(x, q, scale, offset, bits, group, *, interpret, **knobs):
    T, K = x.shape
    N = q.shape[1]
    cfg = _configure(T, K, N, bits, group, offset, **knobs)
    xs = [x] if cfg.pack == 1 else [x[:, 0::2], x[:, 1::2]]
    args = [*xs, q, scale] + ([] if offset is None else [offset])
    y = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        out_shape=jax.ShapeDtypeStruct((cfg.splits, T, N), _F32),
        grid=(pl.cdiv(N, cfg.bn), cfg.splits, pl.cdiv(T, cfg.bt)),
        interpret=interpret,
        compiler_params=C.compiler_params(num_warps=cfg.num_warps, num_stages=2),
        name=f"quantized_matmul_w{bits}",
    )(*args)
    return y.sum(0).astype(x.dtype)


def _xla(x, q, scale, offset, bits, group):
    """One expression: the integers widened, scaled (and shifted) per group, then the product."""
    if bits == 4:
        q = jnp.stack([q & 0xF, q >> 4], axis=1).reshape(-1, q.shape[1])
    K, N = q.shape
    w = q.reshape(K // group, group, N).astype(x.dtype) * scale[:, None, :].astype(x.dtype)
    if offset is not None:
        w = w + offset[:, None, :].astype(x.dtype)
    prec = jax.lax.Precision.HIGHEST if x.dtype == _F32 else None
    return jnp.dot(x, w.reshape(K, N), precision=prec, preferred_element_type=_F32).astype(x.dtype)


def quantized_matmul(x, q, scale, offset=None, *, bits: int, group: int, implementation=None, interpret=None,
                     block_k=None, block_n=None, splits=None, num_warps=None):
    """y = x @ W for W held as `bits`-bit integers `q` in groups of `group` along K (see the module
    docstring); x's dtype out, fp32 sums.

    x [T, K] (the kernel is the GEMV form: meant for T <= MAX_ROWS, a decode step's rows); q int8
    [K, N] or uint8 [K/2, N]; scale and offset [K/group, N] (offset None: none).
    implementation: "pallas", "xla" or None (pallas on GPU, else xla). interpret: run Pallas
    interpreted (default: True off GPU). Pallas-only knobs (None = the default for the shape):
    block_k (K values per step, a power of two dividing `group`), block_n (columns per program),
    splits (programs sharing a column tile's K), num_warps.
    """
    _check(x, q, scale, offset, bits, group)
    if C.resolve_implementation(implementation) == "xla":
        return _xla(x, q, scale, offset, bits, group)
    return _pallas(x, q, scale, offset, bits, group, interpret=C.resolve_interpret(interpret), block_k=block_k,
                   block_n=block_n, splits=splits, num_warps=num_warps)
