"""The native CPU backend end to end: the same logits and tokens as XLA, one call per group, and
the static `auto` rule kept for where nothing can be timed (its kernels alone:
test_native_kernels.py; `auto` by measurement: test_autotune.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import PROMPTS, random_adapter

from lsjax import native
from lsjax.adapters import AdapterConfig
from lsjax.backend_interface import Traits
from lsjax.backends import XLA, XlaBackend, resolve_backend
from lsjax.decode import decode_step, init_cache, left_pad, prefill
from lsjax.errors import ConfigError
from lsjax.generate import Generator
from lsjax.strategies import resolve_strategy

needs_native = pytest.mark.skipif(not native.available(), reason=f"lsjax.native: {native.unavailable_reason()}")


@needs_native
def test_decode_steps_on_the_native_backend_match_xla(tiny_llama):
    """Prefill and every step's logits, through the pure functions in a user's own jit."""
    _, model, _ = tiny_llama
    cfg, params = model.config, model.params()
    ids, mask = left_pad(PROMPTS)
    out = {}
    for backend in (XLA, resolve_backend("native")):
        step = jax.jit(lambda p, t, c: decode_step(cfg, p, t, c, backend), donate_argnums=2)
        if backend is not XLA:
            text = step.lower(params, jnp.zeros(3, jnp.int32), init_cache(cfg, 3, 32)).as_text()
            head = 0 if cfg.tie_word_embeddings else 1  # an untied head is a plain product too
            assert text.count("@lsjax_matmul(") == 4 * cfg.num_layers + head  # one product per group and layer
            assert ("@lsjax_matmul_t(" in text) == cfg.tie_word_embeddings  # a tied head reads the embedding
        logits, cache = prefill(cfg, params, ids, mask, init_cache(cfg, 3, 32), backend)
        steps = [logits]
        for _ in range(6):
            logits, cache = step(params, jnp.argmax(steps[-1], -1).astype(jnp.int32), cache)
            steps.append(logits)
        out[backend.name] = np.stack(steps)
    np.testing.assert_allclose(out["native"], out["xla"], atol=1e-4)


@needs_native
@pytest.mark.parametrize("method, strategy", [(None, "auto"), ("lora", "unmerged"), ("switch", "unmerged"),
                                              ("switch", "fused"), ("layerwise", "fused"), ("blockwise", "fused"),
                                              ("blockwise", "unmerged")])
def test_generators_give_the_same_tokens_on_native_and_xla(tiny_llama, method, strategy):
    _, model, tok = tiny_llama
    adapter = None if method is None else random_adapter(model, method, **(
        {} if method == "lora" else {"num_experts": 4, "top_k": 2}))
    tokens = {}
    for backend in ("xla", "native"):
        gen = Generator(model, tok, adapter, strategy=strategy, backend=backend)
        tokens[backend] = gen.generate(PROMPTS, max_new_tokens=12, stop_token_ids=()).token_ids
    assert tokens["native"] == tokens["xla"]
    if (method, strategy) == ("switch", "fused"):  # each group's product and routed term: one call
        _, ids, mask, cache, *_ = gen._setup(PROMPTS[:1], False, 4, None, ())
        step = gen._step.lower(gen.bundle, jnp.zeros((1,), jnp.int32), cache).as_text()
        assert step.count("@lsjax_routed_group(") == 4 * model.config.num_layers


@needs_native
@pytest.mark.parametrize("strategy", ["fused", "unmerged"])
def test_bfloat16_experts_beside_float32_weights_decode_their_own_values(tiny_llama, strategy):
    """bfloat16 experts are read as such (the native call, not a cast copy) and decode as the float32
    adapter of the very values they hold, on XLA's route."""
    _, model, tok = tiny_llama
    adapter = random_adapter(model, "switch", num_experts=4, top_k=2).astype(jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(adapter.arrays())} == {jnp.dtype(jnp.bfloat16)}
    widened = adapter.astype(jnp.float32)
    tokens = {}
    for name, backend, ad in (("native", "native", adapter), ("xla bf16", "xla", adapter),
                              ("xla f32", "xla", widened)):
        gen = Generator(model, tok, ad, strategy=strategy, backend=backend)
        tokens[name] = gen.generate(PROMPTS, max_new_tokens=12, stop_token_ids=()).token_ids
    assert tokens["native"] == tokens["xla f32"] == tokens["xla bf16"]
    base = Generator(model, tok, backend="xla").generate(PROMPTS, max_new_tokens=12, stop_token_ids=()).token_ids
    assert tokens["native"] != base  # the experts matter
    if strategy == "fused":
        gen = Generator(model, tok, adapter, strategy=strategy, backend="native")
        _, ids, mask, cache, *_ = gen._setup(PROMPTS[:1], False, 4, None, ())
        step = gen._step.lower(gen.bundle, jnp.zeros((1,), jnp.int32), cache).as_text()
        calls = [line for line in step.splitlines() if "@lsjax_routed_group(" in line]
        assert len(calls) == 4 * model.config.num_layers
        assert all(re.search(r"tensor<[0-9x]+xbf16>, tensor<[0-9x]+xbf16>", line) for line in calls)  # A, B as held


def test_the_static_rule_picks_the_native_backend_on_a_cpu_for_fp32_and_says_why_not(monkeypatch):
    """The fallback where `auto` cannot time its candidates (abstract, traced or multi-device arrays)."""
    switch = AdapterConfig(method="switch", num_experts=4, top_k=2, rank=4)
    assert resolve_strategy("auto", switch, XLA) == "unmerged"
    assert resolve_strategy("auto", switch, resolve_backend("pallas")) == "fused"
    assert resolve_backend(None, jnp.bfloat16).name == "xla"  # the custom calls are fp32; bf16 stays on XLA
    assert resolve_backend("xla") == XlaBackend(traits=Traits(gather_once=False, one_expand=False))  # CPU forms
    if native.available():
        assert resolve_backend(None).name == "native"
        assert resolve_strategy("auto", switch, resolve_backend(None)) == "fused"
    monkeypatch.setattr(native, "unavailable_reason", lambda: "lsjax/native/_matvec.so is not built")
    assert resolve_backend(None).name == "xla"  # a clean fall-back
    with pytest.raises(ConfigError, match="backend='native' cannot run: .*not built"):
        resolve_backend("native")
