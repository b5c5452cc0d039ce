"""Sweep routed_group_matmul's Pallas knobs for decode-sized batches on the GPU at hand.

    python -m pallas_kernels.tune --json tune.json                   # llama2-7b groups, T = 1 and 8
    python -m pallas_kernels.tune --groups qkv --tokens 1 --budget 60

Each configuration runs over `--layers` layers inside one jit, each layer its own weight buffer
(as the decode does), so weights stream from memory rather than L2; times are per layer and
compared with XLA's plain `x @ W` and XLA's grouped form (`x @ W` + the XLA routed term) of the
same run. Every result is checked against the reference; a configuration that fails to compile is
reported and skipped. The sweep is short by design (a handful of variants around the defaults per
group and T) and stops starting new configurations once `--budget` seconds have passed.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from . import _common as C
from .bench import (
    GROUPS,
    SHAPES,
    group_shape,
    make_group,
    per_layer,
    plain_fn,
    rel_err,
    route,
    routed_bytes,
    routed_fn,
)
from .reference import routed_group_matmul_reference
from .routed_group import _configure
from .timing import queued_seconds, save_rows


def variants(T, K, N, members, E, r, k, S_r):
    """Knob sets around the defaults, most telling first: the default, then one change at a time."""
    cfg, _ = _configure(T, K, N, E, r, k, S_r, members, gemv=None, block_t=None, block_k=None, block_n=None,
                        splits=None, reduction=None, num_warps=None, num_stages=None)
    out = [{}]
    if T > 1:
        out += [dict(gemv=not cfg.gemv), dict(gemv=not cfg.gemv, block_n=256)]
    out += [dict(reduction="atomic"), dict(block_n=2 * cfg.bn), dict(splits=max(1, cfg.splits // 2)),
            dict(splits=2 * cfg.splits), dict(block_n=cfg.bn // 2)]
    if cfg.gemv:
        out += [dict(num_warps=2 * cfg.num_warps), dict(block_k=2 * cfg.bk)]
    return out


def sweep(name, group, T, args, dtype, deadline):
    K, members = group_shape(SHAPES[name], group)
    N = sum(m[2] for m in members)
    E, r, k, L = args.experts, args.rank, args.topk, args.layers
    Ws, A, B = make_group(jax.random.PRNGKey(0), L, K, members, E, r, dtype)
    x = jax.random.normal(jax.random.PRNGKey(1), (T, K), dtype)
    ids, gates = route(jax.random.PRNGKey(2), T, 1, E, k)
    inputs = (x, Ws, A, B, ids, gates)
    want = routed_group_matmul_reference(x, Ws[-1], A, B, ids, gates, members, layer=L - 1)
    nbytes = routed_bytes(K, N, members, T, E, r, k, jnp.dtype(dtype).itemsize)

    def time_it(f):
        return queued_seconds(per_layer(f), inputs, args.repeats, args.samples) / L

    t_plain, t_xla = time_it(plain_fn), time_it(routed_fn(members, "xla"))
    print(f"\n{name} {group} {K}x{N} T={T}: x@W {1e3 * t_plain:.4f} ms; xla grouped {1e3 * t_xla:.4f} ms "
          f"({t_xla / t_plain:.2f}x)", flush=True)
    rows = []
    for knobs in variants(T, K, N, members, E, r, k, 1)[: args.max_configs]:
        if time.monotonic() > deadline:
            print("  budget spent: remaining configurations skipped", flush=True)
            break
        f = per_layer(routed_fn(members, "pallas", interpret=False, **knobs))
        try:
            err = rel_err(f(*inputs)[-1], want)
            t = queued_seconds(f, inputs, args.repeats, args.samples) / L
        except Exception as e:  # a configuration that does not compile is a result too
            print(f"  {knobs}: failed {type(e).__name__}: {str(e)[:160]}", flush=True)
            error = f"{type(e).__name__}: {e}"[:400]
            rows.append(dict(shape=name, group=group, K=K, N=N, T=T, knobs=knobs, error=error))
            continue
        row = dict(shape=name, group=group, K=K, N=N, T=T, knobs=knobs, ms=1e3 * t, gbps=nbytes / t / 1e9,
                   vs_plain=t / t_plain, vs_xla=t / t_xla, rel_err=err, plain_ms=1e3 * t_plain, xla_ms=1e3 * t_xla)
        rows.append(row)
        print(f"  {json.dumps(knobs):48s} {row['ms']:.4f} ms {row['gbps']:6.0f} GB/s {row['vs_plain']:.2f}x x@W "
              f"{row['vs_xla']:.2f}x xla  err {err:.1e}", flush=True)
    timed = [r for r in rows if "ms" in r]
    if timed:
        best = min(timed, key=lambda r: r["ms"])
        print(f"  best: {best['knobs']} {best['ms']:.4f} ms = {best['vs_plain']:.2f}x x@W", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    p.add_argument("--groups", default=",".join(GROUPS))
    p.add_argument("--tokens", default="1,8")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layers", type=int, default=4, help="per-layer weight buffers per timing")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--max-configs", type=int, default=6, help="variants per group and T (default first)")
    p.add_argument("--budget", type=float, default=110, help="seconds after which no new configuration starts")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not C.on_gpu():
        raise SystemExit("tune.py times native Pallas kernels: it needs a GPU")
    deadline = time.monotonic() + args.budget
    rows = []
    for group in args.groups.split(","):
        for T in (int(t) for t in args.tokens.split(",")):
            if time.monotonic() > deadline:
                break
            rows += sweep(args.shape, group, T, args, jnp.dtype(args.dtype), deadline)
            if args.json:  # after every group, so a run cut short keeps what it measured
                save_rows(args.json, dict(jax=jax.__version__, device=str(jax.devices()[0]), args=vars(args),
                                          rows=rows))
    return rows


if __name__ == "__main__":
    main()
