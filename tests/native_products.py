"""The native quantized products' cases, checked against x @ the dequantized weight (float64): imported
by `test_quant.py` in its process and by a subprocess per instruction set (so it imports little)."""

import jax
import jax.numpy as jnp
import numpy as np

from lsjax import native, quant

# (scheme, group, K, N, axis): small and large (past one thread's share), groups longer than a block
# of rows (per channel), group sizes the vectors do not divide, column counts they do not divide
CASES = [(scheme, group, k, n, axis) for scheme in quant.Scheme for axis in (-2, -1)
         for group, k, n in ((32, 96, 40), (None, 2048, 300), (32, 2048, 300), (6, 96, 40))]
CASES.append((quant.Scheme.INT8, 24, 96, 40, -1))


def check(row_counts=(1, 3, 4, 8, 13, 17)):
    """Every case's product at each row count against x @ the dequantized weight (17 is past the
    native limit: XLA's form)."""
    rng = np.random.default_rng(3)
    for scheme, group, k, n, axis in CASES:
        w = quant.quantize(rng.standard_normal((k, n) if axis == -2 else (n, k)), scheme, group, axis=axis)
        dense = np.asarray(w.dequantize(), np.float64)
        for rows in row_counts:
            x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
            want = np.asarray(x, np.float64) @ (dense if axis == -2 else dense.T)
            got = np.asarray(jax.jit(native.quantized_matmul)(x, w))  # summed in another order: rounding apart
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max() * np.sqrt(k),
                                       err_msg=f"{scheme}:{group} [{k}, {n}] axis {axis}, {rows} rows")
