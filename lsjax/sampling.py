"""Token sampling: greedy, temperature, top-k, top-p, as one pure function of traced values.

Every setting is a traced scalar, so changing temperature, top-k or top-p between calls never
recompiles; greedy is simply temperature 0. The sort that top-k/top-p need runs only when one of
them is active (a `lax.cond`), so plain temperature sampling and greedy skip it; greedy skips
the random draw too.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lsjax.validate import check, is_int, is_number


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; `seed` makes sampling repeatable."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check(is_number(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
              "a number >= 0 (0 = greedy)")
        check(is_int(self.top_k, 0), "top_k", self.top_k, "an integer >= 0 (0 = off)")
        check(is_number(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", self.top_p, "a number in (0, 1] (1 = off)")
        check(is_int(self.seed), "seed", self.seed, "an integer")

    def arrays(self) -> dict[str, jax.Array]:
        """The traced form `sample` takes."""
        return {"temperature": jnp.float32(self.temperature), "top_k": jnp.int32(self.top_k),
                "top_p": jnp.float32(self.top_p)}


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set to -inf every logit outside the top-k and outside the smallest nucleus of mass top_p."""
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, jnp.broadcast_to(k - 1, logits.shape[:-1] + (1,)), axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # the smallest logit still inside the nucleus: tokens whose preceding mass is below top_p
    inside = mass_before < top_p
    nucleus_min = jnp.min(jnp.where(inside, ordered, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(kth, nucleus_min)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """Next tokens `[B]` (int32) from fp32 logits `[B, V]`."""
    def greedy(logits, *_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits, key, temperature, top_k, top_p):
        filtered = jax.lax.cond((top_k > 0) | (top_p < 1.0), filter_logits, lambda x, *_: x, logits, top_k, top_p)
        return jax.random.categorical(key, filtered / temperature, axis=-1).astype(jnp.int32)

    # greedy decoding skips the random draw over the whole vocabulary
    return jax.lax.cond(temperature > 0, draw, greedy, logits.astype(jnp.float32), key, temperature, top_k, top_p)
