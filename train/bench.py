"""CPU/GPU training throughput: `python -m lsjax.train.bench --model CKPT [--batch 8 --length 64 --steps 5]`.

For each method (lora, switch, layerwise, blockwise; dense computation, fp32 unless --dtype), times
`train_step` (forward + backward + AdamW on the adapter) and a jitted base-model forward of the same
batch, after one warm-up call each; prints tokens/s (B * S positions per second) and the ratio
step time / base forward time, as a Markdown table.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np


def _time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> None:
    from lsjax.model import forward
    from lsjax.train.config import load_config
    from lsjax.train.loop import Run
    from lsjax.train.step import global_batch, jit_train_step

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--methods", default="lora,switch,layerwise,blockwise")
    args = p.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind} x{len(jax.devices())}, "
          f"batch {args.batch} x {args.length} tokens, {args.dtype}, median of {args.steps}")
    print("| method | train step (s) | train tokens/s | base forward (s) | step / forward |")
    print("|---|---|---|---|---|")
    fwd_time = None
    for method in args.methods.split(","):
        experts = 1 if method == "lora" else 8
        config = load_config(None, [f"model={args.model}", f"batch_size={args.batch}", f"data.max_length={args.length}",
                                    "data.eval_docs=0", "data.tasks=[arc_easy]", f"adapter.method={method}",
                                    f"adapter.num_experts={experts}", "adapter.rank=16", f"dtype={args.dtype}",
                                    "progress=false"])
        run = Run(config)
        batch = global_batch(next(run.iterator), run.mesh)
        step = jit_train_step(run.step_fn, run.state, run.base, run.mesh)
        holder = {"state": run.state}

        def train_once():
            holder["state"], metrics = step(holder["state"], run.base, batch)
            return metrics

        t_step = _time(train_once, args.steps)
        if fwd_time is None:
            fwd = jax.jit(lambda base, ids, mask: forward(run.model_config, base, ids, mask))
            fwd_time = _time(lambda: fwd(run.base, batch["ids"], batch["mask"]), args.steps)
        tokens = args.batch * args.length
        print(f"| {method} | {t_step:.3f} | {tokens / t_step:.0f} | {fwd_time:.3f} | {t_step / fwd_time:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
