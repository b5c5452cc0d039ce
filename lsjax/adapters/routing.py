"""Routers and routed LoRA terms: pure functions shared by training, prefill and decoding.

A route is per token: `ids [B, S, k]` (int32 expert indices) and `gates [B, S, k]` (fp32, softmax
over all E experts in fp32, top-k, renormalised to sum to 1; alpha/r is NOT folded in, so the
same route serves every projection whatever its scale). A projection group's route has a member
axis, `[B, S, R, k]`: R = 1 when every member follows one route (switch, blockwise), R = the
group's adapted members when each has its own router (layerwise).

`group_term` is a group's routed LoRA term in XLA ops: one shrink (x against the members' A's,
stacked along the rank) and one expand (against their B's, side by side) per group, where
`lsjax.model`'s layers run one product per group. How it is formed (`TermForm`) is the caller's
decision: training and prefill take the default, a decode strategy decides per step
(`lsjax.strategies.term_form`); an adapter never carries it.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp
import numpy as np


class Computation(enum.StrEnum):
    """How a group's routed term is computed."""

    GATHERED = "gathered"  # only each row's k chosen experts: a gather, then small products (few rows)
    DENSE = "dense"  # every expert, masked by the gates: plain products, no gather (prefill, training, many rows)
    FUSED = "fused"  # one backend call computes x @ W and the term together (`lsjax.backends`)

    def __repr__(self) -> str:  # messages name the value, as a user writes it
        return repr(self.value)


@dataclasses.dataclass(frozen=True)
class TermForm:
    """How a forward forms every group's routed term (static under jit)."""

    computation: Computation = Computation.DENSE
    gather_once: bool = True  # gathered switch over split layers: chosen experts gathered once per step
    one_expand: bool = True  # few rows: unequal members expanded in one masked product, not one each


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
    """The route as `[..., E]` weights: the gate of each chosen expert, zero elsewhere."""
    return jnp.sum(jax.nn.one_hot(route.ids, num_experts, dtype=route.gates.dtype) * route.gates[..., None], axis=-2)


def member_route(route: Routing) -> Routing:
    """A token route `[B, S, k]` as a group route `[B, S, 1, k]` (one route for every member)."""
    return Routing(route.ids[..., None, :], route.gates[..., None, :])


def chosen_experts(a: jax.Array, b: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The experts a shared route picks, `a[..., ids, :, :]`: a `[..., E, d, R]` -> `[..., *ids.shape, d, R]`.

    With stacked `a [L, E, ...]` this is one gather for every layer (the switch route is the same
    in all of them); without the layer axis it is one layer's."""
    lead = a.ndim - 3
    take = lambda w: jnp.take(w, ids, axis=lead)  # noqa: E731
    return take(a), take(b)


EQUAL_WIDTH_ROWS = 16  # up to this many rows, unequal member widths expand in one product (decode)


def group_term(x: jax.Array, a: jax.Array, b: jax.Array, route: Routing | None, scale: float,
               members: tuple[tuple[int, int, int], ...], computation: Computation = Computation.GATHERED,
               chosen: tuple[jax.Array, jax.Array] | None = None, one_expand: bool = True) -> jax.Array:
    """A group's routed LoRA term `[..., Nb]` (the adapted members side by side, `place` puts them).

    x `[..., d_in]`; a `[E, d_in, S*r]`; b `[E, r, Nb]` (one layer, `lsjax.adapters.params`);
    route `[..., R, k]` or None (plain LoRA: expert 0, gate 1). `gathered` reads only the chosen
    experts (`chosen`: already gathered `(a[ids], b[ids])` for a shared route, e.g. once per step
    for all layers); `dense` runs every expert and masks with the gates (no gather: prefill,
    training, and decode from E / k rows on). `one_expand`: unequal members in one masked product
    for a few rows, else one product each (see `_expand`).
    """
    S = len(members)
    r = a.shape[-1] // S
    if route is None:
        xa = (x @ a[0]).reshape(*x.shape[:-1], 1, S, r) * scale
        return _expand(xa, b[:1], members, False, one_expand).astype(x.dtype)
    gates = (scale * route.gates).astype(x.dtype)
    if computation == Computation.DENSE:
        xa = jnp.einsum("...d,edR->...eR", x, a).reshape(*x.shape[:-1], a.shape[0], S, r)
        weights = jnp.swapaxes(dense_gates(Routing(route.ids, gates), a.shape[0]), -1, -2)  # [..., E, R]
        return _expand(xa * weights[..., None], b, members, False, one_expand).astype(x.dtype)
    if route.ids.shape[-2] == 1:  # one route for every member: one shrink, one expand
        a_sel, b_sel = chosen if chosen is not None else chosen_experts(a, b, route.ids[..., 0, :])
        xa = jnp.einsum("...d,...kdR->...kR", x, a_sel).reshape(*x.shape[:-1], -1, S, r)
        return _expand(xa * gates[..., 0, :, None, None], b_sel, members, True, one_expand).astype(x.dtype)
    terms = []  # a route per member (layerwise): each member reads its own chosen experts
    for s, (_, b_off, width) in enumerate(members):
        a_sel, b_sel = chosen_experts(a[..., s * r:(s + 1) * r], b[..., b_off:b_off + width], route.ids[..., s, :])
        xa = jnp.einsum("...d,...kdr->...kr", x, a_sel) * gates[..., s, :, None]
        terms.append(jnp.einsum("...kr,...krw->...w", xa, b_sel))
    return jnp.concatenate(terms, axis=-1).astype(x.dtype)


def _expand(xa: jax.Array, b: jax.Array, members, per_row: bool, one_expand: bool = True) -> jax.Array:
    """sum_j xa[..., j, s, :] @ b[j, :, member s's columns], for every member s, as `[..., Nb]`.

    xa `[..., J, S, r]` (gated); b `[..., J, r, Nb]` (per_row: each row its own experts) or
    `[J, r, Nb]`. For a few rows (decode) the members expand in one product: equal widths side by
    side batched over members, unequal ones (q|k|v with grouped-query attention) over every column
    masked to its member (S times a tiny product beats S dependent ones). For many rows (prefill,
    training) one product each, whose outputs land side by side with no transposed copies.
    """
    S, widths = xa.shape[-2], [m[2] for m in members]
    lead = "..." if per_row else ""
    rows = int(np.prod(xa.shape[:-3]))
    few = rows <= EQUAL_WIDTH_ROWS
    if few and len(set(widths)) == 1 and all(m[1] == s * widths[0] for s, m in enumerate(members)):
        wide = b.reshape(*b.shape[:-1], S, widths[0])
        out = jnp.einsum(f"...jsr,{lead}jrsw->...sw", xa, wide)
        return out.reshape(*out.shape[:-2], S * widths[0])
    if one_expand and few:
        mask = np.zeros((S, b.shape[-1]), np.float32)
        for s, (_, b_off, width) in enumerate(members):
            mask[s, b_off:b_off + width] = 1
        out = jnp.einsum(f"...jsr,{lead}jrn->...sn", xa, b)
        return jnp.sum(out * mask.astype(out.dtype), axis=-2)
    return jnp.concatenate([jnp.einsum(f"...jr,{lead}jrw->...w", xa[..., s, :], b[..., b_off:b_off + width])
                            for s, (_, b_off, width) in enumerate(members)], axis=-1)


def place(term: jax.Array, members, width: int) -> jax.Array:
    """The members' terms `[..., Nb]` at their columns of the group's output `[..., width]` (zeros elsewhere)."""
    if all(m[0] == m[1] for m in members) and term.shape[-1] == width:
        return term
    pieces, at = [], 0
    for w_off, b_off, w in members:
        if w_off > at:
            pieces.append(jnp.zeros((*term.shape[:-1], w_off - at), term.dtype))
        pieces.append(term[..., b_off:b_off + w])
        at = w_off + w
    if at < width:
        pieces.append(jnp.zeros((*term.shape[:-1], width - at), term.dtype))
    return jnp.concatenate(pieces, axis=-1)
