"""Who writes which chunk, with ranks that hold the same state planned as one group.

At thousands of ranks most ranks hold what some peer holds (the same replicated tensors,
the same values); their decoded offers share one ``tensors`` tuple (``dckpt._wire``
decodes equal messages once). Grouping ranks by that tuple makes the work
O(distinct structures x tensors + ranks) instead of O(tensors x ranks): a chunk's
holders are groups, and the writer of a replicated chunk is the least-loaded rank among
them, found through one lazily refreshed heap per holder set.

The result is exactly what the one-rank-at-a-time greedy gives (tests compare): chunks
largest first, each to the holder with the fewest bytes so far (lowest rank on a tie).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dckpt._errors import UnsupportedStateError
from dckpt._format import DTYPE_ITEMSIZE, PathPart, ValueEntry
from dckpt._reshard import Box

if TYPE_CHECKING:
    from dckpt._plan import RankOffer, TensorOffer, ValueOffer

Meta = tuple[tuple[PathPart, ...], str, tuple[int, ...]]  # path, dtype, shape
Item = tuple[str, Box, int, bool]  # key, box, nbytes, per rank
_Crc = tuple[int, ...] | None


def groups_of(offers: Sequence[RankOffer]) -> list[tuple[RankOffer, list[int]]]:
    """Ranks by identical ``tensors`` (the same tuple object), first rank first."""
    index: dict[int, int] = {}
    groups: list[tuple[RankOffer, list[int]]] = []
    for offer in offers:
        g = index.setdefault(id(offer.tensors), len(groups))
        if g == len(groups):
            groups.append((offer, []))
        groups[g][1].append(offer.rank)
    return groups


def assign(
    offers: Sequence[RankOffer], world: int
) -> tuple[dict[str, Meta], set[str], list[list[Item]]]:
    """Every tensor's metadata, the keys stored per rank (holders disagree), and each
    rank's items, largest first."""
    groups = groups_of(offers)
    metas, holders, sharded = _collect(groups)
    per_rank: set[str] = set()
    jobs: list[tuple[int, str, Box, tuple[int, ...], bool]] = []
    for key, boxes in holders.items():
        itemsize = DTYPE_ITEMSIZE[metas[key][1]]
        if len(boxes) == 1:  # the common case: one chunk, one holder group
            ((box, hs),) = boxes.items()
            if len(hs) == 1:
                jobs.append((box.numel * itemsize, key, box, (hs[0][0],), False))
                continue
        # One holder (keys distinct per rank, sharded chunks) cannot diverge: skip the sets.
        divergent = not sharded[key] and any(
            len(hs) > 1 and len({crc for _, crc in hs}) > 1 for hs in boxes.values()
        )
        if divergent:
            per_rank.add(key)
        for box, hs in boxes.items():
            nbytes = box.numel * itemsize
            if divergent:
                for g, _ in hs:
                    jobs += ((nbytes, key, box, (r,), True) for r in groups[g][1])
            elif len(hs) == 1:
                jobs.append((nbytes, key, box, (hs[0][0],), False))
            else:
                jobs.append((nbytes, key, box, tuple(g for g, _ in hs), False))
    if all(j[4] or len(groups[j[3][0]][1]) == 1 == len(j[3]) for j in jobs):
        # Every chunk has one possible writer (keys held by one rank, or per rank): no
        # balancing, and no order (the file layout sorts each rank's chunks itself).
        return metas, per_rank, _fixed(jobs, groups, world)
    jobs.sort(key=lambda j: (-j[0], j[1], j[2].offsets))
    return metas, per_rank, _balance(jobs, groups, world)


def _fixed(
    jobs: list[tuple[int, str, Box, tuple[int, ...], bool]],
    groups: list[tuple[RankOffer, list[int]]],
    world: int,
) -> list[list[Item]]:
    assigned: list[list[Item]] = [[] for _ in range(world)]
    for nbytes, key, box, cands, per_rank in jobs:
        writer = cands[0] if per_rank else groups[cands[0]][1][0]
        assigned[writer].append((key, box, nbytes, per_rank))
    return assigned


def _collect(
    groups: list[tuple[RankOffer, list[int]]],
) -> tuple[dict[str, Meta], dict[str, dict[Box, list[tuple[int, _Crc]]]], dict[str, bool]]:
    """Metadata (checked equal across groups) and, per chunk box, its holder groups with
    their checksums."""
    metas: dict[str, Meta] = {}
    holders: dict[str, dict[Box, list[tuple[int, _Crc]]]] = {}
    sharded: dict[str, bool] = {}
    first: dict[str, int] = {}
    for g, (offer, ranks) in enumerate(groups):
        for t in offer.tensors:
            meta = (t.path, t.dtype, t.shape)
            prior = metas.setdefault(t.key, meta)
            if prior != meta:
                raise _mismatch(t, prior, first[t.key], ranks[0])
            if sharded.setdefault(t.key, t.sharded) != t.sharded:
                raise UnsupportedStateError(
                    f"key {t.key!r} is a DTensor on some ranks and a plain tensor on others"
                )
            first.setdefault(t.key, ranks[0])
            boxes = holders.setdefault(t.key, {})
            for c in t.chunks:
                boxes.setdefault(c.box, []).append((g, c.crc))
    return metas, holders, sharded


def _mismatch(t: TensorOffer, prior: Meta, first: int, rank: int) -> UnsupportedStateError:
    return UnsupportedStateError(
        f"key {t.key!r} is {prior[1]}{list(prior[2])} on rank {first} but "
        f"{t.dtype}{list(t.shape)} on rank {rank}; every rank must describe the same "
        "global tensor"
    )


def _balance(
    jobs: list[tuple[int, str, Box, tuple[int, ...], bool]],
    groups: list[tuple[RankOffer, list[int]]],
    world: int,
) -> list[list[Item]]:
    load = [0] * world
    assigned: list[list[Item]] = [[] for _ in range(world)]
    heaps: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for nbytes, key, box, cands, per_rank in jobs:
        if per_rank:
            writer = cands[0]
        else:
            heap = heaps.get(cands)
            if heap is None:
                heap = heaps[cands] = [(load[r], r) for g in cands for r in groups[g][1]]
                heapq.heapify(heap)
            # Entries go stale when their rank is loaded through another holder set; loads
            # only grow, so a top entry that is current is the true (load, rank) minimum.
            while heap[0][0] != load[heap[0][1]]:
                heapq.heapreplace(heap, (load[heap[0][1]], heap[0][1]))
            writer = heap[0][1]
            heapq.heapreplace(heap, (load[writer] + nbytes, writer))
        load[writer] += nbytes
        assigned[writer].append((key, box, nbytes, per_rank))
    return assigned


def plan_values(offers: Sequence[RankOffer]) -> dict[str, ValueEntry]:
    """Values equal on every holder are stored once, others per rank; ranks sharing one
    ``values`` tuple are looked at once."""
    index: dict[int, int] = {}
    groups: list[tuple[tuple[ValueOffer, ...], list[int]]] = []
    for offer in offers:
        g = index.setdefault(id(offer.values), len(groups))
        if g == len(groups):
            groups.append((offer.values, []))
        groups[g][1].append(offer.rank)
    seen: dict[str, list[tuple[list[int], ValueOffer]]] = {}
    for values, ranks in groups:
        for v in values:
            seen.setdefault(v.key, []).append((ranks, v))
    out: dict[str, ValueEntry] = {}
    for key, held in seen.items():
        path = held[0][1].path
        if len({v.text for _, v in held}) == 1:
            out[key] = ValueEntry(path, value=held[0][1].data)
        else:
            per_rank = sorted(((r, v.data) for ranks, v in held for r in ranks), key=_first)
            out[key] = ValueEntry(path, per_rank=dict(per_rank))
    return out


def _first(pair: tuple[int, object]) -> int:
    return pair[0]
