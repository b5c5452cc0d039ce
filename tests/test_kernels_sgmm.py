"""sgmm_merge / sgmm_switch: Pallas (interpreted on CPU, native on a GPU) and XLA against the jnp
reference and a float64 numpy oracle, on fresh random inputs with shapes that are not powers of
two, for single projections and for group weights whose members place their own terms.

Interpret mode fills fresh output buffers with NaN before the kernel runs, and unused experts
are NaN here, so an unwritten tile or a read of an expert nobody picked shows as non-finite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    sgmm_merge,
    sgmm_merge_reference,
    sgmm_switch,
    sgmm_switch_reference,
)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 1e-2}
# Small tiles keep interpret-mode grids tiny and still leave ragged edges (96 = 3x32, 80 = 2.5x32).
BLOCKS = dict(block_in=32, block_out=32)
on_gpu = jax.default_backend() == "gpu"
PALLAS = [
    pytest.param(dict(implementation="pallas", interpret=True, **BLOCKS), id="pallas-interpret"),
    pytest.param(dict(implementation="pallas", interpret=False, **BLOCKS), id="pallas-native",
                 marks=pytest.mark.skipif(not on_gpu, reason="native Pallas/Triton needs a GPU")),
]
IMPLS = PALLAS + [pytest.param(dict(implementation="xla"), id="xla")]


def make(seed, M=2, E=4, d_in=96, d_out=80, r=8, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((M, d_in, d_out)) / np.sqrt(d_in)
    A = rng.standard_normal((M, E, d_in, r)) / np.sqrt(d_in)
    B = rng.standard_normal((M, E, r, d_out)) / np.sqrt(r)  # nonzero B: the delta is visible
    def cast(a):
        return jnp.asarray(a, dtype)

    return cast(W), cast(A), cast(B)


def oracle_delta(A, B, ids, gates):
    A64, B64 = np.asarray(A, np.float64), np.asarray(B, np.float64)
    return sum(float(g) * A64[:, i] @ B64[:, i] for i, g in zip(np.asarray(ids), np.asarray(gates)))


def rel_err(out, want):
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all(), "non-finite values leaked into the output"
    return np.abs(out - want).max() / np.abs(want).max()


def poison_unused(A, B, used):
    """NaN in every expert the route does not pick: a kernel that reads them shows it."""
    unused = np.setdiff1d(np.arange(A.shape[1]), np.asarray(used))
    return A.at[:, unused].set(jnp.nan), B.at[:, unused].set(jnp.nan)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("impl", IMPLS)
def test_merge_matches_oracle_and_reference(impl, dtype):
    W, A, B = make(1, dtype=dtype)
    ids, gates = jnp.array([3, 1], jnp.int32), jnp.array([0.65, 0.35], jnp.float32)
    A, B = poison_unused(A, B, ids)
    out = sgmm_merge(W, A, B, ids, gates, **impl)
    assert out.shape == W.shape and out.dtype == W.dtype
    want = np.asarray(W, np.float64) + oracle_delta(A, B, ids, gates)
    assert rel_err(out, want) <= TOL[dtype]
    ref = sgmm_merge_reference(W, A, B, ids, gates)
    assert rel_err(out, np.asarray(ref, np.float64)) <= TOL[dtype]


@pytest.mark.parametrize(
    "route",
    [
        pytest.param(([2], [1.0]), id="k1"),
        pytest.param(([0, 1, 2, 3], [0.4, 0.3, 0.2, 0.1]), id="k=E"),
        pytest.param(([1, 1], [0.5, 0.5]), id="same-expert-twice"),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_merge_routes_rank_not_pow2(impl, route):
    W, A, B = make(2, E=4, r=12)  # rank 12 -> padded to a 16-wide tile and masked
    ids, gates = jnp.array(route[0], jnp.int32), jnp.array(route[1], jnp.float32)
    out = sgmm_merge(W, A, B, ids, gates, **impl)
    want = np.asarray(W, np.float64) + oracle_delta(A, B, ids, gates)
    assert rel_err(out, want) <= 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("impl", IMPLS)
def test_switch_matches_oracle_and_reference(impl, dtype):
    W, A, B = make(3, E=5, dtype=dtype)
    old_ids, old_g = jnp.array([4, 0], jnp.int32), jnp.array([0.8, 0.2], jnp.float32)
    new_ids, new_g = jnp.array([0, 2], jnp.int32), jnp.array([0.3, 0.7], jnp.float32)
    A, B = poison_unused(A, B, [0, 2, 4])
    W_in = W + jnp.asarray(oracle_delta(A, B, old_ids, old_g), dtype)  # a merged state, any W works
    want = np.asarray(W_in, np.float64) - oracle_delta(A, B, old_ids, old_g) + oracle_delta(A, B, new_ids, new_g)
    ref = sgmm_switch_reference(W_in, A, B, old_ids, old_g, new_ids, new_g)
    out = sgmm_switch(W_in, A, B, old_ids, old_g, new_ids, new_g, **impl)
    assert out.shape == W.shape and out.dtype == W.dtype
    assert rel_err(out, want) <= TOL[dtype]
    assert rel_err(out, np.asarray(ref, np.float64)) <= TOL[dtype]


@pytest.mark.parametrize("impl", IMPLS)
def test_merge_then_switch_equals_merge(impl):
    """merge(old) then switch(old -> new) lands on merge(new) (fp32, up to rounding)."""
    W, A, B = make(4, E=6)
    old = (jnp.array([5, 2, 0], jnp.int32), jnp.array([0.5, 0.3, 0.2], jnp.float32))
    new = (jnp.array([1, 3, 5], jnp.int32), jnp.array([0.6, 0.1, 0.3], jnp.float32))
    W_old = sgmm_merge(W, A, B, *old, **impl)
    W_new = sgmm_switch(W_old, A, B, *old, *new, **impl)
    want = np.asarray(W, np.float64) + oracle_delta(A, B, *new)
    assert rel_err(W_new, want) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_switch_donated_weight_is_updated_in_place(impl):
    W, A, B = make(5, dtype=jnp.bfloat16)
    f = jax.jit(lambda W, *rest: sgmm_switch(W, A, B, *rest, **impl), donate_argnums=0)
    route = (jnp.array([0, 1], jnp.int32), jnp.array([0.5, 0.5]), jnp.array([2, 3], jnp.int32), jnp.array([0.9, 0.1]))
    W_in = W + 0  # a buffer of our own to donate
    want = sgmm_switch_reference(W_in, A, B, *route)
    ptr = W_in.unsafe_buffer_pointer()
    out = f(W_in, *route)
    assert W_in.is_deleted()
    assert out.unsafe_buffer_pointer() == ptr, "the switched weights were written to a new buffer"
    assert rel_err(out, np.asarray(want, np.float64)) <= 1e-2


def test_auto_picks_xla_off_gpu_and_matches():
    W, A, B = make(6)
    ids, gates = jnp.array([1, 2], jnp.int32), jnp.array([0.5, 0.5])
    out = sgmm_merge(W, A, B, ids, gates)  # implementation=None
    want = np.asarray(W, np.float64) + oracle_delta(A, B, ids, gates)
    assert rel_err(out, want) <= 1e-5


def test_under_jit_with_traced_routes():
    W, A, B = make(7)
    f = jax.jit(lambda W, ids, g: sgmm_merge(W, A, B, ids, g, implementation="pallas", interpret=True, **BLOCKS))
    for ids in ([0, 3], [2, 1]):
        ids, g = jnp.array(ids, jnp.int32), jnp.array([0.25, 0.75])
        want = np.asarray(W, np.float64) + oracle_delta(A, B, ids, g)
        assert rel_err(f(W, ids, g), want) <= 1e-5


# name -> (members, N, Nb): q|k|v with GQA widths; q and v adapted with k (columns 64:96) not,
# listed out of column order
GROUPS = {
    "qkv-gqa": (((0, 0, 64), (64, 64, 32), (96, 96, 32)), 128, 128),
    "q_v-gap": (((96, 64, 32), (0, 0, 64)), 128, 96),
}


def make_group(seed, group, M=2, E=5, d_in=40, r=4, dtype=jnp.float32):
    members, N, Nb = GROUPS[group]
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((M, d_in, N)) / np.sqrt(d_in)
    A = rng.standard_normal((M, E, d_in, len(members) * r)) / np.sqrt(d_in)
    B = rng.standard_normal((M, E, r, Nb)) / np.sqrt(r)
    return (*(jnp.asarray(a, dtype) for a in (W, A, B)), members)


def oracle_group_delta(A, B, ids, gates, members, N):
    A64, B64 = np.asarray(A, np.float64), np.asarray(B, np.float64)
    r = A.shape[3] // len(members)
    delta = np.zeros((A.shape[0], A.shape[2], N))
    for s, (w_off, b_off, width) in enumerate(members):
        for e, g in zip(np.asarray(ids), np.asarray(gates, np.float64)):
            delta[..., w_off:w_off + width] += g * A64[:, e, :, s * r:(s + 1) * r] @ B64[:, e, :, b_off:b_off + width]
    return delta


@pytest.mark.parametrize("group, dtype", [("qkv-gqa", jnp.float32), ("q_v-gap", jnp.bfloat16)],
                         ids=["qkv-gqa-float32", "q_v-gap-bfloat16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_group_merge_and_switch(impl, group, dtype):
    """Each member's term lands in its own columns, columns without a member are copied."""
    W, A, B, members = make_group(10, group, dtype=dtype)
    N = W.shape[2]
    old, new = (jnp.array([4, 0], jnp.int32), jnp.array([0.8, 0.7])), (jnp.array([2], jnp.int32), jnp.array([1.5]))
    A, B = poison_unused(A, B, [0, 2, 4])
    merged = sgmm_merge(W, A, B, *old, members=members, **impl)
    want = np.asarray(W, np.float64) + oracle_group_delta(A, B, *old, members, N)
    assert merged.shape == W.shape and merged.dtype == W.dtype
    assert rel_err(merged, want) <= TOL[dtype]
    assert rel_err(merged, np.asarray(sgmm_merge_reference(W, A, B, *old, members), np.float64)) <= TOL[dtype]
    out = sgmm_switch(merged, A, B, *old, *new, members=members, **impl)
    want = np.asarray(W, np.float64) + oracle_group_delta(A, B, *new, members, N)
    assert rel_err(out, want) <= 2 * TOL[dtype]
    ref = sgmm_switch_reference(merged, A, B, *old, *new, members)
    assert rel_err(out, np.asarray(ref, np.float64)) <= TOL[dtype]


@pytest.mark.parametrize("impl", PALLAS)
def test_pallas_tilings(impl):
    """The default tiles (one program walks many row tiles) and the one-tile-per-program layout."""
    W, A, B, members = make_group(11, "q_v-gap", d_in=150)
    ids, gates = jnp.array([1, 3], jnp.int32), jnp.array([0.6, 0.4])
    want = np.asarray(W, np.float64) + oracle_group_delta(A, B, ids, gates, members, W.shape[2])
    native = dict(implementation="pallas", interpret=impl["interpret"])
    for knobs in [dict(), dict(block_in=64, block_out=128, row_steps=1, num_warps=4, num_stages=2),
                  dict(block_in=16, block_out=16, row_steps=3)]:
        assert rel_err(sgmm_merge(W, A, B, ids, gates, members=members, **native, **knobs), want) <= 1e-5, knobs


@pytest.mark.skipif(not on_gpu, reason="native Pallas/Triton needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
def test_native_gpu_real_shape(dtype):
    W, A, B = make(8, M=3, E=8, d_in=576, d_out=1536, r=16, dtype=dtype)
    ids, gates = jnp.array([7, 2], jnp.int32), jnp.array([0.6, 0.4])
    out = sgmm_merge(W, A, B, ids, gates, implementation="pallas", interpret=False)
    want = np.asarray(W, np.float64) + oracle_delta(A, B, ids, gates)
    assert rel_err(out, want) <= TOL[dtype]
    out = sgmm_switch(out, A, B, ids, gates, jnp.array([0, 1]), gates, implementation="pallas", interpret=False)
    want = np.asarray(W, np.float64) + oracle_delta(A, B, jnp.array([0, 1]), gates)
    assert rel_err(out, want) <= 2 * TOL[dtype]


# ----------------------------------------------------------------------------- bad input

_W, _A, _B = make(9, E=4)
_ids, _g = jnp.array([0, 1], jnp.int32), jnp.array([0.5, 0.5])


@pytest.mark.parametrize("impl", IMPLS)
def test_merge_of_bfloat16_experts_into_float32_weights(impl):
    """float32 weights keep their type; the merged term is the float32 one of the experts' values."""
    W, A, B = make(2)
    A, B = A.astype(jnp.bfloat16), B.astype(jnp.bfloat16)
    ids, gates = jnp.array([0, 2], jnp.int32), jnp.array([0.5, 0.5], jnp.float32)
    out = sgmm_merge(W, *poison_unused(A, B, ids), ids, gates, **impl)
    assert out.dtype == jnp.float32
    assert rel_err(out, np.asarray(W, np.float64) + oracle_delta(A, B, ids, gates)) <= TOL[jnp.float32]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(W_base=_W[0]), r"W_base has shape \(96, 80\); expected 3 dims"),
        (dict(A=_A[:, :, :90]), r"A has shape .*expected dim 2 = 96"),
        (dict(B=_B[..., :70]), r"B has shape .*expected dim 3 = 80"),
        (dict(B=_B[:, :3]), r"B has shape .*expected dim 1 = 4"),
        (dict(A=_A[:1]), r"A has shape .*expected dim 0 = 2"),
        (dict(A=_A.astype(jnp.bfloat16)), r"B has dtype float32 but A has dtype bfloat16; expected the experts"),
        (dict(ids=jnp.arange(5, dtype=jnp.int32), gates=jnp.ones(5)), r"k=5 .* must be in \[1, E=4\]"),
        (dict(ids=jnp.array([0.0, 1.0])), r"ids has dtype float32; expected an integer"),
        (dict(gates=jnp.ones(3)), r"gates has shape \(3,\); expected \(2,\)"),
        (dict(ids=jnp.array([0, 4], jnp.int32)), r"ids has values in \[0, 4\]; expected \[0, 4\)"),
        (dict(implementation="cuda"), r"implementation='cuda' is unknown"),
        (dict(implementation="pallas", block_in=48), r"block_in=48 must be a positive power of two"),
        (dict(implementation="pallas", row_steps=0), r"row_steps=0 must be a positive integer"),
        (dict(members=((0, 0, 40), (40, 40, 41))),
         r"members\[1\]=.* ends at column 81; expected <= 80 \(the columns of W_base\)"),
        (dict(members=((0, 0, 40), (40, 40, 40))),
         r"B has shape \(2, 4, 8, 80\); expected dim 2 = 4 \(r = 8 rank columns of A / 2 members\)"),
    ],
)
def test_merge_bad_input(kwargs, match):
    args = dict(W_base=_W, A=_A, B=_B, ids=_ids, gates=_g) | kwargs
    with pytest.raises(ValueError, match=match):
        sgmm_merge(**args)


def test_switch_bad_input_names_argument():
    with pytest.raises(ValueError, match=r"new_gates has shape \(1,\); expected \(2,\)"):
        sgmm_switch(_W, _A, _B, _ids, _g, _ids, _g[:1])
    with pytest.raises(ValueError, match=r"old_ids has dtype float32"):
        sgmm_switch(_W, _A, _B, _g, _g, _ids, _g)
    with pytest.raises(ValueError, match=r"W has dtype int32; expected float32, bfloat16 or float16"):
        sgmm_switch(_W.astype(jnp.int32), _A, _B, _ids, _g, _ids, _g)
