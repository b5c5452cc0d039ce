"""routed_group_matmul: Pallas (interpreted on CPU, native on a GPU) and XLA against the jnp reference
and a float64 numpy oracle, on fresh random inputs, for single projections and q|k|v / gate|up
groups (GQA widths, a member without an adapter), one route or a route per member, decode and
larger batches, split-K with both reductions, stacked experts with static and traced layers.

Interpret mode fills every output buffer the kernel writes with NaN before it runs, and the tests
put NaN in every expert no row picked, so a tile left unwritten or an unused expert read shows up
as a non-finite output.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    routed_group_matmul,
    routed_group_matmul_reference,
    whole_output,
)
from pallas_kernels.routed_group import _xla

on_gpu = jax.default_backend() == "gpu"
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# Small tiles keep interpreted grids tiny and leave ragged edges everywhere (K = 40, widths 24-64).
SMALL = dict(block_k=16, block_n=16)
PALLAS = [
    pytest.param(dict(implementation="pallas", interpret=True), id="pallas-interpret"),
    pytest.param(dict(implementation="pallas", interpret=False), id="pallas-native",
                 marks=pytest.mark.skipif(not on_gpu, reason="native Pallas/Triton needs a GPU")),
]
IMPLS = PALLAS + [pytest.param(dict(implementation="xla"), id="xla")]

# name -> (members, N, Nb)
GROUPS = {
    "single": (whole_output(24), 24, 24),
    "qkv-gqa": (((0, 0, 64), (64, 64, 32), (96, 96, 32)), 128, 128),
    "gate_up": (((0, 0, 40), (40, 40, 40)), 80, 80),
    # q and v adapted, k (columns 64:96) not: a gap; listed out of column order on purpose
    "q_v-gap": (((96, 64, 32), (0, 0, 64)), 128, 96),
}


def make(group, T, k, S_r=1, E=5, K=40, r=4, L=None, dtype=jnp.float32, seed=0, kind="random"):
    """Fresh random x, W, A, B and a route; every expert no route picks is NaN."""
    members, N, Nb = GROUPS[group]
    S = len(members)
    S_r = S if S_r == "S" else S_r
    rng = np.random.default_rng(seed)
    lead = () if L is None else (L,)
    x = rng.standard_normal((T, K))
    W = rng.standard_normal((K, N)) / np.sqrt(K)
    A = rng.standard_normal(lead + (E, K, S * r)) / np.sqrt(K)
    B = rng.standard_normal(lead + (E, r, Nb)) / np.sqrt(r)
    if kind == "random":
        ids = np.stack([[rng.permutation(E)[:k] for _ in range(S_r)] for _ in range(T)])
    elif kind == "same-expert-twice":
        ids = np.full((T, S_r, k), 3)
    elif kind == "one-expert":
        ids = np.full((T, S_r, k), 1) + np.arange(k)
    else:
        raise ValueError(kind)
    gates = (rng.random((T, S_r, k)) + 0.1) * 2.0  # a LoRA scale folded in
    unused = np.setdiff1d(np.arange(E), ids)
    A[..., unused, :, :] = np.nan
    B[..., unused, :, :] = np.nan
    def cast(a):
        return jnp.asarray(a, dtype)

    return (cast(x), cast(W), cast(A), cast(B), jnp.asarray(ids, jnp.int32), jnp.asarray(gates, jnp.float32),
            members)


def oracle(x, W, A, B, ids, gates, members):
    x, W, A, B = (np.asarray(a, np.float64) for a in (x, W, A, B))
    ids, gates = np.asarray(ids), np.asarray(gates, np.float64)
    S = len(members)
    r = A.shape[-1] // S
    y = x @ W
    for t in range(x.shape[0]):
        for s, (w_off, b_off, width) in enumerate(members):
            route = s if ids.shape[1] == S else 0
            for e, g in zip(ids[t, route], gates[t, route]):
                y[t, w_off:w_off + width] += g * (x[t] @ A[e][:, s * r:(s + 1) * r]) @ B[e][:, b_off:b_off + width]
    return y


def rel_err(out, want):
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all(), "non-finite values in the output (an unwritten tile or an unused expert read)"
    return np.abs(out - np.asarray(want, np.float64)).max() / np.abs(want).max()


def knobs(impl, **kw):
    return impl | (SMALL | kw if impl["implementation"] == "pallas" else {})


def poisoned_ok(impl, T, k, E=5):
    """The XLA form reads every expert once T*k >= E (dense): only its gather form skips NaN experts."""
    return impl["implementation"] == "pallas" or T * k < E


# A covering subset of group x route x (T, k): every group meets T = 1 (GEMV), 3 (GEMV, top-1) or 17
# (dots, two row tiles), and both route layouts, without the full product's interpretation time.
CASES = [
    pytest.param(group, S_r, T, k, id=f"{group}-Sr{S_r}-T{T}-top{k}")
    for group, S_r, T, k in [
        ("single", 1, 1, 2), ("single", 1, 17, 2),
        ("qkv-gqa", 1, 1, 2), ("qkv-gqa", "S", 3, 1), ("qkv-gqa", "S", 17, 2),
        ("gate_up", "S", 1, 2), ("gate_up", 1, 3, 1),
        ("q_v-gap", 1, 17, 2), ("q_v-gap", "S", 1, 2), ("q_v-gap", 1, 3, 1),
    ]
]


@pytest.mark.parametrize("group, S_r, T, k", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference_and_oracle(impl, group, S_r, T, k):
    x, W, A, B, ids, gates, members = make(group, T, k, S_r, seed=T)
    if not poisoned_ok(impl, T, k):
        A, B = jnp.nan_to_num(A), jnp.nan_to_num(B)
    out = routed_group_matmul(x, W, A, B, ids, gates, members=members, **knobs(impl))
    assert out.shape == (T, GROUPS[group][1]) and out.dtype == x.dtype
    assert rel_err(out, oracle(x, W, A, B, ids, gates, members)) <= TOL[jnp.float32]
    assert rel_err(out, routed_group_matmul_reference(x, W, A, B, ids, gates, members)) <= TOL[jnp.float32]


@pytest.mark.parametrize("T", [1, 17])
@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16(impl, T):
    x, W, A, B, ids, gates, members = make("qkv-gqa", T, 2, dtype=jnp.bfloat16, seed=5)
    if not poisoned_ok(impl, T, 2):
        A, B = jnp.nan_to_num(A), jnp.nan_to_num(B)
    out = routed_group_matmul(x, W, A, B, ids, gates, members=members, **knobs(impl))
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, oracle(x, W, A, B, ids, gates, members)) <= TOL[jnp.bfloat16]


@pytest.mark.parametrize("T", [1, 17])
@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_experts_beside_float32_weights(impl, T):
    """Experts stored in bfloat16 beside float32 x and W: float32 out, the float32 sum of the values
    the experts hold (widening them is exact)."""
    x, W, A, B, ids, gates, members = make("qkv-gqa", T, 2, S_r="S", seed=9)
    A, B = A.astype(jnp.bfloat16), B.astype(jnp.bfloat16)
    if not poisoned_ok(impl, T, 2):
        A, B = jnp.nan_to_num(A), jnp.nan_to_num(B)
    out = routed_group_matmul(x, W, A, B, ids, gates, members=members, **knobs(impl))
    assert out.dtype == jnp.float32
    assert rel_err(out, oracle(x, W, A, B, ids, gates, members)) <= TOL[jnp.float32]


@pytest.mark.parametrize("kind", ["same-expert-twice", "one-expert"])
@pytest.mark.parametrize("impl", IMPLS)
def test_shared_and_repeated_experts(impl, kind):
    """A row naming one expert twice sums its gates; every row on the same experts reads them once."""
    x, W, A, B, ids, gates, members = make("gate_up", 3, 2, "S", kind=kind, seed=7)
    if not poisoned_ok(impl, 3, 2):
        A, B = jnp.nan_to_num(A), jnp.nan_to_num(B)
    out = routed_group_matmul(x, W, A, B, ids, gates, members=members, **knobs(impl))
    assert rel_err(out, oracle(x, W, A, B, ids, gates, members)) <= TOL[jnp.float32]


@pytest.mark.parametrize("T, configs", [
    pytest.param(1, [(1, None, 16), (2, "atomic", 8), (100, "partials", 16)], id="T1"),
    pytest.param(17, [(2, "partials", 16), (3, "atomic", 8)], id="T17"),
])
@pytest.mark.parametrize("impl", PALLAS)
def test_split_k(impl, T, configs):
    """Programs sharing a column tile's K agree with the oracle for both reductions: K = 40 in
    steps of 16 (3) or 8 (5) split evenly, unevenly (several steps per program, a short last
    share) and into more splits than steps; and without a split."""
    x, W, A, B, ids, gates, members = make("q_v-gap", T, 2, seed=11)
    want = oracle(x, W, A, B, ids, gates, members)
    for splits, reduction, block_k in configs:
        out = routed_group_matmul(x, W, A, B, ids, gates, members=members, splits=splits, reduction=reduction,
                                  **knobs(impl, block_k=block_k))
        assert rel_err(out, want) <= TOL[jnp.float32], (splits, reduction, block_k)


@pytest.mark.parametrize("impl", PALLAS)
def test_forced_forms_and_default_tiles(impl):
    """Each form on request, away from its default: dots at T=3 and GEMV over two row tiles at
    T=17; x @ A inside the kernel (fused) and given by XLA (dense) either way; the default tiles."""
    x, W, A, B, ids, gates, members = make("qkv-gqa", 3, 2, "S", seed=13)
    want = oracle(x, W, A, B, ids, gates, members)
    for kw in [dict(gemv=False, xa="fused"), dict(gemv=True, xa="fused", splits=2), dict(gemv=False, xa="dense")]:
        out = routed_group_matmul(x, W, A, B, ids, gates, members=members, **knobs(impl, **kw))
        assert rel_err(out, want) <= TOL[jnp.float32], kw
    assert rel_err(routed_group_matmul(x, W, A, B, ids, gates, members=members, **impl), want) <= TOL[jnp.float32]
    x, W, A, B, ids, gates, members = make("qkv-gqa", 17, 1, seed=14)
    want = oracle(x, W, A, B, ids, gates, members)
    for kw in [dict(gemv=True, block_t=16), dict(gemv=False, xa="fused", splits=2)]:
        out = routed_group_matmul(x, W, A, B, ids, gates, members=members, **knobs(impl, **kw))
        assert rel_err(out, want) <= TOL[jnp.float32], kw


@pytest.mark.parametrize("impl", IMPLS)
def test_stacked_experts_static_and_traced_layer(impl):
    x, W, A, B, ids, gates, members = make("qkv-gqa", 3, 2, "S", L=3, dtype=jnp.bfloat16, seed=17)
    if not poisoned_ok(impl, 3, 2):
        A, B = jnp.nan_to_num(A), jnp.nan_to_num(B)
    f = jax.jit(lambda layer, x, ids, g: routed_group_matmul(x, W, A, B, ids, g, members=members, layer=layer,
                                                             **knobs(impl)))
    for layer in (2, 0):
        want = oracle(x, W, A[layer], B[layer], ids, gates, members)
        assert rel_err(f(jnp.int32(layer), x, ids, gates), want) <= TOL[jnp.bfloat16]
        out = routed_group_matmul(x, W, A, B, ids, gates, members=members, layer=layer, **knobs(impl))
        assert rel_err(out, want) <= TOL[jnp.bfloat16]


@pytest.mark.parametrize("T, S_r", [(2, "S"), (9, 1)])
def test_xla_gather_and_dense_forms_agree(T, S_r):
    """The XLA form gathers experts per row while T*k < E and combines densely beyond; both are exact."""
    x, W, A, B, ids, gates, members = make("q_v-gap", T, 2, S_r, seed=19)
    A, B = jnp.nan_to_num(A), jnp.nan_to_num(B)
    want = oracle(x, W, A, B, ids, gates, members)
    for form in ("gather", "dense"):
        assert rel_err(_xla(x, W, A, B, ids, gates, members, form=form), want) <= TOL[jnp.float32], form


def test_auto_picks_xla_off_gpu_and_matches():
    x, W, A, B, ids, gates, members = make("gate_up", 2, 2, seed=23)
    out = routed_group_matmul(x, W, A, B, ids, gates, members=members)
    assert rel_err(out, oracle(x, W, A, B, ids, gates, members)) <= TOL[jnp.float32]


@pytest.mark.skipif(not on_gpu, reason="native Pallas/Triton needs a GPU")
@pytest.mark.parametrize("T", [1, 8, 37])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
def test_native_gpu_default_tiles_real_widths(T, dtype):
    """SmolLM2's q|k|v (576|192|192) with the default tiles, splits and reduction; atomics too."""
    rng = np.random.default_rng(29)
    members, K, E, r = ((0, 0, 576), (576, 576, 192), (768, 768, 192)), 576, 8, 16
    x = jnp.asarray(rng.standard_normal((T, K)), dtype)
    W = jnp.asarray(rng.standard_normal((K, 960)) / 24, dtype)
    A = jnp.asarray(rng.standard_normal((E, K, 3 * r)) / 24, dtype)
    B = jnp.asarray(rng.standard_normal((E, r, 960)) / 4, dtype)
    ids = jnp.asarray(np.stack([[rng.permutation(E)[:2]] for _ in range(T)]), jnp.int32)
    gates = jnp.asarray(rng.random((T, 1, 2)) + 0.1, jnp.float32)
    want = oracle(x, W, A, B, ids, gates, members)
    for reduction in ("partials", "atomic"):
        out = routed_group_matmul(x, W, A, B, ids, gates, members=members, implementation="pallas", interpret=False,
                                  reduction=reduction)
        assert rel_err(out, want) <= TOL[dtype], reduction


# ----------------------------------------------------------------------------- bad input

_x, _W, _A, _B, _ids, _g, _members = make("qkv-gqa", 5, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=_x[0]), r"x has shape \(40,\); expected 2 dims \[T, K\]"),
        (dict(W=_W[:30]), r"W has shape \(30, 128\); expected dim 0 = 40 \(K, columns of x\)"),
        (dict(W=_W[None]), r"W has shape \(1, 40, 128\); expected 2 dims \[K, N\]"),
        (dict(A=_A[:, :32]), r"A has shape \(5, 32, 12\); expected dim 1 = 40"),
        (dict(A=_A[..., :10]), r"A has shape \(5, 40, 10\); expected its last dim to be S\*r for the S=3 members"),
        (dict(B=_B[:, :3]), r"B has shape \(5, 3, 128\); expected dim 1 = 4 \(r = 12 rank columns of A / 3 members\)"),
        (dict(B=_B[:4]), r"B has shape \(4, 4, 128\); expected dim 0 = 5 \(E, experts of A\)"),
        (dict(x=_x.astype(jnp.bfloat16)), r"W has dtype float32 but x has dtype bfloat16"),
        (dict(members=((0, 0, 64), (64, 64, 32), (96, 96, 33))),
         r"members\[2\]=\(w_off=96, b_off=96, width=33\) ends at column 129; expected <= 128"),
        (dict(members=((0, 0, 64), (60, 64, 32), (96, 96, 32))), r"members\[0\] and members\[1\] overlap"),
        (dict(members=((0, 0, 64), (64, 100, 32), (96, 96, 32))),
         r"members\[1\]=.* reads B columns up to 132; expected <= 128"),
        (dict(members=((0, 0, 0), (64, 64, 32), (96, 96, 32))), r"width >= 1"),
        (dict(members=[(0, 0)]), r"members=.* must be a non-empty sequence of \(w_off, b_off, width\) triples"),
        (dict(ids=_ids[:, :, :1]), r"gates has shape \(5, 1, 2\); expected \(5, 1, 1\)"),
        (dict(ids=jnp.zeros((5, 2, 2), jnp.int32), gates=jnp.ones((5, 2, 2))),
         r"ids has shape \(5, 2, 2\); expected \[T=5, S_r, k\] with S_r = 1 .* or S_r = 3"),
        (dict(ids=_ids[0]), r"ids has shape \(1, 2\); expected 3 dims \[T, S_r, k\]"),
        (dict(ids=_ids + 5), r"ids has values in .*expected \[0, 5\)"),
        (dict(ids=jnp.zeros((5, 1, 6), jnp.int32), gates=jnp.ones((5, 1, 6))), r"k=6 .* must be in \[1, E=5\]"),
        (dict(layer=0), r"A has shape \(5, 40, 12\); expected 4 dims \[L, E, K, S\*r\]"),
        (dict(implementation="triton"), r"implementation='triton' is unknown"),
        (dict(implementation="pallas", block_n=12), r"block_n=12 must be a positive power of two"),
        (dict(implementation="pallas", splits=0), r"splits=0 must be a positive integer"),
        (dict(implementation="pallas", reduction="tree"), r"reduction='tree' is unknown"),
        (dict(implementation="pallas", gemv="yes"), r"gemv='yes' must be True, False or None"),
        (dict(implementation="pallas", xa="gather"), r"xa='gather' is unknown"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(x=_x, W=_W, A=_A, B=_B, ids=_ids, gates=_g, members=_members) | kwargs
    with pytest.raises(ValueError, match=match):
        routed_group_matmul(**args)


def test_bad_layer_index():
    x, W, A, B, ids, g, members = make("single", 5, 2, L=2)
    with pytest.raises(ValueError, match=r"layer=2 is out of range; expected \[0, 2\)"):
        routed_group_matmul(x, W, A, B, ids, g, members=members, layer=2)
    with pytest.raises(ValueError, match=r"layer=0.5 must be an integer scalar"):
        routed_group_matmul(x, W, A, B, ids, g, members=members, layer=0.5)
    with pytest.raises(ValueError, match=r"B has shape \(3, 5, 4, 24\); expected dim 0 = 2 \(L, layers of A\)"):
        routed_group_matmul(x, W, A, jnp.concatenate([B, B[:1]]), ids, g, members=members, layer=1)
