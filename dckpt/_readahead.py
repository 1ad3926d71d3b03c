"""Batching a file's small planned reads into few requests, for object stores.

Against an object store each ranged read is a request with its own latency; a load
knows in advance which spans it will read, so a miss fetches the following spans too.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from dckpt._bytes import as_memoryview
from dckpt.storage._base import Buffer, Storage

_MiB = 1 << 20


class ReadAhead:
    """Serves a file's small planned reads from batched :meth:`Storage.read_ranges` calls.

    The reader asks for one block at a time; against an object store each would be a
    request with its own latency. Given the spans the load will read, a miss fetches the
    following spans too, up to ``budget`` bytes, in one batched call. Reads bigger than
    ``small`` go straight through (they are split into parallel GETs anyway).
    """

    def __init__(
        self, storage: Storage, name: str, spans: Sequence[tuple[int, int]], budget: int
    ) -> None:
        self.storage = storage
        self.name = name
        self.small = max(1, min(4 * _MiB, budget))
        self.budget = max(budget, self.small)
        merged: list[list[int]] = []  # overlapping spans merged; touching ones kept apart
        for a, b in sorted(s for s in spans if s[1] > s[0]):
            if merged and a < merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.spans = [(a, b) for a, b in merged]
        self.starts = [a for a, _ in self.spans]
        self.held: list[tuple[int, bytearray]] = []
        self.held_starts: list[int] = []

    def read(self, offset: int, out: Buffer) -> bool:
        """Fill ``out`` from a batch; False when the caller should read it directly."""
        view = as_memoryview(out)
        if view.nbytes == 0 or self._copy(offset, view):
            return view.nbytes > 0
        return view.nbytes <= self.small and self._fetch(offset) and self._copy(offset, view)

    def _copy(self, offset: int, view: memoryview) -> bool:
        i = bisect.bisect_right(self.held_starts, offset) - 1
        if i < 0 or offset - self.held[i][0] + view.nbytes > len(self.held[i][1]):
            return False
        lo = offset - self.held[i][0]
        view[:] = memoryview(self.held[i][1])[lo : lo + view.nbytes]
        return True

    def _fetch(self, offset: int) -> bool:
        i = bisect.bisect_right(self.starts, offset) - 1
        if i < 0 or offset >= self.spans[i][1]:
            return False
        ranges = [(offset, min(self.spans[i][1], offset + self.small))]
        total = ranges[0][1] - offset
        for a, b in self.spans[i + 1 :]:
            if b - a > self.small or total + (b - a) > self.budget:
                break
            ranges.append((a, b))
            total += b - a
        bufs = [bytearray(b - a) for a, b in ranges]
        self.held, self.held_starts = [], []
        self.storage.read_ranges(self.name, ranges, [memoryview(x) for x in bufs])
        self.held = [(a, buf) for (a, _), buf in zip(ranges, bufs, strict=True)]
        self.held_starts = [a for a, _ in ranges]
        return True
