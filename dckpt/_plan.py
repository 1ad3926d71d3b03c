"""Save planning: pure functions from what each rank holds to who writes what, where.

Everything here is plain data in, plain data out, so it can be tested alone and the
result cached. Replicated chunks are written once, by the holder with the fewest bytes
assigned so far (largest chunks first), which spreads replicated state across ranks
instead of piling it on rank 0.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from dckpt._errors import UnsupportedStateError
from dckpt._format import (
    ALIGNMENT,
    LAYOUT_VERSION,
    FileRecord,
    Manifest,
    PathPart,
    TableRecord,
    ValueEntry,
    data_dir,
)
from dckpt._layout import LayoutReport, MeshRecord
from dckpt._manifest_text import (
    IntsTexts,
    TailTexts,
    assemble,
    chunk_tail_text,
    crcs_text,
    json_str,
    path_text,
)
from dckpt._offers import ChunkOffer as ChunkOffer
from dckpt._offers import Crcs as Crcs
from dckpt._offers import RankOffer as RankOffer
from dckpt._offers import TensorOffer as TensorOffer
from dckpt._offers import ValueOffer as ValueOffer
from dckpt._offers import with_checksums as with_checksums
from dckpt._plangroups import assign, plan_values
from dckpt._plankey import structure_key as structure_key  # re-exported
from dckpt._reshard import Box
from dckpt.storage._base import LOCAL_LAYOUT, FileLayout


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
class OwnReport:
    """A rank's entries of the tensors it alone holds (``dckpt._owned``), after writing:
    their text (``key:{...}`` joined by commas, in key order), where each entry starts in
    it, and the files that hold them."""

    # ASCII; as received from another rank, its bytes (rank 0 joins them into the manifest
    # as they are: tens of MB at 20k tensors per rank, not decoded and encoded again)
    text: str | bytes
    starts: tuple[int, ...]
    files: tuple[tuple[str, int], ...]  # (name, size)


@dataclass(frozen=True, slots=True)
class RankWritten:
    """One rank's message to rank 0 after writing: its planned files, its layouts, and
    the tensors it alone holds."""

    files: tuple[FileResult, ...]
    layouts: LayoutReport | None = None
    own: OwnReport | None = None


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
    ranks = tuple(layout_rank(save_id, r, assigned[r], layout) for r in range(world))
    values = plan_values(offers)
    clash = set(values) & set(tensors)
    if clash:
        key = sorted(clash)[0]
        raise UnsupportedStateError(f"key {key!r} is a tensor on some ranks and a value on others")
    return SavePlan(save_id, world, ranks, tensors, values)


def layout_rank(
    save_id: str,
    rank: int,
    items: list[tuple[str, Box, int, bool]],
    layout: FileLayout,
    *,
    stem: str = "",
) -> RankPlan:
    """``rank``'s items in files ``r<rank>-<stem><i>.bin``, each at its aligned offset."""
    total = sum(map(_NBYTES, items))
    nfiles = max(1, min(layout.max_files, -(-total // layout.target_bytes)))
    per_file: list[list[tuple[str, Box, int, bool]]] = [items]
    if nfiles > 1:  # largest first, each to the least-filled file
        heap = [(0, f) for f in range(nfiles)]
        per_file = [[] for _ in range(nfiles)]
        # The planner hands them over largest first, or unordered when every chunk has
        # a single possible writer; the order is total, so the files are the same.
        for item in sorted(items, key=_size_order):
            size, f = heapq.heappop(heap)
            per_file[f].append(item)
            heapq.heappush(heap, (size + item[2], f))
    files: list[FilePlan] = []
    for f, group in enumerate(per_file):
        if not group:
            continue
        group = sorted(group, key=_key_order)  # key order: neighbours load together
        pos = 0
        out: list[WriteItem] = []
        for key, box, nbytes, per_rank in group:
            pos = -(-pos // ALIGNMENT) * ALIGNMENT  # align(), inline: one call per chunk
            out.append(WriteItem(key, box, pos, nbytes, per_rank))
            pos += nbytes
        files.append(FilePlan(f"{data_dir(save_id)}/r{rank}-{stem}{f}.bin", tuple(out), pos))
    return RankPlan(save_id, rank, tuple(files))


_NBYTES = operator.itemgetter(2)


def _key_order(item: tuple[str, Box, int, bool]) -> tuple[str, tuple[int, ...]]:
    return item[0], item[1].offsets


def _size_order(item: tuple[str, Box, int, bool]) -> tuple[int, str, tuple[int, ...]]:
    return -item[2], item[0], item[1].offsets


def renamed(plan: RankPlan, save_id: str) -> RankPlan:
    """The same layout under another save id (its files live in that save's directory)."""
    old, new = data_dir(plan.save_id) + "/", data_dir(save_id) + "/"
    files = tuple(FilePlan(new + f.name.removeprefix(old), f.items, f.size) for f in plan.files)
    return RankPlan(save_id, plan.rank, files)


def with_save_id(plan: SavePlan, save_id: str, offers: Sequence[RankOffer]) -> SavePlan:
    """A cached plan under a new save id, with this save's (fresh) values."""
    ranks = tuple(renamed(r, save_id) for r in plan.ranks)
    return SavePlan(save_id, plan.world_size, ranks, plan.tensors, plan_values(offers))


@dataclass(frozen=True, slots=True)
class ManifestTemplate:
    """A plan's chunk entries as manifest text, cut around what changes from save to save.

    Saves that reuse a cached plan differ only in the save id (inside file names), the
    checksums, the non-tensor values and the time. The entries' text is ``texts[0]``,
    then per chunk ``j`` (in text order) its checksums, ``],"file":"data/<save id>/``
    and ``texts[j + 1]``: a save renders it with one join, and the rest (at 100k tensors,
    most of a save's planning cost) is encoded once per plan.
    """

    texts: tuple[str, ...]  # the fixed text around the chunks: one more than chunks
    sources: tuple[int, ...]  # per chunk in text order: its index in plan order
    keys: tuple[str, ...] = ()  # the entries' keys, sorted
    starts: tuple[tuple[int, int], ...] = ()  # per key: (text, position) its entry starts at


_Chunk = tuple[tuple[int, tuple[int, ...]], int, str]  # order in its entry, index, text


def manifest_template(plan: SavePlan) -> ManifestTemplate:
    """The template of ``plan``'s manifest (plan order: rank, file, item)."""
    chunks = _chunk_texts(plan)
    texts: list[str] = []
    sources: list[int] = []
    starts: list[tuple[int, int]] = []
    tails = TailTexts()
    text = ""
    for key, meta in sorted(plan.tensors.items()):
        if starts:
            text += ","
        starts.append((len(texts), len(text)))
        text += json_str(key) + ':{"chunks":['
        held = chunks[key]
        if len(held) > 1:
            held.sort(key=_order)
        opening = '{"crc32c":['
        for _, index, rest in held:
            texts.append(text + opening)
            sources.append(index)
            text, opening = rest, ',{"crc32c":['
        before, after = tails[meta.dtype, meta.per_rank, meta.shape]
        text += before + path_text(meta.path) + after
    texts.append(text)
    return ManifestTemplate(
        tuple(texts), tuple(sources), tuple(sorted(plan.tensors)), tuple(starts)
    )


def _chunk_texts(plan: SavePlan) -> dict[str, list[_Chunk]]:
    """Every chunk by key, with the text after its file's directory (name, closing
    quote and the fields after it); boxes repeat, so their texts are made once."""
    out: dict[str, list[_Chunk]] = {k: [] for k in plan.tensors}
    prefix = data_dir(plan.save_id) + "/"
    box_texts = IntsTexts()
    index = 0
    for rank_plan in plan.ranks:
        for fp in rank_plan.files:
            name = fp.name.removeprefix(prefix) + '"'
            for item in fp.items:
                box = item.box
                rank = rank_plan.rank if item.per_rank else None
                rest = chunk_tail_text(
                    name,
                    item.nbytes,
                    item.offset,
                    box_texts[box.offsets],
                    box_texts[box.sizes],
                    rank,
                )
                out[item.key].append(((rank or 0, box.offsets), index, rest))
                index += 1
    return out


_order = operator.itemgetter(0)  # a chunk's order in its entry


@dataclass(frozen=True, slots=True)
class LayoutPart:
    """The layout tensors of a version 2 manifest, rendered by ``_manifest_build``."""

    entries: tuple[tuple[str, str], ...]  # (key, encoded entry), sorted by key
    files: tuple[FileRecord, ...]
    meshes: tuple[MeshRecord, ...]
    tables: tuple[TableRecord, ...]


@dataclass(frozen=True, slots=True)
class OwnedPart:
    """Tensors their one holder rendered itself (``dckpt._owned``)."""

    entries: Callable[[], Sequence[tuple[str, str]]]  # (key, encoded entry), sorted by key
    files: tuple[FileRecord, ...]
    # Whole comma-joined runs in key order when the ranks' keys do not interleave.
    runs: tuple[str | bytes, ...] = ()
    bounds: tuple[str, str] | None = None

    def text_alone(self, others: Sequence[str]) -> tuple[list[str | bytes], bool] | None:
        """The entries' text in pieces (to be joined as they are), and whether it goes
        before every key of ``others`` (sorted), when it goes whole before or after them
        all; else None."""
        if self.bounds is None:
            return None
        at = bisect.bisect_left(others, self.bounds[0])
        if at != bisect.bisect_right(others, self.bounds[1]) or 0 < at < len(others):
            return None
        pieces: list[str | bytes] = [","] * (2 * len(self.runs) - 1) if self.runs else []
        pieces[::2] = self.runs
        return pieces, at == 0


def render_manifest(
    template: ManifestTemplate,
    plan: SavePlan,
    results: Sequence[Sequence[FileResult]],
    *,
    created: float,
    block_bytes: int,
    library: str,
    layouts: LayoutPart | None = None,
    owned: OwnedPart | None = None,
) -> bytes:
    """``manifest_to_bytes(build_manifest(...))`` for a plan with a template (a test holds
    them equal), at a fraction of the cost; with ``layouts``, a version 2 manifest; with
    ``owned``, the entries and files of tensors their ranks rendered."""
    files, crcs = _checked(plan.ranks, results)
    entries: Sequence[tuple[str, str]] = () if layouts is None else layouts.entries
    alone = None  # the owned entries' text, when it goes whole before or after the rest
    if owned is not None:
        files.extend(owned.files)
        alone = owned.text_alone(template.keys) if not entries else None
        if alone is None:
            more = owned.entries()
            entries = list(heapq.merge(entries, more)) if entries else more
    texts = _with_entries(template, entries) if entries else template.texts
    text, _ = _joined(texts, [crcs[i] for i in template.sources], plan.save_id, ())
    pieces: list[str | bytes] = [text]
    if alone is not None and alone[0]:  # whole runs, before or after the template's keys
        own, before = alone
        pieces = [*own, ",", text] if before else [text, ",", *own]
        if not text:
            pieces = own
    if layouts is not None:
        files.extend(layouts.files)
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
    return assemble(head, pieces)


def render_entries(
    template: ManifestTemplate, plan: RankPlan, results: Sequence[FileResult]
) -> tuple[str, tuple[int, ...]]:
    """The tensor entries of a one-rank template (``key:{...}`` joined by commas) and
    where each entry starts in that text."""
    _, crcs = _checked((plan,), (results,))
    return _joined(
        template.texts, [crcs[i] for i in template.sources], plan.save_id, template.starts
    )


def _joined(
    texts: Sequence[str], crcs: list[str], save_id: str, starts: Sequence[tuple[int, int]]
) -> tuple[str, tuple[int, ...]]:
    """The template's texts with each chunk's checksums and file directory between them;
    ``starts`` (text index, position) become positions in the result."""
    middle = f'],"file":"{data_dir(save_id)}/'
    pieces = list(itertools.chain.from_iterable(zip(texts, crcs, itertools.repeat(middle))))
    pieces += texts[-1:]
    at: tuple[int, ...] = ()
    if starts:  # text j starts after 3 j pieces
        ends = list(itertools.accumulate(map(len, pieces), initial=0))
        at = tuple(ends[3 * j] + pos for j, pos in starts)
    return "".join(pieces), at


def _checked(
    ranks: Sequence[RankPlan], results: Sequence[Sequence[FileResult]]
) -> tuple[list[FileRecord], list[str]]:
    """The files the writers report, checked against the plan, and the text of every
    chunk's checksums in plan order."""
    files: list[FileRecord] = []
    crcs: list[str] = []
    for rank_plan, rank_results in zip(ranks, results, strict=True):
        if len(rank_results) != len(rank_plan.files):
            raise RuntimeError(f"rank {rank_plan.rank} reported {len(rank_results)} files")
        for fp, res in zip(rank_plan.files, rank_results, strict=True):
            if res.name != fp.name or res.size != fp.size or len(res.crcs) != len(fp.items):
                raise RuntimeError(f"writer result for {fp.name} does not match its plan")
            files.append(FileRecord(fp.name, fp.size))
            crcs += map(crcs_text, res.crcs)
    return files, crcs


def _with_entries(template: ManifestTemplate, entries: Sequence[tuple[str, str]]) -> list[str]:
    """The template's texts with other entries (``(key, text)``, sorted) put in key order."""
    texts = list(template.texts)
    if not template.keys:
        texts[0] = ",".join(text for _, text in entries)
        return texts
    before: dict[int, list[str]] = {}  # index of the entry they precede -> their texts
    for key, text in entries:
        before.setdefault(bisect.bisect_left(template.keys, key), []).append(text)
    # Last first: an insertion moves the later start positions within the same text.
    for k in sorted(before, reverse=True):
        if k == len(template.keys):
            texts[-1] += "".join("," + text for text in before[k])
            continue
        j, pos = template.starts[k]
        texts[j] = texts[j][:pos] + "".join(text + "," for text in before[k]) + texts[j][pos:]
    return texts
