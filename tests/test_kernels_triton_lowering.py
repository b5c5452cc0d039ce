"""The Pallas kernels lower to Triton at real model shapes, checked without a GPU.

`jit(...).trace(...).lower(lowering_platforms=("cuda",))` runs Pallas' Triton lowering on
CPU. That catches what interpret mode cannot: non-power-of-two tiles, primitives Triton
lacks (e.g. reduce_or), dots under 16 wide, TF32 sneaking into fp32 dots, and more than one
kernel launch per call. It does not run Triton's own compiler (ptxas) or the kernel.
"""

import contextlib
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import routed_lora_add, routed_lora_matmul, sgmm_merge, sgmm_switch

S = jax.ShapeDtypeStruct
PALLAS = dict(implementation="pallas", interpret=False)
TRITON_TARGET = "__gpu$xla.gpu.triton"


def gpu_target():
    """Newer jax (0.11+) reads the target GPU from the abstract mesh when none is attached: name an H100."""
    if not hasattr(jax.sharding, "AbstractDevice") or jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="cuda")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100))


def triton_kernels(fn, *avals):
    """Lower for CUDA; return the Triton IR text of each Pallas kernel (None if unparsable)."""
    with gpu_target():
        lowered = jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",))
    calls = []

    def walk(op):
        if op.name == "stablehlo.custom_call" and TRITON_TARGET in str(op.attributes["call_target_name"]):
            calls.append(op)
        for region in op.regions:
            for block in region:
                for child in block:
                    walk(child.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    texts = []
    for call in calls:
        try:  # private API: the Triton dialect context used by Pallas' own lowering
            from jax._src.lib.mlir import ir
            from jax._src.pallas.triton.lowering import _new_ir_context

            blob = ir.StringAttr(call.attributes["mhlo.backend_config"]["ir"]).value_bytes
            with _new_ir_context():
                texts.append(str(ir.Module.parse(blob)))
        except Exception:  # noqa: BLE001 - IR inspection is a bonus; the lowering itself passed
            texts.append(None)
    return texts


def check_ir(text, dtype):
    if text is None:
        return
    dot_lines = [line for line in text.splitlines() if "tt.dot " in line]
    assert dot_lines, "expected tensor-core dots in the kernel"
    for line in dot_lines:
        m, k, elt, n = re.search(r": tensor<(\d+)x(\d+)x(\w+)> \* tensor<\d+x(\d+)x", line).groups()
        m, k, n = int(m), int(k), int(n)
        assert min(m, k, n) >= 16, f"tt.dot {m}x{k}x{n} is under Triton's 16 minimum"
        assert not (elt == "f32" and "tf32" in line), f"fp32 dot lowered to TF32: {line.strip()}"
    for shape in re.findall(r"tensor<((?:\d+x)+)", text):
        size = 1
        for d in shape.rstrip("x").split("x"):
            size *= int(d)
        assert size & (size - 1) == 0, f"non power-of-two tensor {shape}"


CONFIGS = [  # (M, E, d_in, d_out, r, k)
    (2, 4, 576, 1536, 8, 1),  # SmolLM2 up, rank padded 8 -> 16
    (3, 16, 4096, 11008, 128, 4),  # Llama-2 up, largest rank/E/k
    (2, 2, 14336, 4096, 12, 2),  # Mistral down, rank not a power of two
    (2, 8, 1536, 576, 16, 2),  # SmolLM2 down
]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_sgmm_lowers_to_one_triton_kernel(cfg, dtype):
    M, E, d_in, d_out, r, k = cfg
    W, A, B = S((M, d_in, d_out), dtype), S((M, E, d_in, r), dtype), S((M, E, r, d_out), dtype)
    ids, g = S((k,), jnp.int32), S((k,), jnp.float32)
    for fn, args in [
        (lambda *a: sgmm_merge(*a, **PALLAS), (W, A, B, ids, g)),
        (lambda *a: sgmm_switch(*a, **PALLAS), (W, A, B, ids, g, ids, g)),
    ]:
        texts = triton_kernels(fn, *args)
        assert len(texts) == 1, f"expected one pallas_call for all {M} layers, got {len(texts)}"
        check_ir(texts[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("T", [1, 256])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_routed_matmul_lowers_to_one_triton_kernel(cfg, T, dtype):
    L, E, d_in, d_out, r, k = cfg
    x, ids, g = S((T, d_in), dtype), S((T, k), jnp.int32), S((T, k), jnp.float32)
    flat = (S((d_in, d_out), dtype), S((E, d_in, r), dtype), S((E, r, d_out), dtype))
    stacked = (S((L, d_in, d_out), dtype), S((L, E, d_in, r), dtype), S((L, E, r, d_out), dtype))
    for fn, args in [
        (lambda *a: routed_lora_matmul(*a, **PALLAS), (x, *flat, ids, g)),
        (lambda l, *a: routed_lora_matmul(*a, layer=l, **PALLAS), (S((), jnp.int32), x, *stacked, ids, g)),
        (lambda y, x, w, *a: routed_lora_add(y, x, *a, **PALLAS), (S((T, d_out), dtype), x, *flat, ids, g)),
    ]:
        texts = triton_kernels(fn, *args)
        assert len(texts) == 1
        check_ir(texts[0], dtype)
