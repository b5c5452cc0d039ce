"""AdapterConfig: defaults, JSON round trip, and eager errors naming field, value and expectation."""

import json

import jax
import numpy as np
import pytest

from lsjax.adapters import (AdapterConfig, AdapterError, RouterConfig, adapter_shapes, check_params, grouped,
                            init_params, per_projection)
from lsjax.adapters.params import member_layout
from lsjax.config import ModelConfig
from lsjax.errors import ConfigError, LsjaxError

MC = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1,
                 head_dim=8)


def test_defaults_follow_the_method():
    assert (AdapterConfig().num_experts, AdapterConfig().top_k) == (8, 2)
    lora = AdapterConfig(method="lora")
    assert (lora.num_experts, lora.top_k, lora.targets) == (1, 1, ("q", "k", "v", "o", "gate", "up", "down"))
    assert AdapterConfig(method="switch", num_experts=1).top_k == 1
    assert AdapterConfig(targets=["down", "q"]).targets == ("q", "down")  # execution order
    assert AdapterConfig(rank=4, alpha=8).scale == 2.0


def test_json_round_trip():
    cfg = AdapterConfig(method="blockwise", num_experts=6, top_k=3, rank=4, alpha=12.0, dropout=0.05,
                        targets=("q", "gate", "down"), router=RouterConfig(jitter=0.01, z_loss_coef=1e-3),
                        init="gaussian")
    back = AdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and hash(back) == hash(cfg)


BAD = [
    (dict(method="moe"), "method='moe' is invalid; expected one of ('lora', 'switch', 'layerwise', 'blockwise')"),
    (dict(num_experts=4, top_k=5), "top_k=5 is invalid; expected an integer in [1, num_experts=4]"),
    (dict(top_k=0), "top_k=0 is invalid"),
    (dict(rank=0), "rank=0 is invalid; expected a positive integer"),
    (dict(rank=2.5), "rank=2.5 is invalid"),
    (dict(num_experts=0), "num_experts=0 is invalid; expected a positive integer"),
    (dict(method="lora", num_experts=4), "num_experts=4 is invalid; expected 1 for method 'lora'"),
    (dict(alpha=0), "alpha=0 is invalid; expected a positive number"),
    (dict(dropout=1.0), "dropout=1.0 is invalid; expected a number in [0, 1)"),
    (dict(targets=("q", "lm_head")), "targets='lm_head' is invalid; expected one of ('q', 'k', 'v', 'o', 'gate', "
                                     "'up', 'down') or 'all-linear'"),
    (dict(targets="everything"), "targets='everything' is invalid"),
    (dict(targets=()), "targets=() is invalid; expected a non-empty list"),
    (dict(method="blockwise", targets=("q", "v")), "targets=['q', 'v'] is invalid; expected at least one FFN "
                                                   "projection ('gate', 'up', 'down') for method 'blockwise'"),
    (dict(init="xavier"), "init='xavier' is invalid; expected one of ('kaiming', 'gaussian')"),
    (dict(router={"jitter": -0.1}), "router.jitter=-0.1 is invalid; expected a number >= 0"),
    (dict(router={"init_std": 0}), "router.init_std=0 is invalid; expected a positive number"),
    (dict(router={"aux_coef": 1}), "unknown router config field(s) ['aux_coef']"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_bad_config_names_field_value_and_expectation(kwargs, message):
    with pytest.raises(ConfigError) as err:
        AdapterConfig(**kwargs)
    assert message in str(err.value)
    assert isinstance(err.value, LsjaxError) and isinstance(err.value, ValueError)


def test_from_dict_refuses_unknown_fields():
    with pytest.raises(ConfigError, match=r"unknown adapter config field\(s\) \['experts'\]"):
        AdapterConfig.from_dict({"method": "switch", "experts": 8})


def test_adapter_shapes_per_method():
    """Experts per projection group (q|k|v, o, gate|up, down): A's of the adapted members side by side
    along the rank, B's side by side along the output. MC: d 16, q 16, k = v 8, intermediate 24."""
    shapes = adapter_shapes(MC, AdapterConfig(method="switch", num_experts=4, rank=2, targets=("gate", "down")))
    assert shapes == {"experts": {"gate_up": {"a": (2, 4, 16, 2), "b": (2, 4, 2, 24)},
                                  "down": {"a": (2, 4, 24, 2), "b": (2, 4, 2, 16)}},
                      "routers": {"switch": (16, 4)}}
    shapes = adapter_shapes(MC, AdapterConfig(method="switch", num_experts=4, rank=2))
    assert shapes["experts"] == {"qkv": {"a": (2, 4, 16, 6), "b": (2, 4, 2, 32)},
                                 "o": {"a": (2, 4, 16, 2), "b": (2, 4, 2, 16)},
                                 "gate_up": {"a": (2, 4, 16, 4), "b": (2, 4, 2, 48)},
                                 "down": {"a": (2, 4, 24, 2), "b": (2, 4, 2, 16)}}
    shapes = adapter_shapes(MC, AdapterConfig(method="switch", num_experts=4, rank=2, targets=("o",)))
    assert shapes["routers"] == {"switch": (16, 4)}  # o's input is num_heads * head_dim = 16
    shapes = adapter_shapes(MC, AdapterConfig(method="layerwise", num_experts=4, rank=2, targets=("k", "down")))
    assert shapes["routers"] == {"qkv": (2, 16, 4), "down": (2, 24, 4)}
    shapes = adapter_shapes(MC, AdapterConfig(method="layerwise", num_experts=4, rank=2, targets=("q", "v")))
    assert shapes["routers"] == {"qkv": (2, 16, 8)}  # q's router and v's side by side
    shapes = adapter_shapes(MC, AdapterConfig(method="blockwise", num_experts=4, rank=2, targets=("q", "up")))
    assert shapes["experts"]["qkv"]["a"] == (2, 1, 16, 2) and shapes["experts"]["gate_up"]["a"] == (2, 4, 16, 2)
    assert shapes["routers"] == {"ffn": (2, 16, 4)}
    assert adapter_shapes(MC, AdapterConfig(method="lora", rank=2, targets="v"))["routers"] == {}


def test_member_layout_places_each_adapted_member():
    """(column in the group's output, column in the group's B, width) of each adapted member."""
    q_and_v = AdapterConfig(method="switch", num_experts=4, rank=2, targets=("q", "v"))
    assert member_layout(MC, q_and_v, "qkv") == ((0, 0, 16), (24, 16, 8))  # k's 8 columns skipped in B
    assert member_layout(MC, AdapterConfig(method="lora"), "gate_up") == ((0, 0, 24), (24, 24, 24))
    assert member_layout(MC, AdapterConfig(method="lora", targets="up"), "gate_up") == ((24, 0, 24),)


def test_per_projection_and_grouped_layouts_round_trip():
    cfg = AdapterConfig(method="layerwise", num_experts=3, rank=2, targets=("q", "v", "up", "down"))
    params = init_params(MC, cfg, jax.random.key(0))
    params = jax.tree.map(lambda a: np.random.default_rng(0).normal(size=a.shape).astype(np.float32), params)
    per = per_projection(MC, cfg, params)
    assert set(per["experts"]) == {"q", "v", "up", "down"} and set(per["routers"]) == {"q", "v", "up", "down"}
    np.testing.assert_array_equal(per["experts"]["v"]["a"], params["experts"]["qkv"]["a"][..., 2:4])
    np.testing.assert_array_equal(per["experts"]["v"]["b"], params["experts"]["qkv"]["b"][..., 16:24])
    np.testing.assert_array_equal(per["routers"]["v"], params["routers"]["qkv"][..., 3:6])
    jax.tree.map(np.testing.assert_array_equal, grouped(MC, cfg, per), params)


def test_init_is_a_random_and_b_zero():
    cfg = AdapterConfig(method="layerwise", num_experts=3, rank=4, router={"init_std": 0.5})
    params = init_params(MC, cfg, jax.random.key(0))
    a, b = np.asarray(params["experts"]["qkv"]["a"]), np.asarray(params["experts"]["qkv"]["b"])
    assert np.all(b == 0) and np.abs(a).max() <= 1 / np.sqrt(16) and a.std() > 0.05
    assert abs(np.asarray(params["routers"]["qkv"]).std() - 0.5) < 0.1
    gauss = init_params(MC, cfg.replace(init="gaussian"), jax.random.key(0))
    assert abs(np.asarray(gauss["experts"]["down"]["a"]).std() - 1 / 4) < 0.05


def test_params_that_do_not_fit_the_config_are_refused():
    cfg = AdapterConfig(method="switch", num_experts=4, rank=2, targets=("q", "v"))
    params = init_params(MC, cfg, jax.random.key(0))
    with pytest.raises(AdapterError, match="missing 'routers/switch'"):
        check_params(MC, cfg, {**params, "routers": {}})
    with pytest.raises(AdapterError, match="unexpected 'experts/k/a'"):
        check_params(MC, cfg, {**params, "experts": {**params["experts"], "k": {"a": 0, "b": 0}}})
    bad = {**params, "experts": {"qkv": {"a": np.zeros((2, 4, 16, 3)), "b": params["experts"]["qkv"]["b"]}}}
    with pytest.raises(AdapterError, match=r"'experts/qkv/a' has shape \[2, 4, 16, 3\]; expected \[2, 4, 16, 4\]"):
        check_params(MC, cfg, bad)
