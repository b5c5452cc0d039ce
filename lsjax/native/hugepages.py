"""Back decode weights with transparent huge pages (Linux `madvise(MADV_COLLAPSE)`).

A batch-1 decode step streams every weight once per token, and the chosen LoRA experts are small
blocks scattered over the adapter: on 4 KiB pages that is a TLB miss (a page walk) every 4 KiB of
the stream and at the start of every expert block. XLA:CPU allocates with the C library, which
the kernel backs with 4 KiB pages unless asked (`transparent_hugepage` is often `madvise`), so
`collapse` asks: it remaps the 2 MiB regions holding the arrays onto huge pages in place (same
addresses, same contents; neighbours sharing a region are remapped too, which changes nothing
for them). Measured on the 2-core VM of docs/perf.md: 2-3% faster decode, base and switch alike.

Best effort by design: where the kernel cannot (not Linux, older than 6.1, THP `never`, no free
huge pages, a region spanning two mappings) the regions stay as they were and decoding is simply
as fast as before; `unavailable_reason()` says why nothing can happen at all.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path
from typing import Any

import jax

MADV_COLLAPSE = 25  # linux/mman.h, Linux 6.1+
REGION = 2 << 20   # a PMD huge page on x86-64 and arm64 (4 KiB base pages)
MIN_BYTES = 64 << 10  # smaller arrays are not worth a syscall (their neighbours' regions cover them)
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@functools.cache
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc.madvise


@functools.cache
def unavailable_reason() -> str | None:
    """Why no array can be collapsed in this process (None when the kernel may do it)."""
    if not sys.platform.startswith("linux"):
        return f"transparent huge pages are a Linux feature (this is {sys.platform})"
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return f"{THP_SETTING} is missing: the kernel has no transparent huge pages"
    if "[never]" in setting:
        return f"transparent huge pages are off ({THP_SETTING}: {setting.strip()})"
    return None


def host_buffers(tree: Any) -> list[tuple[int, int]]:
    """`(address, bytes)` of every CPU-resident shard of the arrays in `tree` worth collapsing."""
    out = []
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array) or leaf.is_deleted():
            continue
        leaf.block_until_ready()  # one still being written (async dispatch) has no pages to collapse yet
        # a one-device array's own buffer; a sharded one's per shard (`addressable_shards` keeps an
        # array object per shard alive with the parent, so it is used only where there are several)
        pieces = [leaf] if len(leaf.devices()) == 1 else [shard.data for shard in leaf.addressable_shards]
        for data in pieces:
            if next(iter(data.devices())).platform != "cpu" or data.nbytes < MIN_BYTES:
                continue
            out.append((data.unsafe_buffer_pointer(), data.nbytes))
    return out


def regions(buffers: list[tuple[int, int]]) -> list[int]:
    """Start addresses of the 2 MiB-aligned regions that the buffers touch, sorted, each once."""
    starts = set()
    for address, size in buffers:
        first, last = address // REGION, (address + size - 1) // REGION
        starts.update(range(first * REGION, (last + 1) * REGION, REGION))
    return sorted(starts)


def collapse(tree: Any) -> int:
    """Remap the CPU arrays of `tree` onto huge pages where the kernel agrees; returns the bytes of
    the regions it collapsed (0 where it cannot: see the module docstring). Contents are unchanged."""
    if unavailable_reason() is not None:
        return 0
    madvise = _madvise()
    done = 0
    for start in regions(host_buffers(tree)):
        if madvise(start, REGION, MADV_COLLAPSE) == 0:
            done += REGION
    return done
