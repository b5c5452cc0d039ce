"""Native CPU matvecs for decoding: XLA FFI custom calls from `matvec.cc` (which says why).

    matmul(x, w)        x [..., K] @ w [K, N]
    matmul_t(x, wt)     x [..., K] @ wt [N, K].T     (the tied vocabulary head)
    quantized_matmul(x, w)  x @ w, or x @ w.T for a tied embedding, of a `lsjax.quant.QuantizedWeight`
    routed_group(x, w, a, b, ids, gates, *, layer, members, otherwise)
                        x [T, K] @ w [K, N] (a projection group's weights side by side: q|k|v,
                        gate|up, or one projection) plus each row's routed LoRA experts for every
                        member of the group; the meaning of
                        `pallas_kernels.reference.routed_group_matmul_reference` (one native
                        call up to `MAX_ROWS` rows; past it XLA's GEMM makes x @ w and a native
                        call adds the routed term)

Each equals its jnp expression up to float summation order. Under jit each runs the native code
when it can (library built, a CPU backend, float32 everywhere, at most `MAX_ROWS` rows for the plain
products, `MAX_ROUTED_ROWS` for the routed group) and the jnp expression (or `otherwise`) when it
cannot, so callers never branch; on a multi-platform lowering `lax.platform_dependent` keeps the
jnp route for GPUs. The custom calls have no derivative: they are for decoding, and the training
forward never uses them.

Build the library with `python -m lsjax.native.build` (`make setup` does); `unavailable_reason()`
says why it is not in use. Products split over the CPUs this process may use (its affinity mask),
or `LSJAX_NATIVE_THREADS` threads; `threads()` says how many. The quantized products run the widest
instruction set the CPU has (AVX-512, AVX2, else portable vectors), or at most the one
`LSJAX_NATIVE_SIMD` names; `simd()` says which.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import operator
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.errors import ConfigError
from lsjax.quant import QuantizedWeight, Scheme, is_quantized

SOURCE = Path(__file__).with_name("matvec.cc")
LIBRARY = Path(__file__).with_name("_matvec.so")
MAX_ROWS = 16  # more rows than this (prefill) are matrix products: XLA's GEMM wins there
# The routed term stays native longer (past MAX_ROWS beside XLA's GEMM for x @ W): it reads each
# chosen expert once for all the rows that chose it, where XLA's form for many rows is a dense pass
# over every expert (a 64-token switch prefill of SmolLM2: 138 vs 176 ms).
MAX_ROUTED_ROWS = 64
# The experts' types the routed term reads (both of A and B the same); it sums in float32 either way.
# bfloat16 experts halve the bytes the term adds to a step.
EXPERT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
TARGETS = {"lsjax_matmul": "LsjaxMatmul", "lsjax_matmul_t": "LsjaxMatmulT", "lsjax_routed_group": "LsjaxRoutedGroup",
           "lsjax_routed_add": "LsjaxRoutedAdd", "lsjax_quantized_matmul": "LsjaxQuantizedMatmul"}
THREADS_SYMBOL = "LsjaxNativeThreads"
SIMD_SYMBOL = "LsjaxNativeSimd"
SIMD_ENV = "LSJAX_NATIVE_SIMD"
SIMD_LEVELS = ("avx512", "avx2", "portable")


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded library with its targets registered, or why it cannot be used."""
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()!r}, not cpu"
    if os.environ.get(SIMD_ENV, SIMD_LEVELS[0]) not in SIMD_LEVELS:
        raise ConfigError(f"{SIMD_ENV}={os.environ[SIMD_ENV]!r} is not an instruction set; expected one of "
                          f"{', '.join(SIMD_LEVELS)}")
    if not LIBRARY.exists():
        return f"{LIBRARY} is not built (run `python -m lsjax.native.build`)"
    try:
        library = ctypes.cdll.LoadLibrary(str(LIBRARY))
    except OSError as e:
        return f"cannot load {LIBRARY}: {e}"
    missing = [symbol for symbol in (*TARGETS.values(), THREADS_SYMBOL, SIMD_SYMBOL) if not hasattr(library, symbol)]
    if missing:
        return f"{LIBRARY} lacks {missing} (an old build? run `python -m lsjax.native.build`)"
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return library


def unavailable_reason() -> str | None:
    """Why the native route cannot be used in this process (None when it can); registers it once."""
    library = _library()
    return library if isinstance(library, str) else None


def available() -> bool:
    return unavailable_reason() is None


def threads() -> int:
    """Threads the native products split over (0 when the library is not in use): the CPUs in this
    process's affinity mask when the library first ran, or `LSJAX_NATIVE_THREADS`."""
    if not available():
        return 0
    return int(_library()[THREADS_SYMBOL]())


def simd() -> str:
    """The instruction set of the quantized products: "avx512", "avx2" or "portable" ("" when the
    library is not in use)."""
    if not available():
        return ""
    function = _library()[SIMD_SYMBOL]
    function.restype = ctypes.c_char_p
    return function().decode()


def _usable(rows: int, limit: int, *arrays) -> bool:
    return rows <= limit and all(a.dtype == jnp.float32 for a in arrays) and available()


def _call(target: str, rows: jax.Array, n: int, *args, otherwise: Callable, **attributes) -> jax.Array:
    native = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32))
    return jax.lax.platform_dependent(rows, *args, cpu=lambda *a: native(*a, **attributes), default=otherwise)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    if not _usable(rows.shape[0], MAX_ROWS, x, w):
        return x @ w
    return _call("lsjax_matmul", rows, w.shape[1], w, otherwise=jnp.matmul).reshape(*lead, w.shape[1])


def matmul_t(x: jax.Array, wt: jax.Array) -> jax.Array:
    """`x @ wt.T` reading each row of `wt` once for all rows of `x` (the tied head: XLA:CPU transposed
    the whole [V, D] embedding every step at batch 8)."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)

    def xla(rows, wt):
        return jnp.einsum("td,vd->tv", rows, wt, preferred_element_type=jnp.float32)

    if not _usable(rows.shape[0], MAX_ROWS, x, wt):
        return xla(rows, wt).reshape(*lead, wt.shape[0])
    return _call("lsjax_matmul_t", rows, wt.shape[0], wt, otherwise=xla).reshape(*lead, wt.shape[0])


def quantized_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """`x @ W` for a quantized `W [K, N]` (grouped along K, axis -2), or `x @ W.T` for one `[N, K]`
    grouped along K (axis -1: a tied embedding as the vocabulary head), dequantized in registers
    (`lsjax.quant`'s `product` where the native call cannot run: more rows, not float32, stacked)."""
    transposed = w.axis == -1
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    n = w.shape[0] if transposed else w.shape[1]
    offset = () if w.offset is None else (w.offset,)

    def xla(rows, q, scale, *offset):
        dense = dataclasses.replace(w, q=q, scale=scale, offset=offset[0] if offset else None).dequantize(rows.dtype)
        return jnp.matmul(rows, dense.T if transposed else dense, preferred_element_type=jnp.float32)

    if w.ndim != 2 or not _usable(rows.shape[0], MAX_ROWS, x, w.scale, *offset):
        return xla(rows, w.q, w.scale, *offset).reshape(*lead, n)
    native = jax.ffi.ffi_call("lsjax_quantized_matmul", jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32))

    def cpu(rows, q, scale, *offset):
        none = jnp.zeros((0,), jnp.float32)
        return native(rows, q, scale, offset[0] if offset else none, group=np.int64(w.group),
                      bits=np.int64(8 if w.scheme == Scheme.INT8 else 4), transposed=bool(transposed))

    return jax.lax.platform_dependent(rows, w.q, w.scale, *offset, cpu=cpu, default=xla).reshape(*lead, n)


def routed_group(x: jax.Array, w: jax.Array | QuantizedWeight, a: jax.Array, b: jax.Array, ids: jax.Array,
                 gates: jax.Array, *, layer: int | None, members: tuple[tuple[int, int, int], ...], otherwise: Callable,
                 product: Callable | None = None) -> jax.Array:
    """A projection group's `x @ w` plus each row's routed LoRA experts, one native call.

    x [T, K]; w [K, N] (the group's members side by side); a [L, E, K, S*R] and b [L, E, R, Nb]
    with a static int `layer` picking one, or a [E, K, S*R] and b [E, R, Nb] with layer None (a and b
    float32, or both bfloat16: read as such, the sums in float32);
    ids / gates [T, S_r, J] with S_r = 1 (one route for every member) or S (a route per member),
    gates including the LoRA scale; members: S static (w_off, b_off, width) triples, member s's
    term (A's rank columns [s*R, (s+1)*R), B's columns [b_off, b_off + width)) landing in output
    columns [w_off, w_off + width). Returns y [T, N]. With `product` (x, w) -> x @ w [T, N], that
    makes the group's product (XLA's: the hybrid backend) and the native call adds the routed term
    into it. Without it: a quantized `w`'s product is `quantized_matmul`, the term added into it; a
    float32 `w`'s is made in the same call as the term up to `MAX_ROWS` rows, by XLA's GEMM past them.

    Where the native call cannot run (no library, not a CPU, x, w or gates not float32, experts not
    both of one type in `EXPERT_DTYPES`, more than `MAX_ROUTED_ROWS` rows, a traced layer) this is
    `otherwise(x, w, a, b, ids, gates, layer=layer, members=members)`, which is also the non-CPU
    branch of a multi-platform lowering. Expert ids outside [0, E) are an error on the native route
    (XLA's gather would clamp them).
    """
    members = tuple(tuple(int(v) for v in m) for m in members)

    def fallback(x, w, a, b, ids, gates):
        return otherwise(x, w, a, b, ids, gates, layer=layer, members=members)

    if a.ndim != b.ndim or a.ndim not in (3, 4) or (a.ndim == 4) != (layer is not None):
        raise ValueError(f"routed_group: a {a.shape} and b {b.shape} must be [E, ...] with layer=None or "
                         f"[L, E, ...] with an int layer (got layer={layer!r})")
    try:
        index = 0 if layer is None else operator.index(layer)
    except TypeError:  # a traced layer: the native call needs it static
        return fallback(x, w, a, b, ids, gates)
    experts_typed = a.dtype == b.dtype and a.dtype in EXPERT_DTYPES
    if not experts_typed or not _usable(x.shape[0], MAX_ROUTED_ROWS, x, w, gates):
        return fallback(x, w, a, b, ids, gates)

    flat = np.asarray(members, np.int64).reshape(-1)
    shape = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
    attributes = {"layer": np.int64(index), "members": flat}
    if product is None and not is_quantized(w) and x.shape[0] <= MAX_ROWS:  # one call: x @ w and the term
        native = jax.ffi.ffi_call("lsjax_routed_group", shape)
        base = w
    else:  # the call adds the routed term into the product made elsewhere (y in its buffer)
        native = jax.ffi.ffi_call("lsjax_routed_add", shape, input_output_aliases={1: 0})
        pooled = product is None and is_quantized(w)  # no XLA threads beside it: it may use the pool
        base = quantized_matmul(x, w) if pooled else (product or _xla_product)(x, w)
        attributes["pooled"] = pooled

    def cpu(x, base, a, b, ids, gates):
        if a.ndim == 3:  # no layer axis: a free one
            a, b = a[None], b[None]
        return native(x, base, a, b, ids.astype(jnp.int32), gates, **attributes)

    def default(x, base, a, b, ids, gates):
        del base  # (the other platforms' route reads w itself)
        return fallback(x, w, a, b, ids, gates)

    return jax.lax.platform_dependent(x, base, a, b, ids, gates, cpu=cpu, default=default)


def _xla_product(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.matmul(x, w, preferred_element_type=jnp.float32)
