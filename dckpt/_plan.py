"""Save planning: pure functions from what each rank holds to who writes what, where.

Everything here is plain data in, plain data out, so it can be tested alone and the
result cached. Replicated chunks are written once, by the holder with the fewest bytes
assigned so far (largest chunks first), which spreads replicated state across ranks
instead of piling it on rank 0.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dckpt._errors import UnsupportedStateError
from dckpt._format import (
    LAYOUT_VERSION,
    ChunkRecord,
    FileRecord,
    Manifest,
    PathPart,
    TableRecord,
    TensorEntry,
    ValueEntry,
    align,
    data_dir,
)
from dckpt._layout import LayoutOffer, LayoutReport, MeshOffer, MeshRecord
from dckpt._manifest_text import (
    assemble,
    chunk_tail_text,
    ints_text,
    json_str,
    tensor_tail_text,
)
from dckpt._plangroups import assign, plan_values
from dckpt._reshard import Box
from dckpt._values import JSON
from dckpt.storage._base import LOCAL_LAYOUT, FileLayout


@dataclass(frozen=True, slots=True)
class ChunkOffer:
    box: Box
    crc: tuple[int, ...] | None = None  # known up front for plain tensors, to detect divergence


@dataclass(frozen=True, slots=True)
class TensorOffer:
    key: str
    path: tuple[PathPart, ...]
    dtype: str
    shape: tuple[int, ...]
    sharded: bool  # a DTensor: chunks are identical across holders by construction
    chunks: tuple[ChunkOffer, ...]


@dataclass(frozen=True, slots=True)
class ValueOffer:
    key: str
    path: tuple[PathPart, ...]
    data: JSON
    text: str  # canonical JSON of ``data``, compared across ranks


@dataclass(frozen=True, slots=True)
class RankOffer:
    rank: int
    tensors: tuple[TensorOffer, ...]
    values: tuple[ValueOffer, ...]
    # Layout tensors never reach rank 0's planner: each rank plans and writes its own
    # shards and reports them after writing (``LayoutReport``).
    layouts: tuple[LayoutOffer, ...] = ()
    meshes: tuple[MeshOffer, ...] = ()


@dataclass(frozen=True, slots=True)
class WriteItem:
    key: str
    box: Box
    offset: int
    nbytes: int
    per_rank: bool = False


@dataclass(frozen=True, slots=True)
class FilePlan:
    name: str
    items: tuple[WriteItem, ...]
    size: int


@dataclass(frozen=True, slots=True)
class RankPlan:
    save_id: str
    rank: int
    files: tuple[FilePlan, ...]

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True, slots=True)
class TensorMeta:
    path: tuple[PathPart, ...]
    dtype: str
    shape: tuple[int, ...]
    per_rank: bool


@dataclass(frozen=True, slots=True)
class SavePlan:
    save_id: str
    world_size: int
    ranks: tuple[RankPlan, ...]
    tensors: Mapping[str, TensorMeta]
    values: Mapping[str, ValueEntry]


@dataclass(frozen=True, slots=True)
class FileResult:
    name: str
    size: int
    crcs: tuple[tuple[int, ...], ...]  # per item, in the file plan's order


@dataclass(frozen=True, slots=True)
class RankWritten:
    """One rank's message to rank 0 after writing: its planned files, and its layouts."""

    files: tuple[FileResult, ...]
    layouts: LayoutReport | None = None


def plan_save(
    offers: Sequence[RankOffer], save_id: str, *, layout: FileLayout = LOCAL_LAYOUT
) -> SavePlan:
    """Decide, for every chunk any rank holds, which rank writes it to which file and offset.

    Ranks whose offers share one ``tensors`` tuple (as decoded offers of equal messages
    do) are planned as one group: see :mod:`dckpt._plangroups`."""
    world = len(offers)
    metas, per_rank, assigned = assign(offers, world)
    tensors = {
        key: TensorMeta(path, dtype, shape, key in per_rank)
        for key, (path, dtype, shape) in metas.items()
    }
    ranks = tuple(_layout_rank(save_id, r, assigned[r], layout) for r in range(world))
    values = plan_values(offers)
    clash = set(values) & set(tensors)
    if clash:
        key = sorted(clash)[0]
        raise UnsupportedStateError(f"key {key!r} is a tensor on some ranks and a value on others")
    return SavePlan(save_id, world, ranks, tensors, values)


def _layout_rank(
    save_id: str,
    rank: int,
    items: list[tuple[str, Box, int, bool]],
    layout: FileLayout,
) -> RankPlan:
    total = sum(i[2] for i in items)
    nfiles = max(1, min(layout.max_files, -(-total // layout.target_bytes)))
    # items arrive largest first: spread them over the files, least-filled first
    heap = [(0, f) for f in range(nfiles)]
    per_file: list[list[tuple[str, Box, int, bool]]] = [[] for _ in range(nfiles)]
    for item in items:
        size, f = heapq.heappop(heap)
        per_file[f].append(item)
        heapq.heappush(heap, (size + item[2], f))
    files: list[FilePlan] = []
    for f, group in enumerate(per_file):
        if not group:
            continue
        group.sort(key=lambda i: (i[0], i[1].offsets))  # key order: neighbours load together
        pos = 0
        out: list[WriteItem] = []
        for key, box, nbytes, per_rank in group:
            pos = align(pos)
            out.append(WriteItem(key, box, pos, nbytes, per_rank))
            pos += nbytes
        files.append(FilePlan(f"{data_dir(save_id)}/r{rank}-{f}.bin", tuple(out), pos))
    return RankPlan(save_id, rank, tuple(files))


def structure_key(offer: RankOffer) -> bytes:
    """A digest of what a rank holds, ignoring contents: equal digests, reusable plan.

    Mesh positions are left out: within one group a rank's position in a mesh follows
    from the mesh's identity, which is in."""
    shape = (
        tuple(
            (
                t.key,
                t.dtype,
                t.shape,
                t.sharded,
                tuple((c.box.offsets, c.box.sizes) for c in t.chunks),
            )
            for t in offer.tensors
        ),
        offer.layouts,
        tuple((m.ident, m.shape) for m in offer.meshes),
    )
    return hashlib.blake2b(repr(shape).encode(), digest_size=16).digest()


def renamed(plan: RankPlan, save_id: str) -> RankPlan:
    """The same layout under another save id (its files live in that save's directory)."""
    old = data_dir(plan.save_id) + "/"
    new = data_dir(save_id) + "/"
    files = tuple(FilePlan(new + f.name.removeprefix(old), f.items, f.size) for f in plan.files)
    return RankPlan(save_id, plan.rank, files)


def with_save_id(plan: SavePlan, save_id: str, offers: Sequence[RankOffer]) -> SavePlan:
    """A cached plan under a new save id, with this save's (fresh) values."""
    ranks = tuple(renamed(r, save_id) for r in plan.ranks)
    return SavePlan(save_id, plan.world_size, ranks, plan.tensors, plan_values(offers))


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


@dataclass(frozen=True, slots=True)
class _Slot:
    """Where one chunk's checksums come from, and its encoded text around them."""

    rank: int
    file: int
    item: int
    name: str  # the file name after ``data/<save_id>/``, closing quote included
    rest: str  # every field after the file name, closing brace included


@dataclass(frozen=True, slots=True)
class ManifestTemplate:
    """A plan's manifest text, cut around what changes from save to save.

    Saves that reuse a cached plan differ only in the save id (inside file names), the
    checksums, the non-tensor values and the time; the rest (which, at 100k tensors,
    is most of a save's planning cost) is encoded once per plan.
    """

    tensors: tuple[tuple[str, tuple[_Slot, ...], str], ...]  # (before, chunks, after)
    keys: tuple[str, ...] = ()  # the key of each entry of ``tensors``


def manifest_template(plan: SavePlan) -> ManifestTemplate:
    slots: dict[str, list[tuple[tuple[int, tuple[int, ...]], _Slot]]] = {
        k: [] for k in plan.tensors
    }
    prefix = data_dir(plan.save_id) + "/"
    for r, rank_plan in enumerate(plan.ranks):
        for f, fp in enumerate(rank_plan.files):
            name = fp.name.removeprefix(prefix) + '"'
            for i, item in enumerate(fp.items):
                rank = rank_plan.rank if item.per_rank else None
                rest = chunk_tail_text(
                    item.nbytes, item.offset, item.box.offsets, item.box.sizes, rank
                )
                order = (rank_plan.rank if item.per_rank else 0, item.box.offsets)
                slots[item.key].append((order, _Slot(r, f, i, name, rest)))
    tensors = []
    for key, meta in sorted(plan.tensors.items()):
        chunks = [s for _, s in sorted(slots[key], key=lambda o: o[0])]
        before = f'{json_str(key)}:{{"chunks":['
        after = tensor_tail_text(meta.dtype, meta.path, meta.per_rank, meta.shape)
        tensors.append((before, tuple(chunks), after))
    return ManifestTemplate(tuple(tensors), tuple(sorted(plan.tensors)))


@dataclass(frozen=True, slots=True)
class LayoutPart:
    """The layout tensors of a version 2 manifest, rendered by ``_manifest_build``."""

    entries: tuple[tuple[str, str], ...]  # (key, encoded entry), sorted by key
    files: tuple[FileRecord, ...]
    meshes: tuple[MeshRecord, ...]
    tables: tuple[TableRecord, ...]


def render_manifest(
    template: ManifestTemplate,
    plan: SavePlan,
    results: Sequence[Sequence[FileResult]],
    *,
    created: float,
    block_bytes: int,
    library: str,
    layouts: LayoutPart | None = None,
) -> bytes:
    """``manifest_to_bytes(build_manifest(...))`` for a plan with a template (a test holds
    them equal), at a fraction of the cost; with ``layouts``, a version 2 manifest."""
    files: list[FileRecord] = []
    crcs: list[list[tuple[tuple[int, ...], ...]]] = []
    for rank_plan, rank_results in zip(plan.ranks, results, strict=True):
        if len(rank_results) != len(rank_plan.files):
            raise RuntimeError(f"rank {rank_plan.rank} reported {len(rank_results)} files")
        for fp, res in zip(rank_plan.files, rank_results, strict=True):
            if res.name != fp.name or res.size != fp.size or len(res.crcs) != len(fp.items):
                raise RuntimeError(f"writer result for {fp.name} does not match its plan")
            files.append(FileRecord(fp.name, fp.size))
        crcs.append([res.crcs for res in rank_results])
    file_prefix = f'"{data_dir(plan.save_id)}/'
    parts: list[tuple[str, str]] = []
    for key, (before, slots, after) in zip(template.keys, template.tensors, strict=True):
        chunks = ",".join(
            '{"crc32c":'
            + ints_text(crcs[s.rank][s.file][s.item])
            + ',"file":'
            + file_prefix
            + s.name
            + s.rest
            for s in slots
        )
        parts.append((key, before + chunks + after))
    if layouts is not None:
        files.extend(layouts.files)
        parts = list(heapq.merge(parts, layouts.entries))
    head = Manifest(
        save_id=plan.save_id,
        world_size=plan.world_size,
        created=created,
        files=tuple(sorted(files, key=lambda f: f.name)),
        tensors={},
        values=dict(sorted(plan.values.items())),
        block_bytes=block_bytes,
        library=library,
        version=1 if layouts is None else LAYOUT_VERSION,
        meshes=() if layouts is None else layouts.meshes,
        tables=() if layouts is None else layouts.tables,
    )
    return assemble(head, ",".join(text for _, text in parts))
