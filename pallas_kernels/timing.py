"""How every benchmark here times things: one timer for jitted calls and one device-bandwidth probe.

`queued_seconds` queues several calls before each sync, so the host's sync latency (tens of us, a
sizeable part of one small GPU kernel) is spread thin; `bandwidth` measures the ceilings a
memory-bound kernel is held to, in the same run as the kernel.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def queued_seconds(fn: Callable, args: tuple, repeats: int = 1, samples: int = 5, feed_back: bool = False) -> float:
    """Median seconds per `fn(*args)` over `samples` samples of `repeats` queued calls, after one
    warm-up call (compilation). With `feed_back` each output is the next call's first argument (an
    in-place update loop over a donated buffer)."""

    def call(args):
        out = fn(*args)
        return out, ((out, *args[1:]) if feed_back else args)

    out, args = call(args)
    jax.block_until_ready(out)
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(repeats):
            out, args = call(args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / repeats)
    return statistics.median(times)


BANDWIDTHS = ("copy", "fresh", "read")


def bandwidth(nbytes: int | None = None, repeats: int = 10, samples: int = 5,
              kinds: tuple[str, ...] = BANDWIDTHS) -> dict[str, Any]:
    """Device memory bandwidth in GB/s (`<kind>_gb_s` for each of `kinds`), over a buffer far larger
    than the caches (1 GiB on a GPU, 256 MiB elsewhere):
        copy:  a jitted in-place `x + 1` with x donated, counting bytes read + written: the floor a
               kernel that reads and writes its data is held to;
        fresh: a jitted `x.copy()` into a new buffer (what a non-donated op pays for allocation);
        read:  a jitted sum (bytes read): the floor of a decode step, which only reads its weights.
    """
    unknown = [k for k in kinds if k not in BANDWIDTHS]
    if unknown:
        raise ValueError(f"bandwidth kind {unknown[0]!r} is unknown; expected some of {list(BANDWIDTHS)}")
    if nbytes is None:
        nbytes = (1 << 30) if jax.default_backend() == "gpu" else 256 << 20
    x = jnp.ones((nbytes // 4,), jnp.float32)
    probes = {  # (jitted function, bytes moved per call, whether its output is fed back as its input)
        "copy": (jax.jit(lambda x: x + 1, donate_argnums=0), 2 * nbytes, True),
        "fresh": (jax.jit(lambda x: x.copy()), 2 * nbytes, False),
        "read": (jax.jit(jnp.sum), nbytes, False),
    }
    out: dict[str, Any] = {"bytes": nbytes}
    for kind in kinds:
        fn, moved, feed_back = probes[kind]
        args = (x + 0,) if feed_back else (x,)  # a donated buffer of its own
        out[f"{kind}_gb_s"] = moved / queued_seconds(fn, args, repeats, samples, feed_back=feed_back) / 1e9
    return out


def save_rows(path: str, data: dict[str, Any]) -> None:
    """A benchmark's results as JSON at `path`, atomically (a temporary file renamed into place): a
    run killed while writing leaves the previous rows whole."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
