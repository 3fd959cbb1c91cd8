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
