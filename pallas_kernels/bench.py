"""Benchmark the kernels against the bytes they must move and against a device copy.

    python -m pallas_kernels.bench --quick                 # CPU: xla timings, tiny interpret checks
    python -m pallas_kernels.bench --json out.json         # GPU: llama2-7b groups, bf16, pallas and xla

Groups of a model shape (d hidden, ff FFN, kv = n_kv_heads * head_dim): qkv [d, d+2kv] (three
members), o [d, d], gate_up [d, 2ff] (two members), down [ff, d]. Adapters: E experts of rank r on
every member, k chosen per row (one route for all members unless --route-per-member).

Bytes each must move (s = bytes per element; K x N group weight, S members, B's width Nb; T rows;
n = min(T*k, E) distinct experts per route; M layers):
  x @ W (plain, XLA)       K*N*s + T*(K+N)*s
  routed_group_matmul      plain + n*(K*S*r + r*Nb)*s      pallas, and xla = XLA's x @ W + routed term
  sgmm_merge               2*M*K*N*s + M*k*(K*S*r + r*Nb)*s    read W_base, write W, read k experts
  quantized_matmul         K*N*b/8 + (K/g)*N*(1 or 2)*s + T*(K+N)*s   b-bit integers, scales (and offsets)
(ids/gates are a few bytes and are left out.) GB/s = bytes / median time; `vs_plain` is a routed
row's time over the plain `x @ W` of the same group and T in the same run. Row-wise products run
over `--layers` layers inside one jit, each layer its own weight buffer (the decode's layout:
together they overflow L2), and are reported per layer; each timing queues several calls per
sync. sgmm_merge runs over all M layers of the stacked group weight, writing into a donated
working buffer (the decode loop's form); `pct_copy` is against a device copy timed in the same
run (read + write), the practical ceiling for these memory-bound kernels; the quantized products,
which only read, are also held to a device read (`pct_read`). The environment,
XLA_FLAGS included (command buffers / CUDA graphs change launch costs), goes into the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

from . import _common as C
from .quantized import quantized_matmul
from .reference import quantized_matmul_reference, routed_group_matmul_reference, sgmm_merge_reference, whole_output
from .routed_group import routed_group_matmul
from .sgmm import sgmm_merge
from .timing import bandwidth, queued_seconds, save_rows

# Model shapes: layers, hidden, FFN, k/v width (n_kv_heads * head_dim).
SHAPES = {
    "smollm2-135m": dict(L=30, d=576, ff=1536, kv=192),
    "llama2-7b": dict(L=32, d=4096, ff=11008, kv=4096),
    "mistral-7b": dict(L=32, d=4096, ff=14336, kv=1024),
}
GROUPS = ("qkv", "o", "gate_up", "down")
# one tile per program: the SGMM tiling timed beside the default (the measurement that picks the default)
SGMM_TILE_PER_PROGRAM = dict(block_in=64, block_out=128, row_steps=1, num_warps=4, num_stages=2)


def group_shape(cfg: dict, group: str) -> tuple[int, tuple]:
    """(K, members) of a group; members' widths add up to N and B's width equals N."""
    d, ff, kv = cfg["d"], cfg["ff"], cfg["kv"]
    if group == "qkv":
        return d, ((0, 0, d), (d, d, kv), (d + kv, d + kv, kv))
    if group == "gate_up":
        return d, ((0, 0, ff), (ff, ff, ff))
    if group == "o":
        return d, whole_output(d)
    if group == "down":
        return ff, whole_output(d)
    raise ValueError(f"group {group!r} is unknown; expected one of {GROUPS}")


def _rand(key, shape, dtype, scale):
    return scale * jax.random.normal(key, shape, dtype)


def make_group(key, L, K, members, E, r, dtype, stacked_w=False):
    """W (one [K, N] per layer, or stacked [L, K, N]) and stacked experts A [L, E, K, S*r], B [L, E, r, N]."""
    N = sum(m[2] for m in members)
    kw, ka, kb = jax.random.split(key, 3)
    if stacked_w:
        W = _rand(kw, (L, K, N), dtype, K**-0.5)
    else:
        W = [_rand(k, (K, N), dtype, K**-0.5) for k in jax.random.split(kw, L)]
    A = _rand(ka, (L, E, K, len(members) * r), dtype, K**-0.5)
    B = _rand(kb, (L, E, r, N), dtype, 0.1 * r**-0.5)
    return W, A, B


def route(key, T, S_r, E, k):
    """ids [T, S_r, k] (k distinct experts per row and route), gates [T, S_r, k] summing to 1."""
    ids = jnp.argsort(jax.random.uniform(key, (T, S_r, E)), axis=-1)[..., :k].astype(jnp.int32)
    gates = jax.nn.softmax(jax.random.normal(jax.random.fold_in(key, 1), (T, S_r, k)), axis=-1)
    return ids, gates


def rel_err(out, want):
    out, want = np.asarray(out, np.float64), np.asarray(want, np.float64)
    return float(np.abs(out - want).max() / np.abs(want).max())


def per_layer(f):
    """jit of f(x, w, A, B, ids, gates, layer) over per-layer weights: one dispatch, L products."""
    return jax.jit(lambda x, Ws, A, B, ids, gates: [f(x, w, A, B, ids, gates, layer) for layer, w in enumerate(Ws)])


def routed_fn(members, implementation, **knobs):
    """f(x, w, A, B, ids, gates, layer): the group product with its routed term."""
    return lambda x, w, A, B, ids, gates, layer: routed_group_matmul(
        x, w, A, B, ids, gates, members=members, layer=layer, implementation=implementation, **knobs)


def plain_fn(x, w, A, B, ids, gates, layer):
    del A, B, ids, gates, layer
    return x @ w


def routed_bytes(K, N, members, T, E, r, k, s):
    n = min(T * k, E)
    return (K * N + T * (K + N) + n * (K * len(members) * r + r * N)) * s


# ----------------------------------------------------------------------------- correctness


def interpret_checks(E, r, k, dtype):
    """Pallas in interpret mode vs the references on a tiny q|k|v group with ragged tiles (full
    shapes would take hours interpreted). Returns {check: max relative error}."""
    members = ((0, 0, 48), (48, 48, 24), (72, 72, 24))
    W, A, B = make_group(jax.random.PRNGKey(1), 2, 40, members, E, r, dtype, stacked_w=True)
    ids, gates = route(jax.random.PRNGKey(2), 1, 1, E, k)
    blk = dict(implementation="pallas", interpret=True)
    merged = sgmm_merge(W, A, B, ids[0, 0], gates[0, 0], members=members, block_in=16, block_out=16, **blk)
    res = {"sgmm_merge": rel_err(merged, sgmm_merge_reference(W, A, B, ids[0, 0], gates[0, 0], members))}
    for T in (1, 8):
        x = _rand(jax.random.PRNGKey(3), (T, 40), dtype, 1.0)
        ids, gates = route(jax.random.PRNGKey(T), T, 3, E, k)
        y = routed_group_matmul(x, W[0], A, B, ids, gates, members=members, layer=1, block_k=16, block_n=16, **blk)
        want = routed_group_matmul_reference(x, W[0], A, B, ids, gates, members, layer=1)
        res[f"routed_group_matmul T={T}"] = rel_err(y, want)
    return res


# ----------------------------------------------------------------------------- benchmark


def _row(rows, copy_bw, **r):
    r["gbps"] = r["bytes"] / (r["time_ms"] / 1e3) / 1e9
    r["pct_copy"] = 100 * r["gbps"] / copy_bw
    rows.append(r)
    print(fmt_row(r), flush=True)


def bench_routed(name, group, cfg, args, dtype, copy_bw, check):
    K, members = group_shape(cfg, group)
    N = sum(m[2] for m in members)
    L = min(cfg["L"], args.layers)
    E, r, k, s = args.experts, args.rank, args.topk, jnp.dtype(dtype).itemsize
    S_r = len(members) if args.route_per_member else 1
    Ws, A, B = make_group(jax.random.PRNGKey(0), L, K, members, E, r, dtype)
    rows = []
    for T in args.tokens:
        x = _rand(jax.random.PRNGKey(4), (T, K), dtype, 1.0)
        ids, gates = route(jax.random.PRNGKey(5), T, S_r, E, k)
        inputs = (x, Ws, A, B, ids, gates)
        want = routed_group_matmul_reference(x, Ws[-1], A, B, ids, gates, members, layer=L - 1) if check else None
        base = dict(shape=name, group=group, K=K, N=N, T=T, L=L, E=E, r=r, k=k, S_r=S_r, dtype=jnp.dtype(dtype).name)
        t_plain = queued_seconds(per_layer(plain_fn), inputs, args.repeats, args.samples) / L
        _row(rows, copy_bw, **base, kernel="x @ W", impl="xla", time_ms=1e3 * t_plain,
             bytes=(K * N + T * (K + N)) * s)
        for impl in args.impls:
            f = per_layer(routed_fn(members, impl, **(args.knobs if impl == "pallas" else {})))
            t = queued_seconds(f, inputs, args.repeats, args.samples) / L
            extra = dict(rel_err=rel_err(f(*inputs)[-1], want)) if check else {}
            _row(rows, copy_bw, **base, kernel="routed_group_matmul", impl=impl, time_ms=1e3 * t,
                 bytes=routed_bytes(K, N, members, T, E, r, k, s), vs_plain=t / t_plain, **extra)
    return rows


# (label, bits, group; None: per channel, group = K): what a quantized checkpoint holds by default
QUANTIZED = (("int8", 8, None), ("int4", 4, 32))


def quantized_layers(key, L, K, N, bits, group, dtype):
    """L layers' (q, scale, offset) of random integers and scales (timing does not need real weights)."""
    layers = []
    for k in jax.random.split(key, L):
        kq, ks, ko = jax.random.split(k, 3)
        if bits == 8:
            q = jax.random.randint(kq, (K, N), -127, 128, jnp.int32).astype(jnp.int8)
        else:
            q = jax.random.randint(kq, (K // 2, N), 0, 256, jnp.int32).astype(jnp.uint8)
        scale = _rand(ks, (K // group, N), dtype, 0.02)
        offset = None if bits == 8 else _rand(ko, (K // group, N), dtype, 0.1)
        layers.append((q, scale, offset))
    return layers


def bench_quantized(name, group, cfg, args, dtype, copy_bw, read_bw, check):
    """x @ W over 8- and 4-bit weights per implementation, beside the float x @ W of the same run."""
    K, members = group_shape(cfg, group)
    N = sum(m[2] for m in members)
    L = min(cfg["L"], args.layers)
    s = jnp.dtype(dtype).itemsize
    Ws = make_group(jax.random.PRNGKey(0), L, K, members, 1, 1, dtype)[0]
    rows = []
    for T in args.tokens:
        x = _rand(jax.random.PRNGKey(4), (T, K), dtype, 1.0)
        base = dict(shape=name, group=group, K=K, N=N, T=T, L=L, dtype=jnp.dtype(dtype).name)
        t_plain = queued_seconds(jax.jit(lambda x, Ws: [x @ w for w in Ws]), (x, Ws), args.repeats, args.samples) / L
        _row(rows, copy_bw, **base, kernel="x @ W", impl="xla", time_ms=1e3 * t_plain,
             bytes=(K * N + T * (K + N)) * s)
        for label, bits, g in QUANTIZED:
            g = g or K
            layers = quantized_layers(jax.random.PRNGKey(8), L, K, N, bits, g, dtype)
            nbytes = K * N * bits // 8 + (K // g) * N * (1 if bits == 8 else 2) * s + T * (K + N) * s
            for impl in args.impls:
                f = jax.jit(lambda x, layers, impl=impl, bits=bits, g=g: [
                    quantized_matmul(x, *p, bits=bits, group=g, implementation=impl) for p in layers])
                t = queued_seconds(f, (x, layers), args.repeats, args.samples) / L
                extra = {}
                if check:
                    want = quantized_matmul_reference(x, *layers[-1], bits, g)
                    extra["rel_err"] = rel_err(f(x, layers)[-1], want)
                _row(rows, copy_bw, **base, kernel=f"quantized_matmul {label}:{g}", impl=impl, time_ms=1e3 * t,
                     bytes=nbytes, vs_plain=t / t_plain, **extra)
                rows[-1]["pct_read"] = 100 * rows[-1]["gbps"] / read_bw
    return rows


def merging_into(merge):
    """The decode loop's form of a merge: the previous working weights are donated (keep_unused keeps
    the otherwise unused argument) so the merged weights land in the same buffer."""
    return jax.jit(lambda W_work, *args: merge(*args), donate_argnums=0, keep_unused=True)


def bench_sgmm(name, group, cfg, args, dtype, copy_bw, check):
    K, members = group_shape(cfg, group)
    N = sum(m[2] for m in members)
    M = min(cfg["L"], args.sgmm_layers)
    E, r, k, s = args.experts, args.rank, args.topk, jnp.dtype(dtype).itemsize
    W, A, B = make_group(jax.random.PRNGKey(6), M, K, members, E, r, dtype, stacked_w=True)
    ids, gates = route(jax.random.PRNGKey(7), 1, 1, E, k)
    ids, gates = ids[0, 0], gates[0, 0]
    nbytes = (2 * M * K * N + M * k * (K * len(members) * r + r * N)) * s
    variants = [(impl, {}) for impl in args.impls]
    if "pallas" in args.impls:
        variants.insert(args.impls.index("pallas") + 1, ("pallas-tile-per-program", SGMM_TILE_PER_PROGRAM))
    rows = []
    for label, knobs in variants:
        impl = label.split("-")[0]
        merge_into = merging_into(functools.partial(sgmm_merge, members=members, implementation=impl, **knobs))
        t = queued_seconds(merge_into, (W + 0, W, A, B, ids, gates), args.sgmm_repeats, args.samples,
                           feed_back=True)
        extra = {}
        if check:  # the same compiled call once more, on a fresh working buffer
            out = merge_into(W + 0, W, A, B, ids, gates)[-1]
            extra["rel_err"] = rel_err(out, sgmm_merge_reference(W[-1:], A[-1:], B[-1:], ids, gates, members)[0])
        _row(rows, copy_bw, shape=name, group=group, K=K, N=N, M=M, E=E, r=r, k=k, dtype=jnp.dtype(dtype).name,
             kernel="sgmm_merge", impl=label, time_ms=1e3 * t, bytes=nbytes, **extra)
    return rows


HEADER = ("| shape | group | K x N | kernel | impl | T or M | time ms | MB moved | GB/s | % of copy | vs x@W "
          "| rel err |\n|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")


def fmt_row(r):
    tm = f"T={r['T']}" if "T" in r else f"M={r['M']}"
    vs = f"{r['vs_plain']:.2f}x" if "vs_plain" in r else ""
    err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
    return (f"| {r['shape']} | {r['group']} | {r['K']}x{r['N']} | {r['kernel']} | {r['impl']} | {tm} | "
            f"{r['time_ms']:.4f} | {r['bytes'] / 1e6:.1f} | {r['gbps']:.1f} | {r['pct_copy']:.0f}% | {vs} | {err} |")


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark pallas_kernels (see the module docstring for byte counts)")
    p.add_argument("--shapes", default=None, help="default: llama2-7b (smollm2-135m with --quick)")
    p.add_argument("--groups", default=",".join(GROUPS))
    p.add_argument("--kernels", default="routed,sgmm", help="some of routed, sgmm, quantized")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 elsewhere")
    p.add_argument("--tokens", default="1,8", help="T values for the row-wise products")
    p.add_argument("--layers", type=int, default=6, help="per-layer weight buffers per routed timing")
    p.add_argument("--sgmm-layers", type=int, default=32, help="cap M, the stacked layers sgmm merges")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--route-per-member", action="store_true", help="S_r = S routes instead of one for all members")
    p.add_argument("--impls", default=None, help="default: pallas,xla on GPU; xla elsewhere")
    p.add_argument("--knobs", default="{}", help="JSON tuning knobs for the Pallas routed_group_matmul")
    p.add_argument("--repeats", type=int, default=20, help="routed calls queued per sync")
    p.add_argument("--sgmm-repeats", type=int, default=3, help="sgmm calls queued per sync")
    p.add_argument("--samples", type=int, default=5, help="timed samples (median)")
    p.add_argument("--copy-mb", type=int, default=1024)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 2 layers, few repeats, 64 MB copy")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    gpu = C.on_gpu()
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.impls = (args.impls or ("pallas,xla" if gpu else "xla")).split(",")
    args.knobs = json.loads(args.knobs)
    if args.quick:
        args.shapes = args.shapes or "smollm2-135m"
        args.layers, args.sgmm_layers = min(args.layers, 2), min(args.sgmm_layers, 2)
        args.repeats, args.sgmm_repeats, args.samples = 2, 1, 2
        args.copy_mb = min(args.copy_mb, 64)
    args.shapes = args.shapes or "llama2-7b"
    args.tokens = [int(t) for t in args.tokens.split(",")]
    kernels = args.kernels.split(",")
    for n in args.shapes.split(","):
        if n not in SHAPES:
            raise ValueError(f"--shapes entry {n!r} is unknown; expected one of {sorted(SHAPES)}")
    for g in args.groups.split(","):
        group_shape(SHAPES["smollm2-135m"], g)

    env = dict(jax=jax.__version__, backend=jax.default_backend(), device=str(jax.devices()[0]),
               machine=platform.processor() or platform.machine(), date=datetime.date.today().isoformat(),
               xla_flags=os.environ.get("XLA_FLAGS", ""), dtype=dtype, args=vars(args))
    checks = interpret_checks(args.experts, args.rank, args.topk, dtype) if not gpu or args.quick else {}
    if checks:
        print("interpret-mode Pallas vs reference (tiny q|k|v group), max rel err:",
              ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))
    kinds = ("copy", "fresh", "read") if "quantized" in kernels else ("copy", "fresh")
    copy = bandwidth(args.copy_mb << 20, max(args.sgmm_repeats, 3), args.samples, kinds=kinds)
    bw = max(copy["fresh_gb_s"], copy["copy_gb_s"])
    print(f"device copy of {copy['bytes'] >> 20} MiB, read + write: {copy['copy_gb_s']:.1f} GB/s in place (donated), "
          f"{copy['fresh_gb_s']:.1f} GB/s into a fresh buffer; ceiling for '% of copy': {bw:.1f} GB/s"
          + (f"; a read: {copy['read_gb_s']:.1f} GB/s" if "read_gb_s" in copy else "") + "\n")
    print(HEADER)
    rows = []
    for name in args.shapes.split(","):
        for group in args.groups.split(","):
            if "routed" in kernels:
                rows += bench_routed(name, group, SHAPES[name], args, dtype, bw, check=gpu)
            if "sgmm" in kernels:
                rows += bench_sgmm(name, group, SHAPES[name], args, dtype, bw, check=gpu)
            if "quantized" in kernels:
                rows += bench_quantized(name, group, SHAPES[name], args, dtype, bw, copy["read_gb_s"], check=gpu)
            if args.json:  # after every group, so a run cut short keeps what it measured
                save_rows(args.json, dict(env=env, copy_gbps=copy, ceiling_gbps=bw, interpret_checks=checks, rows=rows))
    return rows


if __name__ == "__main__":
    main()
