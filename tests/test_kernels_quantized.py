"""quantized_matmul (W8A16 / W4A16): Pallas (interpreted on CPU, native on a GPU) and XLA against a
float64 numpy oracle built from `lsjax.quant`'s own dequantization (independent of the kernel's
unpacking), for int8 and 4-bit weights, per-group and per-channel scales, with and without offsets,
ragged columns, split K, several row tiles; and clear errors for what the kernel cannot take."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsjax.quant import quantize
from pallas_kernels import quantized_matmul, quantized_matmul_reference

on_gpu = jax.default_backend() == "gpu"
IMPLS = [
    pytest.param(dict(implementation="pallas", interpret=True), id="pallas-interpret"),
    pytest.param(dict(implementation="pallas", interpret=False), id="pallas-native",
                 marks=pytest.mark.skipif(not on_gpu, reason="native Pallas/Triton needs a GPU")),
    pytest.param(dict(implementation="xla"), id="xla"),
]
# (scheme, K, N, group, T, knobs): GGUF's group 32; per channel (group = K, not a power of two);
# 40 columns against 16-wide tiles (ragged); 2 K splits; 20 rows (two row tiles of 16)
CASES = [
    ("int8", 96, 40, 32, 1, dict(block_n=16)),
    ("int4", 96, 40, 32, 1, dict(block_n=16, block_k=16, splits=2)),
    ("int8", 96, 24, 96, 3, {}),
    ("int4", 64, 33, 16, 8, dict(block_n=16)),
    ("int4", 128, 48, 128, 20, dict(block_k=32)),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-K{c[1]}-N{c[2]}-g{c[3]}-T{c[4]}")
def test_quantized_matmul_equals_the_dequantized_product(case, impl):
    scheme, K, N, group, T, knobs = case
    rng = np.random.default_rng(K + N + T)
    qw = quantize(rng.standard_normal((K, N)).astype(np.float32), scheme, group)
    x = rng.standard_normal((T, K)).astype(np.float32)
    want = x.astype(np.float64) @ np.asarray(qw.dequantize(), np.float64)
    bits = 8 if scheme == "int8" else 4
    got = quantized_matmul(jnp.asarray(x), qw.q, qw.scale, qw.offset, bits=bits, group=group, **impl,
                           **(knobs if impl["implementation"] == "pallas" else {}))
    assert got.shape == (T, N) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
    ref = quantized_matmul_reference(jnp.asarray(x), qw.q, qw.scale, qw.offset, bits, group)
    np.testing.assert_allclose(np.asarray(ref), want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


def test_quantized_matmul_in_bf16():
    rng = np.random.default_rng(1)
    qw = quantize(jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16), "int4", 32)
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.bfloat16)
    want = np.asarray(x, np.float64) @ np.asarray(qw.dequantize(jnp.float32), np.float64)
    got = quantized_matmul(x, qw.q, qw.scale, qw.offset, bits=4, group=32, implementation="pallas")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def test_quantized_matmul_refuses_what_it_cannot_take():
    qw = quantize(np.ones((64, 16), np.float32), "int4", 32)
    x = jnp.ones((1, 64))
    with pytest.raises(ValueError, match="bits=3 is not supported"):
        quantized_matmul(x, qw.q, qw.scale, qw.offset, bits=3, group=32)
    with pytest.raises(ValueError, match="q has dtype uint8; expected int8"):
        quantized_matmul(x, qw.q, qw.scale, None, bits=8, group=32)
    with pytest.raises(ValueError, match="group=24 must be a positive divisor of K=64"):
        quantized_matmul(x, qw.q, qw.scale, qw.offset, bits=4, group=24)
    with pytest.raises(ValueError, match=r"scale has shape \(2, 16\); expected \(4, 16\)"):
        quantized_matmul(x, qw.q, qw.scale, qw.offset, bits=4, group=16)
    with pytest.raises(ValueError, match="block_k=64 must divide group=32"):
        quantized_matmul(x, qw.q, qw.scale, qw.offset, bits=4, group=32, implementation="pallas", block_k=64)
