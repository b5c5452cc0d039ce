"""Decode speed over a quantized base against the float one, base and LoRA-Switch, in one run.

    python eval/quantized_latency.py --ckpt CKPT [--kept Q_CKPT] [--batch 1,8] [--tokens 32] [--rounds 5]
    python eval/quantized_latency.py --shape llama2-7b --dtype bfloat16 --backend xla   # random weights (GPU)

The float model's weights are quantized here with `lsjax.quant.quantize_params` (int8 per channel;
4-bit in groups of 32), or `--kept` names a checkpoint converted with `lsjax convert --gguf ...
--keep-quantized` to stand for the 4-bit base. Every model decodes greedily with
`lsjax.generate.Generator` on `--backend` (default native where it is built), compiled and warmed
up first, then timed in alternating rounds; the medians give each ms/token against the float base
of the same batch, beside the ratio of weight bytes that a step reads (what bandwidth allows; for
switch, the chosen experts' bytes beside its base's). A random switch adapter of the usual shape
(8 experts, top-2, rank 16, every projection) stands in, in the float model's dtype. `--json` is
rewritten after each batch size (`meta.complete` once all are timed), so a run cut short keeps
what it measured.
"""

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lsjax
from lsjax import native, quant
from lsjax.adapters import Adapter, AdapterConfig
from lsjax.config import SHAPES
from lsjax.eval.latency import load_model
from lsjax.generate import Generator
from lsjax.jsonfile import write_json
from lsjax.model import model_from_params

FLOAT_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def weight_bytes(model) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(model.params()))


def expert_bytes(adapter) -> float:
    """One expert's bytes over every layer and projection (A and B)."""
    experts = jax.tree.leaves(nnx.state(adapter.experts))
    return sum(x.nbytes for x in experts) / adapter.config.num_experts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a float checkpoint")
    source.add_argument("--shape", choices=sorted(SHAPES), help="random weights at a named shape instead")
    parser.add_argument("--dtype", choices=sorted(FLOAT_NAMES), default="float32", help="the float model's dtype")
    parser.add_argument("--kept", help="a checkpoint keeping a GGUF file's 4-bit blocks (else int4:32 made here)")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default="native" if native.available() else "xla")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.kept and not args.ckpt:
        parser.error("--kept goes with --ckpt (the float checkpoint of the same model)")

    floats, tokenizer, source = load_model(args)  # --shape: random weights; --ckpt: that checkpoint
    name = FLOAT_NAMES[args.dtype]
    models = {name: floats,
              "int8": model_from_params(floats.config, quant.quantize_params(floats.params(), "int8")),
              "4-bit": lsjax.load(args.kept, dtype=args.dtype)[0] if args.kept else
              model_from_params(floats.config, quant.quantize_params(floats.params(), "int4", 32))}
    config = AdapterConfig(method="switch", num_experts=8, top_k=2, rank=16, targets="all-linear")
    adapter = Adapter(floats.config, config, rngs=nnx.Rngs(0), dtype=jnp.dtype(args.dtype))
    sizes = {key: weight_bytes(model) for key, model in models.items()}
    per_expert = expert_bytes(adapter)
    meta = {"backend": args.backend, "dtype": args.dtype, "source": source, "complete": False}
    records = []
    for batch in (int(b) for b in args.batch.split(",")):
        prompts = np.random.default_rng(0).integers(3, floats.config.vocab_size, (batch, 16)).tolist()
        generators = {(key, method): Generator(model, tokenizer, adapter if method == "switch" else None,
                                                strategy="fused" if method == "switch" else "auto",
                                                backend=args.backend)
                      for key, model in models.items() for method in ("base", "switch")}
        times = {key: [] for key in generators}
        for gen in generators.values():  # compile and warm up
            gen.generate(prompts, max_new_tokens=args.tokens, stop_token_ids=())
        for _ in range(args.rounds):
            for key, gen in generators.items():
                times[key].append(gen.generate(prompts, max_new_tokens=args.tokens, stop_token_ids=()).timings[
                    "decode_ms_per_token"])
        ms = {key: statistics.median(t) for key, t in times.items()}
        base = ms[name, "base"]
        # a step reads the weights and each expert some row chose once: top-k at batch 1, at most
        # every expert at larger batches (an upper bound there)
        chosen = min(config.num_experts, batch * config.top_k) * per_expert
        for key in models:
            record = {"batch": batch, "weights": key, "weight_mb": sizes[key] / 2**20,
                      "bytes_vs_float": sizes[key] / sizes[name], "base_ms": ms[key, "base"],
                      "base_vs_float": ms[key, "base"] / base, "switch_ms": ms[key, "switch"],
                      "switch_vs_base": ms[key, "switch"] / ms[key, "base"], "expert_mb": chosen / 2**20,
                      "switch_bytes_vs_base": (sizes[key] + chosen) / sizes[key]}
            records.append(record)
            print(f"batch {batch} {key:>5}: weights {record['weight_mb']:.1f} MB ({record['bytes_vs_float']:.2f}x), "
                  f"base {record['base_ms']:.2f} ms/token ({record['base_vs_float']:.2f}x {name}), "
                  f"switch {record['switch_ms']:.2f} ms/token ({record['switch_vs_base']:.2f}x its base; "
                  f"{'its' if batch == 1 else 'at most its'} bytes {record['switch_bytes_vs_base']:.2f}x)", flush=True)
        if args.json:
            write_json(args.json, {"meta": meta, "records": records})
    meta["complete"] = True
    if args.json:
        write_json(args.json, {"meta": meta, "records": records})


if __name__ == "__main__":
    main()
