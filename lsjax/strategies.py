"""Decode strategies: how an adapter's routed term is computed while generating.

Each strategy yields two pure functions over a `bundle` of arrays (jit them, donate the cache):
    prefill(bundle, input_ids, attention_mask, cache) -> (last-token logits [B, V], cache)
    step(bundle, tokens [B], cache)                   -> (logits [B, V], cache)
and runs its products on a backend (`lsjax.backends`: XLA, the CPU native library, Pallas).

- `unmerged`: each group's product on the backend, then its routed term as XLA ops: the chosen
  experts gathered (once per step for all layers, switch) for a few rows, every expert masked by
  its gates from E / k rows on; one shrink and one expand per group.
- `fused`: one backend call per group, `x @ W + sum_k g_k (x @ A_k) @ B_k`, any batch, each row
  its own experts, never writing weights (the native library's kernel on a CPU, Pallas on a GPU).
- `merged`: the paper's way. `lora`: merged once, then the plain backbone. `switch`: per token,
  the router runs on layer 0's input, the backend's `merge` (XLA's form, or the Pallas SGMM
  kernel) builds W_base + delta for all layers of each group (from a pristine stacked copy of the
  base: no drift), then the plain backbone runs. One route per step, so batch 1 only.
- `auto`: the strategy (with the backend, unless one is given) timed fastest on this machine at
  the batch decoded (`lsjax.autotune`, which a `lsjax.decoder.Decoder` asks). Where nothing can be
  timed (abstract, traced or multi-device arrays) `resolve_strategy` keeps a static rule: `lora`
  -> merged; otherwise `fused` where the backend declares its fused kernel the faster form
  (`Traits.fused_is_faster`), else `unmerged`.
Prefill runs the training form (dense routed term), as in the paper, except that `fused` prefills
a chunk of at most `Traits.fused_prefill_rows` tokens with the fused kernel (the native library's).
How each step forms its routed terms is decided in one place, `term_form`, from the strategy, the
rows and the backend's declared traits; the adapter config never carries it.

Memory: `unmerged` and `fused` decode from the model's and adapter's own arrays (no copy);
`lora` merged holds a merged copy of its adapted groups; `switch` merged a stacked copy of the base.
"""

from __future__ import annotations

import enum
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lsjax import decode
from lsjax.adapters.merge import merge_lora
from lsjax.adapters.methods import adapted_forward_cached, switch_route
from lsjax.adapters.params import adapted_groups, member_layout
from lsjax.adapters.routing import Computation, TermForm
from lsjax.adapters.table import RowChoice, row_choice
from lsjax.backend_interface import Backend
from lsjax.backends import XLA
from lsjax.config import ModelConfig
from lsjax.decode import forward_cached
from lsjax.errors import ConfigError
from lsjax.layers import Layers
from lsjax.model import embed_tokens, stack_layers


class Strategy(enum.StrEnum):
    """How a decode computes an adapter's routed term (equal to their names as strings)."""

    UNMERGED = "unmerged"  # the group's product, then the routed term as XLA ops
    MERGED = "merged"  # the chosen experts merged into working weights (lora: once; switch: per token)
    FUSED = "fused"  # one backend call per group computes both
    AUTO = "auto"  # chosen per adapter and backend (`resolve_strategy`)
    BASE = "base"  # no adapter: what every strategy resolves to without one

    def __repr__(self) -> str:  # messages name the value, as a user writes it
        return repr(self.value)


STRATEGIES = ("unmerged", "merged", "fused", "auto")  # what a caller may ask for


def resolve_strategy(strategy: str, adapter_config: Any | None, backend: Backend = XLA,
                     mergeable: bool = True) -> Strategy:
    """The concrete strategy for this adapter on this backend; refuses what cannot run. "auto"
    here is the static rule (module docstring), the fallback where `lsjax.autotune` cannot time;
    `mergeable`: whether adapter terms may be written into the weights (not into quantized ones)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is not supported; expected one of {STRATEGIES}")
    strategy = Strategy(strategy)
    if adapter_config is None:
        return Strategy.BASE
    method = adapter_config.method
    if strategy == Strategy.AUTO:
        if method == "lora" and mergeable:
            return Strategy.MERGED
        return Strategy.FUSED if backend.traits.fused_is_faster else Strategy.UNMERGED
    if strategy == "merged" and method not in ("lora", "switch"):
        raise ConfigError(f"strategy 'merged' is for methods 'lora' and 'switch', not {method!r} "
                          f"(its routes are decided inside every layer); use 'unmerged' or 'fused'")
    return strategy


def merged_switch_params(model_config: ModelConfig, base: dict, adapter_config, adapter_params: dict, route,
                         backend: Backend = XLA) -> dict:
    """W_base + scale * sum_k g_k A_k B_k for all layers of each adapted group: one `backend.merge` per group."""

    ids, gates = route.ids[0, 0], (adapter_config.scale * route.gates[0, 0]).astype(jnp.float32)
    layers = dict(base["layers"].tree)  # stacked (`prepare_bundle`): one merge per group for all layers
    for group in adapted_groups(adapter_config):
        e = adapter_params["experts"][group]
        layers[group] = backend.merge(layers[group], e["a"], e["b"], ids, gates,
                                      members=member_layout(model_config, adapter_config, group))
    return {**base, "layers": Layers.of_stacked(layers)}


def build(model_config: ModelConfig, adapter_config, strategy: str, backend: Backend = XLA
          ) -> tuple[Callable, Callable]:
    """(prefill, step) pure functions of `bundle = {"base": params, "adapter": arrays or None}`.

    `prefill(bundle, ids, mask, cache, every=False)`: the last position's logits `[B, V]`, or with
    `every` (static) every position's `[B, S, V]` (scoring a prompt's own tokens).
    """
    if strategy == "base" or (strategy == "merged" and adapter_config.method == "lora"):
        # lora merged: the bundle's base already holds W + scale * A @ B (see `prepare_bundle`)
        def prefill(bundle, ids, mask, cache, every: bool = False):
            return decode.prefill(model_config, bundle["base"], ids, mask, cache, backend, every=every)

        def step(bundle, tokens, cache):
            return decode.decode_step(model_config, bundle["base"], tokens, cache, backend)
        return prefill, step


    def prefill(bundle, ids, mask, cache, every: bool = False):
        form = term_form(strategy, adapter_config, backend, ids.size, prefill=True)
        logits, cache, _ = adapted_forward_cached(model_config, bundle["base"], adapter_config, bundle["adapter"],
                                                  ids, mask, decode.prompt_positions(mask, cache), cache, backend,
                                                  form, rows_choice(bundle, cache))
        return (logits if every else logits[:, -1]), cache

    def adapted_step(bundle, tokens, cache):
        form = term_form(strategy, adapter_config, backend, tokens.shape[0], prefill=False)
        positions = decode.next_positions(cache)
        logits, cache, _ = adapted_forward_cached(model_config, bundle["base"], adapter_config, bundle["adapter"],
                                                  tokens[:, None], jnp.ones_like(positions, jnp.bool_),
                                                  positions, cache, backend, form, rows_choice(bundle, cache))
        return logits[:, 0], cache

    if strategy != "merged":
        return prefill, adapted_step

    def merged_step(bundle, tokens, cache):
        positions = decode.next_positions(cache)
        valid = jnp.ones_like(positions, jnp.bool_)
        _, _, cos, sin, mask = decode.cached_inputs(model_config, cache, valid, positions)
        kv0 = (cache.k.layer(0), cache.v.layer(0), cache.length)
        route, _ = switch_route(model_config, adapter_config, bundle["base"]["layers"],
                                bundle["adapter"]["routers"]["switch"], embed_tokens(bundle["base"], tokens[:, None]),
                                cos, sin, mask, kv0)
        merged = merged_switch_params(model_config, bundle["base"], adapter_config, bundle["adapter"], route, backend)
        logits, cache = forward_cached(model_config, merged, tokens[:, None], valid, positions, cache, backend=backend)
        return logits[:, 0], cache

    return prefill, merged_step


def rows_choice(bundle: dict, cache) -> RowChoice | None:
    """Each row's adapter in a table (`lsjax.adapters.table`): read from the state's rows and the
    bundle's per-slot arrays; None where one adapter serves every row."""
    return None if cache.adapter is None else row_choice(bundle["slots"], cache.adapter)


def term_form(strategy: str, adapter_config, backend: Backend, rows: int, prefill: bool) -> TermForm:
    """How a `strategy` step over `rows` tokens forms its routed terms on `backend` (static under jit).

    Prefill: the training form (dense), except a chunk short enough for the backend's fused kernel
    (`Traits.fused_prefill_rows`: a serving engine's prefill chunks on the CPU native library).
    Decode: `fused` runs the backend's fused kernel; `unmerged` gathers each row's k chosen experts,
    until rows * k reaches E: then that is more bytes than all experts, and `dense` (every expert,
    masked by the gates: plain products, no gather) is faster (docs/perf.md). The XLA forms of a
    separate term are those the backend declares faster where it runs (`Traits`).
    """
    traits = backend.traits
    if strategy == "fused" and (not prefill or rows <= traits.fused_prefill_rows):
        computation = Computation.FUSED
    elif prefill or rows * adapter_config.top_k >= adapter_config.num_experts:
        computation = Computation.DENSE
    else:
        computation = Computation.GATHERED
    return TermForm(computation, gather_once=traits.gather_once, one_expand=traits.one_expand)


def prepare_bundle(model_config: ModelConfig, base: dict, adapter_config, adapter_params: dict | None,
                   strategy: str) -> dict:
    """The arrays the strategy's functions take: the model's and adapter's own, shared, except
    where a strategy needs weights of its own (`lora` merged folds the adapter into a copy of
    its groups once; `switch` merged keeps a stacked base for its all-layers merge)."""
    if strategy == "merged" and adapter_config.method == "lora":
        return {"base": merge_lora(model_config, base, adapter_config, adapter_params), "adapter": None}
    if strategy == "merged" and adapter_config.method == "switch":
        return {"base": stack_layers(base), "adapter": adapter_params}
    return {"base": base, "adapter": adapter_params}


@functools.lru_cache(maxsize=None)
def compiled(model_config: ModelConfig, adapter_config, strategy: str, backend: Backend = XLA):
    """Jitted (prefill, step) per (model, adapter config, strategy, backend), shared by every Generator."""
    prefill, step = build(model_config, adapter_config, strategy, backend)
    return jax.jit(prefill, donate_argnums=(3,), static_argnames="every"), jax.jit(step, donate_argnums=(2,))
