"""Drift of in-place switching vs merging from the base, and buffer reuse in decode loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sgmm_merge, sgmm_switch
from pallas_kernels.drift import drift_study

IMPLS = [
    pytest.param(dict(implementation="pallas", interpret=True, block_in=32, block_out=32), id="pallas-interpret"),
    pytest.param(dict(implementation="pallas", interpret=False, block_in=32, block_out=32), id="pallas-native",
                 marks=pytest.mark.skipif(jax.default_backend() != "gpu", reason="native Pallas/Triton needs a GPU")),
    pytest.param(dict(implementation="xla"), id="xla"),
]


def test_switch_drifts_merge_does_not():
    rows = drift_study(steps=300, M=1, d=64, r=8, E=4, k=2, dtype="bfloat16", checkpoints=(1, 300))
    first, last = rows
    # Merge: one bf16 rounding of a value <= max|W| (+ delta): at most ~half an ulp there.
    for r in rows:
        assert r["merge_max_abs"] <= 2.0**-8 * 2 * r["max_abs_weight"]
    assert last["switch_max_abs"] > 3 * last["merge_max_abs"]
    assert last["switch_rms"] > 3 * first["switch_rms"]  # grows with the number of switches


def test_fp32_switch_stays_tight():
    (row,) = drift_study(steps=200, M=1, d=64, r=8, E=4, k=2, dtype="float32", checkpoints=(200,))
    assert row["switch_max_abs"] <= 1e-5 * row["max_abs_weight"]


def _setup(dtype=jnp.bfloat16):
    rng = np.random.default_rng(0)
    W = jnp.asarray(rng.standard_normal((2, 96, 80)) / 10, dtype)
    A = jnp.asarray(rng.standard_normal((2, 4, 96, 8)) / 10, dtype)
    B = jnp.asarray(rng.standard_normal((2, 4, 8, 80)) / 3, dtype)
    return W, A, B


@pytest.mark.parametrize("impl", IMPLS)
def test_merge_into_donated_working_buffer(impl):
    """Decode-loop idiom for the drift-free merge: donate the previous working weights and
    keep the (unused) argument so XLA writes the merged weights into the same buffer."""
    W_base, A, B = _setup()
    merge_into = jax.jit(
        lambda W_work, W_base, ids, g: sgmm_merge(W_base, A, B, ids, g, **impl),
        donate_argnums=0, keep_unused=True,
    )
    W_work = W_base + 0
    ptr = W_work.unsafe_buffer_pointer()
    for ids in ([0, 1], [3, 2], [1, 3]):
        ids, g = jnp.array(ids, jnp.int32), jnp.array([0.6, 0.4])
        W_work = merge_into(W_work, W_base, ids, g)
        assert W_work.unsafe_buffer_pointer() == ptr
    want = np.asarray(W_base, np.float64) + sum(
        gi * np.asarray(A[:, i], np.float64) @ np.asarray(B[:, i], np.float64) for i, gi in zip([1, 3], [0.6, 0.4])
    )
    assert np.abs(np.asarray(W_work, np.float64) - want).max() <= 1e-2 * np.abs(want).max()


@pytest.mark.parametrize("impl", IMPLS)
def test_switch_loop_keeps_one_buffer(impl):
    W, A, B = _setup()
    switch = jax.jit(lambda W, *r: sgmm_switch(W, A, B, *r, **impl), donate_argnums=0)
    W = sgmm_merge(W, A, B, jnp.array([0, 1]), jnp.array([0.5, 0.5]), **impl)
    ptr = W.unsafe_buffer_pointer()
    routes = [([0, 1], [0.5, 0.5]), ([2, 3], [0.7, 0.3]), ([1, 2], [0.2, 0.8])]
    for (oi, og), (ni, ng) in zip(routes, routes[1:]):
        W = switch(W, jnp.array(oi), jnp.array(og), jnp.array(ni), jnp.array(ng))
        assert W.unsafe_buffer_pointer() == ptr
