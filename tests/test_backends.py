"""Every backend's products against float64 numpy, one projection at a time: a group's product is
its members' products side by side, and the fused call adds each row's own experts to the right
columns. The Pallas backend runs interpreted on a CPU and natively on a GPU (the same bodies)."""

import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import PROMPTS, random_adapter

from lsjax import native
from lsjax.backends import resolve_backend
from lsjax.generate import Generator

BACKENDS = ["xla", "pallas"] + (["native", "hybrid"] if native.available() else [])
rng = np.random.default_rng(0)


def rand(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [1, 3])
def test_a_group_product_is_its_members_products_side_by_side(backend, rows):
    x, members = rand(rows, 48), [rand(48, 40), rand(48, 16), rand(48, 16)]  # q | k | v with grouped-query heads
    got = np.asarray(resolve_backend(backend)("qkv", jnp.asarray(x), jnp.asarray(np.concatenate(members, 1))))
    want = np.concatenate([x.astype(np.float64) @ w for w in members], 1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def fused_reference(x, members, a_by_member, b_by_member, ids, gates, adapted):
    """x @ [W_m ...] + for each adapted member m and chosen expert j: g * (x @ A_m[e]) @ B_m[e], in float64,
    one member at a time (a member without an adapter gets its plain product)."""
    out = []
    for m, w in enumerate(members):
        y = x.astype(np.float64) @ w
        if m in adapted:
            s = adapted.index(m)
            route = s if ids.shape[1] > 1 else 0
            for t in range(x.shape[0]):
                for j in range(ids.shape[2]):
                    e = ids[t, route, j]
                    y[t] += gates[t, route, j] * (x[t].astype(np.float64) @ a_by_member[s][e] @ b_by_member[s][e])
        out.append(y)
    return np.concatenate(out, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows, routes", [(1, 1), (3, 1), (3, 2)])
def test_fused_adds_each_rows_experts_to_its_members_columns(backend, rows, routes):
    """q and v adapted, k not (a gap in the group); experts stacked on a layer axis, layer 1 used;
    `routes` 1: one route for both members (switch), 2: a route each (layerwise)."""
    E, r, k, L = 4, 3, 2, 3
    x, members = rand(rows, 48), [rand(48, 40), rand(48, 16), rand(48, 16)]
    adapted = [0, 2]
    a_by_member = [rand(L, E, 48, r), rand(L, E, 48, r)]
    b_by_member = [rand(L, E, r, 40), rand(L, E, r, 16)]
    a = np.concatenate(a_by_member, -1)  # [L, E, d, 2r]
    b = np.concatenate(b_by_member, -1)  # [L, E, r, 40 + 16]
    ids = np.stack([np.stack([rng.permutation(E)[:k] for _ in range(routes)]) for _ in range(rows)]).astype(np.int32)
    gates = rng.uniform(0.2, 1.0, ids.shape).astype(np.float32)
    layout = ((0, 0, 40), (56, 40, 16))
    got = resolve_backend(backend).fused(jnp.asarray(x), jnp.asarray(np.concatenate(members, 1)), jnp.asarray(a),
                                         jnp.asarray(b), jnp.asarray(ids), jnp.asarray(gates), members=layout, layer=1)
    want = fused_reference(x, members, [m[1] for m in a_by_member], [m[1] for m in b_by_member], ids, gates, adapted)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_the_pallas_backend_decodes_the_tokens_xla_does(tiny_llama):
    """`fused` on the Pallas backend (interpreted here) gives the tokens of `unmerged` on XLA."""
    _, model, tok = tiny_llama
    adapter = random_adapter(model, "switch", num_experts=4, top_k=2)
    want = Generator(model, tok, adapter, strategy="unmerged", backend="xla").generate(
        PROMPTS[:2], max_new_tokens=4, stop_token_ids=()).token_ids
    pallas = Generator(model, tok, adapter, strategy="fused", backend="pallas")
    assert pallas.generate(PROMPTS[:2], max_new_tokens=4, stop_token_ids=()).token_ids == want
