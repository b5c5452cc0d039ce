"""`Layers`: one pytree per decoder layer, held in a declared layout.

Two layouts, each where it is measured faster:
- stacked: one pytree whose leaves are `[L, ...]` arrays. A `lax.scan` runs the layers, so compile
  time stays flat in depth: full-sequence forwards (training, scoring) and the `merged` switch
  step, whose all-layer merge reads a group's weights as one array.
- per layer: a tuple of L pytrees, each layer's own buffers. A decode step loops over them in
  Python and reads every weight in place and updates every cache buffer in place (XLA:CPU copies
  a slice of a stacked weight before a product, and a stacked cache restacked per step is a copy
  of the whole cache; docs/perf.md).

The layout is a static field, never read off a container's type. `Layers` is a pytree node whose
children are the per-name stacks or the per-layer trees (paths `layers/qkv` or `layers/3/qkv`), so
`jax.tree.map`, sharding rules and jit see the arrays themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Layers:
    """`tree`: stacked, a pytree of `[L, ...]` leaves; per layer, a tuple of L pytrees alike.

    Build with `Layers.of_stacked(tree)` or `Layers.of_layers(trees)`.
    """

    tree: Any
    stacked: bool

    @classmethod
    def of_stacked(cls, tree: Any) -> "Layers":
        return cls(tree, True)

    @classmethod
    def of_layers(cls, trees) -> "Layers":
        return cls(tuple(trees), False)

    @property
    def count(self) -> int:
        """L, the number of layers."""
        if self.stacked:
            return jax.tree.leaves(self.tree)[0].shape[0]
        return len(self.tree)

    def layer(self, index: int | jax.Array) -> Any:
        """Layer `index`'s pytree: its own (per layer) or a slice of every stack (static index: a
        static slice; a traced one inside a scan)."""
        if self.stacked:
            return jax.tree.map(lambda a: a[index], self.tree)
        return self.tree[index]

    def as_stacked(self) -> "Layers":
        """The stacked layout (a copy of every array when per layer)."""
        if self.stacked:
            return self
        return Layers.of_stacked(jax.tree.map(lambda *a: jnp.stack(a), *self.tree))

    def as_layers(self) -> "Layers":
        """The per-layer layout (static slices of the stacks when stacked)."""
        if not self.stacked:
            return self
        return Layers.of_layers(self.layer(i) for i in range(self.count))

    def in_layout_of(self, other: "Layers") -> "Layers":
        return self.as_stacked() if other.stacked else self.as_layers()

    def item(self, index: int) -> "Layers":
        """Item `index` of every layer's tuple, as its own `Layers` (e.g. `k` of per-layer `(k, v)`)."""
        if self.stacked:
            return Layers(self.tree[index], True)
        return Layers.of_layers(t[index] for t in self.tree)


def _flatten_with_keys(layers: Layers):
    if layers.stacked and isinstance(layers.tree, dict):  # named stacks: paths `layers/qkv`
        names = tuple(sorted(layers.tree))
        return [(jax.tree_util.DictKey(n), layers.tree[n]) for n in names], (True, names)
    if layers.stacked:
        return [(jax.tree_util.GetAttrKey("tree"), layers.tree)], (True, None)
    return [(jax.tree_util.SequenceKey(i), t) for i, t in enumerate(layers.tree)], (False, len(layers.tree))


def _unflatten(aux, children) -> Layers:
    stacked, names = aux
    if stacked and names is not None:
        return Layers(dict(zip(names, children)), True)
    if stacked:
        return Layers(children[0], True)
    return Layers(tuple(children), False)


def _flatten(layers: Layers):
    keyed, aux = _flatten_with_keys(layers)
    return [child for _, child in keyed], aux


jax.tree_util.register_pytree_with_keys(Layers, _flatten_with_keys, _unflatten, _flatten)


def run_layers(body: Callable, carry: Any, layers: Layers, xs: tuple[Layers | None, ...] = ()):
    """`body(carry, (index, weights, xs_slices)) -> (carry, ys)` over every layer; returns
    `(carry, Layers of ys)` in the layout of `layers`.

    Stacked: one `lax.scan` (`index` traced; an `xs` held per layer is stacked first). Per layer: a
    Python loop, `index` a static int, each layer's own arrays (an `xs` stacked is sliced statically).
    """
    if layers.stacked:
        stacked_xs = tuple(None if x is None else x.as_stacked().tree for x in xs)
        index = jnp.arange(layers.count, dtype=jnp.int32)
        carry, ys = jax.lax.scan(body, carry, (index, layers.tree, stacked_xs))
        return carry, Layers.of_stacked(ys)
    ys = []
    for index, weights in enumerate(layers.tree):
        carry, y = body(carry, (index, weights, tuple(None if x is None else x.layer(index) for x in xs)))
        ys.append(y)
    return carry, Layers.of_layers(ys)
