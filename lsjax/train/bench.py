"""Training throughput: `python -m lsjax.train.bench (--model CKPT | --shape llama2-7b) [--batch 8 --length 64]`.

For each method (lora, switch, layerwise, blockwise; dense expert computation, rank 16, 8 experts
top-2 for the routed ones, all-linear targets, fp32 unless --dtype), times `train_step` (forward +
backward through the frozen base + AdamW on the adapter) and a jitted base-model forward of the same
batch, after one warm-up call each; prints tokens/s (B * S positions per second) and the ratio step
time / base forward time as a Markdown table, and with `--json FILE` writes the records.

The batch is random tokens with the second half of every row as the answer: a dense step's work does
not depend on the token values, so no dataset is needed. With `--data FILE` (a `data.files` JSONL
file) the rows are that file's train split instead, built both ways, one example per row and packed:
a step costs the same either way, so what packing changes is the real (not padding) tokens and the
answer tokens each second of training sees; both are printed with their ratio. `--shape` replaces the checkpoint with
random base weights of a named shape (`lsjax.config.SHAPES`), so a GPU machine without
checkpoints can time 7B shapes. Arrays are laid out on a one-device mesh by `lsjax.sharding`'s rules.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.adapters import AdapterConfig
from lsjax.adapters.config import METHODS
from lsjax.checkpoint import load_params
from lsjax.config import named_config
from lsjax.errors import ConfigError, LsjaxError
from lsjax.jsonfile import write_json
from lsjax.model import forward, is_shape, param_shapes, stack_layers
from lsjax.sharding import param_shardings
from lsjax.train.batches import make_batch
from lsjax.train.config import MeshConfig, OptimConfig
from lsjax.train.loop import make_mesh
from lsjax.train.step import global_batch, init_state, jit_train_step, make_optimizer, make_train_step
from pallas_kernels.timing import queued_seconds



def random_base(config, dtype, mesh, seed: int = 0) -> dict:
    """Base params of `config`'s shapes, N(0, 0.02) (norms 1), made on device, sharded over `mesh`."""

    shapes = param_shapes(config, stacked=True)  # the layout training scans
    paths = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)[0]

    def make():
        keys = iter(jax.random.split(jax.random.key(seed), len(paths)))

        def one(path, shape):
            if "norm" in jax.tree_util.keystr(path):
                return jnp.ones(shape, dtype)
            return (0.02 * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

        return jax.tree_util.tree_map_with_path(one, shapes, is_leaf=is_shape)

    return jax.jit(make, out_shardings=param_shardings(shapes, mesh))()


def random_batch(vocab_size: int, batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`make_batch` of random rows: `length` input positions, the second half of each row the answer."""

    rng = np.random.default_rng(seed)
    examples = np.zeros((batch, 3, length + 1), np.int32)
    examples[:, 0] = rng.integers(3, vocab_size, (batch, length + 1))
    examples[:, 1, length // 2 + 1:] = 1  # flags of positions 1.. are the weights of targets 0..
    examples[:, 2] = 1  # one example per row
    return make_batch(examples)


def packing_records(args, model_config, base, mesh, dtype, source: str) -> list[dict]:
    """Each method's step on the file's rows, one example per row and packed: tokens/s of both."""
    from lsjax.checkpoint import TOKENIZER_DIR
    from lsjax.datafiles import read_examples
    from lsjax.tokenizer import load_tokenizer
    from lsjax.train.batches import SEGMENTS, build_rows

    tokenizer = load_tokenizer(f"{args.model}/{TOKENIZER_DIR}")
    _, examples = read_examples(args.data, "train")
    layouts = {}
    for packing in (False, True):
        rows = build_rows(tokenizer, examples, args.length, packing)
        if len(rows.rows) < args.batch:
            raise ConfigError(f"--data {args.data}: {len(rows.rows)} rows, fewer than --batch {args.batch}")
        real = float(np.mean(rows.rows[:, SEGMENTS, :-1] > 0)) * args.batch * args.length  # per batch, on average
        answers = float(np.mean(make_batch(rows.rows)["weights"].sum(axis=1))) * args.batch
        layouts["packed" if packing else "one per row"] = (rows, real, answers)
    print(f"{source}: jax {jax.__version__}, {jax.devices()[0].device_kind}, {args.data} ({len(examples)} train "
          f"examples), batch {args.batch} x {args.length}, {args.dtype}, median of {args.steps}")
    print("| method | rows | padding | train step (s) | real tokens/s | answer tokens/s |")
    print("|---|---|---:|---:|---:|---:|")
    records = []
    for method in args.methods.split(","):
        step, holder = _step(model_config, method, base, mesh, dtype)
        for name, (rows, real, answers) in layouts.items():
            t = _step_seconds(step, holder, base, global_batch(make_batch(rows.rows[:args.batch]), mesh), args.steps)
            records.append({"method": method, "layout": name, **rows.summary(), "step_s": t,
                            "real_tokens_per_s": real / t, "answer_tokens_per_s": answers / t,
                            "batch": args.batch, "length": args.length, "dtype": args.dtype, "source": source,
                            "data": str(args.data), "device": jax.devices()[0].device_kind, "jax": jax.__version__})
            print(f"| {method} ({name}) | {len(rows.rows)} | {rows.padding:.1%} | {t:.3f} | {real / t:.0f} | "
                  f"{answers / t:.0f} |", flush=True)
        one, packed = records[-2], records[-1]
        print(f"{method}: packed / one per row, real tokens/s: "
              f"{packed['real_tokens_per_s'] / one['real_tokens_per_s']:.2f}x", flush=True)
    return records


def _step(model_config, method: str, base, mesh, dtype):
    routed = method != "lora"
    adapter = AdapterConfig(method=method, num_experts=8 if routed else 1, top_k=2 if routed else 1, rank=16)
    tx, schedule = make_optimizer(OptimConfig(), 100)
    holder = {"state": init_state(model_config, adapter, tx, 0, mesh)}
    return jit_train_step(make_train_step(model_config, adapter, tx, schedule, dtype=dtype), holder["state"],
                          base, mesh), holder


def _step_seconds(step, holder: dict, base, batch, samples: int) -> float:
    """Median seconds of a train step (the state carried from call to call)."""

    def train_once():
        holder["state"], metrics = step(holder["state"], base, batch)
        return metrics

    return queued_seconds(train_once, (), samples=samples)


def run(args) -> list[dict]:

    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown {unknown}; expected some of {list(METHODS)}")
    if args.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype {args.dtype!r}: expected float32 or bfloat16")
    for name in ("batch", "length", "steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} {getattr(args, name)}: expected a positive integer")
    if args.shape is not None:
        named_config(args.shape)  # refused before any work
    if getattr(args, "data", None) and args.model is None:
        raise ConfigError("--data needs --model (its tokenizer encodes the file)")
    dtype = jnp.dtype(args.dtype)
    mesh = make_mesh(MeshConfig())
    if args.shape is not None:
        model_config = named_config(args.shape)
        base, source = random_base(model_config, dtype, mesh), f"random {args.shape}"
    else:
        (model_config, base), source = load_params(args.model, dtype, mesh), args.model
        base = stack_layers(base)  # as a training run holds it
    if getattr(args, "data", None):
        records = packing_records(args, model_config, base, mesh, dtype, source)
        if args.json:
            write_json(args.json, {"records": records})
        return records
    batch = global_batch(random_batch(model_config.vocab_size, args.batch, args.length), mesh)
    tokens = args.batch * args.length

    fwd = jax.jit(lambda base, ids, mask: forward(model_config, base, ids, mask))
    fwd_time = queued_seconds(lambda: fwd(base, batch["ids"], batch["mask"]), (), samples=args.steps)
    print(f"{source}: jax {jax.__version__}, {jax.devices()[0].device_kind}, batch {args.batch} x {args.length} "
          f"tokens, {args.dtype}, median of {args.steps}")
    print("| method | train step (s) | train tokens/s | base forward (s) | step / forward |")
    print("|---|---|---|---|---|")
    records = []
    for method in methods:
        step, holder = _step(model_config, method, base, mesh, dtype)

        t_step = _step_seconds(step, holder, base, batch, args.steps)
        records.append({"method": method, "step_s": t_step, "tokens_per_s": tokens / t_step,
                        "forward_s": fwd_time, "step_over_forward": t_step / fwd_time, "batch": args.batch,
                        "length": args.length, "dtype": args.dtype, "source": source,
                        "device": jax.devices()[0].device_kind, "jax": jax.__version__})
        print(f"| {method} | {t_step:.3f} | {tokens / t_step:.0f} | {fwd_time:.3f} | {t_step / fwd_time:.1f} |",
              flush=True)
    if args.json:
        write_json(args.json, {"records": records})
    return records


def main(argv=None) -> int:

    p = argparse.ArgumentParser(prog="python -m lsjax.train.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="lsjax checkpoint")
    source.add_argument("--shape", help="random base weights of this shape instead (e.g. llama2-7b)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--data", help="a JSONL data file: its rows one example each and packed, instead of random rows")
    p.add_argument("--json", help="write the records here")
    args = p.parse_args(argv)
    try:
        run(args)
    except LsjaxError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
