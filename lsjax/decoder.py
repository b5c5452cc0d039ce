"""The decode API that both drivers use: `lsjax.generate.Generator` (batches, an on-device loop) and
`lsjax.serve.Engine` (continuous batching over slots).

    decoder = Decoder(model, adapter, strategy="auto", backend="auto", rows=2)
    cache = decoder.empty_cache(rows=2, capacity=128)       # the decode state: a KVCache
    logits, cache = decoder.prefill(ids, mask, cache)       # left-padded prompts [rows, S] in
    logits, cache = decoder.step(tokens, cache)             # one token per row [rows]
    slots = decoder.insert(slots, cache, slot, row)         # a prefilled row into a slot of another state

A `Decoder` resolves the backend and the strategy once, holds the arrays they decode from (the
model's and the adapter's own: no copy, except where a `merged` strategy needs weights of its own),
and states what the strategy allows (`max_rows`, checked by `check_rows`). Its `prefill_fn` and
`step_fn` are the strategy's functions of `(bundle, ...)`, jitted once per configuration and shared
by every Decoder of it, for drivers that compose them into their own jitted loops; `prefill`,
`step` and `insert` call them on this decoder's arrays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lsjax import autotune, strategies
from lsjax.adapters import AdapterError
from lsjax.backend_interface import Backend
from lsjax.decode import KVCache, cache_shardings, init_cache, pinned
from lsjax.errors import ConfigError
from lsjax.layers import Layers


class Decoder:
    """What decoding a model (+ adapter) needs, resolved once; see the module docstring.

    `backend` / `strategy` "auto" (or None for the backend) is chosen by `lsjax.autotune`: the
    candidates timed on this machine at `rows` rows (the batch the auto choice is tuned for: a
    Generator's batch, a serving engine's slots) the first time, then read from its cache file.
    A backend or strategy given explicitly always wins.

    `adapter` may be an `lsjax.adapters.table.AdapterTable`: then each row of a state decodes with
    its own adapter of the table (`with_adapters`), and `refresh` picks up loads and unloads.

    Attributes: `config` (ModelConfig), `adapter_config` (None without an adapter), `backend`,
    `strategy` (resolved: "base" without an adapter), `tuning` (the `autotune.Choice` behind an
    auto choice; None when both were given or nothing could be timed), `bundle` (the arrays
    decoded from), `prepared` (what the backend did to place them), `max_rows` (the most rows one
    step may hold: 1 for the `merged` switch, whose step merges one route into the weights; else None).
    """

    def __init__(self, model, adapter=None, *, strategy: str = "auto", backend: Backend | str | None = None,
                 rows: int = 1):
        self.config, self.dtype = model.config, model.dtype
        self.adapter_config = None
        self.table = adapter if adapter is not None and adapter.per_row else None
        if adapter is not None:
            if adapter.model_config != model.config:
                raise AdapterError(f"adapter was made for another base model: {adapter.model_config.shape_summary()} "
                                   f"vs this model's {model.config.shape_summary()}")
            self.adapter_config = adapter.config
        params = model.params()
        self.backend, self.strategy, self.tuning = autotune.resolve(Decoder, model, adapter, rows, backend, strategy)
        if self.table is not None and self.strategy == strategies.Strategy.MERGED:
            raise ConfigError("strategy 'merged' merges one route into the weights; an adapter table routes every row "
                              "within its own adapter: use 'fused', 'unmerged' or 'auto'", "strategy")
        one_route = self.strategy == strategies.Strategy.MERGED and self.adapter_config.method == "switch"
        self.max_rows = 1 if one_route else None
        adapter_params = None if adapter is None else adapter.arrays()
        self.bundle = strategies.prepare_bundle(self.config, params, self.adapter_config, adapter_params,
                                                self.strategy)
        if self.table is not None:
            self.bundle["slots"] = self.table.slot_arrays()
        self.prepared = self.backend.prepare(self.bundle)
        self.prefill_fn, self.step_fn = strategies.compiled(self.config, self.adapter_config, self.strategy,
                                                            self.backend)
        devices = {d for x in jax.tree.leaves(self.bundle) for d in x.devices()}
        self.device = devices.pop() if len(devices) == 1 else None
        self.mesh = None if self.device is not None else _mesh_of(self.bundle)  # where a sharded state lives

    def check_rows(self, rows: int, what: str, field: str | None = None) -> None:
        """Refuse `rows` rows (of `what`: a batch, slots) where the strategy decodes fewer."""
        if self.max_rows is not None and rows > self.max_rows:
            raise ConfigError(f"strategy 'merged' with a switch adapter decodes one sequence at a time (one route "
                              f"per token), got {what} of {rows}; use strategy 'fused' or 'unmerged'", field)

    def empty_cache(self, rows: int, capacity: int, row_lengths: bool = False) -> KVCache:
        """An empty decode state for `rows` rows of `capacity` columns, in the layout the bundle's
        layers take; with `row_lengths`, each row keeps its own length (a serving engine's slots)."""
        cache = init_cache(self.config, rows, capacity, self.dtype, stacked=self.bundle["base"]["layers"].stacked)
        if row_lengths:
            cache = dataclasses.replace(cache, length=jnp.zeros((rows,), jnp.int32))
        if self.table is not None:  # every row starts as a base row; `with_adapters` says otherwise
            cache = dataclasses.replace(cache, adapter=jnp.full((rows,), self.table.room.base_slot, jnp.int32))
        return self.place(cache)

    def place(self, tree):
        """`tree` (a decode state, or a row's adapter slots) on this decoder's device, or over its mesh
        (a state as `lsjax.decode.cache_shardings` says, anything else replicated)."""
        if self.mesh is None:
            return jax.device_put(tree, self.device)
        if isinstance(tree, KVCache):
            return jax.device_put(tree, cache_shardings(tree, self.mesh))
        return jax.device_put(tree, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

    def with_adapters(self, cache: KVCache, slots) -> KVCache:
        """`cache` whose rows decode with the table's adapters in `slots` `[rows]` (`AdapterTable.slot`)."""
        if self.table is None:
            raise ConfigError("this decoder has one adapter for every row; rows choose adapters only in an "
                              "AdapterTable")
        return dataclasses.replace(cache, adapter=self.place(jnp.asarray(slots, jnp.int32)))

    def refresh(self) -> None:
        """Read the table's arrays again after a load or unload (same shapes: nothing compiles). The
        bundle is replaced, not changed: a step already running keeps the arrays it was given."""
        self.bundle = {**self.bundle, "adapter": self.table.arrays(), "slots": self.table.slot_arrays()}

    def prefill(self, ids, mask, cache: KVCache):
        """`(logits [rows, V] of each prompt's last token, cache)`: left-padded prompts `[rows, S]` into
        `cache` (which may hold their start already); the cache is donated."""
        return self.prefill_fn(self.bundle, ids, mask, cache)

    def step(self, tokens, cache: KVCache):
        """`(logits [rows, V], cache)`: one token per row `[rows]` at each row's next position; donated cache."""
        return self.step_fn(self.bundle, tokens, cache)

    def insert(self, cache: KVCache, rows: KVCache, slot, row) -> KVCache:
        """Row `row` of a prefilled state copied into slot `slot` of `cache` (donated)."""
        return _insert(cache, rows, slot, row, self.mesh)

    def compile_count(self) -> int:
        return sum(f._cache_size() for f in (self.prefill_fn, self.step_fn))


def insert_row(cache: KVCache, rows: KVCache, slot, index, mesh=None) -> KVCache:
    """Row `index` of a prefilled group's cache copied into `slot` (its columns, positions, validity,
    length and adapter), kept where the cache lives over `mesh` (None: one device). Pure."""
    axis = 1 if cache.k.stacked else 0  # the row axis of [L, KV*B, T, D] or of each layer's [KV*B, T, D]

    def place(buf, row_buf):
        def by_head(x, rows):  # [.., KV*rows, ..] -> [.., KV, rows, ..]: a row's heads are `rows` apart
            return x.reshape(*x.shape[:axis], x.shape[axis] // rows, rows, *x.shape[axis + 1:])

        row = jax.lax.dynamic_slice_in_dim(by_head(row_buf, rows.positions.shape[0]), index, 1, axis + 1)
        return jax.lax.dynamic_update_slice_in_dim(by_head(buf, cache.positions.shape[0]), row, slot,
                                                   axis + 1).reshape(buf.shape)

    def each(mine: Layers, theirs: Layers) -> Layers:
        return Layers(jax.tree.map(place, mine.tree, theirs.in_layout_of(mine).tree), mine.stacked)

    adapter = None if cache.adapter is None else cache.adapter.at[slot].set(rows.adapter[index])
    placed = KVCache(each(cache.k, rows.k), each(cache.v, rows.v), cache.positions.at[slot].set(rows.positions[index]),
                     cache.valid.at[slot].set(rows.valid[index]), cache.length.at[slot].set(rows.length), adapter)
    return pinned(placed, mesh)


_insert = jax.jit(insert_row, donate_argnums=(0,), static_argnums=(4,))


def _mesh_of(tree) -> jax.sharding.Mesh | None:
    """The mesh that `tree`'s arrays are split over (None: none is)."""
    for x in jax.tree.leaves(tree):
        if isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh.size > 1:
            return x.sharding.mesh
    return None

