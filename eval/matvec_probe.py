"""What bounds a batch-1 decode step on this machine: bandwidths, the matvec rate, the routed term.

    python -m lsjax.eval.matvec_probe --json probe.json

A decode step is a chain of matvecs (each layer needs the last one's output), so it runs at the
rate of one matvec at a time, not at the rate of independent ones. This probe times, in one run:
a device copy (read + write) and a read-only pass over 1 GiB; 30 layers of SmolLM2-135M-shaped
q/o/gate/up/down matvecs as a dependent chain and as independent products; and the same chain
with a routed LoRA term (k of E experts, rank r) in three forms: gathered (what `unmerged` runs),
static slices of the first k experts (no gather at all), and dense over all E experts. The
ratios tell whether the routed term costs operations or bytes (docs/perf.md, "What bounds a CPU
decode step"). Where `lsjax.native` is built, the chain also runs on its multi-threaded matvecs,
plain and with the routed term in the same call (what `fused` runs on CPU).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lsjax import native
from lsjax.eval.latency import copy_bandwidth, read_bandwidth
from lsjax.jsonfile import write_json

SHAPES = {"q": ("d", "d"), "o": ("d", "d"), "gate": ("d", "ff"), "up": ("d", "ff"), "down": ("ff", "d")}


def median_seconds(fn, *args, calls: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def routed(form: str, k: int):
    def term(x, p, ids, gates):
        if form == "gathered":
            xa = jnp.einsum("td,tkdr->tkr", x, p["a"][ids]) * gates[..., None]
            return jnp.einsum("tkr,tkro->to", xa, p["b"][ids])
        if form == "static":  # the first k experts by static slices: the same bytes, no gather
            xa = jnp.einsum("td,kdr->tkr", x, p["a"][:k]) * gates[..., None]
            return jnp.einsum("tkr,kro->to", xa, p["b"][:k])
        coef = jnp.zeros((x.shape[0], p["a"].shape[0])).at[0, ids[0]].set(gates[0])  # dense: every expert
        xa = jnp.einsum("td,edr->ter", x, p["a"]) * coef[..., None]
        return jnp.einsum("ter,ero->to", xa, p["b"])
    return term


def native_project(routed: bool):
    def project(h, p, ids, gates):
        if routed:
            return native.routed_matmul(h, p["w"], p["a"], p["b"], ids, gates)
        return native.matmul(h, p["w"])
    return project


def chain(term=None, project=None):
    """30 dependent layers: attention-like q -> o and an MLP, each projection optionally routed
    (`term`), or each computed whole by `project(h, params, ids, gates)`."""
    def run(x, layers, ids, gates):
        def project_one(name, h, layer):
            if project is not None:
                return project(h, layer[name], ids, gates)
            y = h @ layer[name]["w"]
            return y if term is None else y + term(h, layer[name], ids, gates)

        h = x
        for layer in layers:
            h = h + project_one("o", project_one("q", h, layer), layer)
            h = h + project_one("down", jax.nn.silu(project_one("gate", h, layer)) * project_one("up", h, layer),
                                layer)
            h = h / jnp.linalg.norm(h)
        return h
    return jax.jit(run)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--json")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    dims = {"d": args.hidden, "ff": args.ffn}
    E, r, k = args.experts, args.rank, args.top_k

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[-2]), jnp.float32)

    layers = [{name: {"w": rand(dims[i], dims[o]), "a": rand(E, dims[i], r), "b": rand(E, r, dims[o])}
               for name, (i, o) in SHAPES.items()} for _ in range(args.layers)]
    weight_bytes = sum(layer[n]["w"].nbytes for layer in layers for n in SHAPES)
    x = rand(1, args.hidden)
    ids = jnp.asarray([rng.permutation(E)[:k]], jnp.int32)
    gates = jnp.full((1, k), 1.0 / k, jnp.float32)

    independent = jax.jit(lambda x, layers: sum(jnp.sum(x[:, :layer[n]["w"].shape[0]] @ layer[n]["w"])
                                                for layer in layers for n in SHAPES))
    ms = {"chain": median_seconds(chain(), x, layers, ids, gates) * 1e3,
          "independent": median_seconds(independent, jnp.ones((1, max(dims.values()))), layers) * 1e3}
    outputs = {}
    for form in ("gathered", "static", "dense"):
        run = chain(routed(form, k))
        ms[f"chain + routed {form}"] = median_seconds(run, x, layers, ids, gates) * 1e3
        outputs[form] = run(x, layers, ids, gates)
    if native.available():
        ms["native chain"] = median_seconds(chain(project=native_project(False)), x, layers, ids, gates) * 1e3
        run = chain(project=native_project(True))
        ms["native chain + routed"] = median_seconds(run, x, layers, ids, gates) * 1e3
        outputs["native"] = run(x, layers, ids, gates)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "backend": jax.default_backend(),
        "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "args": vars(args),
        "copy_gb_s": copy_bandwidth(), "read_gb_s": read_bandwidth(), "weight_bytes": weight_bytes, "ms": ms,
        "chain_gb_s": weight_bytes / ms["chain"] / 1e6, "independent_gb_s": weight_bytes / ms["independent"] / 1e6,
        "routed_extra_ms": {form: ms[f"chain + routed {form}"] - ms["chain"] for form in ("gathered", "static", "dense")},
        # the gathered and dense forms compute the same function (static slices use other experts)
        "gathered_vs_dense_max_abs": float(jnp.abs(outputs["gathered"] - outputs["dense"]).max()),
    }
    if "native" in outputs:
        result.update(native_chain_gb_s=weight_bytes / ms["native chain"] / 1e6,
                      native_routed_extra_ms=ms["native chain + routed"] - ms["native chain"],
                      native_vs_gathered_max_abs=float(jnp.abs(outputs["native"] - outputs["gathered"]).max()))
    print(f"copy {result['copy_gb_s']:.1f} GB/s (read + write); read-only {result['read_gb_s']:.1f} GB/s")
    print(f"{args.layers} layers, {weight_bytes / 1e6:.0f} MB of weights: dependent matvec chain {ms['chain']:.2f} ms "
          f"({result['chain_gb_s']:.1f} GB/s); independent matvecs {ms['independent']:.2f} ms "
          f"({result['independent_gb_s']:.1f} GB/s)")
    for form, extra in result["routed_extra_ms"].items():
        print(f"routed term ({form}): +{extra:.2f} ms = {ms[f'chain + routed {form}'] / ms['chain']:.2f}x the chain")
    if "native" in outputs:
        print(f"lsjax.native: chain {ms['native chain']:.2f} ms ({result['native_chain_gb_s']:.1f} GB/s, "
              f"{ms['chain'] / ms['native chain']:.2f}x faster than XLA's); routed term in the same call "
              f"+{result['native_routed_extra_ms']:.2f} ms = "
              f"{ms['native chain + routed'] / ms['native chain']:.2f}x the native chain")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
