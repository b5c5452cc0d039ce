"""Decode speed of a LoRA-Switch adapter against the plain model, in one run on this machine.

    python eval/latency.py --ckpt CKPT [--adapter runs/my-switch] [--batch 1] [--tokens 64]

Both decode greedily from the same prompts with `lsjax.generate.Generator` (a jitted prefill, then
an on-device loop of decode steps); each is compiled and warmed up first, then timed in alternating
rounds, and the median ms/token of each gives the ratio. Without `--adapter` a random switch
adapter of the usual shape (8 experts, top-2, rank 16, every projection) stands in: speed depends
on its shape, not its values. `lsjax bench decode` is the full benchmark (every method and strategy).
"""

import argparse
import statistics

import numpy as np
from flax import nnx

import lsjax
from lsjax.adapters import Adapter, AdapterConfig, open_adapter
from lsjax.generate import Generator


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--adapter", help="adapter folder; default: a random switch adapter")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    model, tokenizer = lsjax.load(args.ckpt)
    if args.adapter:
        adapter = open_adapter(args.adapter, model.config)
    else:
        config = AdapterConfig(method="switch", num_experts=8, top_k=2, rank=16, targets="all-linear")
        adapter = Adapter(model.config, config, rngs=nnx.Rngs(0))
    prompts = np.random.default_rng(0).integers(3, model.config.vocab_size, (args.batch, 32)).tolist()
    generators = {"base": Generator(model, tokenizer), "switch": Generator(model, tokenizer, adapter)}
    times = {name: [] for name in generators}
    for gen in generators.values():  # compile and warm up
        gen.generate(prompts, max_new_tokens=args.tokens, stop_token_ids=())
    for _ in range(args.rounds):
        for name, gen in generators.items():
            timings = gen.generate(prompts, max_new_tokens=args.tokens, stop_token_ids=()).timings
            times[name].append(timings["decode_ms_per_token"])
    ms = {name: statistics.median(t) for name, t in times.items()}
    for name, gen in generators.items():
        print(f"{name}: {ms[name]:.2f} ms/token (strategy {gen.strategy}, backend {gen.backend.name})")
    print(f"switch / base, batch {args.batch}: {ms['switch'] / ms['base']:.2f}x")


if __name__ == "__main__":
    main()
