"""Many adapters in one decode batch: every row is routed within its own adapter's experts.

An `AdapterTable` holds the experts of every adapter it serves in one table per projection group,
in preallocated room (`TableRoom`): `adapters` slots of up to `experts` experts each, rank up to
`rank`, on the targets the room was made for. Slot s owns expert rows `[s*experts, (s+1)*experts)`
of each group's table; an adapter's rank columns past its own rank and the members it does not
target are zeros, so its term in the table is the term it makes alone. A switch adapter's router
sits in its slot's columns of one router `[d_in, adapters*experts]` (the rows share that one
product); plain LoRA is one expert with gate 1; a base row has an expert with scale 0.

Seen by the decode path the table is one switch adapter (`TableRoom.adapter_config`: all slots'
experts, the largest top-k, scale 1) whose route each row narrows (`RowChoice`): the experts its
adapter may choose, how many it keeps, its scale. A row's choice is read from the table's per-slot
arrays by the row's slot (`lsjax.decode.KVCache.adapter`), so loading or unloading an adapter
changes array values only, and no decode function compiles again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.adapters.config import AdapterConfig, Method, normalise_targets
from lsjax.adapters.errors import AdapterError
from lsjax.adapters.params import adapted_groups, adapted_members, group_experts, member_layout
from lsjax.adapters.routing import Routing
from lsjax.config import ModelConfig
from lsjax.sharding import adapter_shardings
from lsjax.validate import check, is_int

BATCHABLE = (Method.SWITCH, Method.LORA)  # routes decided once per token (or none): one table serves them


@dataclasses.dataclass(frozen=True)
class TableRoom:
    """The room a table preallocates (static: the decode functions compile for it once)."""

    adapters: int
    experts: int
    top_k: int
    rank: int
    targets: tuple[str, ...] | str = "all-linear"

    def __post_init__(self):
        check(is_int(self.adapters, 1), "max_adapters", self.adapters, "an integer >= 1")
        check(is_int(self.experts, 1), "max_experts", self.experts, "an integer >= 1")
        check(is_int(self.top_k, 1) and self.top_k <= self.experts, "top_k", self.top_k,
              f"an integer in [1, max_experts={self.experts}]")
        check(is_int(self.rank, 1), "max_lora_rank", self.rank, "an integer >= 1")
        object.__setattr__(self, "targets", normalise_targets(self.targets))

    @classmethod
    def fitting(cls, configs: list[AdapterConfig], adapters: int | None = None, *, experts: int | None = None,
                rank: int | None = None) -> "TableRoom":
        """Room for `configs` (and `adapters` slots, default as many as there are): the largest expert
        count, top-k and rank among them (or those given) on the union of their targets."""
        targets = tuple(dict.fromkeys(t for c in configs for t in c.targets)) or "all-linear"
        experts = experts or max((c.num_experts for c in configs), default=8)
        return cls(adapters or max(len(configs), 1), experts,
                   max((c.top_k for c in configs), default=min(2, experts)),
                   rank or max((c.rank for c in configs), default=16), targets)

    @property
    def base_slot(self) -> int:
        """The slot of rows without an adapter (one past the adapters')."""
        return self.adapters

    def adapter_config(self) -> AdapterConfig:
        """The table as the decode path sees it: one switch adapter over every slot's experts,
        scale 1 (each row's own scale is in its gates)."""
        return AdapterConfig(method=Method.SWITCH, num_experts=self.adapters * self.experts, top_k=self.top_k,
                             rank=self.rank, alpha=float(self.rank), targets=self.targets)

    def refusal(self, name: str, config: AdapterConfig) -> str | None:
        """Why adapter `name` cannot go into this room, or None."""
        if config.method not in BATCHABLE:
            return (f"adapter {name!r} is {config.method!r}: its routes are decided inside the layers, so it is served "
                    f"alone, not in a batch of several adapters (methods batched together: "
                    f"{', '.join(m.value for m in BATCHABLE)})")
        if config.num_experts > self.experts:
            return f"adapter {name!r} has {config.num_experts} experts; the table has room for {self.experts}"
        if config.top_k > self.top_k:
            return f"adapter {name!r} routes top_k={config.top_k}; the table routes at most {self.top_k}"
        if config.rank > self.rank:
            return f"adapter {name!r} has rank {config.rank}; the table's largest rank is {self.rank}"
        outside = [t for t in config.targets if t not in self.targets]
        if outside:
            return f"adapter {name!r} targets {outside}; the table holds {list(self.targets)}"
        if config.method == Method.SWITCH and adapted_groups(config)[0] != adapted_groups(self.adapter_config())[0]:
            return (f"adapter {name!r} routes on the input of {adapted_groups(config)[0]!r}; the table's router reads "
                    f"{adapted_groups(self.adapter_config())[0]!r} (its first adapted group)")
        return None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowChoice:
    """What each row's adapter allows: `allowed [B, E]` experts its router may choose, `k [B]` how
    many it keeps, `scale [B]` its alpha / rank (0: a base row)."""

    allowed: jax.Array
    k: jax.Array
    scale: jax.Array

    def mask(self, logits: jax.Array) -> jax.Array:
        """Router logits `[B, S, E]` with every expert outside the row's adapter at -inf."""
        return jnp.where(self.allowed[:, None, :], logits, -jnp.inf)

    def narrow(self, route: Routing) -> Routing:
        """A top-k route `[B, S, k]` kept to each row's own k (renormalised) and scaled by its scale."""
        keep = jnp.arange(route.gates.shape[-1]) < self.k[:, None, None]
        gates = jnp.where(keep, route.gates, 0.0)
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
        return Routing(route.ids, gates * self.scale[:, None, None])


def row_choice(slots: dict[str, jax.Array], rows: jax.Array) -> RowChoice:
    """Each row's `RowChoice` from the table's per-slot arrays (`AdapterTable.slot_arrays`) and the
    rows' slots `[B]`."""
    return RowChoice(slots["allowed"][rows], slots["k"][rows], slots["scale"][rows])


class AdapterTable:
    """Adapters by name in the slots of a `TableRoom` (see the module docstring).

    `load(name, adapter)` puts an `lsjax.adapters.Adapter` into a free slot, `unload(name)` frees
    it; `arrays()` (experts and router, in the `adapter_config`'s layout) and `slot_arrays()` are
    what a decoder reads; `slot(name)` a row's slot (None: the base). Not thread-safe: one driver
    (the serving engine) calls it.
    """

    per_row = True  # each row of a batch decodes with its own adapter (`lsjax.adapters.Adapter`: one for all)

    def __init__(self, model_config: ModelConfig, room: TableRoom, dtype: Any = jnp.float32, mesh: Any = None):
        self.model_config, self.room, self.dtype, self.mesh = model_config, room, dtype, mesh
        self.config = room.adapter_config()
        self.names: dict[str, int] = {}
        self.configs: dict[str, AdapterConfig] = {}
        E, R, L = self.config.num_experts, room.rank, model_config.num_layers
        shapes = model_config.group_shapes()
        self.groups = adapted_groups(self.config)
        self._experts = {}
        for g in self.groups:
            members = member_layout(model_config, self.config, g)
            self._experts[g] = {"a": jnp.zeros((L, E, shapes[g][0], len(members) * R), dtype),
                                "b": jnp.zeros((L, E, R, sum(m[2] for m in members)), dtype)}
        self._router = jnp.zeros((shapes[self.groups[0]][0], E), dtype)
        allowed = np.zeros((room.adapters + 1, E), bool)  # a free slot's or a base row's only expert: at scale 0
        allowed[np.arange(room.adapters + 1), np.arange(room.adapters + 1) * room.experts % E] = True
        self._slots = {"allowed": allowed, "k": np.ones(room.adapters + 1, np.int32),
                       "scale": np.zeros(room.adapters + 1, np.float32)}
        self._settle()

    @classmethod
    def of(cls, model_config: ModelConfig, adapters: dict[str, Any], room: TableRoom | None = None,
           dtype: Any = jnp.float32, mesh: Any = None) -> "AdapterTable":
        """A table holding `adapters` (name -> `Adapter`), in `room` (default: just enough); with a
        `mesh`, its arrays are split as `lsjax.sharding.adapter_shardings` says."""
        room = room or TableRoom.fitting([a.config for a in adapters.values()])
        table = cls(model_config, room, dtype, mesh)
        for name, adapter in adapters.items():
            table.load(name, adapter)
        return table

    def slot(self, name: str | None) -> int:
        """The slot of adapter `name` (None: the base slot)."""
        if name is None:
            return self.room.base_slot
        if name not in self.names:
            raise AdapterError(f"adapter {name!r} is not loaded; loaded: {sorted(self.names) or 'none'}")
        return self.names[name]

    def arrays(self) -> dict[str, Any]:
        """Experts and router in the `adapter_config`'s layout (over the mesh, if any: the same
        shardings after every load, so nothing compiles again)."""
        return {"experts": self._experts, "routers": {"switch": self._router}}

    def slot_arrays(self) -> dict[str, jax.Array]:
        return {k: jnp.asarray(v) for k, v in self._slots.items()}

    def load(self, name: str, adapter) -> int:
        """Put `adapter` (made for this model) into a free slot; returns the slot."""
        slot = self.check_load(name, adapter)
        self._place(slot, adapter.config, adapter.arrays())
        self._settle()
        self.names[name], self.configs[name] = slot, adapter.config
        return slot

    def check_load(self, name: str, adapter) -> int:
        """The slot `load` would use; raises `AdapterError` naming why it cannot (nothing changes)."""
        config = adapter.config
        if name in self.names:
            raise AdapterError(f"adapter {name!r} is already loaded (slot {self.names[name]}); unload it first")
        if adapter.model_config != self.model_config:
            raise AdapterError(f"adapter {name!r} was made for another base model "
                               f"({adapter.model_config.shape_summary()}); this model is "
                               f"{self.model_config.shape_summary()}")
        why = self.room.refusal(name, config)
        if why:
            raise AdapterError(why)
        free = [s for s in range(self.room.adapters) if s not in self.names.values()]
        if not free:
            raise AdapterError(f"no room for adapter {name!r}: all {self.room.adapters} adapter slots are in use "
                               f"({', '.join(sorted(self.names))}); unload one or start with more (max_adapters)")
        return free[0]

    def unload(self, name: str) -> int:
        """Free adapter `name`'s slot (its experts zeroed, its rows refused until loaded again)."""
        slot = self.slot(name)
        self._clear(slot)
        self._settle()
        del self.names[name], self.configs[name]
        return slot

    # -- placing one adapter's arrays in its slot -----------------------------------------------------------
    def _settle(self) -> None:
        """Over a mesh, the arrays split as `adapter_shardings` says (after every change: the same
        shardings each time, so a decoder reading them compiles nothing again)."""
        if self.mesh is not None:
            tree = jax.device_put(self.arrays(), adapter_shardings(self.arrays(), self.mesh))
            self._experts, self._router = tree["experts"], tree["routers"]["switch"]

    def _clear(self, slot: int) -> None:
        E = self.room.experts
        for g, e in self._experts.items():
            self._experts[g] = {k: _put(v, jnp.zeros((v.shape[0], E, *v.shape[2:]), v.dtype), slot * E)
                                for k, v in e.items()}
        self._router = self._router.at[:, slot * E:(slot + 1) * E].set(0)
        self._slots["allowed"][slot] = False  # as a base row: one (zeroed) expert at scale 0, never all masked
        self._slots["allowed"][slot, slot * E] = True
        self._slots["k"][slot], self._slots["scale"][slot] = 1, 0.0

    def _place(self, slot: int, config: AdapterConfig, arrays: dict[str, Any]) -> None:
        E, R, r = self.room.experts, self.room.rank, config.rank
        for g in self.groups:
            a_table, b_table = self._experts[g]["a"], self._experts[g]["b"]
            a = np.zeros((a_table.shape[0], E, *a_table.shape[2:]), np.float32)
            b = np.zeros((b_table.shape[0], E, *b_table.shape[2:]), np.float32)
            if g in adapted_groups(config):
                n = group_experts(config, g)
                mine_a = np.asarray(arrays["experts"][g]["a"], np.float32)
                mine_b = np.asarray(arrays["experts"][g]["b"], np.float32)
                table_members = adapted_members(self.config, g)
                table_layout = member_layout(self.model_config, self.config, g)
                for s, (member, (_, b_off, width)) in enumerate(zip(adapted_members(config, g),
                                                                     member_layout(self.model_config, config, g))):
                    t = table_members.index(member)
                    a[:, :n, :, t * R:t * R + r] = mine_a[..., s * r:(s + 1) * r]
                    b[:, :n, :r, table_layout[t][1]:table_layout[t][1] + width] = mine_b[..., b_off:b_off + width]
            self._experts[g] = {"a": _put(a_table, jnp.asarray(a, a_table.dtype), slot * E),
                                "b": _put(b_table, jnp.asarray(b, b_table.dtype), slot * E)}
        columns = np.zeros((self._router.shape[0], E), np.float32)
        if config.method == Method.SWITCH:
            columns[:, :config.num_experts] = np.asarray(arrays["routers"]["switch"], np.float32)
        self._router = self._router.at[:, slot * E:(slot + 1) * E].set(jnp.asarray(columns, self._router.dtype))
        allowed = np.zeros(self.config.num_experts, bool)
        allowed[slot * E:slot * E + config.num_experts] = True
        self._slots["allowed"][slot] = allowed
        self._slots["k"][slot], self._slots["scale"][slot] = config.top_k, config.scale


def _put(table: jax.Array, block: jax.Array, start: int) -> jax.Array:
    """`block` written into `table` from expert row `start` (axis 1); a new array (rows in flight keep
    reading the old one until the driver swaps them)."""
    return jax.lax.dynamic_update_slice_in_dim(table, block, start, axis=1)


def served(model_config: ModelConfig, adapters: dict[str, Any], *, runtime: bool = False,
           room: dict[str, int | None] | None = None, dtype: Any = jnp.float32, mesh: Any = None):
    """What a server decodes with for `adapters` (name -> `Adapter`): nothing, the one adapter on its
    own (a lone layer-wise or block-wise adapter), or an `AdapterTable` of them all, with the base
    (switch and LoRA adapters; always where adapters load at run time, `runtime`). `room`:
    `adapters` / `experts` / `rank` of the table, each None for just enough. A mix that cannot
    share a batch is refused, naming the adapter. `mesh`: the arrays split over it."""
    alone = [n for n, a in adapters.items() if a.config.method not in BATCHABLE]
    if alone and (len(adapters) > 1 or runtime):
        name = alone[0]
        raise AdapterError(f"adapter {name!r} is {adapters[name].config.method!r}: its routes are decided inside the "
                           f"layers, so it cannot share a batch with other adapters (or take adapters loaded at run "
                           f"time); serve it alone, or serve "
                           f"{', '.join(m.value for m in BATCHABLE)} adapters together")
    if alone:
        return adapters[alone[0]] if mesh is None else placed(adapters[alone[0]], mesh)
    if not adapters and not runtime:
        return None
    room = room or {}
    fitting = TableRoom.fitting([a.config for a in adapters.values()], room.get("adapters"),
                                experts=room.get("experts"), rank=room.get("rank"))
    if room.get("adapters") is not None and room["adapters"] < len(adapters):
        raise AdapterError(f"max_adapters={room['adapters']} has no room for the {len(adapters)} adapters given")
    return AdapterTable.of(model_config, adapters, fitting, dtype, mesh)


def placed(adapter, mesh):
    """`adapter` with its arrays split over `mesh` (`lsjax.sharding.adapter_shardings`)."""
    arrays = adapter.arrays()
    return type(adapter).from_arrays(adapter.model_config, adapter.config,
                                     jax.device_put(arrays, adapter_shardings(arrays, mesh)))
