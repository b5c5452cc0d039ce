"""Native CPU matvecs for decoding: XLA FFI custom calls from `matvec.cc` (which says why).

    matmul(x, w)                          x [..., K] @ w [K, N]
    matmul_t(x, wt)                       x [..., K] @ wt[N, K].T      (the tied vocabulary head)
    routed_matmul(x, w, a, b, ids, gates) x @ w + sum_j gates[t, j] (x[t] @ a[ids[t, j]]) @ b[ids[t, j]]
    matmul_group(x, ws), routed_matmul_group(x, ws, as_, bs, ids, gates)
                                          several of those over the same x (q, k, v; gate, up) in one call

Each equals its jnp expression up to float summation order. Under jit each runs the native code
when it can (library built, a CPU backend, float32 everywhere, at most `MAX_ROWS` rows: decode, not
prefill) and the jnp expression (or `otherwise`) when it cannot, so callers never branch; on a
multi-platform lowering `lax.platform_dependent` keeps the jnp route for GPUs. The custom calls
have no derivative: they are for decoding, and the training forward never uses them.

Build the library with `python -m lsjax.native.build` (`make setup` does); `unavailable_reason()`
says why it is not in use. Products split over all cores, or `LSJAX_NATIVE_THREADS` threads.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("matvec.cc")
LIBRARY = Path(__file__).with_name("_matvec.so")
MAX_ROWS = 16  # more rows than this (prefill) are matrix products: XLA's GEMM wins there
TARGETS = {"lsjax_matmul": "LsjaxMatmul", "lsjax_matmul_t": "LsjaxMatmulT",
           "lsjax_routed_matmul": "LsjaxRoutedMatmul", "lsjax_matmul_group": "LsjaxMatmulGroup",
           "lsjax_routed_matmul_group": "LsjaxRoutedMatmulGroup"}
MAX_GROUP = 4  # products per grouped call


@functools.cache
def unavailable_reason() -> str | None:
    """Why the native route cannot be used in this process (None when it can); registers it once."""
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()!r}, not cpu"
    if not LIBRARY.exists():
        return f"{LIBRARY} is not built (run `python -m lsjax.native.build`)"
    try:
        library = ctypes.cdll.LoadLibrary(str(LIBRARY))
    except OSError as e:
        return f"cannot load {LIBRARY}: {e}"
    missing = [symbol for symbol in TARGETS.values() if not hasattr(library, symbol)]
    if missing:
        return f"{LIBRARY} lacks {missing} (an old build? run `python -m lsjax.native.build`)"
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return None


def available() -> bool:
    return unavailable_reason() is None


def _usable(rows: int, *arrays, max_rows: int = MAX_ROWS) -> bool:
    return rows <= max_rows and all(a.dtype == jnp.float32 for a in arrays) and available()


def _call(target: str, rows: jax.Array, n: int, *args, otherwise: Callable) -> jax.Array:
    native = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32))
    return jax.lax.platform_dependent(rows, *args, cpu=native, default=otherwise)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    if not _usable(rows.shape[0], x, w):
        return x @ w
    return _call("lsjax_matmul", rows, w.shape[1], w, otherwise=jnp.matmul).reshape(*lead, w.shape[1])


def matmul_t(x: jax.Array, wt: jax.Array) -> jax.Array:
    """`x @ wt.T` reading each row of `wt` once for all rows of `x` (the tied head: XLA:CPU transposed
    the whole [V, D] embedding every step at batch 8)."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)

    def xla(rows, wt):
        return jnp.einsum("td,vd->tv", rows, wt, preferred_element_type=jnp.float32)

    if not _usable(rows.shape[0], x, wt):
        return xla(rows, wt).reshape(*lead, wt.shape[0])
    return _call("lsjax_matmul_t", rows, wt.shape[0], wt, otherwise=xla).reshape(*lead, wt.shape[0])


def routed_reference(x, w, a, b, ids, gates):
    """The pure-jnp meaning of `routed_matmul` (rows `[T, K]`)."""
    xa = jnp.einsum("tk,tjkr->tjr", x, a[ids]) * gates[..., None]
    return x @ w + jnp.einsum("tjr,tjrn->tn", xa, b[ids])


def routed_matmul(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array, gates: jax.Array, *,
                  otherwise: Callable = routed_reference) -> jax.Array:
    """Rows `x [T, K]`, experts `a [E, K, R]`, `b [E, R, N]`, `ids`/`gates [T, J]` -> `[T, N]`.

    Expert ids outside [0, E) are an error on the native route (XLA's gather would clamp them).
    """
    if not _usable(x.shape[0], x, w, a, b, gates):
        return otherwise(x, w, a, b, ids, gates)
    return _call("lsjax_routed_matmul", x, w.shape[1], w, a, b, ids.astype(jnp.int32), gates,
                 otherwise=otherwise)


def _group_call(target: str, rows: jax.Array, widths: list[int], *args, otherwise: Callable) -> list[jax.Array]:
    results = [jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32) for n in widths]
    native = jax.ffi.ffi_call(target, results)
    return list(jax.lax.platform_dependent(rows, *args, cpu=lambda *a: tuple(native(*a)),
                                           default=lambda *a: tuple(otherwise(*a))))


def matmul_group(x: jax.Array, ws: list[jax.Array]) -> list[jax.Array]:
    """`[x @ w for w in ws]` in one call (the products of one input: q, k, v or gate, up)."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    if len(ws) == 1 or len(ws) > MAX_GROUP or not _usable(rows.shape[0], x, *ws):
        return [matmul(x, w) for w in ws]

    def xla(rows, *ws):
        return [rows @ w for w in ws]

    ys = _group_call("lsjax_matmul_group", rows, [w.shape[1] for w in ws], *ws, otherwise=xla)
    return [y.reshape(*lead, y.shape[-1]) for y in ys]


def routed_matmul_group(x: jax.Array, ws: list[jax.Array], as_: list[jax.Array], bs: list[jax.Array],
                        ids: jax.Array, gates: jax.Array, *, otherwise: Callable = routed_reference) -> list[jax.Array]:
    """`[routed_matmul(x, w, a, b, ids, gates) for w, a, b in zip(ws, as_, bs)]` in one call: rows
    `x [T, K]`, one route `ids`/`gates [T, J]` for every product, A's of one rank."""
    usable = (1 < len(ws) <= MAX_GROUP and len({a.shape[-1] for a in as_}) == 1
              and _usable(x.shape[0], x, *ws, *as_, *bs, gates))
    if not usable:
        return [routed_matmul(x, w, a, b, ids, gates, otherwise=otherwise) for w, a, b in zip(ws, as_, bs)]
    S = len(ws)

    def xla(rows, ids, gates, *weights):
        return [otherwise(rows, w, a, b, ids, gates) for w, a, b in zip(weights[:S], weights[S:2 * S], weights[2 * S:])]

    return _group_call("lsjax_routed_matmul_group", x, [w.shape[1] for w in ws], ids.astype(jnp.int32), gates,
                       *ws, *as_, *bs, otherwise=xla)


class Project:
    """`lsjax.model.plain_project` through `matmul` (the base model's decode projections), with
    `group` for several projections of one input (`lsjax.model.project_group`)."""

    def __call__(self, kind: str, x: jax.Array, w: jax.Array) -> jax.Array:
        del kind
        return matmul(x, w)

    def group(self, kinds: tuple[str, ...], x: jax.Array, ws: list[jax.Array]) -> list[jax.Array]:
        del kinds
        return matmul_group(x, ws)


project = Project()
