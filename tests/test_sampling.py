"""Sampling against a numpy oracle: which tokens survive top-k/top-p, and draw frequencies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsjax.errors import ConfigError
from lsjax.sampling import SamplingConfig, filter_logits, sample


def oracle_support(logits, top_k, top_p):
    order = np.argsort(-logits, kind="stable")
    keep = np.ones(len(logits), bool) if top_k == 0 else np.isin(np.arange(len(logits)), order[:top_k])
    probs = np.exp(logits[order] - logits.max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    nucleus = order[before < top_p]
    return keep & np.isin(np.arange(len(logits)), nucleus)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (7, 0.8), (3, 0.01)])
def test_filter_matches_oracle(top_k, top_p):
    logits = np.random.default_rng(top_k).normal(size=(4, 50)).astype(np.float32) * 3
    got = np.asarray(filter_logits(jnp.asarray(logits), jnp.int32(top_k), jnp.float32(top_p)))
    for row in range(4):
        assert np.array_equal(np.isfinite(got[row]), oracle_support(logits[row], top_k, top_p))


def test_greedy_and_sampling_frequencies():
    logits = jnp.log(jnp.array([[0.1, 0.6, 0.3, 0.0 + 1e-9]], jnp.float32))
    greedy = sample(logits, jax.random.key(0), jnp.float32(0), jnp.int32(0), jnp.float32(1))
    assert greedy.tolist() == [1]
    draw = jax.jit(jax.vmap(lambda k: sample(logits, k, jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0))[0]))
    counts = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(1), 20000))), minlength=4) / 20000
    assert np.abs(counts - [0.1, 0.6, 0.3, 0.0]).max() < 0.02
    draw_k2 = jax.jit(jax.vmap(lambda k: sample(logits, k, jnp.float32(1.0), jnp.int32(2), jnp.float32(1.0))[0]))
    counts = np.bincount(np.asarray(draw_k2(jax.random.split(jax.random.key(2), 20000))), minlength=4) / 20000
    assert np.abs(counts - [0.0, 2 / 3, 1 / 3, 0.0]).max() < 0.02


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), r"temperature=-0.1 is invalid; expected a number >= 0"),
    (dict(top_p=0.0), r"top_p=0.0 is invalid; expected a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 is invalid"),
    (dict(top_k=-1), r"top_k=-1 is invalid; expected an integer >= 0"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplingConfig(**kwargs)
