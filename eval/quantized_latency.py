"""Decode speed over a quantized base against the float one, base and LoRA-Switch, in one run.

    python eval/quantized_latency.py --ckpt CKPT [--kept Q_CKPT] [--batch 1,8] [--tokens 32] [--rounds 5]

The float checkpoint's weights are quantized here with `lsjax.quant.quantize_params` (int8 per
channel; 4-bit in groups of 32), or `--kept` names a checkpoint converted with `lsjax convert --gguf
... --keep-quantized` to stand for the 4-bit base. Every model decodes greedily with
`lsjax.generate.Generator` on `--backend` (default native where it is built), compiled and warmed
up first, then timed in alternating rounds; the medians give each ms/token against the float base
of the same batch, beside the ratio of weight bytes that a step reads (what bandwidth allows). A
random switch adapter of the usual shape (8 experts, top-2, rank 16, every projection) stands in.
"""

import argparse
import json
import statistics

import jax
import numpy as np
from flax import nnx

import lsjax
from lsjax import native, quant
from lsjax.adapters import Adapter, AdapterConfig
from lsjax.generate import Generator
from lsjax.model import model_from_params


def weight_bytes(model) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(model.params()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a float checkpoint")
    parser.add_argument("--kept", help="a checkpoint keeping a GGUF file's 4-bit blocks (else int4:32 made here)")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default="native" if native.available() else "xla")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    floats, tokenizer = lsjax.load(args.ckpt)
    models = {"fp32": floats,
              "int8": model_from_params(floats.config, quant.quantize_params(floats.params(), "int8")),
              "4-bit": lsjax.load(args.kept)[0] if args.kept else
              model_from_params(floats.config, quant.quantize_params(floats.params(), "int4", 32))}
    config = AdapterConfig(method="switch", num_experts=8, top_k=2, rank=16, targets="all-linear")
    adapter = Adapter(floats.config, config, rngs=nnx.Rngs(0))
    sizes = {name: weight_bytes(model) for name, model in models.items()}
    records = []
    for batch in (int(b) for b in args.batch.split(",")):
        prompts = np.random.default_rng(0).integers(3, floats.config.vocab_size, (batch, 16)).tolist()
        generators = {(name, method): Generator(model, tokenizer, adapter if method == "switch" else None,
                                                strategy="fused" if method == "switch" else "auto",
                                                backend=args.backend)
                      for name, model in models.items() for method in ("base", "switch")}
        times = {key: [] for key in generators}
        for gen in generators.values():  # compile and warm up
            gen.generate(prompts, max_new_tokens=args.tokens, stop_token_ids=())
        for _ in range(args.rounds):
            for key, gen in generators.items():
                times[key].append(gen.generate(prompts, max_new_tokens=args.tokens, stop_token_ids=()).timings[
                    "decode_ms_per_token"])
        ms = {key: statistics.median(t) for key, t in times.items()}
        base = ms["fp32", "base"]
        for name in models:
            record = {"batch": batch, "weights": name, "weight_mb": sizes[name] / 2**20,
                      "bytes_vs_fp32": sizes[name] / sizes["fp32"], "base_ms": ms[name, "base"],
                      "base_vs_fp32": ms[name, "base"] / base, "switch_ms": ms[name, "switch"],
                      "switch_vs_base": ms[name, "switch"] / ms[name, "base"]}
            records.append(record)
            print(f"batch {batch} {name:>5}: weights {record['weight_mb']:.1f} MB ({record['bytes_vs_fp32']:.2f}x), "
                  f"base {record['base_ms']:.2f} ms/token ({record['base_vs_fp32']:.2f}x fp32), "
                  f"switch {record['switch_ms']:.2f} ms/token ({record['switch_vs_base']:.2f}x its base)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": args.backend, "records": records}, f, indent=2)


if __name__ == "__main__":
    main()
