"""The Pallas kernels lower to Triton at real model shapes, checked without a GPU.

`jit(...).trace(...).lower(lowering_platforms=("cuda",))` runs Pallas' Triton lowering on
CPU. That catches what interpret mode cannot: non-power-of-two tiles, primitives Triton
lacks (e.g. reduce_or), dots under 16 wide, TF32 sneaking into fp32 dots, and more than one
kernel launch per call. It does not run Triton's own compiler (ptxas) or the kernel.

Reading the kernel's Triton IR back uses Pallas' private IR context; if a jax upgrade moves it,
these tests fail and say what moved rather than passing without looking at the IR.
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from lowering import TRITON_TARGET, call_target, custom_calls, lower_for_gpu

from pallas_kernels import routed_group_matmul, sgmm_merge, sgmm_switch

S = jax.ShapeDtypeStruct
PALLAS = dict(implementation="pallas", interpret=False)


def triton_ir(call) -> str:
    """The Triton IR text of one Pallas custom call."""
    try:
        from jax._src.lib.mlir import ir
        from jax._src.pallas.triton.lowering import _new_ir_context
    except ImportError as e:
        pytest.fail(f"cannot read the Triton IR with jax {jax.__version__}: {e}. The test reads it with "
                    "jax._src.lib.mlir.ir and jax._src.pallas.triton.lowering._new_ir_context; update triton_ir()")
    config = call.attributes["mhlo.backend_config"]
    try:
        blob = ir.StringAttr(config["ir"]).value_bytes
    except KeyError:
        pytest.fail(f"the {TRITON_TARGET} custom call's backend_config has no 'ir' entry with jax {jax.__version__}; "
                    f"it has: {config}. Update triton_ir() to where Pallas now keeps the kernel")
    with _new_ir_context():
        return str(ir.Module.parse(blob))


def triton_kernels(fn, *avals):
    """Lower for CUDA; return the Triton IR text of each Pallas kernel in the program."""
    return [triton_ir(call) for call in custom_calls(lower_for_gpu(fn, *avals)) if call_target(call) == TRITON_TARGET]


def check_ir(text, dots: bool):
    """Every tensor a power of two; dots (when expected) at least 16 wide and never TF32 on fp32;
    none at all in the GEMV form."""
    dot_lines = [line for line in text.splitlines() if "tt.dot " in line]
    if not dots:
        assert not dot_lines, f"the GEMV form should have no tt.dot: {dot_lines[0].strip()}"
    assert dot_lines or not dots, "expected tensor-core dots in the kernel"
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


# (name, K, members, rank, E, k): llama2-7b's groups, Mistral's GQA q|k|v, SmolLM2's q|v with k
# unadapted (a gap), a rank that is not a power of two.
GROUPS = [
    ("7b-qkv", 4096, ((0, 0, 4096), (4096, 4096, 4096), (8192, 8192, 4096)), 16, 8, 2),
    ("7b-gate_up", 4096, ((0, 0, 11008), (11008, 11008, 11008)), 16, 8, 2),
    ("7b-down", 11008, ((0, 0, 4096),), 16, 8, 2),
    ("mistral-qkv-r12", 4096, ((0, 0, 4096), (4096, 4096, 1024), (5120, 5120, 1024)), 12, 4, 1),
    ("smollm2-q_v-gap", 576, ((0, 0, 576), (768, 576, 192)), 8, 16, 4),
]


def _group_avals(K, members, r, E, k, T, S_r, dtype, L=3):
    N = max(w + n for w, _, n in members)
    Nb = max(b + n for _, b, n in members)
    S_ = len(members)
    return (S((T, K), dtype), S((K, N), dtype), S((L, E, K, S_ * r), dtype), S((L, E, r, Nb), dtype),
            S((T, S_r, k), jnp.int32), S((T, S_r, k), jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("T", [1, 8, 256])
@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g[0])
def test_routed_group_lowers_to_one_triton_kernel(group, T, dtype):
    _, K, members, r, E, k = group
    S_r = len(members) if group[0].startswith("mistral") else 1
    args = _group_avals(K, members, r, E, k, T, S_r, dtype)
    reductions = ("partials", "atomic") if T == 1 else ("partials",)
    for reduction in reductions:
        fn = functools.partial(routed_group_matmul, members=members, reduction=reduction, **PALLAS)
        (text,) = triton_kernels(lambda *v, fn=fn: fn(*v[:-1], layer=v[-1]), *args, S((), jnp.int32))
        check_ir(text, dots=T > 8)
        assert ("tt.atomic_rmw" in text) == (reduction == "atomic")
        assert "evict_first" in text, "the weight stream should be marked evict_first"


def test_routed_group_unstacked_and_forced_forms():
    """One layer's A/B without `layer`; each form away from its default: dots at T=1 (x @ A fused
    and given), GEMV at T=16, x @ A given at T=1 and fused at T=256."""
    _, K, members, r, E, k = GROUPS[0]

    def flat(avals):  # experts of one layer: drop the leading L of A and B
        return (*avals[:2], S(avals[2].shape[1:], avals[2].dtype), S(avals[3].shape[1:], avals[3].dtype), *avals[4:])

    cases = [(1, {}, False), (1, dict(gemv=False), True), (1, dict(gemv=False, xa="dense"), True),
             (16, dict(gemv=True), False), (1, dict(xa="dense"), False), (256, dict(xa="fused"), True)]
    for T, kw, dots in cases:
        args = flat(_group_avals(K, members, r, E, k, T, 1, jnp.bfloat16))
        fn = functools.partial(routed_group_matmul, members=members, **kw, **PALLAS)
        texts = triton_kernels(fn, *args)
        assert len(texts) == 1, kw
        check_ir(texts[0], dots=dots)


CONFIGS = [  # (M, E, d_in, d_out, r, k, members)
    (2, 4, 576, 1536, 8, 1, None),  # SmolLM2 up, rank padded 8 -> 16
    (3, 16, 4096, 11008, 128, 4, None),  # Llama-2 up, largest rank/E/k
    (2, 2, 14336, 4096, 12, 2, None),  # Mistral down, rank not a power of two
    (2, 8, 4096, 6144, 16, 2, ((0, 0, 4096), (4096, 4096, 1024), (5120, 5120, 1024))),  # Mistral q|k|v
    (2, 8, 576, 960, 16, 2, ((0, 0, 576), (768, 576, 192))),  # SmolLM2 q|v, k unadapted
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(map(str, c[:6])) + ("-group" if c[6] else ""))
def test_sgmm_lowers_to_one_triton_kernel(cfg, dtype):
    M, E, d_in, d_out, r, k, members = cfg
    S_ = 1 if members is None else len(members)
    Nb = d_out if members is None else max(b + n for _, b, n in members)
    W, A, B = S((M, d_in, d_out), dtype), S((M, E, d_in, S_ * r), dtype), S((M, E, r, Nb), dtype)
    ids, g = S((k,), jnp.int32), S((k,), jnp.float32)
    old = dict(block_in=64, block_out=128, row_steps=1, num_warps=4, num_stages=2)
    for fn, args in [
        (lambda *a: sgmm_merge(*a, members=members, **PALLAS), (W, A, B, ids, g)),
        (lambda *a: sgmm_merge(*a, members=members, **old, **PALLAS), (W, A, B, ids, g)),
        (lambda *a: sgmm_switch(*a, members=members, **PALLAS), (W, A, B, ids, g, ids, g)),
    ]:
        texts = triton_kernels(fn, *args)
        assert len(texts) == 1, f"expected one pallas_call for all {M} layers, got {len(texts)}"
        check_ir(texts[0], dots=True)


# (name, K, N, bits, group): llama2-7b's down and gate|up at GGUF's group 32 and per channel; SmolLM2's q|k|v
QUANTIZED = [("7b-down-q4", 11008, 4096, 4, 32), ("7b-gate_up-q8", 4096, 22016, 8, 32),
             ("7b-down-q8-channel", 11008, 4096, 8, 11008), ("smollm2-qkv-q4", 576, 960, 4, 32)]


@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize("case", QUANTIZED, ids=lambda c: c[0])
def test_quantized_matmul_lowers_to_one_triton_kernel(case, T):
    """One GEMV kernel (no tt.dot) reading the integers once (evict_first), bf16 activations."""
    from pallas_kernels import quantized_matmul

    _, K, N, bits, group = case
    q = S((K if bits == 8 else K // 2, N), jnp.int8 if bits == 8 else jnp.uint8)
    parts = [S((K // group, N), jnp.bfloat16)] * (2 if bits == 4 else 1)
    fn = functools.partial(quantized_matmul, bits=bits, group=group, **PALLAS)
    texts = triton_kernels(lambda x, q, *p: fn(x, q, *p), S((T, K), jnp.bfloat16), q, *parts)
    assert len(texts) == 1
    check_ir(texts[0], dots=False)
    assert "evict_first" in texts[0], "the integer stream should be marked evict_first"
