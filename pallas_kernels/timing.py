"""Wall-clock timing of jitted calls with the host's sync latency spread thin (benchmarks only)."""

from __future__ import annotations

import statistics
import time


def queued_seconds(fn, x, repeats: int, samples: int, feed_back: bool) -> float:
    """Median seconds per call of `fn`, `repeats` calls queued before each sync, so the host's sync
    latency (tens of us, a sizeable part of one GPU copy) is spread thin. With `feed_back` each
    output is the next input (a donated, in-place update)."""
    out = fn(x).block_until_ready()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn(out if feed_back else x)
        out.block_until_ready()
        times.append((time.perf_counter() - start) / repeats)
    return statistics.median(times)
