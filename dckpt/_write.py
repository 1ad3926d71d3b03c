"""Writing one rank's share of a save: its files, in parallel, checksummed as they go."""

from __future__ import annotations

import contextlib
import heapq
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import crc32c
import numpy as np
import torch

from dckpt._bytes import as_memoryview, block_crcs, host_bytes
from dckpt._faults import fault_point
from dckpt._format import ALIGNMENT, DTYPE_ITEMSIZE, align, data_dir
from dckpt._gc import gc_paused
from dckpt._layout import is_writer, shard_pieces, unravel
from dckpt._manifest_build import layout_report
from dckpt._owned import OwnPlan, own_report
from dckpt._plan import FilePlan, FileResult, RankOffer, RankPlan, RankWritten, WriteItem
from dckpt._reshard import Box
from dckpt._table import Row, encode_table, table_crc, table_name
from dckpt.storage import FileLayout, Storage, Writer

_ZEROS = memoryview(bytes(ALIGNMENT))
_PADS = [_ZEROS[:n] for n in range(ALIGNMENT)]  # every padding an item can need
_BATCH_BYTES = 8 << 20
_BATCH_BUFFERS = 256
# Items up to this size go into a run buffer with their padding (see _Batch).
_SMALL_BYTES = 4096
_RUN_BYTES = 1 << 20

SourceMap = Mapping[tuple[str, Box], torch.Tensor]
#: Host bytes and checksums a rank already has for some chunks (plain tensors, from
#: planning), so the writer neither fetches nor checksums them twice.
KnownCrcs = Mapping[tuple[str, Box], tuple[tuple[int, ...], np.ndarray]]


def write_rank(
    storage: Storage,
    plan: RankPlan,
    sources: SourceMap,
    *,
    durable: bool,
    block_bytes: int,
    known_crcs: KnownCrcs | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[FileResult]:
    """Write every file of ``plan``; on any failure remove what was written and re-raise."""
    if not plan.files:
        return []
    known = known_crcs or {}
    writers: list[Writer] = []
    try:
        if len(plan.files) == 1:
            results = [
                _write_file(
                    storage, plan.files[0], sources, known, durable, block_bytes, writers, progress
                )
            ]
        else:
            with ThreadPoolExecutor(len(plan.files), thread_name_prefix="dckpt-write") as pool:
                futures = [
                    pool.submit(
                        _write_file,
                        storage,
                        f,
                        sources,
                        known,
                        durable,
                        block_bytes,
                        writers,
                        progress,
                    )
                    for f in plan.files
                ]
                results = [f.result() for f in futures]
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return results


def _write_checksummed(w: Writer, view: memoryview, block_bytes: int) -> tuple[int, ...]:
    """Write a large chunk block by block, checksumming each block right before writing it,
    while it is still in the CPU cache, instead of reading all of it twice from memory."""
    crcs = []
    for start in range(0, view.nbytes, block_bytes):
        block = view[start : start + block_bytes]
        crcs.append(crc32c.crc32c(block))
        w.write([block])
    return tuple(crcs)


class _Batch:
    """Buffers gathered for one vectored write, and the bytes not yet reported. Small
    items, with their padding, are joined into one run buffer that goes in as one: at
    thousands of tiny tensors, two buffers each in ``writev`` cost more than copying."""

    def __init__(self, w: Writer, progress: Callable[[int], None] | None) -> None:
        self.w = w
        self.progress = progress
        self.views: list[memoryview] = []
        self.keep: list[np.ndarray] = []  # host copies must outlive the views into them
        self.pending = 0
        self.small: list[memoryview | np.ndarray] = []  # the run's pieces, joined at its end
        self.run_bytes = 0
        self.run_items = 0  # the bytes of items in the run, for progress

    def add_small(self, pad: int, data: np.ndarray, nbytes: int) -> None:
        if pad > 0:
            self.small.append(_PADS[pad] if pad < ALIGNMENT else memoryview(bytes(pad)))
        self.small.append(data)
        self.run_items += nbytes
        self.run_bytes += pad + nbytes
        if self.run_bytes >= _RUN_BYTES:
            self._end_run()

    def _end_run(self) -> None:
        run, items = b"".join(self.small), self.run_items  # type: ignore[arg-type]  # buffers
        self.small, self.run_bytes, self.run_items = [], 0, 0
        self.add(memoryview(run), None, items)

    def add(self, view: memoryview, data: np.ndarray | None, nbytes: int) -> None:
        if self.small:
            self._end_run()
        self.views.append(view)
        if data is not None:
            self.keep.append(data)
        self.pending += nbytes
        if self.pending >= _BATCH_BYTES or len(self.views) >= _BATCH_BUFFERS:
            self.flush()

    def write(self) -> None:
        if self.small:
            self._end_run()
        if self.views:
            self.w.write(self.views)
            self.views, self.keep = [], []

    def flush(self) -> None:
        had = bool(self.views or self.small)
        self.write()
        if self.progress is not None and (had or self.pending):
            self.progress(self.pending)
        self.pending = 0


def _write_file(
    storage: Storage,
    fp: FilePlan,
    sources: SourceMap,
    known: KnownCrcs,
    durable: bool,
    block_bytes: int,
    writers: list[Writer],
    progress: Callable[[int], None] | None,
) -> FileResult:
    w = storage.open_writer(fp.name)
    writers.append(w)
    crcs: list[tuple[int, ...]] = []
    batch = _Batch(w, progress)
    pos = 0
    known_at = known.get  # inline, not _item_bytes: tens of thousands of items
    for item in fp.items:
        nbytes = item.nbytes
        done = known_at((item.key, item.box))
        data = done[1] if done is not None else host_bytes(sources[(item.key, item.box)])
        if data.nbytes != nbytes:
            raise RuntimeError(f"key {item.key!r}: planned {nbytes} bytes, found {data.nbytes}")
        pad, pos = item.offset - pos, item.offset + nbytes
        if nbytes <= _SMALL_BYTES:
            batch.add_small(pad, data, nbytes)
            crcs.append(done[0] if done is not None else block_crcs(data, block_bytes))
            continue
        if pad > 0:
            batch.add(_ZEROS[:pad], None, 0)
        if done is None and data.nbytes > block_bytes:
            batch.write()
            crcs.append(_write_checksummed(w, as_memoryview(data), block_bytes))
            batch.pending += item.nbytes
            batch.flush()
            continue
        crcs.append(done[0] if done is not None else block_crcs(data, block_bytes))
        batch.add(as_memoryview(data), data, item.nbytes)
    batch.flush()
    size = w.close(durable=durable)
    with contextlib.suppress(ValueError):
        writers.remove(w)  # closed cleanly: nothing to abort for this file
    if size != fp.size:
        raise RuntimeError(f"{fp.name}: wrote {size} bytes, planned {fp.size}")
    return FileResult(fp.name, size, tuple(crcs))


# ----------------------------------------------------------------------------- layouts


def plan_layout_files(
    offer: RankOffer, save_id: str, layout: FileLayout
) -> tuple[list[FilePlan], dict[tuple[str, Box], int]]:
    """This rank's shard files (``r<rank>-s<i>.bin``): the pieces of every layout shard it
    writes, a pure function of its offer; and each piece's index in its shard."""
    items: list[tuple[int, str, Box]] = []
    pieces: dict[tuple[str, Box], int] = {}
    for e in offer.layouts:
        mesh = offer.meshes[e.mesh]
        coordinate = unravel(mesh.position, mesh.shape)
        if not is_writer(e.key, mesh.shape, e.placements, coordinate):
            continue
        for piece, box in enumerate(shard_pieces(e.shape, mesh.shape, coordinate, e.placements)):
            items.append((box.numel * DTYPE_ITEMSIZE[e.dtype], e.key, box))
            pieces[(e.key, box)] = piece
    total = sum(n for n, _, _ in items)
    nfiles = max(1, min(layout.max_files, -(-total // layout.target_bytes)))
    heap = [(0, f) for f in range(nfiles)]
    per_file: list[list[tuple[int, str, Box]]] = [[] for _ in range(nfiles)]
    for item in sorted(items, key=lambda i: (-i[0], i[1])):  # largest first, least-filled file
        size, f = heapq.heappop(heap)
        per_file[f].append(item)
        heapq.heappush(heap, (size + item[0], f))
    files: list[FilePlan] = []
    for group in per_file:
        if not group:
            continue
        group.sort(key=lambda i: (i[1], i[2].offsets))
        pos, out = 0, []
        for nbytes, key, box in group:
            pos = align(pos)
            out.append(WriteItem(key, box, pos, nbytes))
            pos += nbytes
        name = f"{data_dir(save_id)}/r{offer.rank}-s{len(files)}.bin"
        files.append(FilePlan(name, tuple(out), pos))
    return files, pieces


def with_layout_files(
    plan: RankPlan, offer: RankOffer, layout: FileLayout, own: OwnPlan | None = None
) -> tuple[RankPlan, dict[tuple[str, Box], int], str]:
    """``plan`` with the files of this rank's own tensors and its shard files appended
    (one write pass does all), each piece's index in its shard, and the name of the
    table that lists them."""
    shard_files, pieces = plan_layout_files(offer, plan.save_id, layout)
    mine = () if own is None else own.plan.files
    every = RankPlan(plan.save_id, plan.rank, (*plan.files, *mine, *shard_files))
    return every, pieces, table_name(data_dir(plan.save_id), plan.rank)


def finish_layouts(
    storage: Storage,
    offer: RankOffer,
    planned: int,
    every: RankPlan,
    results: list[FileResult],
    pieces: dict[tuple[str, Box], int],
    *,
    durable: bool,
    own: OwnPlan | None = None,
) -> RankWritten:
    """After ``write_rank(every)``: write the table of the shard files (those after the
    first ``planned`` files and the ``own`` files) and make this rank's report to rank 0,
    the entries of its own tensors rendered."""
    report_own = None
    if own is not None:
        mine = len(own.plan.files)
        report_own = gc_paused(own_report)(own, results[planned : planned + mine])
        every = RankPlan(
            every.save_id, every.rank, every.files[:planned] + every.files[planned + mine :]
        )
        results = results[:planned] + results[planned + mine :]
    shard_files, written = every.files[planned:], results[planned:]
    table = None
    if shard_files:
        rows = [
            Row(item.key, pieces[(item.key, item.box)], f, item.offset, item.nbytes, crcs)
            for f, (fp, res) in enumerate(zip(shard_files, written, strict=True))
            for item, crcs in zip(fp.items, res.crcs, strict=True)
        ]
        data = encode_table(every.rank, rows)
        name = table_name(data_dir(every.save_id), every.rank)
        table = (name, _write_table(storage, name, data, durable), table_crc(data))
    report = layout_report(offer, [(r.name, r.size) for r in written], table)
    return RankWritten(tuple(results[:planned]), report, report_own)


def _write_table(storage: Storage, name: str, data: bytes, durable: bool) -> int:
    fault_point("save.table.write")
    w = storage.open_writer(name)
    try:
        w.write([memoryview(data)])
        size = w.close(durable=durable)
    except BaseException:
        w.abort()
        raise
    if size != len(data):
        raise RuntimeError(f"{name}: wrote {size} bytes, planned {len(data)}")
    return size
