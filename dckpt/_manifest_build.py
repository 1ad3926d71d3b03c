"""The layout side of a version 2 manifest: what each rank reports, and rank 0's merge.

Rank 0 never sees a layout tensor's shards. Each rank reports its meshes (shape, its own
position, a digest of the layout entries it holds there) and, for the tensors whose
first shard it writes, the entries themselves, so each entry reaches rank 0 exactly
once. Rank 0 rebuilds every mesh's rank list from the positions, checks that every
member holds the same entries (by digest) and renders the entries, meshes and tables:
O(tensors + ranks), whatever the number of shards.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Sequence

from dckpt._errors import UnsupportedStateError
from dckpt._format import ChunkRecord, FileRecord, Manifest, TableRecord, TensorEntry
from dckpt._layout import (
    Layout,
    LayoutOffer,
    LayoutReport,
    MeshOffer,
    MeshRecord,
    MeshReport,
    key_id,
    placement_text,
    unravel,
    writer_coordinate,
)
from dckpt._manifest_text import json_str, layout_entry_text
from dckpt._plan import FileResult, LayoutPart, RankOffer, SavePlan


def entries_digest(entries: Iterable[LayoutOffer]) -> bytes:
    """A digest of layout entries (their mesh left out), in key order."""
    h = hashlib.blake2b(digest_size=16)
    for e in sorted(entries, key=lambda e: e.key):
        placements = ",".join(placement_text(p) for p in e.placements)
        h.update(repr((e.key, e.path, e.dtype, e.shape, placements)).encode("utf-8"))
    return h.digest()


def first_writer(e: LayoutOffer, mesh: MeshOffer) -> bool:
    """Whether this rank writes ``e``'s first shard (all sharding coordinates 0), which
    makes it the one rank that reports ``e`` in full."""
    coordinate = unravel(mesh.position, mesh.shape)
    first = tuple(
        c if p.kind == "replicate" else 0 for c, p in zip(coordinate, e.placements, strict=True)
    )
    return writer_coordinate(e.key, mesh.shape, e.placements, first) == coordinate


def layout_report(
    offer: RankOffer, files: Sequence[tuple[str, int]], table: tuple[str, int, int] | None
) -> LayoutReport | None:
    """What this rank tells rank 0 about its layout tensors, once their shards are written."""
    if not offer.meshes:
        return None
    meshes = tuple(
        MeshReport(
            m.ident, m.shape, m.position, entries_digest(e for e in offer.layouts if e.mesh == i)
        )
        for i, m in enumerate(offer.meshes)
    )
    mine = tuple(e for e in offer.layouts if first_writer(e, offer.meshes[e.mesh]))
    return LayoutReport(offer.rank, meshes, mine, tuple(files), table)


def merge_layouts(
    reports: Sequence[LayoutReport | None], world_size: int, taken: Collection[str]
) -> LayoutPart | None:
    """Rank 0: the layout part of the manifest from every rank's report; None without
    layout tensors. ``taken``: the keys of the save's chunk entries and values."""
    live = [r for r in reports if r is not None]
    if not live:
        return None
    members, digests, entries = _gather(live)
    ids = {key_id(k) for k in entries}
    if len(ids) != len(entries):  # 2**-64 per pair; a table could not tell them apart
        raise UnsupportedStateError("two DTensor keys have the same key id; rename one")
    clash = sorted(set(entries) & set(taken))
    if clash:
        raise UnsupportedStateError(
            f"key {clash[0]!r} is a DTensor on some ranks and a plain tensor or value on others"
        )
    built = {ident: _mesh(*members[ident]) for ident in members}
    order = sorted(built, key=lambda i: (built[i].shape, built[i].ranks))
    index = {ident: n for n, ident in enumerate(order)}
    meshes = tuple(built[ident] for ident in order)
    _check_members(members, digests, entries)
    texts = tuple(
        (
            key,
            json_str(key)
            + ":"
            + layout_entry_text(e.dtype, Layout(index[ident], e.placements), e.path, e.shape),
        )
        for key, (e, ident) in sorted(entries.items())
    )
    files = tuple(FileRecord(n, s) for r in live for n, s in r.files)
    tables = tuple(
        TableRecord(r.rank, r.table[0], r.table[1], r.table[2], tuple(n for n, _ in r.files))
        for r in sorted(live, key=lambda r: r.rank)
        if r.table is not None
    )
    return LayoutPart(texts, files, meshes, tables)


_Members = dict[bytes, tuple[tuple[int, ...], list[int | None]]]  # ident -> shape, ranks
_Entries = dict[str, tuple[LayoutOffer, bytes]]  # key -> entry, mesh ident


def _gather(
    live: list[LayoutReport],
) -> tuple[_Members, dict[bytes, list[tuple[int, bytes]]], _Entries]:
    """Every mesh's members by position, their entry digests, and each entry once."""
    members: _Members = {}
    digests: dict[bytes, list[tuple[int, bytes]]] = {}
    entries: _Entries = {}
    for rep in live:
        for m in rep.meshes:
            _place(members, m, rep.rank)
            digests.setdefault(m.ident, []).append((rep.rank, m.entries))
        for e in rep.entries:
            ident = rep.meshes[e.mesh].ident
            prior = entries.setdefault(e.key, (e, ident))
            if prior[0] is not e and (entries_digest([prior[0]]), prior[1]) != (
                entries_digest([e]),
                ident,
            ):
                raise UnsupportedStateError(
                    f"key {e.key!r}: ranks describe this DTensor differently (shape, dtype, "
                    "placements or mesh); every rank must describe the same global tensor"
                )
    return members, digests, entries


def _check_members(
    members: _Members, digests: dict[bytes, list[tuple[int, bytes]]], entries: _Entries
) -> None:
    """Every member of a mesh holds exactly the entries reported on it (by digest)."""
    for ident, held in digests.items():
        want = entries_digest(e for e, i in entries.values() if i == ident)
        for rank, got in held:
            if got != want:
                raise UnsupportedStateError(
                    f"rank {rank} holds other DTensors on its device mesh "
                    f"{list(members[ident][0])} than the other ranks of that mesh; every rank "
                    "of a mesh must save the same DTensors under the same keys"
                )


def _place(members: _Members, m: MeshReport, rank: int) -> None:
    # Not setdefault: its default, a list of the mesh's size, would be built for every rank
    # (quadratic in the world size: 0.8 s of rank 0's commit at 16,384 ranks).
    held = members.get(m.ident)
    if held is None:
        held = members[m.ident] = (m.shape, [None] * math.prod(m.shape))
    shape, slots = held
    if shape != m.shape or not 0 <= m.position < len(slots) or slots[m.position] is not None:
        raise UnsupportedStateError(
            f"rank {rank} and another rank claim one position of a device mesh of shape "
            f"{list(m.shape)}; save every DTensor of a mesh from the ranks of that mesh"
        )
    slots[m.position] = rank


def _mesh(shape: tuple[int, ...], slots: list[int | None]) -> MeshRecord:
    missing = slots.count(None)
    if missing:
        raise UnsupportedStateError(
            f"{missing} of the {len(slots)} ranks of a device mesh of shape {list(shape)} "
            "are not part of this save; save DTensors with a process group holding every "
            "rank of their mesh"
        )
    return MeshRecord(shape, tuple(r for r in slots if r is not None))


def _ordered(chunks: list[ChunkRecord]) -> tuple[ChunkRecord, ...]:
    if len(chunks) < 2:  # the common case, and sorting 1-lists costs at 100k tensors
        return tuple(chunks)
    return tuple(sorted(chunks, key=lambda c: (c.rank or 0, c.offsets)))


def build_manifest(
    plan: SavePlan,
    results: Sequence[Sequence[FileResult]],
    *,
    created: float,
    block_bytes: int,
    library: str,
) -> Manifest:
    """The manifest of a finished save: the plan plus what the writers measured."""
    chunks: dict[str, list[ChunkRecord]] = {k: [] for k in plan.tensors}
    files: list[FileRecord] = []
    for rank_plan, rank_results in zip(plan.ranks, results, strict=True):
        by_name = {r.name: r for r in rank_results}
        for fp in rank_plan.files:
            res = by_name[fp.name]
            if res.size != fp.size or len(res.crcs) != len(fp.items):
                raise RuntimeError(f"writer result for {fp.name} does not match its plan")
            files.append(FileRecord(fp.name, fp.size))
            for item, crcs in zip(fp.items, res.crcs, strict=True):
                chunks[item.key].append(
                    ChunkRecord(
                        item.box.offsets,
                        item.box.sizes,
                        fp.name,
                        item.offset,
                        item.nbytes,
                        crcs,
                        rank_plan.rank if item.per_rank else None,
                    )
                )
    tensors = {
        key: TensorEntry(meta.path, meta.dtype, meta.shape, _ordered(chunks[key]), meta.per_rank)
        for key, meta in sorted(plan.tensors.items())
    }
    return Manifest(
        save_id=plan.save_id,
        world_size=plan.world_size,
        created=created,
        files=tuple(sorted(files, key=lambda f: f.name)),
        tensors=tensors,
        values=dict(sorted(plan.values.items())),
        block_bytes=block_bytes,
        library=library,
    )
