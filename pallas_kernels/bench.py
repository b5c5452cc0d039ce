"""Benchmark the kernels against the bytes they must move and against a device copy.

    python -m pallas_kernels.bench --quick                      # CPU: xla timings, small interpret checks
    python -m pallas_kernels.bench --shapes llama2-7b --dtype bfloat16 --json out.json   # GPU

Bytes each kernel must move (s = bytes per element; M layers; k experts; r rank; T rows):
  sgmm_merge          2*M*d_in*d_out*s + M*k*r*(d_in+d_out)*s     read W_base, write W, read k experts
  sgmm_switch         2*M*d_in*d_out*s + M*2k*r*(d_in+d_out)*s    read+write W in place, old+new experts
  routed_lora_matmul  d_in*d_out*s + T*(d_in+d_out)*s + min(T*k, E)*r*(d_in+d_out)*s
  x @ W (plain)       d_in*d_out*s + T*(d_in+d_out)*s
(ids/gates are a few bytes and are left out.) Achieved GB/s = bytes / median time. The
row-wise kernels (x @ W, routed) run over all M layers in one jit, each layer in its own buffers,
and are reported per layer. The copy
row times a jitted copy of a large buffer in the same run and counts read + write bytes: it
is the practical ceiling for these memory-bound kernels on this machine.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import _common as C
from .reference import routed_lora_matmul_reference, sgmm_merge_reference, sgmm_switch_reference
from .routed_matmul import _routed_xla, routed_lora_add, routed_lora_matmul
from .sgmm import sgmm_merge, sgmm_switch
from .timing import queued_seconds

# Model shapes: layers, hidden, FFN, k/v width (n_kv_heads * head_dim).
SHAPES = {
    "smollm2-135m": dict(L=30, d=576, ff=1536, kv=192),
    "llama2-7b": dict(L=32, d=4096, ff=11008, kv=4096),
    "mistral-7b": dict(L=32, d=4096, ff=14336, kv=1024),
}
PROJECTIONS = {"q": ("d", "d"), "k": ("d", "kv"), "up": ("d", "ff"), "down": ("ff", "d")}


def timeit(fn, *args, iters=10, warmup=2, donate_first=False):
    """Median wall time (s) of fn(*args) after warmup; with donate_first the output is fed
    back as the first argument, as an in-place update loop would do."""
    for _ in range(warmup):
        out = jax.block_until_ready(fn(*args))
        if donate_first:
            args = (out,) + args[1:]
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
        if donate_first:
            args = (out,) + args[1:]
    return statistics.median(times)


def copy_gbps(nbytes, iters):
    """Device copy bandwidth, read + write bytes, two ways:

    fresh:   jit(x.copy()) into a newly allocated buffer (what a non-donated op pays);
    inplace: jit(x + 1) with x donated, so the output reuses x's buffer.
    Each sample queues `iters` copies before one sync: one sync per copy cost an H100 a third
    of its bandwidth (1.97 TB/s vs 2.88 TB/s at 512 MiB). On the 2-core CPU VM the fresh copy
    runs ~4x slower than the in-place one: every large new buffer is mmap'ed and page-faulted in.
    The better of the two is the ceiling used for "% of copy".
    """
    def queued(fn, x, feed_back):
        return 2 * x.nbytes / queued_seconds(fn, x, iters, 3, feed_back) / 1e9

    x = jnp.ones((nbytes // 4,), jnp.float32)
    fresh = queued(jax.jit(lambda x: x.copy()), x, feed_back=False)
    inplace = queued(jax.jit(lambda x: x + 1, donate_argnums=0), x + 0, feed_back=True)
    return dict(fresh=fresh, inplace=inplace, bytes=x.nbytes)


def per_layer(f):
    """jit of `f(x, W, A, B, ids, gates)` summed over per-layer buffers: M kernels, one dispatch."""
    def run(x, Ws, As, Bs, ids, gates):
        return sum(f(x, w, a, b, ids, gates).astype(jnp.float32) for w, a, b in zip(Ws, As, Bs))
    return jax.jit(run)


def projected_add(**kwargs):
    """f(x, w, a, b, ids, gates): XLA's own x @ w, then `routed_lora_add(..., **kwargs)` onto it."""
    add = functools.partial(routed_lora_add, **kwargs)
    return lambda x, w, a, b, ids, gates: add(jnp.dot(x, w), x, a, b, ids, gates)


def _rand(key, shape, dtype, scale):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def make_inputs(key, M, d_in, d_out, E, r, dtype):
    kw, ka, kb = jax.random.split(key, 3)
    W = _rand(kw, (M, d_in, d_out), dtype, d_in**-0.5)
    A = _rand(ka, (M, E, d_in, r), dtype, d_in**-0.5)
    B = _rand(kb, (M, E, r, d_out), dtype, 0.1 * r**-0.5)
    return W, A, B


def route(key, T, E, k):
    ids = jnp.argsort(jax.random.uniform(key, (T, E)), axis=1)[:, :k].astype(jnp.int32)
    gates = jax.nn.softmax(jax.random.normal(key, (T, k)), axis=-1)
    return ids, gates


def rel_err(out, want):
    out, want = np.asarray(out, np.float64), np.asarray(want, np.float64)
    return float(np.abs(out - want).max() / np.abs(want).max())


# ----------------------------------------------------------------------------- correctness


def interpret_checks(E, r, k, dtype):
    """Pallas in interpret mode vs the references at a small ragged shape (full shapes would
    take hours interpreted). Returns {kernel: max relative error}."""
    key = jax.random.PRNGKey(1)
    W, A, B = make_inputs(key, 2, 96, 80, E, r, dtype)
    ids, gates = route(key, 2, E, k)
    blk = dict(implementation="pallas", interpret=True, block_in=32, block_out=32)
    merged = sgmm_merge(W, A, B, ids[0], gates[0], **blk)
    res = {"sgmm_merge": rel_err(merged, sgmm_merge_reference(W, A, B, ids[0], gates[0]))}
    sw = sgmm_switch(merged, A, B, ids[0], gates[0], ids[1], gates[1], **blk)
    res["sgmm_switch"] = rel_err(sw, sgmm_switch_reference(merged, A, B, ids[0], gates[0], ids[1], gates[1]))
    x = _rand(key, (5, 96), dtype, 1.0)
    rids, rg = route(jax.random.PRNGKey(2), 5, E, k)
    y = routed_lora_matmul(x, W[0], A[0], B[0], rids, rg, block_t=16, **blk)
    res["routed_lora_matmul"] = rel_err(y, routed_lora_matmul_reference(x, W[0], A[0], B[0], rids, rg))
    return res


# ----------------------------------------------------------------------------- benchmark


def bench_projection(name, proj, cfg, args, impls, dtype, copy_bw, check):
    d_in, d_out = (cfg[a] for a in PROJECTIONS[proj])
    M = cfg["L"] if args.layers is None else min(cfg["L"], args.layers)
    E, r, k, it = args.experts, args.rank, args.topk, args.iters
    s = jnp.dtype(dtype).itemsize
    key = jax.random.PRNGKey(0)
    W, A, B = make_inputs(key, M, d_in, d_out, E, r, dtype)
    (old_ids, new_ids), (old_g, new_g) = route(jax.random.PRNGKey(3), 2, E, k)
    rows = []

    def row(kernel, impl, t, nbytes, extra=None):
        r_ = dict(shape=name, proj=f"{proj} {d_in}x{d_out}", kernel=kernel, impl=impl, dtype=jnp.dtype(dtype).name,
                  M=M, E=E, r=r, k=k, time_ms=1e3 * t, bytes=nbytes, gbps=nbytes / t / 1e9,
                  pct_copy=100 * nbytes / t / 1e9 / copy_bw)
        r_.update(extra or {})
        rows.append(r_)
        print(fmt_row(r_), flush=True)

    for impl in impls:
        merge = functools.partial(sgmm_merge, implementation=impl)
        # Decode-loop form: the previous working weights are donated (keep_unused keeps the
        # otherwise unused argument) so the merged weights land in the same buffer.
        merge_into = jax.jit(lambda W_work, *a: merge(*a), donate_argnums=0, keep_unused=True)
        W_work = W + 0
        t = timeit(merge_into, W_work, W, A, B, new_ids, new_g, iters=it, donate_first=True)
        extra = {}
        if check:
            extra["rel_err"] = rel_err(jax.jit(merge)(W, A, B, new_ids, new_g),
                                       sgmm_merge_reference(W, A, B, new_ids, new_g))
        row("sgmm_merge", impl, t, 2 * M * d_in * d_out * s + M * k * r * (d_in + d_out) * s, extra)
        del W_work

        switch = jax.jit(functools.partial(sgmm_switch, implementation=impl), donate_argnums=0)
        W_work = W + 0  # our own buffer to donate round and round
        t = timeit(switch, W_work, A, B, old_ids, old_g, new_ids, new_g, iters=it, donate_first=True)
        row("sgmm_switch", impl, t, 2 * M * d_in * d_out * s + M * 2 * k * r * (d_in + d_out) * s)
        del W_work

    # Row-wise kernels are timed over all M layers inside one jit, each layer its own buffers (the
    # unrolled decode's layout): one dispatch for M kernels, and M weight matrices overflow the GPU's
    # L2 where one 4096x4096 bf16 matrix (34 MB) would sit in it. Figures are per layer.
    Ws = [W[i] + 0 for i in range(M)]
    As, Bs = [A[i] + 0 for i in range(M)], [B[i] + 0 for i in range(M)]
    del W, A, B

    plain = per_layer(lambda x, w, a, b, ids, g: jnp.dot(x, w, preferred_element_type=jnp.float32))
    for T in args.tokens:
        x = _rand(jax.random.PRNGKey(4), (T, d_in), dtype, 1.0)
        ids, gates = route(jax.random.PRNGKey(5), T, E, k)
        io = T * (d_in + d_out) * s
        t_plain = timeit(plain, x, Ws, As, Bs, ids, gates, iters=it) / M
        row("x @ W", "xla", t_plain, d_in * d_out * s + io, dict(T=T))
        nbytes = d_in * d_out * s + io + min(T * k, E) * r * (d_in + d_out) * s
        want = routed_lora_matmul_reference(x, Ws[-1], As[-1], Bs[-1], ids, gates) if check else None
        for impl in impls:
            for kernel, fn in [
                ("routed_lora_matmul", functools.partial(routed_lora_matmul, implementation=impl)),
                ("x @ W + routed_lora_add", projected_add(implementation=impl)),
            ]:
                t = timeit(per_layer(fn), x, Ws, As, Bs, ids, gates, iters=it) / M
                extra = dict(T=T, vs_plain=t / t_plain)
                if check:
                    extra["rel_err"] = rel_err(jax.jit(fn)(x, Ws[-1], As[-1], Bs[-1], ids, gates), want)
                row(kernel, impl, t, nbytes, extra)
        if "xla" in impls and T * k > E:  # the per-row gather form the auto choice skipped
            gather = functools.partial(_routed_xla, form="gather")
            t = timeit(per_layer(gather), x, Ws, As, Bs, ids, gates, iters=it) / M
            row("routed_lora_matmul", "xla-gather", t, nbytes, dict(T=T, vs_plain=t / t_plain))
    return rows


HEADER = ("| shape | proj | kernel | impl | M or T | time ms | MB moved | GB/s | % of copy | vs x@W | rel err |\n"
          "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")


def fmt_row(r):
    mt = f"T={r['T']}" if "T" in r else f"M={r['M']}"
    vs = f"{r['vs_plain']:.2f}x" if "vs_plain" in r else ""
    err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
    return (f"| {r['shape']} | {r['proj']} | {r['kernel']} | {r['impl']} | {mt} | {r['time_ms']:.3f} | "
            f"{r['bytes'] / 1e6:.1f} | {r['gbps']:.1f} | {r['pct_copy']:.0f}% | {vs} | {err} |")


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark pallas_kernels (see module docstring for byte formulas)")
    p.add_argument("--shapes", default="smollm2-135m,llama2-7b,mistral-7b")
    p.add_argument("--projections", default="q,up,down")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 elsewhere")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="cap M (stacked layers) for sgmm")
    p.add_argument("--tokens", default="1,64", help="T values for routed_lora_matmul")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--impls", default=None, help="default: pallas,xla on GPU; xla elsewhere")
    p.add_argument("--copy-mb", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: M<=2, 3 iters, 256 MB copy")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    gpu = C.on_gpu()
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    impls = (args.impls or ("pallas,xla" if gpu else "xla")).split(",")
    if args.quick:
        args.layers = 2 if args.layers is None else args.layers
        args.iters = args.iters or 3
        args.copy_mb = min(args.copy_mb, 256)
    args.iters = args.iters or 10
    args.tokens = [int(t) for t in args.tokens.split(",")]
    for n in args.shapes.split(","):
        if n not in SHAPES:
            raise ValueError(f"--shapes entry {n!r} is unknown; expected one of {sorted(SHAPES)}")

    env = dict(jax=jax.__version__, backend=jax.default_backend(), device=str(jax.devices()[0]),
               machine=platform.processor() or platform.machine(), date=datetime.date.today().isoformat(),
               dtype=dtype, impls=impls, args=vars(args))
    checks = interpret_checks(args.experts, args.rank, args.topk, dtype) if not gpu or args.quick else {}
    if checks:
        print("interpret-mode Pallas vs reference (M=2, 96x80, T=5), max rel err:",
              ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))
    copy = copy_gbps(args.copy_mb << 20, args.iters)
    bw = max(copy["fresh"], copy["inplace"])
    print(f"device copy of {copy['bytes'] >> 20} MiB, read + write: {copy['inplace']:.1f} GB/s in place (donated), "
          f"{copy['fresh']:.1f} GB/s into a fresh buffer; ceiling for '% of copy': {bw:.1f} GB/s\n")
    print(HEADER)
    rows = []
    for name in args.shapes.split(","):
        for proj in args.projections.split(","):
            rows += bench_projection(name, proj, SHAPES[name], args, impls, dtype, bw, check=gpu)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, copy_gbps=copy, ceiling_gbps=bw, interpret_checks=checks, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
