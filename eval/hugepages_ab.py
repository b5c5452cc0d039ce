"""Huge pages on and off in one run: base and fused switch decode, each on its own copy of the weights.

    python -m lsjax.eval.hugepages_ab --json ab.json

`lsjax bench decode` shares one copy of the weights between all its configurations, so it cannot
time both page sizes side by side; this does: two copies of the per-layer weights (one remapped
onto huge pages by its Generators, one left on the C library's 4 KiB pages), the same adapter,
interleaved rounds, medians, ratios of this run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from lsjax.eval.latency import load_model, random_adapter
from lsjax.jsonfile import write_json


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="lsjax checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", default=".cache/lsjax")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json")
    args = p.parse_args(argv)
    from lsjax import hugepages
    from lsjax.generate import Generator
    from lsjax.model import split_layers

    spec = types.SimpleNamespace(shape=None, ckpt=args.ckpt, cache_dir=args.cache_dir, dtype="float32", experts=8,
                                 top_k=2, rank=16, targets="all-linear")
    model, tokenizer, source = load_model(spec)
    adapter = random_adapter(model.config, "switch", spec)
    generators = {}
    for huge in (False, True):
        weights = jax.tree.map(lambda x: jnp.array(np.asarray(x)), split_layers(model.params()))  # its own copy
        generators[("base", huge)] = Generator(model, tokenizer, None, params=weights, huge_pages=huge)
        generators[("switch", huge)] = Generator(model, tokenizer, adapter, strategy="fused", params=weights,
                                                 huge_pages=huge)
    prompt = [np.random.default_rng(0).integers(3, model.config.vocab_size, 32).tolist()]
    samples = {key: [] for key in generators}
    for gen in generators.values():
        gen.generate(prompt, max_new_tokens=args.new_tokens, stop_token_ids=())  # compile + warm up
    for _ in range(args.rounds):
        for key, gen in generators.items():
            timings = gen.generate(prompt, max_new_tokens=args.new_tokens, stop_token_ids=()).timings
            samples[key].append(timings["decode_ms_per_token"])
    ms = {f"{method} huge_pages={'on' if huge else 'off'}": statistics.median(v) for (method, huge), v in samples.items()}
    result = {"source": source, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds,
              "new_tokens": args.new_tokens, "native": generators[("base", True)].native,
              "huge_page_mb": {f"{m} huge_pages={'on' if h else 'off'}": g.huge_page_bytes / 2**20
                               for (m, h), g in generators.items()},
              "unavailable_reason": hugepages.unavailable_reason(), "ms_per_token": ms,
              "speedup": {m: ms[f"{m} huge_pages=off"] / ms[f"{m} huge_pages=on"] for m in ("base", "switch")},
              "switch_over_base": {h: ms[f"switch huge_pages={h}"] / ms[f"base huge_pages={h}"] for h in ("off", "on")}}
    for name, value in ms.items():
        print(f"{name:24s} {value:6.2f} ms/token")
    print("huge pages speed-up: " + ", ".join(f"{m} {s:.3f}x" for m, s in result["speedup"].items()))
    print("switch / base: " + ", ".join(f"huge pages {h} {r:.3f}x" for h, r in result["switch_over_base"].items()))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
