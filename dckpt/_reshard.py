"""Geometry of tensor chunks: which bytes of which saved chunks a load must read.

A saved tensor is a set of disjoint hyper-rectangles ("boxes") of the global tensor, each
stored as C-order bytes. Loading with a different sharding means intersecting the wanted
boxes with the saved ones. Everything here is pure integer math (no torch import) so the
planner can run before any tensor exists and import costs nothing.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "Box",
    "ChunkIndex",
    "Copy",
    "contiguous_span",
    "plan_copies",
    "row_bytes",
    "rows_box",
]

# Below this many saved boxes a linear scan beats building and bisecting an index.
_LINEAR_SCAN_MAX = 32


@dataclass(frozen=True, slots=True)
class Box:
    """A hyper-rectangle of a global tensor; 0-d tensors use empty tuples (numel 1)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    # Boxes key the save's dicts of chunks ((key, box) pairs), hashed a few times per
    # tensor: a save of 20k small tensors hashed them 80k times per describe.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # min() rather than any(<genexpr>): saves of many small tensors make millions of boxes.
        offsets, sizes = self.offsets, self.sizes
        if len(offsets) != len(sizes):
            raise ValueError(f"Box offsets {offsets} and sizes {sizes} differ in rank")
        if offsets and (min(offsets) < 0 or min(sizes) < 0):
            raise ValueError(f"Box offsets {offsets} and sizes {sizes} must be >= 0")
        object.__setattr__(self, "_hash", hash((offsets, sizes)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    @property
    def stops(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.sizes, strict=True))

    def is_empty(self) -> bool:
        return any(s == 0 for s in self.sizes)

    def intersect(self, other: Box) -> Box | None:
        """The overlap of two boxes, or None when it holds no element."""
        _check_same_ndim(self, other)
        offsets: list[int] = []
        sizes: list[int] = []
        for a0, an, b0, bn in zip(
            self.offsets, self.sizes, other.offsets, other.sizes, strict=True
        ):
            lo = max(a0, b0)
            hi = min(a0 + an, b0 + bn)
            if hi <= lo:
                return None
            offsets.append(lo)
            sizes.append(hi - lo)
        return Box(tuple(offsets), tuple(sizes))

    def contains(self, inner: Box) -> bool:
        _check_same_ndim(self, inner)
        return all(
            o <= i and i + n <= o + s
            for o, s, i, n in zip(self.offsets, self.sizes, inner.offsets, inner.sizes, strict=True)
        )

    def relative_to(self, outer: Box) -> tuple[slice, ...]:
        """Slices that pick this box out of a tensor holding exactly ``outer``."""
        if not outer.contains(self):
            raise ValueError(f"{self} does not lie inside {outer}")
        return tuple(
            slice(i - o, i - o + n)
            for o, i, n in zip(outer.offsets, self.offsets, self.sizes, strict=True)
        )

    def __str__(self) -> str:
        if not self.sizes:
            return "[scalar]"
        return (
            "["
            + ", ".join(f"{o}:{o + s}" for o, s in zip(self.offsets, self.sizes, strict=True))
            + "]"
        )


@dataclass(frozen=True, slots=True)
class Copy:
    """One saved chunk's contribution to a wanted box."""

    source: int
    overlap: Box
    rows: tuple[int, int]
    byte_span: tuple[int, int]
    contiguous: bool


def _check_same_ndim(a: Box, b: Box) -> None:
    if a.ndim != b.ndim:
        raise ValueError(f"box {a} has {a.ndim} dims but box {b} has {b.ndim}")


def row_bytes(box: Box, itemsize: int) -> int:
    """Bytes of one dim-0 row of a C-order chunk (the whole scalar for 0-d)."""
    return math.prod(box.sizes[1:]) * itemsize


def rows_box(box: Box, rows: tuple[int, int]) -> Box:
    """The global box held by local rows ``[start, stop)`` of a chunk holding ``box``.

    Reading a non-contiguous :class:`Copy` fetches ``byte_span``; this box says what
    those bytes hold, so ``copy.overlap.relative_to(rows_box(src, copy.rows))`` selects
    the overlap inside them.
    """
    if box.ndim == 0:
        return box
    start, stop = rows
    if not 0 <= start <= stop <= box.sizes[0]:
        raise ValueError(f"rows {rows} outside chunk {box}")
    return Box((box.offsets[0] + start, *box.offsets[1:]), (stop - start, *box.sizes[1:]))


def contiguous_span(outer: Box, region: Box, itemsize: int) -> tuple[int, int] | None:
    """Byte range of ``region`` in a C-contiguous tensor holding ``outer``, if it is one run.

    A region is one run iff some dim ``j`` splits it so that every dim before ``j`` has
    extent 1 and every dim after ``j`` spans ``outer`` fully. An empty region is reported
    as the empty span ``(0, 0)``.
    """
    if not outer.contains(region):
        raise ValueError(f"{region} does not lie inside {outer}")
    if region.is_empty():
        return (0, 0)
    sizes = outer.sizes
    rel = [r - o for r, o in zip(region.offsets, outer.offsets, strict=True)]
    # The outermost dim that is not a single index: everything inner must be full.
    j = next((d for d, n in enumerate(region.sizes) if n != 1), region.ndim)
    if any(region.sizes[d] != sizes[d] for d in range(j + 1, region.ndim)):
        return None
    start = 0
    for d in range(region.ndim):
        start = start * sizes[d] + rel[d]
    return (start * itemsize, (start + region.numel) * itemsize)


class ChunkIndex:
    """Saved boxes indexed on dim 0, so each plan touches O(log n + k) of them.

    Boxes are sorted by dim-0 start. A query ``[a, b)`` bisects for starts below ``b`` and
    skips every box that provably ends at or before ``a``: those before the first point
    where the running maximum of dim-0 stops exceeds ``a``, and those starting more than
    the longest dim-0 extent before ``a``.
    """

    __slots__ = ("_by_start", "_maxlen", "_ndim", "_prefix_max_stop", "_saved", "_starts")

    def __init__(self, saved: Sequence[Box]) -> None:
        self._saved: tuple[Box, ...] = tuple(saved)
        ndims = {b.ndim for b in self._saved}
        if len(ndims) > 1:
            raise ValueError(f"saved boxes differ in rank: {sorted(ndims)}")
        self._ndim: int | None = ndims.pop() if ndims else None
        # Identical duplicates (replicated saves) and empty boxes contribute nothing.
        seen: set[Box] = set()
        keep: list[int] = []
        for i, b in enumerate(self._saved):
            if b.is_empty() or b in seen:
                continue
            seen.add(b)
            keep.append(i)
        self._by_start: list[int] = []
        self._starts: list[int] = []
        self._prefix_max_stop: list[int] = []
        self._maxlen = 0
        if self._ndim == 0 or len(keep) <= _LINEAR_SCAN_MAX:
            self._by_start = keep
            return
        keep.sort(key=lambda i: (self._saved[i].offsets[0], i))
        self._by_start = keep
        self._starts = [self._saved[i].offsets[0] for i in keep]
        running = 0
        for i in keep:
            running = max(running, self._saved[i].stops[0])
            self._prefix_max_stop.append(running)
        self._maxlen = max(self._saved[i].sizes[0] for i in keep)

    def __len__(self) -> int:
        return len(self._saved)

    @property
    def saved(self) -> tuple[Box, ...]:
        return self._saved

    def candidates(self, want: Box) -> list[int]:
        """Source indices that may overlap ``want`` (a superset; sorted ascending)."""
        if self._ndim is not None:
            _check_same_ndim(self._saved[0], want)
        if not self._starts:
            return sorted(self._by_start)
        a = want.offsets[0]
        b = a + want.sizes[0]
        hi = bisect.bisect_left(self._starts, b)
        lo = max(
            bisect.bisect_right(self._prefix_max_stop, a),
            bisect.bisect_right(self._starts, a - self._maxlen),
        )
        return sorted(self._by_start[lo:hi])

    def plan_copies(self, want: Box, itemsize: int) -> list[Copy]:
        """The copies, ordered by source index, whose overlaps tile ``want`` exactly."""
        if itemsize <= 0:
            raise ValueError(f"itemsize must be positive, got {itemsize}")
        if want.is_empty():
            return []
        copies: list[Copy] = []
        covered = 0
        for i in self.candidates(want):
            src = self._saved[i]
            overlap = src.intersect(want)
            if overlap is None:
                continue
            copies.append(_make_copy(i, src, overlap, itemsize))
            covered += overlap.numel
        if covered != want.numel:
            raise ValueError(self._coverage_message(want, copies, covered))
        return copies

    def _coverage_message(self, want: Box, copies: list[Copy], covered: int) -> str:
        if covered > want.numel:
            pair = _first_overlapping_pair(self._saved, [c.source for c in copies])
            detail = (
                f" (chunk {pair[0]} {self._saved[pair[0]]} and chunk {pair[1]} "
                f"{self._saved[pair[1]]})"
                if pair
                else ""
            )
            return (
                f"saved chunks cover {covered} elements of wanted box {want} "
                f"which holds only {want.numel}: the saved chunks overlap{detail}"
            )
        holes = _subtract(want, (c.overlap for c in copies))
        shown = ", ".join(str(h) for h in holes[:4])
        more = f" and {len(holes) - 4} more" if len(holes) > 4 else ""
        return (
            f"saved chunks do not cover wanted box {want}: {want.numel - covered} of "
            f"{want.numel} elements are missing, in {shown}{more}"
        )


def plan_copies(saved: Sequence[Box], want: Box, itemsize: int) -> list[Copy]:
    """Plan reading ``want`` from ``saved``; raises ValueError naming any uncovered region.

    Build a :class:`ChunkIndex` once instead when planning many wants against one tensor.
    """
    return ChunkIndex(saved).plan_copies(want, itemsize)


def _make_copy(index: int, src: Box, overlap: Box, itemsize: int) -> Copy:
    if src.ndim == 0:
        return Copy(index, overlap, (0, 1), (0, itemsize), True)
    r0 = overlap.offsets[0] - src.offsets[0]
    rows = (r0, r0 + overlap.sizes[0])
    span = contiguous_span(src, overlap, itemsize)
    if span is not None:
        return Copy(index, overlap, rows, span, True)
    rb = row_bytes(src, itemsize)
    return Copy(index, overlap, rows, (rows[0] * rb, rows[1] * rb), False)


def _subtract(box: Box, cuts: Iterable[Box]) -> list[Box]:
    """``box`` minus ``cuts`` as disjoint boxes (error reporting only; not fast)."""
    left = [box]
    for cut in cuts:
        nxt: list[Box] = []
        for piece in left:
            nxt.extend(_difference(piece, cut))
        left = nxt
    return left


def _difference(a: Box, b: Box) -> list[Box]:
    inter = a.intersect(b)
    if inter is None:
        return [a]
    out: list[Box] = []
    offsets = list(a.offsets)
    sizes = list(a.sizes)
    for d in range(a.ndim):
        lo, hi = inter.offsets[d], inter.offsets[d] + inter.sizes[d]
        stop = offsets[d] + sizes[d]
        for p0, p1 in ((offsets[d], lo), (hi, stop)):
            if p0 < p1:
                out.append(_replace_dim(offsets, sizes, d, p0, p1 - p0))
        offsets[d], sizes[d] = lo, hi - lo
    return out


def _replace_dim(offsets: list[int], sizes: list[int], d: int, offset: int, size: int) -> Box:
    return Box(
        (*offsets[:d], offset, *offsets[d + 1 :]),
        (*sizes[:d], size, *sizes[d + 1 :]),
    )


def _first_overlapping_pair(saved: Sequence[Box], indices: list[int]) -> tuple[int, int] | None:
    for n, i in enumerate(indices):
        for j in indices[n + 1 :]:
            if saved[i].intersect(saved[j]) is not None:
                return (i, j)
    return None
