"""Shared helpers: backend choice, block sizing, masked loads, argument checks.

Pallas' Triton backend needs power-of-two tensor sizes for every load, store and dot, and
`tl.dot` needs every dim >= 16. Real model dims (576, 1536, 11008, 14336) are not powers of
two, so the kernels take whole arrays as refs, load power-of-two tiles at computed offsets
and mask the ragged edges (masked loads return 0, masked stores write nothing). That keeps
the big weight buffers unpadded, which matters twice: padding a 7B weight would copy it,
and a padded copy could not be aliased to the output for in-place switching.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental.pallas import triton as pltriton

IMPLEMENTATIONS = ("pallas", "xla")
MIN_DOT_DIM = 16  # Triton's tl.dot needs M, N, K >= 16.
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def on_gpu() -> bool:
    """True when JAX's default backend is a GPU (CUDA or ROCm)."""
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def resolve_implementation(implementation: str | None) -> str:
    """`None` means auto: Pallas only where it compiles natively (GPU), XLA elsewhere."""
    if implementation is None:
        return "pallas" if on_gpu() else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is unknown; expected one of "
            f"{IMPLEMENTATIONS} or None (auto)"
        )
    return implementation


def resolve_interpret(interpret: bool | None) -> bool:
    """Pallas runs natively only on GPU here; elsewhere it must be interpreted."""
    return (not on_gpu()) if interpret is None else bool(interpret)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def prev_pow2(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def check_pow2(name: str, requested) -> None:
    if not isinstance(requested, int) or requested < 1 or requested & (requested - 1):
        raise ValueError(f"{name}={requested!r} must be a positive power of two")


def tile(dim: int, requested: int | None, default: int, name: str, minimum: int = MIN_DOT_DIM) -> int:
    """Power-of-two tile for a dim: no larger than needed, at least `minimum` (tl.dot's 16 by default;
    1 for tiles that never meet a dot)."""
    if requested is not None:
        check_pow2(name, requested)
        return max(minimum, requested)
    return max(minimum, min(default, next_pow2(dim)))


def check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def compiler_params(num_warps: int = 4, num_stages: int = 2) -> Any:
    """Triton CompilerParams (selects the Triton backend explicitly on GPU).

    The class has lived under a couple of names across jax versions; look it up by name.
    """
    cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams", None)
    return None if cls is None else cls(num_warps=num_warps, num_stages=num_stages)


def dot(a, b):
    """In-kernel matmul with fp32 accumulation. fp32 operands ask for HIGHEST: Pallas-Triton
    maps DEFAULT to TF32 (10-bit mantissa), which would miss fp32 tolerances by 100x."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, precision=prec, preferred_element_type=jnp.float32)


def load(ref, mask, other=0, eviction_policy=None):
    """Masked load; masked-off lanes read `other` and touch no memory on GPU. `eviction_policy=
    "evict_first"` marks a read-once stream so that it does not push reused data out of L2."""
    return pltriton.load(ref, mask=mask, other=jnp.asarray(other, ref.dtype), eviction_policy=eviction_policy)


def store(ref, value, mask):
    pltriton.store(ref, value, mask=mask)


# ----------------------------------------------------------------------------- checks


def concrete(x):
    """x as a numpy array when its value is known (eager call), else None (traced under jit)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_float(name: str, x) -> None:
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
        raise ValueError(f"{name} has dtype {x.dtype}; expected float32, bfloat16 or float16")


def check_same_dtype(ref_name: str, ref, **others) -> None:
    for name, x in others.items():
        if x.dtype != ref.dtype:
            raise ValueError(
                f"{name} has dtype {x.dtype} but {ref_name} has dtype {ref.dtype}; "
                "expected the same dtype"
            )


def check_experts(A, B) -> None:
    """Experts of one float type, which may differ from the weights' (bfloat16 experts beside float32
    weights read half the bytes): kernels widen them as they read, summing in float32."""
    check_float("A", A)
    if B.dtype != A.dtype:
        raise ValueError(f"B has dtype {B.dtype} but A has dtype {A.dtype}; expected the experts' A and B of one dtype")


def check_ndim(name: str, x, ndim: int, layout: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {ndim} dims {layout}")


def check_dim(name: str, x, axis: int, expected: int, what: str) -> None:
    if x.shape[axis] != expected:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; expected dim {axis} = {expected} ({what})"
        )


def check_routing(ids_name: str, ids, gates_name: str, gates, shape: tuple, num_experts: int) -> None:
    """Ids integer, gates float, both `shape`, k <= E; ids in range when known eagerly."""
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{ids_name} has dtype {ids.dtype}; expected an integer dtype (int32)")
    if not jnp.issubdtype(gates.dtype, jnp.floating):
        raise ValueError(f"{gates_name} has dtype {gates.dtype}; expected a float dtype")
    if tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{ids_name} has shape {tuple(ids.shape)}; expected {tuple(shape)}")
    if tuple(gates.shape) != tuple(ids.shape):
        raise ValueError(
            f"{gates_name} has shape {tuple(gates.shape)}; expected {tuple(ids.shape)} "
            f"(the shape of {ids_name})"
        )
    k = shape[-1]
    if k < 1 or k > num_experts:
        raise ValueError(f"k={k} (last dim of {ids_name}) must be in [1, E={num_experts}]")
    vals = concrete(ids)
    if vals is not None:
        if vals.size and (vals.min() < 0 or vals.max() >= num_experts):
            raise ValueError(
                f"{ids_name} has values in [{vals.min()}, {vals.max()}]; expected [0, {num_experts})"
            )
