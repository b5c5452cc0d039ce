"""routed_lora_matmul: Pallas (interpret on CPU) and XLA against the jnp reference and a float64
numpy oracle, across routing distributions, on shapes that are not powers of two."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import routed_lora_add, routed_lora_matmul, routed_lora_matmul_reference

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 1e-2}
BLOCKS = dict(block_t=16, block_in=32, block_out=32)
IMPLS = [
    pytest.param(dict(implementation="pallas", interpret=True, **BLOCKS), id="pallas-interpret"),
    pytest.param(dict(implementation="xla"), id="xla"),
]
on_gpu = jax.default_backend() == "gpu"


def make(seed, T=5, E=4, d_in=96, d_out=80, r=8, L=None, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    lead = () if L is None else (L,)
    x = rng.standard_normal((T, d_in))
    W = rng.standard_normal(lead + (d_in, d_out)) / np.sqrt(d_in)
    A = rng.standard_normal(lead + (E, d_in, r)) / np.sqrt(d_in)
    B = rng.standard_normal(lead + (E, r, d_out)) / np.sqrt(r)
    return tuple(jnp.asarray(a, dtype) for a in (x, W, A, B))


def oracle(x, W, A, B, ids, gates):
    x, W, A, B = (np.asarray(a, np.float64) for a in (x, W, A, B))
    ids, gates = np.asarray(ids), np.asarray(gates, np.float64)
    y = x @ W
    for t in range(x.shape[0]):
        for e, g in zip(ids[t], gates[t]):
            y[t] += g * (x[t] @ A[e]) @ B[e]
    return y


def rel_err(out, want):
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all(), "non-finite values leaked into the output"
    return np.abs(out - want).max() / np.abs(want).max()


def routes(kind, T, E, k, seed=0):
    """ids [T, k] for a named routing distribution, and gates that sum to 1 per row."""
    rng = np.random.default_rng(seed)
    if kind == "one-expert":  # every row on expert 1
        ids = np.full((T, k), 1)
    elif kind == "all-different":  # no two rows share an expert
        ids = np.arange(T * k).reshape(T, k) % E
    elif kind == "skewed":  # most rows pick expert 0 first
        ids = np.stack([rng.permutation(E)[:k] for _ in range(T)])
        ids[: (3 * T) // 4, 0] = 0
        ids[: (3 * T) // 4, 1:] = np.maximum(ids[: (3 * T) // 4, 1:], 1)
    elif kind == "unused-experts":  # only experts 0 and 2 appear
        ids = np.stack([rng.permutation([0, 2])[:k] for _ in range(T)])
    elif kind == "k=E":
        ids = np.stack([rng.permutation(E) for _ in range(T)])
    else:
        ids = rng.integers(0, E, (T, k))
    gates = rng.random(ids.shape) + 0.1
    return jnp.asarray(ids, jnp.int32), jnp.asarray(gates / gates.sum(1, keepdims=True), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_oracle_and_reference(impl, dtype):
    x, W, A, B = make(1, dtype=dtype)
    ids, gates = routes("uniform", 5, 4, 2)
    out = routed_lora_matmul(x, W, A, B, ids, gates, **impl)
    assert out.shape == (5, 80) and out.dtype == dtype
    assert rel_err(out, oracle(x, W, A, B, ids, gates)) <= TOL[dtype]
    ref = routed_lora_matmul_reference(x, W, A, B, ids, gates)
    assert rel_err(out, np.asarray(ref, np.float64)) <= TOL[dtype]


@pytest.mark.parametrize(
    "kind, T, E, k",
    [
        ("one-expert", 5, 4, 1),
        ("all-different", 4, 8, 2),
        ("skewed", 20, 4, 2),  # 20 rows: two row tiles of 16
        ("unused-experts", 6, 5, 2),
        ("k=E", 3, 3, 3),
        ("uniform", 1, 4, 2),  # decode: T=1
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_routing_distributions(impl, kind, T, E, k):
    x, W, A, B = make(2, T=T, E=E, r=12)  # rank 12: padded to 16 and masked
    ids, gates = routes(kind, T, E, k)
    if impl["implementation"] == "pallas" or T * k <= E:
        # Experts nobody picked are NaN: the kernel must not read them (the XLA form reads
        # all experts once T*k > E, so it is poisoned only in its gather regime).
        unused = np.setdiff1d(np.arange(E), np.asarray(ids))
        A, B = A.at[unused].set(jnp.nan), B.at[unused].set(jnp.nan)
    out = routed_lora_matmul(x, W, A, B, ids, gates, **impl)
    assert rel_err(out, oracle(x, W, A, B, ids, gates)) <= 1e-5


@pytest.mark.parametrize("T", [2, 9], ids=["gather-form", "dense-form"])
def test_xla_forms_agree(T):
    """The XLA path gathers experts per row while T*k <= E and combines densely beyond."""
    x, W, A, B = make(3, T=T, E=8)
    ids, gates = routes("uniform", T, 8, 2, seed=3)
    out = routed_lora_matmul(x, W, A, B, ids, gates, implementation="xla")
    assert rel_err(out, oracle(x, W, A, B, ids, gates)) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_stacked_layers_with_traced_layer_index(impl):
    x, W, A, B = make(4, L=3, E=4, dtype=jnp.bfloat16)
    ids, gates = routes("uniform", 5, 4, 2, seed=4)
    f = jax.jit(lambda layer, x, ids, g: routed_lora_matmul(x, W, A, B, ids, g, layer=layer, **impl))
    for layer in (2, 0):
        out = f(jnp.int32(layer), x, ids, gates)
        assert rel_err(out, oracle(x, W[layer], A[layer], B[layer], ids, gates)) <= 1e-2


@pytest.mark.parametrize("T", [1, 5, 20])
def test_split_d_in_matches_oracle(T):
    """Programs sharing d_in (fp32 partials summed after the kernel) give the same result, for
    explicit splits (even, uneven, more than the d_in tiles) and the decode defaults."""
    x, W, A, B = make(10, T=T, E=8, d_in=200, r=12)
    ids, gates = routes("uniform", T, 8, 2, seed=T)
    want = oracle(x, W, A, B, ids, gates)
    for splits in (1, 2, 3, 7, 100):
        out = routed_lora_matmul(x, W, A, B, ids, gates, implementation="pallas", interpret=True, block_t=16,
                                 block_in=32, block_out=32, splits=splits)
        assert rel_err(out, want) <= 1e-5, splits
    out = routed_lora_matmul(x, W, A, B, ids, gates, implementation="pallas", interpret=True)
    assert rel_err(out, want) <= 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["uniform", "one-expert", "all-different", "unused-experts"])
def test_add_routed_term_to_a_given_projection(impl, dtype, kind):
    """routed_lora_add(x @ W, ...) equals the whole routed matmul; stacked layers via `layer`."""
    x, W, A, B = make(11, T=7, E=4, dtype=dtype, L=2)
    ids, gates = routes(kind, 7, 4, 2, seed=3)
    want = oracle(x, W[1], A[1], B[1], ids, gates)
    y = (x.astype(jnp.float32) @ W[1].astype(jnp.float32)).astype(dtype)
    assert rel_err(routed_lora_add(y, x, A[1], B[1], ids, gates, **impl), want) <= TOL[dtype]
    at_layer = jax.jit(lambda y, x, A, B, i, g, l: routed_lora_add(y, x, A, B, i, g, layer=l, **impl))
    assert rel_err(at_layer(y, x, A, B, ids, gates, 1), want) <= TOL[dtype]


def test_add_bad_input():
    x, W, A, B = make(12)
    ids, g = routes("uniform", 5, 4, 2)
    y = x @ W
    with pytest.raises(ValueError, match=r"y has shape \(5, 64\); expected dim 1 = 80 \(d_out of B\)"):
        routed_lora_add(y[:, :64], x, A, B, ids, g)
    with pytest.raises(ValueError, match=r"y has shape \(4, 80\); expected dim 0 = 5 \(T, rows of x\)"):
        routed_lora_add(y[:4], x, A, B, ids, g)
    with pytest.raises(ValueError, match=r"y has dtype bfloat16 but x has dtype float32"):
        routed_lora_add(y.astype(jnp.bfloat16), x, A, B, ids, g)
    with pytest.raises(ValueError, match=r"splits=2: adding to y runs unsplit"):
        from pallas_kernels.routed_matmul import _routed_pallas
        _routed_pallas(x, None, A[None], B[None], ids, g, 0, interpret=True, block_t=None, block_in=None,
                       block_out=None, splits=2, num_warps=None, num_stages=None, y=y)


def test_auto_picks_xla_off_gpu_and_matches():
    x, W, A, B = make(5)
    ids, gates = routes("uniform", 5, 4, 2, seed=5)
    out = routed_lora_matmul(x, W, A, B, ids, gates)
    assert rel_err(out, oracle(x, W, A, B, ids, gates)) <= 1e-5


@pytest.mark.skipif(not on_gpu, reason="native Pallas/Triton needs a GPU")
@pytest.mark.parametrize("T", [1, 37, 256])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
def test_native_gpu_real_shape(T, dtype):
    x, W, A, B = make(6, T=T, E=8, d_in=576, d_out=1536, r=16, dtype=dtype)
    ids, gates = routes("skewed", T, 8, 2, seed=6)
    out = routed_lora_matmul(x, W, A, B, ids, gates, implementation="pallas", interpret=False)
    assert rel_err(out, oracle(x, W, A, B, ids, gates)) <= TOL[dtype]
    # XLA's own fp32 dot on a GPU defaults to TF32 (~2e-4 off): the projection given must be exact
    y = jnp.dot(x.astype(jnp.float32), W.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST).astype(dtype)
    out = routed_lora_add(y, x, A, B, ids, gates, implementation="pallas", interpret=False)
    assert rel_err(out, oracle(x, W, A, B, ids, gates)) <= TOL[dtype]


# ----------------------------------------------------------------------------- bad input

_x, _W, _A, _B = make(7, E=4)
_ids, _g = routes("uniform", 5, 4, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=_x[0]), r"x has shape \(96,\); expected 2 dims \[T, d_in\]"),
        (dict(W=_W[:90]), r"W has shape \(90, 80\); expected dim 0 = 96"),
        (dict(A=_A[:, :, :4]), r"B has shape .*expected dim 1 = 4 \(r, rank of A\)"),
        (dict(B=_B[..., :64]), r"B has shape .*expected dim 2 = 80 \(d_out of W\)"),
        (dict(x=_x.astype(jnp.bfloat16)), r"W has dtype float32 but x has dtype bfloat16"),
        (dict(ids=_ids[:4], gates=_g[:4]), r"ids has shape \(4, 2\); expected \(5, 2\)"),
        (dict(ids=jnp.zeros((5, 6), jnp.int32), gates=jnp.ones((5, 6))), r"k=6 .* must be in \[1, E=4\]"),
        (dict(gates=_g[:, :1]), r"gates has shape \(5, 1\); expected \(5, 2\)"),
        (dict(ids=_ids + 4), r"ids has values in .*expected \[0, 4\)"),
        (dict(layer=0), r"W has shape \(96, 80\); expected 3 dims \[L, d_in, d_out\]"),
        (dict(implementation="triton"), r"implementation='triton' is unknown"),
        (dict(implementation="pallas", block_t=12), r"block_t=12 must be a positive power of two"),
        (dict(implementation="pallas", splits=0), r"splits=0 must be a positive integer"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(x=_x, W=_W, A=_A, B=_B, ids=_ids, gates=_g) | kwargs
    with pytest.raises(ValueError, match=match):
        routed_lora_matmul(**args)


def test_bad_layer_index():
    x, W, A, B = make(8, L=2)
    ids, g = routes("uniform", 5, 4, 2)
    with pytest.raises(ValueError, match=r"layer=2 is out of range; expected \[0, 2\)"):
        routed_lora_matmul(x, W, A, B, ids, g, layer=2)
    with pytest.raises(ValueError, match=r"layer=0.5 must be an integer scalar"):
        routed_lora_matmul(x, W, A, B, ids, g, layer=0.5)
