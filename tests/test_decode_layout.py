"""The decode step's shape: products per group and layer counted in its jaxpr, and the device
memory a Generator holds (the model's own weights and the adapter's, no second copy)."""

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from collections import Counter

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsjax import native, strategies
from lsjax.adapters import Adapter, AdapterConfig
from lsjax.backends import XLA
from lsjax.config import ModelConfig
from lsjax.decode import init_cache
from lsjax.model import Llama

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                     head_dim=8)
GROUPS = 4  # qkv, o, gate_up, down


def primitives(fn, *args) -> Counter:
    """How often each primitive appears in `fn`'s jaxpr, nested jaxprs included."""
    counts = Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return counts


def step_primitives(adapter_config, batch: int) -> Counter:
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    arrays = None if adapter_config is None else Adapter(CONFIG, adapter_config, rngs=nnx.Rngs(1)).arrays()
    strategy = strategies.resolve_strategy("unmerged", adapter_config, XLA)
    _, step = strategies.build(CONFIG, adapter_config, strategy, XLA)
    bundle = strategies.prepare_bundle(CONFIG, model.params(), adapter_config, arrays, strategy)
    return primitives(step, bundle, jnp.zeros((batch,), jnp.int32), init_cache(CONFIG, batch, 16))


def test_a_base_step_runs_one_product_per_group_and_layer():
    counts = step_primitives(None, 1)
    attention = 2  # scores and values
    assert counts["dot_general"] == CONFIG.num_layers * (GROUPS + attention) + 1  # + the vocabulary head
    assert counts["gather"] == 1  # the embedding lookup


def test_a_switch_step_routes_with_two_products_per_group_and_one_gather_per_group():
    """Unmerged switch at batch 1: per group and layer one shrink and one expand on top of the base
    product, the router once, and each group's chosen experts gathered once for all layers."""
    base = step_primitives(None, 1)
    switch = step_primitives(AdapterConfig(method="switch", num_experts=8, top_k=2, rank=4), 1)
    routed = switch["dot_general"] - base["dot_general"] - 1  # minus the router
    assert routed == 2 * GROUPS * CONFIG.num_layers
    assert switch["gather"] - base["gather"] == 2 * GROUPS  # A and B of each group, once per step
    # from E / k rows on every expert is read, masked by its gate: still two products, and no gather
    dense = step_primitives(AdapterConfig(method="switch", num_experts=8, top_k=2, rank=4), 4)
    assert dense["dot_general"] - step_primitives(None, 4)["dot_general"] - 1 == 2 * GROUPS * CONFIG.num_layers
    assert dense["gather"] == base["gather"]


@pytest.mark.parametrize("batch, row_lengths", [(1, False), (4, False), (4, True)])
def test_a_compiled_step_updates_the_cache_in_place(batch, row_lengths):
    """The compiled base step writes each layer's new key and value into the donated cache without
    copying any cache buffer: batch 1 (where a `[1, KV, T, D]` buffer was copied four times a
    step), a batch, and a serving engine's cache whose rows each have their own length."""
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    _, step = strategies.compiled(CONFIG, None, "base", XLA)
    cache = init_cache(CONFIG, batch, 64)
    if row_lengths:
        cache = dataclasses.replace(cache, length=jnp.zeros((batch,), jnp.int32))
    bundle = strategies.prepare_bundle(CONFIG, model.params(), None, None, "base")
    text = step.lower(bundle, jnp.zeros((batch,), jnp.int32), cache).compile().as_text()
    entry = text[text.index("ENTRY"):]
    buffer = cache.k.layer(0)
    dims = {",".join(map(str, buffer.shape)), ",".join(map(str, (CONFIG.num_kv_heads, batch, *buffer.shape[1:])))}
    copies = [line for line in entry.splitlines() if re.search(r"= f32\[([\d,]+)\]\S* copy\(", line)
              and re.search(r"= f32\[([\d,]+)\]", line).group(1) in dims]
    assert not copies, f"{len(copies)} copies of a cache buffer in one step, e.g. {copies[0].strip()[:160]}"


MEMORY = textwrap.dedent("""
    import json, sys
    import jax
    from flax import nnx
    import lsjax
    from lsjax.adapters import Adapter, AdapterConfig
    from lsjax.generate import CACHE_ROUND, Generator, bucket, round_up
    model, tokenizer = lsjax.load(sys.argv[1])
    adapter = Adapter(model.config, AdapterConfig(method="switch", num_experts=8, top_k=2, rank=16), rngs=nnx.Rngs(0))
    gen = Generator(model, tokenizer, adapter, strategy="fused", backend=sys.argv[2])  # auto is timed elsewhere
    out = gen.generate(["Tell me about the sea."], max_new_tokens=8, stop_token_ids=())
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    c = model.config
    capacity = round_up(bucket(out.prompt_tokens[0]) + 8, CACHE_ROUND)  # the cache of that one row
    print("RESULT" + json.dumps({
        "live": sum({a.unsafe_buffer_pointer(): a.nbytes for a in jax.live_arrays()}.values()),  # each buffer once
        "weights": nbytes(model.params()),
        "experts": nbytes(adapter.arrays()), "backend": gen.backend.name, "strategy": gen.strategy,
        "cache": 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4 * capacity}))
""")


@pytest.mark.parametrize("backend", ["xla"] + (["native", "hybrid"] if native.available() else []))
def test_a_generator_holds_the_weights_once(smollm2_ckpt, backend):
    """SmolLM2 + an 8-expert switch adapter decoding `fused`, after 8 generated tokens: every live
    device buffer together is at most 1.05 x (weights + experts + one KV cache), on each CPU backend
    (the Pallas backend decodes from the same bundle as XLA)."""
    proc = subprocess.run([sys.executable, "-c", MEMORY, str(smollm2_ckpt), backend], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT")[-1])
    budget = out["weights"] + out["experts"] + out["cache"]
    assert out["live"] <= 1.05 * budget, out
    assert out["live"] >= out["weights"] + out["experts"], out  # the measure sees the arrays at all
    assert out["backend"] == backend


def test_cache_positions_count_each_rows_real_tokens(tiny_llama):
    """After a left-padded prefill and one decode step, each row's valid columns hold positions
    0..n-1 in order (its real tokens counted from its first), and its padding columns are invalid.
    RoPE sees only differences of positions, so logits alone would not catch a shift of them all."""
    from lsjax.decode import decode_step, init_cache, left_pad, prefill

    _, model, _ = tiny_llama
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    ids, mask = left_pad(prompts)
    params = model.params()
    logits, cache = prefill(model.config, params, ids, mask, init_cache(model.config, len(prompts), 16))
    _, cache = decode_step(model.config, params, jnp.argmax(logits, -1).astype(jnp.int32), cache)
    positions, valid = np.asarray(cache.positions), np.asarray(cache.valid)
    for row, prompt in enumerate(prompts):
        n = len(prompt) + 1  # the prompt and one generated token
        assert valid[row].sum() == n
        assert positions[row][valid[row]].tolist() == list(range(n))
        pad = ids.shape[1] - len(prompt)
        assert not valid[row, :pad].any() and valid[row, pad:ids.shape[1] + 1].all()
