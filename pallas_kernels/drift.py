"""Drift study: in-place expert switching vs merging from a pristine base, over many tokens.

    python -m pallas_kernels.drift [--steps 10000] [--dtypes bfloat16,float16,float32] [--json F]

Each step draws a fresh route (k distinct experts of E, gates summing to 1). The switch path
updates one working copy in place, W <- W - delta(previous) + delta(current), rounding to
the weight dtype every step; the merge path recomputes W_base + delta(current) from the
untouched base. Both are compared with the exact float64 value W_base + delta(current)
(computed from the stored, already rounded W_base/A/B, so only the kernels' own arithmetic
counts). Merge error stays at one rounding; switch error is a random walk of roundings.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from .sgmm import sgmm_merge, sgmm_switch


def _routes(rng, steps, E, k):
    ids = np.stack([rng.choice(E, size=k, replace=False) for _ in range(steps + 1)]).astype(np.int32)
    gates = rng.random((steps + 1, k)) + 0.05
    return ids, (gates / gates.sum(1, keepdims=True)).astype(np.float32)


def drift_study(
    steps=10_000, M=2, d=256, r=16, E=8, k=2, dtype="bfloat16", seed=0,
    checkpoints=(1, 10, 100, 1000, 10_000), implementation="xla",
):
    """Returns one dict per checkpoint: step, max abs error of switch and merge vs float64."""
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    W_base = jnp.asarray(rng.standard_normal((M, d, d)) / np.sqrt(d), dt)
    A = jnp.asarray(rng.standard_normal((M, E, d, r)) / np.sqrt(d), dt)
    B = jnp.asarray(0.1 * rng.standard_normal((M, E, r, d)) / np.sqrt(r), dt)  # |delta| ~ 10% of |W|
    ids, gates = _routes(rng, steps, E, k)
    W64, A64, B64 = (np.asarray(a, np.float64) for a in (W_base, A, B))

    def truth(t):
        return W64 + sum(float(g) * A64[:, i] @ B64[:, i] for i, g in zip(ids[t], gates[t]))

    merge = jax.jit(functools.partial(sgmm_merge, implementation=implementation))

    @functools.partial(jax.jit, donate_argnums=0)
    def run(W, ids_seg, gates_seg):  # routes t0-1 .. t1: switch from each to the next
        def step(W, i):
            old_i, old_g = ids_seg[i], gates_seg[i]
            new_i, new_g = ids_seg[i + 1], gates_seg[i + 1]
            return sgmm_switch(W, A, B, old_i, old_g, new_i, new_g, implementation=implementation), None

        return jax.lax.scan(step, W, jnp.arange(ids_seg.shape[0] - 1))[0]

    W = merge(W_base, A, B, jnp.asarray(ids[0]), jnp.asarray(gates[0]))
    rows, t = [], 0
    scale = float(np.abs(W64).max())
    for c in sorted(c for c in checkpoints if c <= steps):
        W = run(W, jnp.asarray(ids[t : c + 1]), jnp.asarray(gates[t : c + 1]))
        t = c
        want = truth(t)
        merged = merge(W_base, A, B, jnp.asarray(ids[t]), jnp.asarray(gates[t]))
        rows.append(dict(
            dtype=dt.name, step=t,
            switch_max_abs=float(np.abs(np.asarray(W, np.float64) - want).max()),
            merge_max_abs=float(np.abs(np.asarray(merged, np.float64) - want).max()),
            switch_rms=float(np.sqrt(np.mean((np.asarray(W, np.float64) - want) ** 2))),
            merge_rms=float(np.sqrt(np.mean((np.asarray(merged, np.float64) - want) ** 2))),
            max_abs_weight=scale,
        ))
    return rows


def markdown(rows, shape):
    out = [
        f"Drift, {shape}: max abs (rms) error vs float64 W_base + delta(current route)",
        "",
        "| dtype | switches | in-place switch | merge from base | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["switch_max_abs"] / r["merge_max_abs"] if r["merge_max_abs"] else float("inf")
        out.append(
            f"| {r['dtype']} | {r['step']} | {r['switch_max_abs']:.3g} ({r['switch_rms']:.2g}) "
            f"| {r['merge_max_abs']:.3g} ({r['merge_rms']:.2g}) | {ratio:.1f}x |"
        )
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--dtypes", default="bfloat16,float16,float32")
    p.add_argument("--M", type=int, default=2)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--E", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    cps = sorted({c for c in (1, 10, 100, 1000, 10_000, a.steps) if c <= a.steps})
    rows = []
    for dt in a.dtypes.split(","):
        rows += drift_study(a.steps, a.M, a.d, a.r, a.E, a.k, dt, a.seed, cps)
    shape = f"M={a.M}, {a.d}x{a.d}, r={a.r}, E={a.E}, k={a.k}, xla, jax {jax.__version__}, {jax.default_backend()}"
    print(markdown(rows, shape))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(config=vars(a), jax=jax.__version__, backend=jax.default_backend(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
