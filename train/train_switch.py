"""Fine-tune a LoRA-Switch adapter on benchmark tasks with lsjax's pure API and optax, nothing else.

    python train/train_switch.py --ckpt CKPT --config train/configs/switch.yaml --out runs/my-switch

A research script to copy and change (the loss, the router, the data, the schedule): the base
model stays frozen, only the adapter's pytree is trained, and the loop is a plain jitted step.
`lsjax train` is the full trainer (sharding, checkpoints, resuming, evaluation while training).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

import lsjax
from lsjax.adapters import AdapterConfig, adapted_forward, init_params, save_adapter_arrays
from lsjax.data import load_task
from lsjax.train.batches import encode_docs, make_batch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="lsjax checkpoint (lsjax convert)")
    parser.add_argument("--config", default="train/configs/switch.yaml")
    parser.add_argument("--out", required=True, help="adapter folder to write")
    parser.add_argument("--steps", type=int, help="override the config's steps")
    args = parser.parse_args(argv)
    with open(args.config) as f:
        config = yaml.safe_load(f)
    steps = args.steps or config["steps"]

    model, tokenizer = lsjax.load(args.ckpt)
    base, model_config = model.params(), model.config
    adapter_config = AdapterConfig.from_dict(config["adapter"])
    adapter = init_params(model_config, adapter_config, jax.random.key(config["seed"]))
    docs = [doc for task in config["tasks"] for doc in load_task(task, "train")]
    rows = encode_docs(tokenizer, docs, config["max_length"])  # answer tokens flagged for the loss

    schedule = optax.warmup_cosine_decay_schedule(0.0, config["lr"], config["warmup"], steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = tx.init(adapter)

    def loss_fn(adapter, batch):
        logits, aux = adapted_forward(model_config, base, adapter_config, adapter, batch["ids"], batch["mask"])
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        answer = jnp.sum(nll * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        return answer + aux.loss, answer  # aux.loss: the router's load balance (and z-loss)

    @jax.jit
    def train_step(adapter, opt_state, batch):
        (_, answer), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapter, batch)
        updates, opt_state = tx.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, answer

    order = np.random.default_rng(config["seed"]).permutation(len(rows))
    size = config["batch_size"]
    for step in range(steps):
        picked = order[np.arange(step * size, (step + 1) * size) % len(rows)]
        adapter, opt_state, answer = train_step(adapter, opt_state, make_batch(rows[picked]))
        if step % config["log_every"] == 0 or step == steps - 1:
            print(f"step {step}: answer loss {float(answer):.4f}", flush=True)
    print(f"wrote {save_adapter_arrays(args.out, model_config, adapter_config, adapter)}")


if __name__ == "__main__":
    main()
