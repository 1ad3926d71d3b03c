"""Which files of a tier step each rank writes, sends and reads.

A step's files are the data files rank 0 plans (``r<rank>-<i>.bin``) and, in format
version 2, each writer's shard files (``r<rank>-s<i>.bin``) and its table (``r<rank>.tab``),
which only their writer plans: their names and sizes reach the other ranks through the
manifest's table records, so every rank derives the same transfers from the manifest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import crc32c

from dckpt._dtensor import PlacementSpec
from dckpt._format import Manifest
from dckpt._layout import unravel, writer_coordinate
from dckpt._plan import RankOffer, RankWritten, SavePlan
from dckpt._reshard import Box
from dckpt.tiers._nodes import NodeMap
from dckpt.tiers._transfer import Recv, Send


def written_files(written: RankWritten) -> tuple[tuple[str, int], ...]:
    """(name, size) of the files a rank wrote: its planned files, shard files and table."""
    mine = [(f.name, f.size) for f in written.files]
    report = written.layouts
    if report is not None:
        mine += report.files
        if report.table is not None:
            mine.append(report.table[:2])
    return tuple(mine)


def layout_transfers(
    nodes: NodeMap, manifest: Manifest, rank: int
) -> tuple[list[Send], list[Recv]]:
    """The transfers of the shard files and tables ``rank`` sends to its replica holders
    and receives from the ranks it holds replicas of, from the manifest's table records."""
    tables = {t.rank: t for t in manifest.tables}
    sizes = manifest.file_sizes

    def files(r: int) -> list[tuple[str, int]]:
        t = tables.get(r)
        return [] if t is None else [(t.name, t.size), *((f, sizes[f]) for f in t.files)]

    sends = [Send(n, size, h) for h in nodes.holders(rank) for n, size in files(rank)]
    recvs = [Recv(n, size, src) for src in nodes.sources(rank) for n, size in files(src)]
    return sends, recvs


def plan_needs(plan: SavePlan, offers: Sequence[RankOffer]) -> dict[int, set[str]]:
    """The planned data files each rank's load of this step reads (same world size and
    sharding): those holding the chunks it offered."""
    where: dict[tuple[str, Box, int | None], str] = {}
    for rp in plan.ranks:
        for fp in rp.files:
            for item in fp.items:
                where[(item.key, item.box, rp.rank if item.per_rank else None)] = fp.name
    needs: dict[int, set[str]] = {}
    for offer in offers:
        got = needs[offer.rank] = set()
        for t in offer.tensors:
            per_rank = plan.tensors[t.key].per_rank
            for c in t.chunks:
                name = where.get((t.key, c.box, offer.rank if per_rank else None))
                if name is not None:
                    got.add(name)
    return needs


def layout_needs(manifest: Manifest) -> dict[int, set[str]]:
    """The shard files and tables each rank's load of ``manifest`` reads (same world size
    and layouts): for every shard it holds, the table and files of that shard's writer
    (whole: a writer's file may hold other shards too, as in version 1).

    The writer of the shard at a coordinate depends on the key only through its CRC-32C
    modulo the replicas (``_layout.writer_coordinate``), so the layout entries are grouped
    by mesh, placements and that residue first: O(groups x ranks), not O(keys x ranks)."""
    files = {t.rank: (t.name, *t.files) for t in manifest.tables}
    groups: dict[tuple[int, tuple[PlacementSpec, ...], int], str] = {}
    for key, entry in manifest.tensors.items():
        layout = entry.layout
        if layout is None:
            continue
        mesh = manifest.meshes[layout.mesh]
        spread = math.prod(
            n for n, p in zip(mesh.shape, layout.placements, strict=True) if p.kind == "replicate"
        )
        turn = crc32c.crc32c(key.encode("utf-8")) % spread
        groups.setdefault((layout.mesh, layout.placements, turn), key)
    needs: dict[int, set[str]] = {}
    for (m, placements, _turn), key in groups.items():
        mesh = manifest.meshes[m]
        for flat, rank in enumerate(mesh.ranks):
            coordinate = writer_coordinate(key, mesh.shape, placements, unravel(flat, mesh.shape))
            needs.setdefault(rank, set()).update(files.get(mesh.rank_at(coordinate), ()))
    return needs
