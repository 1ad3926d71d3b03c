"""Save planning: pure functions from what each rank holds to who writes what, where.

Everything here is plain data in, plain data out, so it can be tested alone and the
result cached. Replicated chunks are written once, by the holder with the fewest bytes
assigned so far (largest chunks first), which spreads replicated state across ranks
instead of piling it on rank 0.
"""

from __future__ import annotations

import hashlib
import heapq
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dckpt._errors import UnsupportedStateError
from dckpt._format import (
    DTYPE_ITEMSIZE,
    ChunkRecord,
    FileRecord,
    Manifest,
    PathPart,
    TensorEntry,
    ValueEntry,
    align,
    data_dir,
)
from dckpt._manifest_text import (
    assemble,
    chunk_tail_text,
    ints_text,
    json_str,
    tensor_tail_text,
)
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


_Holders = dict[str, dict[Box, list[tuple[int, tuple[int, ...] | None]]]]
_Job = tuple[int, str, Box, tuple[int, ...], bool]  # nbytes, key, box, candidates, per rank


def plan_save(
    offers: Sequence[RankOffer], save_id: str, *, layout: FileLayout = LOCAL_LAYOUT
) -> SavePlan:
    """Decide, for every chunk any rank holds, which rank writes it to which file and offset."""
    world = len(offers)
    tensors, holders, sharded = _collect(offers)
    jobs = _jobs(tensors, holders, sharded)
    # Greedy balance by bytes: largest first, to the least-loaded holder.
    jobs.sort(key=lambda j: (-j[0], j[1], j[2].offsets))
    load = [0] * world
    assigned: list[list[tuple[str, Box, int, bool]]] = [[] for _ in range(world)]
    for nbytes, key, box, cands, per_rank in jobs:
        writer = min(cands, key=lambda r: (load[r], r))
        load[writer] += nbytes
        assigned[writer].append((key, box, nbytes, per_rank))

    ranks = tuple(_layout_rank(save_id, r, assigned[r], layout) for r in range(world))
    values = _plan_values(offers)
    clash = set(values) & set(tensors)
    if clash:
        key = sorted(clash)[0]
        raise UnsupportedStateError(f"key {key!r} is a tensor on some ranks and a value on others")
    return SavePlan(save_id, world, ranks, tensors, values)


def _collect(
    offers: Sequence[RankOffer],
) -> tuple[dict[str, TensorMeta], _Holders, dict[str, bool]]:
    """Every tensor's metadata (checked equal across ranks) and, per chunk box, its holders
    with their checksums, in rank order."""
    tensors: dict[str, TensorMeta] = {}
    holders: _Holders = {}
    sharded: dict[str, bool] = {}
    first_rank: dict[str, int] = {}
    for offer in offers:
        for t in offer.tensors:
            meta = TensorMeta(t.path, t.dtype, t.shape, False)
            prior = tensors.setdefault(t.key, meta)
            if prior != meta:
                raise UnsupportedStateError(
                    f"key {t.key!r} is {prior.dtype}{list(prior.shape)} on rank "
                    f"{first_rank[t.key]} but {t.dtype}{list(t.shape)} on rank {offer.rank}; "
                    "every rank must describe the same global tensor"
                )
            if sharded.setdefault(t.key, t.sharded) != t.sharded:
                raise UnsupportedStateError(
                    f"key {t.key!r} is a DTensor on some ranks and a plain tensor on others"
                )
            first_rank.setdefault(t.key, offer.rank)
            boxes = holders.setdefault(t.key, {})
            for c in t.chunks:
                boxes.setdefault(c.box, []).append((offer.rank, c.crc))
    return tensors, holders, sharded


def _jobs(
    tensors: dict[str, TensorMeta], holders: _Holders, sharded: dict[str, bool]
) -> list[_Job]:
    """Unique chunks with their candidate writers; a plain tensor whose holders disagree
    becomes per-rank (each holder writes its own copy), which ``tensors`` records."""
    jobs: list[_Job] = []
    for key, boxes in holders.items():
        meta = tensors[key]
        itemsize = DTYPE_ITEMSIZE[meta.dtype]
        divergent = not sharded[key] and any(
            len({crc for _, crc in hs}) > 1 for hs in boxes.values()
        )
        if divergent:
            tensors[key] = TensorMeta(meta.path, meta.dtype, meta.shape, True)
        for box, hs in boxes.items():
            nbytes = box.numel * itemsize
            if divergent:
                for rank, _crc in hs:
                    jobs.append((nbytes, key, box, (rank,), True))
            else:
                jobs.append((nbytes, key, box, tuple(r for r, _ in hs), False))
    return jobs


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
    """A digest of what a rank holds, ignoring contents: equal digests, reusable plan."""

    shape = tuple(
        (t.key, t.dtype, t.shape, t.sharded, tuple(c.box for c in t.chunks)) for t in offer.tensors
    )
    return hashlib.blake2b(pickle.dumps(shape, protocol=5), digest_size=16).digest()


def renamed(plan: RankPlan, save_id: str) -> RankPlan:
    """The same layout under another save id (its files live in that save's directory)."""
    old = data_dir(plan.save_id) + "/"
    new = data_dir(save_id) + "/"
    files = tuple(FilePlan(new + f.name.removeprefix(old), f.items, f.size) for f in plan.files)
    return RankPlan(save_id, plan.rank, files)


def with_save_id(plan: SavePlan, save_id: str, offers: Sequence[RankOffer]) -> SavePlan:
    """A cached plan under a new save id, with this save's (fresh) values."""
    ranks = tuple(renamed(r, save_id) for r in plan.ranks)
    return SavePlan(save_id, plan.world_size, ranks, plan.tensors, _plan_values(offers))


def _plan_values(offers: Sequence[RankOffer]) -> dict[str, ValueEntry]:
    seen: dict[str, list[tuple[int, ValueOffer]]] = {}
    for offer in offers:
        for v in offer.values:
            seen.setdefault(v.key, []).append((offer.rank, v))
    values: dict[str, ValueEntry] = {}
    for key, held in seen.items():
        path = held[0][1].path
        if len({v.text for _, v in held}) == 1:
            values[key] = ValueEntry(path, value=held[0][1].data)
        else:
            values[key] = ValueEntry(path, per_rank={r: v.data for r, v in held})
    return values


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
    return ManifestTemplate(tuple(tensors))


def render_manifest(
    template: ManifestTemplate,
    plan: SavePlan,
    results: Sequence[Sequence[FileResult]],
    *,
    created: float,
    block_bytes: int,
    library: str,
) -> bytes:
    """``manifest_to_bytes(build_manifest(...))`` for a plan with a template (a test holds
    them equal), at a fraction of the cost."""
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
    parts = []
    for before, slots, after in template.tensors:
        chunks = ",".join(
            '{"crc32c":'
            + ints_text(crcs[s.rank][s.file][s.item])
            + ',"file":'
            + file_prefix
            + s.name
            + s.rest
            for s in slots
        )
        parts.append(before + chunks + after)
    head = Manifest(
        save_id=plan.save_id,
        world_size=plan.world_size,
        created=created,
        files=tuple(sorted(files, key=lambda f: f.name)),
        tensors={},
        values=dict(sorted(plan.values.items())),
        block_bytes=block_bytes,
        library=library,
    )
    return assemble(head, ",".join(parts))
