"""Every adapter method against an explicit per-token merged-weight forward written in numpy.

The reference runs the whole Llama in float64 numpy, one sequence at a time, one projection at a
time (no groups), and gives each token of each projection its own weight
W_eff[t] = W + sum over its chosen experts g * (alpha/r) * A @ B. Routes are recomputed here
(softmax -> top-k -> renormalise, stable ties), never taken from lsjax. Weights and experts are
drawn per projection; lsjax gets them in its grouped layout.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lsjax.adapters import (TRAINABLE, Adapter, AdaptedLlama, AdapterConfig, AdapterError, AdapterParam,
                            RouterParam, adapted_forward, adapted_forward_cached, grouped, project_hooks,
                            router_stats, top_k_route)
from lsjax.adapters.params import per_projection_shapes
from lsjax.adapters.routing import Computation, TermForm
from lsjax.config import ModelConfig
from lsjax.decode import forward_cached, init_cache
from lsjax.model import Llama, forward, from_projections, model_from_params

MC = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, rms_norm_eps=1e-5)
IDS = np.array([[5, 9, 17, 33, 2, 61, 40], [0, 0, 12, 7, 50, 3, 28]], np.int32)
MASK = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]], np.int32)  # row 1 left-padded
TOL = 1e-5
FFN = ("gate", "up", "down")


# -- fixtures -----------------------------------------------------------------------------------
def random_base(config: ModelConfig, seed: int = 0) -> dict:
    """One stacked array per projection (the reference's layout; `held` gives lsjax's)."""
    rng = np.random.default_rng(seed)
    L, d = config.num_layers, config.hidden_size
    layers = {p: rng.normal(0, 0.15, (L, *s)).astype(np.float32) for p, s in config.projection_shapes().items()}
    layers.update(attn_norm=(1 + 0.1 * rng.normal(size=(L, d))).astype(np.float32),
                  mlp_norm=(1 + 0.1 * rng.normal(size=(L, d))).astype(np.float32))
    params = {"embed": rng.normal(0, 1.0, (config.vocab_size, d)).astype(np.float32), "layers": layers,
              "norm": (1 + 0.1 * rng.normal(size=d)).astype(np.float32)}
    if not config.tie_word_embeddings:
        params["lm_head"] = rng.normal(0, 0.2, (d, config.vocab_size)).astype(np.float32)
    return params


def held(base: dict, config: ModelConfig = MC) -> dict:
    return from_projections(config, base)


def random_experts(config: AdapterConfig, seed: int = 1, b_std: float = 0.1, router_std: float = 1.0,
                   mc: ModelConfig = MC) -> dict:
    """Per-projection adapter arrays (the reference's layout) with B nonzero and routers strong
    enough that routes are far from ties."""
    shapes = per_projection_shapes(mc, config)
    rng = np.random.default_rng(seed)

    def rand(shape, std):
        return rng.normal(0, std, shape).astype(np.float32) if std else np.zeros(shape, np.float32)

    return {"experts": {p: {"a": rand(e["a"], 0.1), "b": rand(e["b"], b_std)} for p, e in shapes["experts"].items()},
            "routers": {n: rand(r, router_std) for n, r in shapes["routers"].items()}}


def random_adapter(config: AdapterConfig, seed: int = 1, b_std: float = 0.1, router_std: float = 1.0) -> dict:
    """`random_experts` in lsjax's grouped layout."""
    return grouped(MC, config, random_experts(config, seed, b_std, router_std))


@pytest.fixture(scope="module")
def base():
    return random_base(MC)


@pytest.fixture(scope="module")
def run():
    return jax.jit(adapted_forward, static_argnums=(0, 2), static_argnames=("form",))


# -- the numpy reference ------------------------------------------------------------------------
def np_rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos[:, None] + rot * sin[:, None]


def np_route(h, w, k, mixture):
    """(experts, gates) of one token: softmax over all E, then top-k renormalised (or all of it)."""
    logits = h @ w
    p = np.exp(logits - logits.max())
    p /= p.sum()
    if mixture == "softmax":
        return np.arange(len(p)), p
    top = np.argsort(-p, kind="stable")[:k]
    return top, p[top] / p[top].sum()


def np_forward(mc, base, cfg, adapter, ids, mask, mixture="topk"):
    """Logits [B, S, V] (float64); padded positions are left at zero. `adapter` per projection."""
    base = jax.tree.map(lambda a: np.asarray(a, np.float64), base)
    adapter = jax.tree.map(lambda a: np.asarray(a, np.float64), adapter)
    lay, s = base["layers"], cfg.alpha / cfg.rank
    out = np.zeros((*ids.shape, mc.vocab_size))
    for row in range(ids.shape[0]):
        keep = mask[row].astype(bool)
        toks = ids[row][keep]
        n = len(toks)
        pos = np.arange(n, dtype=np.float64)
        x = base["embed"][toks]
        switch_route = [None] * n
        for layer in range(mc.num_layers):
            block_route = [None] * n

            def project(kind, h):
                w = lay[kind][layer]
                if kind == "gate" and cfg.method == "blockwise":
                    for t in range(n):
                        block_route[t] = np_route(h[t], adapter["routers"]["ffn"][layer], cfg.top_k, mixture)
                if kind not in cfg.targets:
                    return h @ w
                ys = []
                for t in range(n):
                    if cfg.method == "switch":
                        if switch_route[t] is None:  # the first adapted projection of layer 0
                            assert layer == 0
                            switch_route[t] = np_route(h[t], adapter["routers"]["switch"], cfg.top_k, mixture)
                        experts, gates = switch_route[t]
                    elif cfg.method == "layerwise":
                        experts, gates = np_route(h[t], adapter["routers"][kind][layer], cfg.top_k, mixture)
                    elif cfg.method == "blockwise" and kind in FFN:
                        experts, gates = block_route[t]
                    else:
                        experts, gates = [0], [1.0]
                    a, b = adapter["experts"][kind]["a"][layer], adapter["experts"][kind]["b"][layer]
                    w_eff = w + sum(g * s * a[e] @ b[e] for e, g in zip(experts, gates))
                    ys.append(h[t] @ w_eff)
                return np.stack(ys)

            h = np_rms(x, lay["attn_norm"][layer], mc.rms_norm_eps)
            q = project("q", h).reshape(n, mc.num_heads, mc.head_dim)
            k = project("k", h).reshape(n, mc.num_kv_heads, mc.head_dim)
            v = project("v", h).reshape(n, mc.num_kv_heads, mc.head_dim)
            q, k = np_rope(q, pos, mc.rope.theta), np_rope(k, pos, mc.rope.theta)
            group = mc.num_heads // mc.num_kv_heads
            attn = np.zeros((n, mc.num_heads, mc.head_dim))
            for hd in range(mc.num_heads):
                kh, vh = k[:, hd // group], v[:, hd // group]
                scores = q[:, hd] @ kh.T / np.sqrt(mc.head_dim)
                scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
                p = np.exp(scores - scores.max(-1, keepdims=True))
                attn[:, hd] = (p / p.sum(-1, keepdims=True)) @ vh
            x = x + project("o", attn.reshape(n, -1))
            h = np_rms(x, lay["mlp_norm"][layer], mc.rms_norm_eps)
            g = project("gate", h)
            x = x + project("down", g / (1 + np.exp(-g)) * project("up", h))
        h = np_rms(x, base["norm"], mc.rms_norm_eps)
        head = base["embed"].T if mc.tie_word_embeddings else base["lm_head"]
        out[row][keep] = h @ head
    return out


def max_diff(got, want, mask=MASK):
    keep = np.asarray(mask).astype(bool)
    return float(np.abs(np.asarray(got)[keep] - want[keep]).max())


# -- every method against the reference ---------------------------------------------------------
CASES = {
    "lora": dict(method="lora"),
    "switch": dict(method="switch", num_experts=4, top_k=2),
    "switch-ffn-only": dict(method="switch", num_experts=4, top_k=2, targets=FFN),
    "switch-o-first": dict(method="switch", num_experts=3, top_k=1, targets=("o", "up")),
    "switch-down-only": dict(method="switch", num_experts=4, top_k=3, targets=("down",)),
    "layerwise": dict(method="layerwise", num_experts=4, top_k=2),
    "layerwise-kv-up": dict(method="layerwise", num_experts=3, top_k=2, targets=("k", "v", "up")),
    "blockwise": dict(method="blockwise", num_experts=4, top_k=2),
    "blockwise-q-down": dict(method="blockwise", num_experts=4, top_k=2, targets=("q", "down")),
}
GATHERED, DENSE = TermForm(Computation.GATHERED), TermForm(Computation.DENSE)
METHODS = ("lora", "switch", "layerwise", "blockwise")  # the all-linear cases


def case_config(case: str, **changes) -> AdapterConfig:
    return AdapterConfig(rank=4, alpha=8.0, **{**CASES[case], **changes})


@pytest.mark.parametrize("case", list(CASES) + [f"{m}/dense" for m in METHODS])
def test_matches_per_token_merged_reference(base, run, case):
    case, _, dense = case.partition("/")
    cfg = case_config(case)
    experts = random_experts(cfg)
    adapter = grouped(MC, cfg, experts)
    logits, _ = run(MC, held(base), cfg, adapter, IDS, MASK, form=DENSE if dense else GATHERED)
    want = np_forward(MC, base, cfg, experts, IDS, MASK)
    assert max_diff(logits, want) <= TOL, case
    base_only = np_forward(MC, base, cfg, {**experts, "experts": jax.tree.map(np.zeros_like, experts["experts"])},
                           IDS, MASK)
    assert max_diff(logits, base_only) > 1e-2  # the adapter really changed the logits
    if dense:  # and the two computations agree with each other
        gathered, _ = run(MC, held(base), cfg, adapter, IDS, MASK, form=GATHERED)
        assert max_diff(logits, np.asarray(gathered)) <= TOL


def test_tied_embeddings_and_gqa_1(run):
    mc = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_layers=3, num_heads=4, num_kv_heads=1,
                     head_dim=8, tie_word_embeddings=True)
    base = random_base(mc, seed=3)
    cfg = AdapterConfig(method="switch", num_experts=4, top_k=2, rank=2, alpha=4.0)
    experts = random_experts(cfg, seed=0, router_std=0.1, mc=mc)
    logits, _ = run(mc, held(base, mc), cfg, grouped(mc, cfg, experts), IDS, MASK)
    assert max_diff(logits, np_forward(mc, base, cfg, experts, IDS, MASK)) <= TOL


@pytest.mark.parametrize("method", METHODS)
def test_zero_b_reproduces_base_exactly(base, run, method):
    cfg = case_config(method)
    adapter = random_adapter(cfg, b_std=0.0)
    logits, _ = run(MC, held(base), cfg, adapter, IDS, MASK)
    want = jax.jit(forward, static_argnums=0)(MC, held(base), IDS, MASK)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(want))


@pytest.mark.parametrize("method", ["switch", "layerwise", "blockwise"])
def test_top_k_all_is_the_dense_softmax_mixture(base, run, method):
    cfg = AdapterConfig(method=method, num_experts=3, top_k=3, rank=4)
    experts = random_experts(cfg, seed=5, router_std=0.5)
    logits, _ = run(MC, held(base), cfg, grouped(MC, cfg, experts), IDS, MASK, form=GATHERED)
    assert max_diff(logits, np_forward(MC, base, cfg, experts, IDS, MASK, mixture="softmax")) <= TOL


# -- routes are data, not call order ------------------------------------------------------------
def parallel_layer(mlp_first: bool):
    """A parallel-residual decoder layer (attention and FFN both read the block's input, as in
    GPT-J or Cohere), written on the `Products` protocol: its products can run in either order."""
    from lsjax.model import apply_rope, attention, kv_rows, rms_norm

    def layer(config, w, x, cos, sin, mask, products, kv=None):
        assert kv is None
        stats = {}

        def product(group, x, block=None):
            route, stats[group] = products.route(group, x, block)
            return products(group, x, w[group], route), route

        def attn_half():
            b, s, _ = x.shape
            h = rms_norm(x, w["attn_norm"], config.rms_norm_eps)
            qkv, _ = product("qkv", h)
            q, k, v = jnp.split(qkv, [config.q_size, config.q_size + config.kv_size], axis=-1)
            q = apply_rope(q.reshape(b, s, config.num_heads, config.head_dim), cos, sin)
            k = kv_rows(apply_rope(k.reshape(b, s, config.num_kv_heads, config.head_dim), cos, sin))
            v = kv_rows(v.reshape(b, s, config.num_kv_heads, config.head_dim))
            return product("o", attention(q, k, v, mask).reshape(b, s, config.q_size))[0]

        def mlp_half():
            h = rms_norm(x, w["mlp_norm"], config.rms_norm_eps)
            gate_up, block = product("gate_up", h)
            gate, up = jnp.split(gate_up, 2, axis=-1)
            return product("down", jax.nn.silu(gate) * up, block)[0]

        if mlp_first:
            mlp = mlp_half()
            attn = attn_half()
        else:
            attn = attn_half()
            mlp = mlp_half()
        return x + attn + mlp, None, stats
    return layer


@pytest.mark.parametrize("method", ["switch", "layerwise", "blockwise"])
def test_reordered_products_keep_routes_and_logits(base, method, monkeypatch):
    """The same layer with its products called in the other order routes every token alike and
    gives the same logits and router statistics: no route depends on which product ran first."""
    import lsjax.adapters.methods as methods

    cfg = case_config(method)
    adapter = random_adapter(cfg)
    results = []
    for mlp_first in (False, True):
        monkeypatch.setattr(methods, "decoder_layer", parallel_layer(mlp_first))
        logits, aux = adapted_forward(MC, held(base), cfg, adapter, IDS, MASK)
        results.append((np.asarray(logits), jax.tree.map(np.asarray, aux)))
    (logits, aux), (again, aux_again) = results
    np.testing.assert_array_equal(again, logits)
    for got, want in zip(jax.tree.leaves(aux_again), jax.tree.leaves(aux)):
        np.testing.assert_array_equal(got, want)
    if method == "switch":  # the route of the qkv-first switch: layer 0's attention input, whatever ran first
        h = np_rms(np.asarray(base["embed"], np.float64)[IDS], base["layers"]["attn_norm"][0], MC.rms_norm_eps)
        want = np.argsort(-(h @ adapter["routers"]["switch"]), axis=-1, kind="stable")[..., :cfg.top_k]
        np.testing.assert_array_equal(np.asarray(aux.routing.ids)[MASK.astype(bool)], want[MASK.astype(bool)])


# -- aux loss -----------------------------------------------------------------------------------
def test_switch_aux_matches_numpy_over_valid_tokens(base, run):
    cfg = AdapterConfig(method="switch", num_experts=4, top_k=2, rank=4, targets=("q", "v"),
                        router={"aux_loss_coef": 0.5, "z_loss_coef": 0.25})
    adapter = random_adapter(cfg)
    _, aux = run(MC, held(base), cfg, adapter, IDS, MASK)
    w = adapter["routers"]["switch"].astype(np.float64)
    lay = base["layers"]
    probs, chosen, z = [], [], []
    for row in range(2):
        x = base["embed"][IDS[row][MASK[row].astype(bool)]].astype(np.float64)
        logits = np_rms(x, lay["attn_norm"][0].astype(np.float64), MC.rms_norm_eps) @ w
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        probs.append(p)
        chosen.append(np.argsort(-p, axis=-1, kind="stable")[:, :2])
        z.append(np.log(np.exp(logits).sum(-1)) ** 2)
    probs, chosen, z = np.concatenate(probs), np.concatenate(chosen), np.concatenate(z)
    f = np.bincount(chosen.ravel(), minlength=4) / chosen.size
    lb = 4 * np.sum(f * probs.mean(0))
    np.testing.assert_allclose(aux.load, f, atol=1e-6)
    np.testing.assert_allclose(aux.load_balance, lb, rtol=1e-5)
    np.testing.assert_allclose(aux.z_loss, z.mean(), rtol=1e-5)
    np.testing.assert_allclose(aux.entropy, -(probs * np.log(probs)).sum(-1).mean(), rtol=1e-5)
    np.testing.assert_allclose(aux.loss, 0.5 * lb + 0.25 * z.mean(), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux.routing.ids)[MASK.astype(bool)], chosen)


def test_load_balance_is_one_when_uniform_and_larger_when_skewed():
    E, T = 4, 8

    def lb(logits, valid=np.ones((1, T), bool)):
        logits = jnp.asarray(logits, jnp.float32)
        route, probs = top_k_route(logits, 2)
        return float(router_stats(logits, probs, route.ids, valid).load_balance)

    assert lb(np.zeros((1, T, E))) == pytest.approx(1.0, abs=1e-6)  # uniform probabilities
    first, second = np.arange(T) % E, (np.arange(T) + 1) % E  # confident, but spread evenly
    balanced = 20.0 * np.eye(E)[first] + 19.0 * np.eye(E)[second]
    assert lb(balanced[None]) == pytest.approx(1.0, abs=1e-3)
    skewed = np.random.default_rng(0).normal(0, 0.1, (1, T, E))
    skewed[..., 0] += 4.0
    assert lb(skewed) > 1.5
    valid = np.arange(T)[None] < 6
    padded = skewed.copy()
    padded[0, 6:] = [[0, 0, 0, 90], [0, 0, 90, 0]]  # padding with extreme logits must not count
    assert lb(padded, valid) == pytest.approx(lb(skewed[:, :6], valid[:, :6]), rel=1e-6)


@pytest.mark.parametrize("method", ["switch", "layerwise", "blockwise"])
def test_zero_router_gives_uniform_probs_and_unit_aux(base, run, method):
    cfg = case_config(method)
    _, aux = run(MC, held(base), cfg, random_adapter(cfg, router_std=0.0), IDS, MASK)
    assert float(aux.load_balance) == pytest.approx(1.0, abs=1e-6)
    assert float(aux.entropy) == pytest.approx(np.log(4), abs=1e-5)


# -- compile once, gradients --------------------------------------------------------------------
def test_routed_forward_compiles_once_per_shape(base):
    traces = []

    def counted(*args):
        traces.append(1)
        return adapted_forward(*args)

    run = jax.jit(counted, static_argnums=(0, 2))
    cfg = AdapterConfig(method="switch", num_experts=4, top_k=2, rank=4)
    base, ids, mask = jax.tree.map(jnp.asarray, (held(base), IDS, MASK))
    routes = set()
    for seed in range(4):  # new experts, new router -> new routes and gates, same shapes
        adapter = jax.tree.map(jnp.asarray, random_adapter(cfg, seed=seed))
        logits, aux = run(MC, base, cfg, adapter, ids, mask)
        routes.add(np.asarray(aux.routing.ids).tobytes())
    assert len(routes) > 1
    assert len(traces) == 1 and run._cache_size() == 1
    # a loaded adapter (jax arrays from an Adapter module) is the same shape too
    run(MC, base, cfg, Adapter(MC, cfg, rngs=nnx.Rngs(3)).arrays(), ids, mask)
    assert len(traces) == 1 and run._cache_size() == 1


@pytest.mark.parametrize("method", ["switch", "blockwise"])
def test_gradients_reach_only_adapter_and_router_params(base, method):
    cfg = AdapterConfig(method=method, num_experts=4, top_k=2, rank=4, dropout=0.1,
                        router={"jitter": 0.01, "z_loss_coef": 1e-3})
    model = AdaptedLlama(model_from_params(MC, jax.tree.map(jnp.asarray, held(base))),
                         Adapter(MC, cfg, rngs=nnx.Rngs(0)))
    model.adapter.load_arrays(random_adapter(cfg))  # B != 0, or A's gradient would be zero
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    def loss_fn(model):
        logits, aux = model(IDS, MASK, rng=jax.random.key(0), train=True)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3]) + aux.loss

    grads = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE)))(model)
    leaves = nnx.to_flat_state(grads)
    kinds = {type(v) for _, v in leaves}
    assert kinds <= {AdapterParam, RouterParam} and AdapterParam in kinds
    assert RouterParam in kinds
    want = {path for path, _ in nnx.to_flat_state(nnx.state(model, TRAINABLE))}
    assert {path for path, _ in leaves} == want
    for path, v in leaves:
        assert np.abs(np.asarray(v[...])).max() > 0, path
    assert not any(isinstance(v, nnx.Param) for _, v in leaves)

    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=TRAINABLE)
    optimizer.update(model, grads)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    jax.tree.map(np.testing.assert_array_equal, after, before)  # base weights untouched


def test_train_mode_needs_rng_and_dropout_changes_output(base, run):
    cfg = AdapterConfig(method="lora", dropout=0.5)
    adapter = random_adapter(cfg)
    with pytest.raises(AdapterError, match="needs rng"):
        adapted_forward(MC, held(base), cfg, adapter, IDS, MASK, train=True)
    evaluated, _ = run(MC, held(base), cfg, adapter, IDS, MASK)
    trained, _ = adapted_forward(MC, held(base), cfg, adapter, IDS, MASK, rng=jax.random.key(1), train=True)
    assert max_diff(trained, np.asarray(evaluated)) > 1e-3


# -- decoding through the KV cache --------------------------------------------------------------
@pytest.mark.parametrize("method", ["switch", "blockwise"])
def test_cached_prefill_and_decode_match_full_forward(base, run, method):
    cfg = AdapterConfig(method=method, num_experts=4, top_k=2, rank=4,
                        targets=FFN if method == "switch" else "all-linear")
    adapter = random_adapter(cfg)
    full, _ = run(MC, held(base), cfg, adapter, IDS, MASK)
    traces = []

    def counted(*args):
        traces.append(1)
        return adapted_forward_cached(*args)

    step = jax.jit(counted, static_argnums=(0, 2))
    cache = init_cache(MC, 2, IDS.shape[1])
    prompt = 4
    pos = np.maximum(np.cumsum(MASK, 1) - 1, 0)
    logits, cache, _ = step(MC, held(base), cfg, adapter, IDS[:, :prompt], MASK[:, :prompt], pos[:, :prompt], cache)
    got = [np.asarray(logits)]
    for t in range(prompt, IDS.shape[1]):
        logits, cache, _ = step(MC, held(base), cfg, adapter, IDS[:, t:t + 1], MASK[:, t:t + 1], pos[:, t:t + 1], cache)
        got.append(np.asarray(logits))
    assert max_diff(np.concatenate(got, 1), np.asarray(full)) <= TOL
    assert len(traces) == 2  # one prefill shape, one decode-step shape


def test_hooks_run_through_model_forward_and_decode_forward_cached(base, run):
    cfg = AdapterConfig(method="layerwise", num_experts=4, top_k=2, rank=4)
    adapter = random_adapter(cfg)
    want, _ = run(MC, held(base), cfg, adapter, IDS, MASK)
    factory, extras = project_hooks(MC, cfg, adapter)
    got = forward(MC, held(base), IDS, MASK, products=factory, layer_extras=extras)
    assert max_diff(got, np.asarray(want)) <= TOL
    pos = np.maximum(np.cumsum(MASK, 1) - 1, 0)
    cached, _ = forward_cached(MC, held(base), IDS, MASK, pos, init_cache(MC, 2, 8), factory, extras)
    assert max_diff(cached, np.asarray(want)) <= TOL

    cfg = AdapterConfig(method="switch", num_experts=4, top_k=2, rank=4, targets=FFN)
    adapter = random_adapter(cfg)
    want, aux = run(MC, held(base), cfg, adapter, IDS, MASK)
    factory, extras = project_hooks(MC, cfg, adapter, route=aux.routing)  # decided once, reused
    got = forward(MC, held(base), IDS, MASK, products=factory, layer_extras=extras)
    assert max_diff(got, np.asarray(want)) <= TOL
    with pytest.raises(AdapterError, match="needs route="):
        project_hooks(MC, cfg, adapter)


def test_adapted_llama_module_matches_the_numpy_reference(base):
    cfg = AdapterConfig(method="blockwise", num_experts=4, top_k=2, rank=4)
    llama = model_from_params(MC, jax.tree.map(jnp.asarray, held(base)))
    model = AdaptedLlama.create(llama, cfg, rngs=nnx.Rngs(0))
    experts = random_experts(cfg)
    model.adapter.load_arrays(grouped(MC, cfg, experts))
    got, _ = model(IDS, MASK)
    assert max_diff(got, np_forward(MC, base, cfg, experts, IDS, MASK)) <= TOL
    other = ModelConfig(**{**MC.to_dict(), "rope": MC.rope, "num_layers": 3})
    with pytest.raises(AdapterError, match="built for"):
        AdaptedLlama(Llama(other, rngs=nnx.Rngs(0)), model.adapter)
