"""Writing one rank's share of a save: its files, in parallel, checksummed as they go."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import crc32c
import numpy as np
import torch

from dckpt._bytes import as_memoryview, block_crcs, host_bytes
from dckpt._plan import FilePlan, FileResult, RankPlan
from dckpt._reshard import Box
from dckpt.storage._base import Storage, Writer

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
    batch: list[memoryview] = []
    keep: list[np.ndarray] = []  # host copies must outlive the batch that points at them
    pending = 0
    pos = 0
    for item in fp.items:
        if item.offset > pos:
            batch.append(_ZEROS[: item.offset - pos])
            pos = item.offset
        done = known.get((item.key, item.box))
        data = done[1] if done is not None else host_bytes(sources[(item.key, item.box)])
        if data.nbytes != item.nbytes:
            raise RuntimeError(
                f"key {item.key!r}: planned {item.nbytes} bytes, found {data.nbytes}"
            )
        pos += item.nbytes
        if done is None and data.nbytes > block_bytes:
            # Large chunk: checksum each block right before writing it, while it is still
            # in the CPU cache, instead of reading all of it twice from memory.
            if batch:
                w.write(batch)
                batch, keep = [], []
            view = as_memoryview(data)
            item_crcs = []
            for start in range(0, data.nbytes, block_bytes):
                block = view[start : start + block_bytes]
                item_crcs.append(crc32c.crc32c(block))
                w.write([block])
            crcs.append(tuple(item_crcs))
            pending += item.nbytes
            if progress is not None:
                progress(pending)
            pending = 0
            continue
        crcs.append(done[0] if done is not None else block_crcs(data, block_bytes))
        keep.append(data)
        batch.append(as_memoryview(data))
        pending += item.nbytes
        if pending >= _BATCH_BYTES or len(batch) >= _BATCH_BUFFERS:
            w.write(batch)
            if progress is not None:
                progress(pending)
            batch, keep, pending = [], [], 0
    if batch:
        w.write(batch)
        if progress is not None:
            progress(pending)
    size = w.close(durable=durable)
    with contextlib.suppress(ValueError):
        writers.remove(w)  # closed cleanly: nothing to abort for this file
    if size != fp.size:
        raise RuntimeError(f"{fp.name}: wrote {size} bytes, planned {fp.size}")
    return FileResult(fp.name, size, tuple(crcs))
