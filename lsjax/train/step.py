"""The optimizer, the train state, and a pure `train_step` for jit (with shardings) or pmap.

    tx, schedule = make_optimizer(config.optim, config.steps)
    state = init_state(model_config, adapter_config, tx, seed=0, mesh=mesh)   # params, opt_state, step, rng
    step = make_train_step(model_config, adapter_config, tx, schedule, accumulation=2)
    state, metrics = step(state, base_params, batch)     # pure: jit it (see `jit_train_step`)

Only the adapter (experts and routers) is trained; the base params are an explicit frozen argument
(no gradient is taken for them). The objective is the mean cross-entropy over answer tokens of the
whole batch plus `AdapterAux.loss` (the router regularisers, coefficients included) averaged over
microbatches. Accumulation splits the batch into `accumulation` microbatches (rows m, m + A, ...)
and sums their gradients in a `lax.scan`: one optimizer update per step.

pmap form (`make_pmap_train_step`): every device holds a replica of the state and a slice of the
batch; gradients are summed over the axis (`psum` of token-weighted gradients, i.e. the pmean of
per-device gradients weighted by their answer-token counts), so the update equals the single-device
one. The router load-balance loss is then computed per device shard (as with microbatches) rather
than over the global batch: identical numbers need `adapter.router.aux_loss_coef=0` or method `lora`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lsjax.adapters import AdapterConfig, adapted_forward, init_params
from lsjax.config import ModelConfig
from lsjax.sharding import adapter_shardings
from lsjax.train.config import OptimConfig

State = dict[str, Any]  # {"params", "opt_state", "step": int32 [], "rng": uint32 [2]}
BATCH_AXES = ("data", "fsdp")


def make_schedule(optim: OptimConfig, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `end_lr_fraction * lr` at `steps`."""
    warmup = min(optim.warmup_steps, steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else optim.lr, optim.lr, warmup,
                                              max(steps, warmup + 1), optim.lr * optim.end_lr_fraction)


def make_optimizer(optim: OptimConfig, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(optim, steps)
    parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay))
    return optax.chain(*parts), schedule


def init_state(model_config: ModelConfig, adapter_config: AdapterConfig, tx: optax.GradientTransformation,
               seed: int, mesh: Mesh | None = None) -> State:
    """Fresh fp32 adapter params (sharded by `lsjax.sharding.adapter_shardings`), opt state, step 0, rng."""

    def init():
        k_params, k_train = jax.random.split(jax.random.PRNGKey(seed))
        params = init_params(model_config, adapter_config, k_params, jnp.float32)
        if mesh is not None:
            params = jax.lax.with_sharding_constraint(params, adapter_shardings(params, mesh))
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32), "rng": k_train}

    return jax.jit(init)()


def _token_loss_sum(model_config, adapter_config, dtype, params, base, batch, key):
    """Sum of answer-token cross-entropies of one (micro)batch, and the adapter aux."""
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    logits, aux = adapted_forward(model_config, base, adapter_config, params, batch["ids"],
                                  segment_ids=batch["segments"], rng=key, train=True)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(batch["weights"] > 0, ce, 0.0) * batch["weights"]), aux


def _microbatches(batch: dict, accumulation: int) -> dict:
    """[B, ...] -> [A, B / A, ...] with microbatch m = rows m, m + A, ... (keeps batch sharding local)."""
    return jax.tree.map(lambda x: jnp.moveaxis(x.reshape(x.shape[0] // accumulation, accumulation, *x.shape[1:]),
                                               1, 0), batch)


def _grads(model_config, adapter_config, dtype, accumulation, params, base, batch, key, total_tokens, shards):
    """Gradients of ce_sum / total_tokens + aux / (accumulation * shards), summed over microbatches."""
    parts = accumulation * shards

    def objective(params, micro, k):
        ce_sum, aux = _token_loss_sum(model_config, adapter_config, dtype, params, base, micro, k)
        return ce_sum / total_tokens + aux.loss / parts, (ce_sum, aux)

    grad_fn = jax.grad(objective, has_aux=True)

    def body(acc, xs):
        micro, m = xs
        g, (ce_sum, aux) = grad_fn(params, micro, jax.random.fold_in(key, m))
        acc = jax.tree.map(jnp.add, acc, (g, ce_sum, aux.loss, aux.load_balance, aux.z_loss, aux.entropy, aux.load))
        return acc, None

    zero = jnp.zeros((), jnp.float32)
    init = (jax.tree.map(jnp.zeros_like, params), zero, zero, zero, zero, zero,
            jnp.zeros((adapter_config.num_experts,), jnp.float32))
    micro = _microbatches(batch, accumulation)
    (grads, ce_sum, *aux_sums), _ = jax.lax.scan(body, init, (micro, jnp.arange(accumulation)))
    return grads, ce_sum, aux_sums


def _update(tx, schedule, state, grads, ce_sum, aux_sums, total_tokens, tokens, parts):
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    aux_loss, load_balance, z_loss, entropy, load = (a / parts for a in aux_sums)
    metrics = {"loss": ce_sum / total_tokens, "aux": aux_loss, "load_balance": load_balance, "z_loss": z_loss,
               "entropy": entropy, "load": load, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state["step"]), "tokens": tokens, "target_tokens": total_tokens}
    rng, _ = jax.random.split(state["rng"])
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}, metrics


def make_train_step(model_config: ModelConfig, adapter_config: AdapterConfig, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, accumulation: int = 1,
                    dtype: Any = jnp.float32) -> Callable[[State, Any, dict], tuple[State, dict]]:
    """`train_step(state, base_params, batch) -> (state, metrics)`: pure, for `jax.jit`."""

    def train_step(state, base, batch):
        key = jax.random.fold_in(state["rng"], 0)
        total = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        grads, ce_sum, aux_sums = _grads(model_config, adapter_config, dtype, accumulation, state["params"], base,
                                         batch, key, total, 1)
        tokens = jnp.sum(batch["mask"]).astype(jnp.float32)
        return _update(tx, schedule, state, grads, ce_sum, aux_sums, total, tokens, accumulation)

    return train_step


def make_pmap_train_step(model_config: ModelConfig, adapter_config: AdapterConfig, tx: optax.GradientTransformation,
                         schedule: optax.Schedule, *, axis_name: str = "batch", accumulation: int = 1,
                         dtype: Any = jnp.float32) -> Callable[[State, Any, dict], tuple[State, dict]]:
    """`jax.pmap(step, axis_name=axis_name)` over (replicated state, replicated base, batch shard).

    Example (n devices, state and base replicated with a leading device axis, batch `[n, B/n, ...]`):

        step = jax.pmap(make_pmap_train_step(mc, ac, tx, schedule), axis_name="batch")
        rep = lambda t: jax.tree.map(lambda x: np.stack([np.asarray(x)] * n), jax.device_get(t))
        state, metrics = step(rep(state), rep(base), jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), batch))
        # state["params"][...][0] is the updated adapter (every replica is equal); tested in tests/test_train.py
    """

    def train_step(state, base, batch):
        shards = jax.lax.psum(1, axis_name)
        key = jax.random.fold_in(state["rng"], 0)
        total = jnp.maximum(jax.lax.psum(jnp.sum(batch["weights"]), axis_name), 1.0)
        grads, ce_sum, aux_sums = _grads(model_config, adapter_config, dtype, accumulation, state["params"], base,
                                         batch, jax.random.fold_in(key, jax.lax.axis_index(axis_name) + 1), total,
                                         shards)
        grads, ce_sum, aux_sums = jax.lax.psum((grads, ce_sum, aux_sums), axis_name)
        tokens = jax.lax.psum(jnp.sum(batch["mask"]).astype(jnp.float32), axis_name)
        return _update(tx, schedule, state, grads, ce_sum, aux_sums, total, tokens, accumulation * shards)

    return train_step


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def jit_train_step(step: Callable, state: State, base: Any, mesh: Mesh) -> Callable:
    """`jax.jit` with the state's own shardings in and out, the batch split over (data, fsdp)."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    base_sh = jax.tree.map(lambda x: x.sharding, base)
    return jax.jit(step, in_shardings=(state_sh, base_sh, batch_sharding(mesh)),
                   out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=0)


def make_eval_step(model_config: ModelConfig, adapter_config: AdapterConfig, dtype: Any = jnp.float32) -> Callable:
    """`eval_step(params, base, batch) -> (ce_sum, answer_tokens)` without dropout or jitter."""

    def eval_step(params, base, batch):
        params = jax.tree.map(lambda x: x.astype(dtype), params)
        logits, _ = adapted_forward(model_config, base, adapter_config, params, batch["ids"],
                                    segment_ids=batch["segments"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        ce = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(batch["weights"] > 0, ce, 0.0) * batch["weights"]), jnp.sum(batch["weights"])

    return eval_step


def global_batch(batch: dict, mesh: Mesh) -> dict:
    """Host batch (the same global batch on every process) -> global arrays sharded over (data, fsdp)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_callback(v.shape, sharding, partial(lambda v, idx: v[idx], v))
            for k, v in batch.items()}
