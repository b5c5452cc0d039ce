"""Fine-tune a LoRA-Switch adapter on your own instruction file (prompt/completion or chat JSONL).

    python train/train_instructions.py --ckpt CKPT --data my_data.jsonl --out runs/my-adapter

The loss is on the answers only (completions, assistant turns); short examples are packed into
rows, each attending only to itself. `lsjax train` does the same with sharding, checkpoints and
held-out evaluation (`data.files`); `lsjax eval --files` scores the result.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lsjax
from lsjax.adapters import AdapterConfig, adapted_forward, init_params, save_adapter_arrays
from lsjax.datafiles import read_examples
from lsjax.train.batches import build_rows, make_batch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="lsjax checkpoint (lsjax convert)")
    parser.add_argument("--data", required=True, help="JSONL: {prompt, completion} or {messages} per line")
    parser.add_argument("--out", required=True, help="adapter folder to write")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args(argv)

    model, tokenizer = lsjax.load(args.ckpt)
    base, model_config = model.params(), model.config
    adapter_config = AdapterConfig(method="switch", num_experts=8, top_k=2, rank=16, alpha=32, targets="all-linear")
    adapter = init_params(model_config, adapter_config, jax.random.key(0))
    _, examples = read_examples(args.data, "train")  # the held-out part is for `lsjax eval --files`
    data = build_rows(tokenizer, examples, args.max_length, packing=True)
    print(f"{data.examples} examples in {len(data.rows)} rows ({data.padding:.0%} padding, {data.dropped} too long)")

    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10), args.steps))
    opt_state = tx.init(adapter)

    def loss_fn(adapter, batch):
        logits, aux = adapted_forward(model_config, base, adapter_config, adapter, batch["ids"],
                                      segment_ids=batch["segments"])  # packed rows: one segment per example
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        answer = jnp.sum(nll * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        return answer + aux.loss, answer

    @jax.jit
    def train_step(adapter, opt_state, batch):
        (_, answer), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapter, batch)
        updates, opt_state = tx.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, answer

    order = np.random.default_rng(0).permutation(len(data.rows))
    for step in range(args.steps):
        picked = order[np.arange(step * args.batch_size, (step + 1) * args.batch_size) % len(order)]
        adapter, opt_state, answer = train_step(adapter, opt_state, make_batch(data.rows[picked]))
        print(f"step {step}: answer loss {float(answer):.4f}", flush=True)
    print(f"wrote {save_adapter_arrays(args.out, model_config, adapter_config, adapter)}")


if __name__ == "__main__":
    main()
