"""Routers and routed LoRA terms: pure functions shared by training, prefill and decoding.

A route is per token: `ids [B, S, k]` (int32 expert indices) and `gates [B, S, k]` (fp32, softmax
over all E experts in fp32, top-k, renormalised to sum to 1; alpha/r is NOT folded in, so the
same route serves every projection whatever its scale).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Routing:
    ids: jax.Array    # [B, S, k] int32
    gates: jax.Array  # [B, S, k] float32, rows sum to 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RouterStats:
    """Statistics of one router over the valid (non-padding) tokens."""

    load_balance: jax.Array  # E * sum_e f_e * P_e; 1.0 when P or f is uniform
    z_loss: jax.Array        # mean logsumexp(logits)^2
    entropy: jax.Array       # mean entropy of the full softmax (nats)
    load: jax.Array          # [E] f_e: share of the top-k assignments given to expert e (sums to 1)


def router_logits(x: jax.Array, weight: jax.Array, jitter: float = 0.0, key: jax.Array | None = None) -> jax.Array:
    """fp32 logits `[B, S, E]`; with `key`, the input is jittered by U(1 - jitter, 1 + jitter)."""
    x = x.astype(jnp.float32)
    if key is not None and jitter > 0:
        x = x * jax.random.uniform(key, x.shape, jnp.float32, 1.0 - jitter, 1.0 + jitter)
    return jnp.einsum("bsd,de->bse", x, weight.astype(jnp.float32), preferred_element_type=jnp.float32)


def top_k_route(logits: jax.Array, k: int) -> tuple[Routing, jax.Array]:
    """Softmax over all experts (fp32) -> top-k -> renormalise. Returns the route and the probs."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, ids = jax.lax.top_k(probs, k)
    return Routing(ids.astype(jnp.int32), top / jnp.sum(top, axis=-1, keepdims=True)), probs


def router_stats(logits: jax.Array, probs: jax.Array, ids: jax.Array, valid: jax.Array) -> RouterStats:
    """Switch/Mixtral load balance E * sum_e f_e P_e, z-loss, load and entropy, padding masked."""
    num_experts, k = probs.shape[-1], ids.shape[-1]
    w = valid.astype(jnp.float32)[..., None]
    n = jnp.maximum(jnp.sum(w), 1.0)
    assigned = jnp.sum(jax.nn.one_hot(ids, num_experts, dtype=jnp.float32), axis=-2)  # [B, S, E]
    load = jnp.sum(assigned * w, axis=(0, 1)) / (n * k)
    mean_probs = jnp.sum(probs * w, axis=(0, 1)) / n
    z = jax.nn.logsumexp(logits, axis=-1)
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
    return RouterStats(load_balance=num_experts * jnp.sum(load * mean_probs),
                       z_loss=jnp.sum(z * z * w[..., 0]) / n,
                       entropy=jnp.sum(entropy * w[..., 0]) / n,
                       load=load)


def dense_gates(route: Routing, num_experts: int) -> jax.Array:
    """The route as `[B, S, E]` weights: the gate of each chosen expert, zero elsewhere."""
    return jnp.sum(jax.nn.one_hot(route.ids, num_experts, dtype=route.gates.dtype) * route.gates[..., None], axis=-2)


def lora_term(x: jax.Array, a: jax.Array, b: jax.Array, route: Routing | None, scale: float,
              computation: str = "gathered") -> jax.Array:
    """scale * sum_k g_k (x @ A[id_k]) @ B[id_k] for `x [B, S, d_in]`, `a [E, d_in, r]`, `b [E, r, d_out]`.

    route None: the single expert with gate 1 (plain LoRA). `gathered` reads only the k chosen
    experts per token (decode); `dense` runs every expert and masks with the gates (prefill,
    training: no `[B, S, k, d_in, r]` gather).
    """
    if route is None:
        return scale * ((x @ a[0]) @ b[0])
    gates = (scale * route.gates).astype(x.dtype)
    if computation == "gathered":
        xa = jnp.einsum("bsd,bskdr->bskr", x, a[route.ids])
        return jnp.einsum("bskr,bskro->bso", xa * gates[..., None], b[route.ids])
    xa = jnp.einsum("bsd,edr->bser", x, a)
    weights = dense_gates(Routing(route.ids, gates), a.shape[0])
    return jnp.einsum("bser,ero->bso", xa * weights[..., None], b)
