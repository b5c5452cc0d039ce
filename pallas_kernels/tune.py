"""Sweep the routed kernels' Pallas tiles for decode-sized batches on the GPU at hand.

    python -m pallas_kernels.tune --json tune.json                  # routed_lora_matmul (x @ W inside)
    python -m pallas_kernels.tune --kernel add --json tune_add.json  # XLA's x @ W, then routed_lora_add

Each configuration runs over M layers inside one jit, each layer in its own buffers (as the
unrolled decode does), so weights stream from memory rather than L2; the time is per layer and
is compared with XLA's plain `x @ W` of the same run. Every result is checked against the
reference first; a configuration that fails to compile is reported and skipped.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import jax
import jax.numpy as jnp

from .bench import PROJECTIONS, SHAPES, make_inputs, per_layer, projected_add, rel_err, route, timeit
from .reference import routed_lora_matmul_reference
from .routed_matmul import routed_lora_matmul

# (block_out, block_in) pairs, most promising first: wide column tiles read long contiguous runs.
TILES = [(128, 64), (128, 128), (64, 128), (256, 64), (64, 64), (32, 64), (256, 32), (128, 32)]
SPLITS = [1, 2, 4, 8]
# routed_lora_add reads only the chosen experts: each program recomputes x @ A over all of d_in, so
# the trade is fewer, wider column tiles (less recomputation) against more programs (more SMs busy).
ADD_TILES = [(256, 128), (128, 128), (64, 128), (512, 128), (256, 256), (128, 256), (64, 256), (256, 64)]


def _configs(kernel, warps):
    if kernel == "add":
        return [dict(block_out=bn, block_in=bk, num_warps=w) for (bn, bk), w in itertools.product(ADD_TILES, warps)]
    return [dict(block_out=bn, block_in=bk, splits=s, num_warps=w)
            for (bn, bk), s, w in itertools.product(TILES, SPLITS, warps)]


def _kernel(kernel, **cfg):
    """f(x, w, a, b, ids, gates) -> x @ w + routed term, through the kernel under test."""
    if kernel == "add":
        return projected_add(implementation="pallas", interpret=False, **cfg)
    return functools.partial(routed_lora_matmul, implementation="pallas", interpret=False, **cfg)


def sweep(d_in, d_out, T, args, dtype):
    M, E, r, k = args.layers, args.experts, args.rank, args.topk
    W, A, B = make_inputs(jax.random.PRNGKey(0), M, d_in, d_out, E, r, dtype)
    Ws, As, Bs = [W[i] for i in range(M)], [A[i] for i in range(M)], [B[i] for i in range(M)]
    x = (jax.random.normal(jax.random.PRNGKey(1), (T, d_in))).astype(dtype)
    ids, gates = route(jax.random.PRNGKey(2), T, E, k)
    want = routed_lora_matmul_reference(x, Ws[0], As[0], Bs[0], ids, gates)
    inputs = (x, Ws, As, Bs, ids, gates)
    t_plain = timeit(per_layer(lambda x, w, a, b, i, g: jnp.dot(x, w, preferred_element_type=jnp.float32)),
                     *inputs, iters=args.iters) / M
    t_xla = timeit(per_layer(functools.partial(routed_lora_matmul, implementation="xla")), *inputs,
                   iters=args.iters) / M
    nbytes = (d_in * d_out + T * (d_in + d_out) + min(T * k, E) * r * (d_in + d_out)) * jnp.dtype(dtype).itemsize
    print(f"\n{d_in}x{d_out} T={T}: x@W {1e3 * t_plain:.4f} ms ({nbytes / t_plain / 1e9:.0f} GB/s); "
          f"xla routed {1e3 * t_xla:.4f} ms ({t_xla / t_plain:.2f}x)", flush=True)
    rows = []
    for cfg in _configs(args.kernel, args.warps):
        f = _kernel(args.kernel, **cfg)
        try:
            err = rel_err(jax.jit(f)(x, Ws[0], As[0], Bs[0], ids, gates), want)
            t = timeit(per_layer(f), *inputs, iters=args.iters) / M
        except Exception as e:  # noqa: BLE001 - a tile that does not compile is a result too
            print(f"  {cfg}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        row = dict(kernel=args.kernel, d_in=d_in, d_out=d_out, T=T, splits=1)
        row.update(cfg, ms=1e3 * t, gbps=nbytes / t / 1e9, vs_plain=t / t_plain, vs_xla=t / t_xla, rel_err=err,
                   plain_ms=1e3 * t_plain, xla_ms=1e3 * t_xla)
        rows.append(row)
        print(f"  bn={row['block_out']:<3} bk={row['block_in']:<3} splits={row['splits']} warps={row['num_warps']}: "
              f"{row['ms']:.4f} ms {row['gbps']:.0f} GB/s {row['vs_plain']:.2f}x x@W  err {err:.1e}", flush=True)
    best = min(rows, key=lambda r: r["ms"]) if rows else None
    if best:
        print(f"  best: {best['ms']:.4f} ms = {best['vs_plain']:.2f}x x@W with block_out={best['block_out']} "
              f"block_in={best['block_in']} splits={best['splits']} num_warps={best['num_warps']}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", default="matmul", choices=("matmul", "add"),
                   help="routed_lora_matmul, or XLA's x @ W followed by routed_lora_add")
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    p.add_argument("--projections", default="q,up,down")
    p.add_argument("--tokens", default="1,8")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--warps", default="4")
    p.add_argument("--json")
    args = p.parse_args(argv)
    args.warps = [int(w) for w in args.warps.split(",")]
    cfg = SHAPES[args.shape]
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        for proj in args.projections.split(","):
            d_in, d_out = (cfg[a] for a in PROJECTIONS[proj])
            rows += sweep(d_in, d_out, T, args, jnp.dtype(args.dtype))
            if args.json:  # after every shape, so a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), args=vars(args), rows=rows),
                              f, indent=1)


if __name__ == "__main__":
    main()
