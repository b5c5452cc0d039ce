"""lsjax.native's kernels alone: the custom calls against their jnp meaning, their fallbacks, errors,
threads and build (decoding with them: test_native.py)."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsjax import native
from lsjax.native import build as native_build
from pallas_kernels.reference import routed_group_matmul_reference

needs_native = pytest.mark.skipif(not native.available(), reason=f"lsjax.native: {native.unavailable_reason()}")
rng = np.random.default_rng(0)
ROOT = Path(__file__).resolve().parents[1]


def rand(*shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


@jax.jit(static_argnames=("layer", "members"))
def reference(x, w, a, b, ids, gates, *, layer, members):
    return routed_group_matmul_reference(x, w, a, b, ids, gates, members, layer=layer)


def routed(x, w, a, b, ids, gates, *, layer, members, otherwise=reference):
    return native.routed_group(x, w, a, b, ids, gates, layer=layer, members=members, otherwise=otherwise)


# Groups as the model lays them out: K not a multiple of the 4-row step, N not of the 16-column
# pieces; the larger ones (over 256 KiB of W) are split across threads, the smaller run on one.
GROUPS = {
    "one projection": (37, 45, ((0, 0, 45),)),
    "q|k|v, GQA widths": (576, 960, ((0, 0, 576), (576, 576, 192), (768, 768, 192))),
    "gate|up": (40, 100, ((0, 0, 50), (50, 50, 50))),
    "q and v of q|k|v": (301, 221, ((0, 0, 100), (144, 100, 77))),  # k (columns 100:144) not adapted
}


def routed_inputs(rows, k, n, members, chosen, per_member, experts=3, rank=4, layers=2):
    nb = max(b_off + width for _, b_off, width in members)
    x, w = rand(rows, k), rand(k, n)
    a, b = rand(layers, experts, k, len(members) * rank), rand(layers, experts, rank, nb)
    routes = len(members) if per_member else 1
    ids = jnp.asarray(rng.integers(0, experts, (rows, routes, chosen)), jnp.int32)  # 3 experts: rows repeat them
    gates = rand(rows, routes, chosen).at[0, 0, -1].set(0.0)  # a pick with a zero gate
    return x, w, a, b, ids, gates


def assert_close(got, want):
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale, rtol=0)


@needs_native
@pytest.mark.parametrize("group, per_member", [(group, per_member) for group, (*_, members) in GROUPS.items()
                                               for per_member in (False, True)[:len(members)]])  # 1 member: 1 route
@pytest.mark.parametrize("chosen", [1, 2])
def test_routed_group_matches_the_reference(group, per_member, chosen):
    k, n, members = GROUPS[group]
    fn = jax.jit(routed, static_argnames=("layer", "members"))
    x, w, a, b, ids, gates = routed_inputs(native.MAX_ROUTED_ROWS, k, n, members, chosen, per_member)
    want = reference(x, w, a, b, ids, gates, layer=1, members=members)  # row by row: its first rows serve all
    for rows in (1, 3, 6, 8, native.MAX_ROWS, 24, native.MAX_ROUTED_ROWS):  # 3: one by one; 8: in fours; 6: both
        args = x[:rows], w, a, b, ids[:rows], gates[:rows]
        call = fn.lower(*args, layer=1, members=members)
        target = "lsjax_routed_group" if rows <= native.MAX_ROWS else "lsjax_routed_add"  # past it: XLA's x @ W
        assert target in call.as_text()
        assert_close(call.compile()(*args), want[:rows])


@needs_native
@pytest.mark.parametrize("group, per_member", [("q|k|v, GQA widths", False), ("q and v of q|k|v", True),
                                               ("one projection", False)])
def test_bfloat16_experts_are_read_as_such_beside_float32_weights(group, per_member):
    k, n, members = GROUPS[group]
    fn = jax.jit(routed, static_argnames=("layer", "members"))
    x, w, a, b, ids, gates = routed_inputs(native.MAX_ROUTED_ROWS, k, n, members, 2, per_member)
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    # the float32 term of the very values bfloat16 holds: widening them is exact
    want = reference(x, w, a16.astype(jnp.float32), b16.astype(jnp.float32), ids, gates, layer=1, members=members)
    for rows in (1, 6, native.MAX_ROWS, native.MAX_ROUTED_ROWS):
        args = x[:rows], w, a16, b16, ids[:rows], gates[:rows]
        call = fn.lower(*args, layer=1, members=members)
        assert ("lsjax_routed_group" if rows <= native.MAX_ROWS else "lsjax_routed_add") in call.as_text()
        got = call.compile()(*args)
        assert got.dtype == jnp.float32
        assert_close(got, want[:rows])
    mixed = x[:2], w, a16, b, ids[:2], gates[:2]  # experts of two types: the fallback's promotion
    assert "lsjax_" not in lowered(lambda *args: routed(*args, layer=1, members=members), *mixed)


@needs_native
def test_routed_group_without_a_layer_axis_and_with_zero_gates():
    k, n, members = GROUPS["q and v of q|k|v"]
    x, w, a, b, ids, gates = routed_inputs(5, k, n, members, 2, True, layers=1)
    a3, b3 = a[0], b[0]
    assert "lsjax_routed_group" in lowered(lambda *args: routed(*args, layer=None, members=members),
                                           x, w, a3, b3, ids, gates)
    got = routed(x, w, a3, b3, ids, gates, layer=None, members=members)
    assert_close(got, reference(x, w, a3, b3, ids, gates, layer=None, members=members))
    assert_close(got, reference(x, w, a, b, ids, gates, layer=0, members=members))
    assert_close(routed(x, w, a3, b3, ids, jnp.zeros_like(gates), layer=None, members=members), x @ w)


@needs_native
@pytest.mark.parametrize("rows", [1, 3, 6, 8, 16])
@pytest.mark.parametrize("k, n", [(37, 45), (576, 192)])
def test_plain_and_transposed_products_match_jnp(rows, k, n):
    x, w = rand(rows, k), rand(k, n)
    want = x @ w
    assert "lsjax_matmul(" in lowered(native.matmul, x, w)
    assert_close(jax.jit(native.matmul)(x, w), want)
    assert "lsjax_matmul_t(" in lowered(native.matmul_t, x, w.T)  # the tied head: rows in 8s, 4s, 2s and 1s
    assert_close(jax.jit(native.matmul_t)(x, w.T), want)
    assert_close(jax.jit(native.matmul)(x.reshape(rows, 1, k), w)[:, 0], want)  # leading axes


def test_prefill_sized_bf16_and_traced_layer_calls_take_the_fallback():
    k, n, members = GROUPS["gate|up"]
    calls = []

    def otherwise(*args, layer, members):
        calls.append((layer, members))
        return routed_group_matmul_reference(*args, members, layer=layer)

    big = routed_inputs(native.MAX_ROUTED_ROWS + 1, k, n, members, 2, False)
    text = lowered(lambda *args: routed(*args, layer=1, members=members, otherwise=otherwise), *big)
    assert "lsjax_" not in text and calls == [(1, members)]
    assert_close(routed(*big, layer=1, members=members), reference(*big, layer=1, members=members))

    bf16 = [v.astype(jnp.bfloat16) if v.dtype == jnp.float32 else v for v in routed_inputs(2, k, n, members, 2, False)]
    assert "lsjax_" not in lowered(lambda *args: routed(*args, layer=1, members=members), *bf16)
    assert routed(*bf16, layer=1, members=members).dtype == jnp.bfloat16

    small = routed_inputs(2, k, n, members, 2, False)
    by_layer = jax.jit(lambda layer, *args: routed(*args, layer=layer, members=members, otherwise=otherwise))
    assert "lsjax_" not in by_layer.lower(1, *small).as_text()  # a traced layer cannot be an attribute

    x, w = big[0][:native.MAX_ROWS + 1], big[1]
    assert "lsjax_" not in lowered(native.matmul, x, w) + lowered(native.matmul_t, x, w.T)
    assert_close(native.matmul(x, w), x @ w)
    assert native.matmul(x[:1].astype(jnp.bfloat16), w.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@needs_native
def test_an_expert_id_out_of_range_is_a_clear_error():
    k, n, members = GROUPS["gate|up"]
    x, w, a, b, ids, gates = routed_inputs(2, k, n, members, 2, True)
    for bad in (3, -1):  # 3 experts
        with pytest.raises(Exception, match="expert id out of range"):
            jax.block_until_ready(routed(x, w, a, b, ids.at[1, 1, 0].set(bad), gates, layer=0, members=members))


@needs_native
def test_calls_from_several_threads_at_once_stay_correct():
    """XLA may run two custom calls at once; the second then works alone on its own thread."""
    k, n, members = GROUPS["q|k|v, GQA widths"]
    args = routed_inputs(4, k, n, members, 2, False)
    fn = jax.jit(lambda *a: routed(*a, layer=1, members=members))
    want, plain = np.asarray(reference(*args, layer=1, members=members)), np.asarray(args[0] @ args[1])
    errors = []

    def hammer():
        for _ in range(30):
            errors.append(float(np.abs(np.asarray(fn(*args)) - want).max()))
            errors.append(float(np.abs(np.asarray(native.matmul(args[0], args[1])) - plain).max()))

    workers = [threading.Thread(target=hammer) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(errors) == 180 and max(errors) < 1e-3


def test_the_portable_build_has_no_march_unless_asked(monkeypatch):
    monkeypatch.delenv(native_build.MARCH_ENV, raising=False)
    assert not any(flag.startswith("-march") for flag in native_build.command(Path("x.so")))
    assert "-march=native" in native_build.command(Path("x.so"), march="native")
    monkeypatch.setenv(native_build.MARCH_ENV, "native")
    assert "-march=native" in native_build.command(Path("x.so"))


def test_a_failed_build_leaves_no_library(tmp_path, monkeypatch):
    compiler = tmp_path / "broken-c++"  # writes half a library, then fails
    compiler.write_text('#!/bin/sh\nfor last; do :; done\necho partial > "$last"\necho "error: broken" >&2\nexit 1\n')
    compiler.chmod(0o755)
    output = tmp_path / "out" / "_matvec.so"
    output.parent.mkdir()
    with pytest.raises(RuntimeError, match="broken"):
        native_build.build(output, compiler=str(compiler), quiet=True)
    assert list(output.parent.iterdir()) == []
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert native_build.main(["--optional", "--output", str(output)]) == 0
    assert native_build.main(["--output", str(output)]) == 1
    assert not output.exists()


# the pool's size, read straight from the library (no jax), on the CPUs and environment given
THREADS_PROBE = "import ctypes, os, sys; os.sched_setaffinity(0, eval(sys.argv[2])); " \
                "print(ctypes.CDLL(sys.argv[1]).LsjaxNativeThreads())"


@needs_native
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no sched_setaffinity here")
def test_threads_follow_the_affinity_mask_or_the_environment():
    env = {key: value for key, value in os.environ.items() if key != "LSJAX_NATIVE_THREADS"}
    mine = os.sched_getaffinity(0)
    one = {min(mine)}
    for cpus, environ, want in ((one, env, 1), (one, {**env, "LSJAX_NATIVE_THREADS": "3"}, 3),
                                (mine, {**env, "LSJAX_NATIVE_THREADS": "0"}, len(mine))):  # 0: not a count
        out = subprocess.run([sys.executable, "-c", THREADS_PROBE, str(native.LIBRARY), repr(cpus)], env=environ,
                             capture_output=True, text=True, check=True, timeout=60).stdout
        assert int(out) == want
    if "LSJAX_NATIVE_THREADS" not in os.environ:
        assert native.threads() == len(os.sched_getaffinity(0))  # this process: every CPU it may use
