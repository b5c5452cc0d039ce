"""Projection groups: where each member's routed term lands, and the column tiling kernels share.

A group weight holds projections that share an input side by side (q|k|v as [K, Q+K+V], gate|up
as [K, 2F]). An adapter's experts for the group are one stacked pair: member s owns rank columns
[s*r, (s+1)*r) of A and columns [b_off, b_off + width) of B, and its term lands in output columns
[w_off, w_off + width). `members` is the tuple of those (w_off, b_off, width) triples.

Kernels tile the output columns segment by segment: each member's columns from the member's own
first column, and each stretch no member covers (a projection without an adapter) on its own. So
no tile straddles two members, a tile's routed term is one member's or none, and B's column
offset inside a tile is never negative (a masked load at a negative offset is harmless on a GPU
but shifts the data in interpret mode, where loads are dynamic slices).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def normalize_members(members, N: int, Nb: int, wname: str = "W") -> tuple[tuple[int, int, int], ...]:
    """`members` as a tuple of int triples, checked against the group width N and B's width Nb."""
    try:
        out = tuple(tuple(int(v) for v in m) for m in members)
    except TypeError:
        raise ValueError(f"members={members!r} must be a sequence of (w_off, b_off, width) triples") from None
    if not out or any(len(m) != 3 for m in out):
        raise ValueError(f"members={members!r} must be a non-empty sequence of (w_off, b_off, width) triples")
    for s, (w_off, b_off, width) in enumerate(out):
        where = f"members[{s}]=(w_off={w_off}, b_off={b_off}, width={width})"
        if width < 1 or w_off < 0 or b_off < 0:
            raise ValueError(f"{where}: offsets must be >= 0 and width >= 1")
        if w_off + width > N:
            raise ValueError(f"{where} ends at column {w_off + width}; expected <= {N} (the columns of {wname})")
        if b_off + width > Nb:
            raise ValueError(f"{where} reads B columns up to {b_off + width}; expected <= {Nb} (the columns of B)")
    spans = sorted((w_off, w_off + width, s) for s, (w_off, _, width) in enumerate(out))
    for (_, end, s), (start, _, t) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"members[{s}] and members[{t}] overlap in the columns of {wname}")
    return out


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static column tiling of a group: per segment its first tile, first column, end and member
    (-1 where no member's term lands). Kernels look their segment up from the program id."""

    block: int
    firsts: tuple[int, ...]
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    owners: tuple[int, ...]
    tiles: int

    @property
    def padded_width(self) -> int:
        """Columns a tile may touch, masked lanes included (the last tile of each segment is ragged)."""
        return max(start + (nxt - first) * self.block
                   for start, first, nxt in zip(self.starts, self.firsts, self.firsts[1:] + (self.tiles,)))

    def lookup(self, j, values):
        """values[segment of tile j] as an int32 scalar (a select chain: at most 2S+1 segments)."""
        out = jnp.int32(values[0])
        for first, value in zip(self.firsts[1:], values[1:]):
            out = jnp.where(j >= first, jnp.int32(value), out)
        return out

    def segment(self, j, members, S_r):
        """Scalars for tile j: first column, end column, has a member, that member's first rank
        column (s*r / r), its route index, and its first B column for this tile."""
        first = self.lookup(j, self.firsts)
        offset = (j - first) * self.block
        owner = [max(o, 0) for o in self.owners]
        return dict(
            col0=self.lookup(j, self.starts) + offset,
            end=self.lookup(j, self.ends),
            lora=self.lookup(j, [int(o >= 0) for o in self.owners]) > 0,
            member=self.lookup(j, owner),
            route=self.lookup(j, owner if S_r > 1 else [0] * len(owner)),
            bcol0=self.lookup(j, [members[o][1] for o in owner]) + offset,
        )


def column_tiling(members, N: int, block: int) -> Tiling:
    """Tiles of `block` columns over each member's columns and each uncovered gap, in column order."""
    segments, at = [], 0
    for s in sorted(range(len(members)), key=lambda s: members[s][0]):
        w_off, _, width = members[s]
        if w_off > at:
            segments.append((at, w_off, -1))
        segments.append((w_off, w_off + width, s))
        at = w_off + width
    if at < N:
        segments.append((at, N, -1))
    firsts, tiles = [], 0
    for start, end, _ in segments:
        firsts.append(tiles)
        tiles += -(-(end - start) // block)
    return Tiling(block, tuple(firsts), tuple(s for s, _, _ in segments), tuple(e for _, e, _ in segments),
                  tuple(o for _, _, o in segments), tiles)


def max_width(members, N: int) -> int:
    """The widest segment (tiles wider than it only add masked lanes)."""
    t = column_tiling(members, N, 1)
    return max(e - s for s, e in zip(t.starts, t.ends))
