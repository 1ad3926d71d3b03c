"""Writing one rank's share of a save: its files, in parallel, checksummed as they go."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import crc32c
import numpy as np
import torch

from dckpt._bytes import as_memoryview, block_crcs, host_bytes
from dckpt._plan import FilePlan, FileResult, RankPlan, WriteItem
from dckpt._reshard import Box
from dckpt.storage import Storage, Writer

_ZEROS = memoryview(bytes(64))
_BATCH_BYTES = 8 << 20
_BATCH_BUFFERS = 256

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


def _item_bytes(
    item: WriteItem, sources: SourceMap, known: KnownCrcs
) -> tuple[tuple[tuple[int, ...], np.ndarray] | None, np.ndarray]:
    """The item's bytes on the host, and its checksums when they were computed already."""
    done = known.get((item.key, item.box))
    data = done[1] if done is not None else host_bytes(sources[(item.key, item.box)])
    if data.nbytes != item.nbytes:
        raise RuntimeError(f"key {item.key!r}: planned {item.nbytes} bytes, found {data.nbytes}")
    return done, data


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
    """Buffers gathered for one vectored write, and the bytes not yet reported."""

    def __init__(self, w: Writer, progress: Callable[[int], None] | None) -> None:
        self.w = w
        self.progress = progress
        self.views: list[memoryview] = []
        self.keep: list[np.ndarray] = []  # host copies must outlive the views into them
        self.pending = 0

    def add(self, view: memoryview, data: np.ndarray | None, nbytes: int) -> None:
        self.views.append(view)
        if data is not None:
            self.keep.append(data)
        self.pending += nbytes
        if self.pending >= _BATCH_BYTES or len(self.views) >= _BATCH_BUFFERS:
            self.flush()

    def write(self) -> None:
        if self.views:
            self.w.write(self.views)
            self.views, self.keep = [], []

    def flush(self) -> None:
        had = bool(self.views)
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
    for item in fp.items:
        if item.offset > pos:
            batch.add(_ZEROS[: item.offset - pos], None, 0)
            pos = item.offset
        done, data = _item_bytes(item, sources, known)
        pos += item.nbytes
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
