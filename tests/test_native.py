"""lsjax.native: the CPU decode matvecs against jnp, their fallbacks, errors, build, and decoding with them."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import PROMPTS, random_adapter

from lsjax import native
from lsjax.decode import decode_step, init_cache, left_pad, prefill
from lsjax.errors import ConfigError
from lsjax.generate import Generator
from lsjax.model import split_layers
from lsjax.native.build import build
from lsjax.strategies import resolve_native, resolve_strategy

needs_native = pytest.mark.skipif(not native.available(), reason=f"lsjax.native: {native.unavailable_reason()}")
rng = np.random.default_rng(0)


def rand(*shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def targets(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


# K not a multiple of the 4-row step, N not of the 16-column pieces, expert ids repeated across rows,
# top-1 and top-2 routes
@needs_native
@pytest.mark.parametrize("rows", [1, 3, 6, 8])  # 3: tokens one by one; 8: in fours; 6: both
@pytest.mark.parametrize("k, n", [(37, 45), (576, 192)])
@pytest.mark.parametrize("chosen", [1, 2])
def test_products_match_jnp(rows, k, n, chosen):
    x, w = rand(rows, k), rand(k, n)
    a, b = rand(5, k, 3), rand(5, 3, n)
    ids = jnp.asarray(rng.integers(0, 5, (rows, chosen)), jnp.int32)
    gates = rand(rows, chosen)
    want = x @ w
    scale = float(jnp.abs(want).max())
    for fn, args, expected in ((native.matmul, (x, w), want), (native.routed_matmul, (x, w, a, b, ids, gates),
                                want + jnp.einsum("tj,tjr,tjrn->tn", gates, jnp.einsum("tk,tjkr->tjr", x, a[ids]),
                                                  b[ids]))):
        assert "lsjax_" in targets(fn, *args)  # the custom call, not the fallback
        got = jax.jit(fn)(*args)
        np.testing.assert_allclose(got, expected, atol=1e-5 * scale, rtol=0)
    # the transposed form (the tied head), its rows in blocks of 8, 4, 2 and 1
    assert "lsjax_matmul_t" in targets(native.matmul_t, x, w.T)
    np.testing.assert_allclose(jax.jit(native.matmul_t)(x, w.T), want, atol=1e-5 * scale, rtol=0)


@needs_native
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("k, widths", [(37, (45, 20)), (576, (576, 192, 192)), (64, (1536, 1536))])
def test_grouped_products_match_one_call_each(rows, k, widths):
    """q, k, v (or gate, up) in one call: each output equals its own product, routed or not."""
    x = rand(rows, k)
    ws = [rand(k, n) for n in widths]
    as_, bs = [rand(5, k, 3) for _ in widths], [rand(5, 3, n) for n in widths]
    ids, gates = jnp.asarray(rng.integers(0, 5, (rows, 2)), jnp.int32), rand(rows, 2)
    assert "lsjax_matmul_group" in targets(native.matmul_group, x, ws)
    assert "lsjax_routed_matmul_group" in targets(native.routed_matmul_group, x, ws, as_, bs, ids, gates)
    plain = jax.jit(native.matmul_group)(x, ws)
    routed = jax.jit(native.routed_matmul_group)(x, ws, as_, bs, ids, gates)
    for w, a, b, got_plain, got_routed in zip(ws, as_, bs, plain, routed):
        want = x @ w
        term = jnp.einsum("tj,tjr,tjrn->tn", gates, jnp.einsum("tk,tjkr->tjr", x, a[ids]), b[ids])
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(got_plain, want, atol=1e-5 * scale, rtol=0)
        np.testing.assert_allclose(got_routed, want + term, atol=1e-5 * scale, rtol=0)


def test_groups_the_native_route_cannot_take_fall_back_to_one_call_each():
    x, ws = rand(2, 32), [rand(32, 8), rand(32, 16)]
    as_, bs = [rand(3, 32, 2), rand(3, 32, 4)], [rand(3, 2, 8), rand(3, 4, 16)]  # two ranks: not one group
    ids, gates = jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1))
    assert "lsjax_routed_matmul_group" not in targets(native.routed_matmul_group, x, ws, as_, bs, ids, gates)
    for got, w, a, b in zip(native.routed_matmul_group(x, ws, as_, bs, ids, gates), ws, as_, bs):
        np.testing.assert_allclose(got, native.routed_reference(x, w, a, b, ids, gates), atol=1e-5)
    big = rand(native.MAX_ROWS + 1, 32)  # prefill-sized rows: XLA's products
    assert "lsjax_" not in targets(native.matmul_group, big, ws)
    for got, w in zip(native.matmul_group(big, ws), ws):
        np.testing.assert_allclose(got, big @ w, atol=1e-5)


@needs_native
def test_leading_axes_and_gateless_rows():
    x, w = rand(2, 1, 64), rand(64, 40)
    np.testing.assert_allclose(jax.jit(native.matmul)(x, w), x @ w, atol=1e-4)
    a, b = rand(4, 64, 8), rand(4, 8, 40)
    ids, zero = jnp.zeros((2, 2), jnp.int32), jnp.zeros((2, 2), jnp.float32)
    np.testing.assert_allclose(native.routed_matmul(x[:, 0], w, a, b, ids, zero), x[:, 0] @ w, atol=1e-4)


def test_prefill_sized_and_bf16_inputs_take_the_xla_route():
    x, w = rand(native.MAX_ROWS + 1, 32), rand(32, 24)
    assert "lsjax_" not in targets(native.matmul, x, w)
    np.testing.assert_allclose(native.matmul(x, w), x @ w, atol=1e-5)
    xb, wb = x[:1].astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    assert "lsjax_" not in targets(native.matmul, xb, wb)
    assert native.matmul(xb, wb).dtype == jnp.bfloat16


@needs_native
def test_an_expert_id_out_of_range_is_a_clear_error():
    x, w, a, b = rand(1, 16), rand(16, 8), rand(3, 16, 2), rand(3, 2, 8)
    with pytest.raises(Exception, match="expert id out of range"):
        jax.block_until_ready(jax.jit(native.routed_matmul)(x, w, a, b, jnp.asarray([[0, 3]], jnp.int32),
                                                            jnp.ones((1, 2))))


@needs_native
def test_calls_from_several_threads_at_once_stay_correct():
    """XLA may run two custom calls at once; the second then works alone on its own thread."""
    x, w = rand(2, 300), rand(300, 500)
    fn, want = jax.jit(native.matmul), np.asarray(x @ w)
    errors = []

    def hammer():
        for _ in range(50):
            errors.append(float(np.abs(np.asarray(fn(x, w)) - want).max()))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 150 and max(errors) < 1e-3


@needs_native
def test_decode_steps_with_native_matvecs_match_xla(tiny_llama):
    """Prefill and every step's logits, through the pure functions in a user's own jit."""
    _, model, _ = tiny_llama
    cfg, params = model.config, split_layers(model.params())
    ids, mask = left_pad(PROMPTS)
    out = {}
    for use in (False, True):
        step = jax.jit(lambda p, t, c: decode_step(cfg, p, t, c, native=use), donate_argnums=2)
        if use:
            assert "lsjax_matmul" in step.lower(params, jnp.zeros(3, jnp.int32),
                                                init_cache(cfg, 3, 32, per_layer=True)).as_text()
        logits, cache = prefill(cfg, params, ids, mask, init_cache(cfg, 3, 32, per_layer=True), native=use)
        steps = [logits]
        for i in range(6):
            logits, cache = step(params, jnp.argmax(steps[-1], -1).astype(jnp.int32), cache)
            steps.append(logits)
        out[use] = np.stack(steps)
    np.testing.assert_allclose(out[True], out[False], atol=1e-4)


@needs_native
@pytest.mark.parametrize("method, strategy", [(None, "auto"), ("lora", "unmerged"), ("switch", "unmerged"),
                                              ("switch", "fused"), ("layerwise", "fused"), ("blockwise", "fused"),
                                              ("blockwise", "unmerged")])
def test_generators_give_the_same_tokens_with_and_without(tiny_llama, method, strategy):
    _, model, tok = tiny_llama
    adapter = None if method is None else random_adapter(model, method, **(
        {} if method == "lora" else {"num_experts": 4, "top_k": 2}))
    tokens = {}
    for use in (False, True):
        gen = Generator(model, tok, adapter, strategy=strategy, native=use)
        assert gen.native is use
        tokens[use] = gen.generate(PROMPTS, max_new_tokens=12, stop_token_ids=()).token_ids
    assert tokens[True] == tokens[False]
    assert Generator(model, tok, adapter, strategy=strategy).native  # the default on CPU, fp32, built
    if (method, strategy) in ((None, "auto"), ("switch", "fused")):  # q, k, v and gate, up: one call each
        _, ids, mask, cache, *_ = gen._setup(PROMPTS[:1], False, 4, None, ())
        step = gen._step.lower(gen.bundle, jnp.zeros((1,), jnp.int32), cache).as_text()
        target = "lsjax_matmul_group" if method is None else "lsjax_routed_matmul_group"
        assert step.count(f"@{target}(") == 2 * model.config.num_layers


def test_native_choice_and_auto_strategy(monkeypatch):
    from lsjax.adapters import AdapterConfig

    switch = AdapterConfig(method="switch", num_experts=4, top_k=2, rank=4)
    assert resolve_strategy("auto", switch, native=True) == "fused"
    assert resolve_strategy("auto", switch, native=False) == "unmerged"
    assert not resolve_native(None, jnp.bfloat16)  # the custom calls are fp32; bf16 stays on XLA
    assert not resolve_native(False, jnp.float32)
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "lsjax/native/_matvec.so is not built")
    assert not resolve_native(None, jnp.float32)
    with pytest.raises(ConfigError, match="native=True, but the native CPU matvecs cannot run: .*not built"):
        resolve_native(True, jnp.float32)


def test_a_failed_build_leaves_no_library(tmp_path):
    out = tmp_path / "lib.so"
    with pytest.raises(RuntimeError, match="building lib.so failed"):
        build(out, compiler="false", quiet=True)  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-cxx'"):
        build(out, compiler="no-such-cxx", quiet=True)
    assert list(tmp_path.iterdir()) == []
