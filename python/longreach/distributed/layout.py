"""Which positions each rank of a context-parallel group owns, needs and sends (pure Python).

The sequence is the concatenation of the ranks' shards in rank order: rank r owns positions
[start_r, start_r + length_r). Its rows' windows reach `left * dilation` positions before its
shard and `right * dilation` after it (an unbounded side reaches the sequence's end), clipped to
the sequence. Those halo positions may live on several ranks (a window longer than a shard, or
empty shards in between); every owner sends its part directly, so the plan is one point-to-point
message per (owner, reader) pair and the bytes a rank sends are exactly the halo it serves.
Every rank computes the same plan from the all-gathered shard lengths: no negotiation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

Piece = Tuple[int, int, int]  # (peer rank, first position, end position), global positions


@dataclass(frozen=True)
class ShardLayout:
    lengths: Tuple[int, ...]
    left: int  # keys before a row, -1 = unbounded (the kernels' convention)
    right: int  # keys after a row, -1 = unbounded; 0 when causal
    dilation: int

    @property
    def world(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def start(self, rank: int) -> int:
        return sum(self.lengths[:rank])

    def end(self, rank: int) -> int:
        return self.start(rank) + self.lengths[rank]

    def key_range(self, rank: int) -> Tuple[int, int]:
        """[first, end) of the keys rank's rows can reach by their window: own shard plus halos.
        An empty shard has no rows and needs nothing."""
        start, end = self.start(rank), self.end(rank)
        if start == end:
            return start, end
        first = 0 if self.left < 0 else max(0, start - self.left * self.dilation)
        last = self.total if self.right < 0 else min(self.total, end + self.right * self.dilation)
        return first, last

    def receives(self, rank: int) -> List[Piece]:
        """The pieces of rank's halo, in position order, with the rank that owns each."""
        return [piece for piece in self._pieces(rank) if piece[0] != rank]

    def sends(self, rank: int) -> List[Piece]:
        """The pieces of rank's own shard that other ranks' halos hold, with the reader of each."""
        out = []
        for reader in range(self.world):
            if reader == rank:
                continue
            for owner, lo, hi in self._pieces(reader):
                if owner == rank:
                    out.append((reader, lo, hi))
        return out

    def halo_lengths(self, rank: int) -> Tuple[int, int]:
        """(positions before the shard, positions after it) in rank's key range."""
        first, last = self.key_range(rank)
        return self.start(rank) - first, last - self.end(rank)

    def _pieces(self, rank: int) -> List[Piece]:
        first, last = self.key_range(rank)
        pieces = []
        for owner in range(self.world):
            lo, hi = max(first, self.start(owner)), min(last, self.end(owner))
            if lo < hi:
                pieces.append((owner, lo, hi))
        return pieces


def total_reach(side: int, dilation: int, total: int) -> int:
    """Positions a window side reaches (side * dilation; the whole sequence when unbounded, -1)."""
    return total if side < 0 else min(total, side * dilation)


def row_groups(n: int, before: int, after: int, reach_left: int, reach_right: int) -> List[Tuple[int, int, bool]]:
    """The shard's rows as (first, end, interior) runs in row order. Interior rows reach only
    the shard's own keys, so they can run while the halo is in flight; the boundary runs wait
    for it. Without a halo there is one run, and it is not interior (it reads the exchanged keys,
    which keeps the exchange's backward, where this rank receives its readers' gradients, in the
    graph)."""
    if before == 0 and after == 0:
        return [(0, n, False)]
    lo = 0 if before == 0 else min(n, reach_left)
    hi = n if after == 0 else max(lo, n - reach_right)
    groups = []
    if lo > 0:
        groups.append((0, lo, False))
    if lo < hi:
        groups.append((lo, hi, True))
    if hi < n:
        groups.append((hi, n, False))
    return groups


def key_span(r0: int, r1: int, before: int, ext_len: int, reach_left: int, reach_right: int) -> Tuple[int, int]:
    """[first, end) of the keys rows [r0, r1) reach, in the coordinates of the rank's key range
    (halo before, own shard, halo after; ext_len positions)."""
    return max(0, before + r0 - reach_left), min(ext_len, before + r1 + reach_right)
