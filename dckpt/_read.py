"""Reading saved chunks into destination tensors, verifying every block it touches.

Each rank reads only the byte ranges that overlap what it asked for. Where both the
saved bytes and the destination region are contiguous, bytes land straight in the
destination tensor's memory and are checksummed there; otherwise they pass through a
bounded scratch buffer. Only blocks cut by a range boundary are read in full into
scratch, so every byte is read about once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import crc32c
import numpy as np
import torch

from dckpt._bytes import as_memoryview, byte_view, frombuffer
from dckpt._errors import CorruptCheckpointError
from dckpt._format import ChunkRecord
from dckpt._readahead import ReadAhead
from dckpt._reshard import Box, Copy, contiguous_span, row_bytes, rows_box
from dckpt.storage import Storage

DEFAULT_MEMORY_BUDGET = 1 << 30
_MAX_WINDOW = 64 << 20


@dataclass(frozen=True, slots=True)
class ReadTask:
    key: str
    chunk: ChunkRecord
    copy: Copy
    dest: torch.Tensor  # the local tensor (or view) holding ``dest_box``
    dest_box: Box
    dtype: torch.dtype
    itemsize: int


class _Source:
    """Ranged reads of one file through the storage's :class:`~dckpt.storage.RangeReader`.

    A low-latency reader (a local file) is read one block at a time; otherwise each read
    is a request, so the planned small reads are batched (:class:`ReadAhead`) and long
    runs read in one request.
    """

    def __init__(self, storage: Storage, name: str) -> None:
        self.ranges = storage.open_ranges(name)
        self.low_latency = self.ranges.low_latency
        self.path = f"{storage.location}/{name}"
        self.read: Callable[[int, memoryview], None] = self.ranges.read_into
        self._ahead: ReadAhead | None = None
        self._storage = storage
        self._name = name

    def plan(self, spans: Sequence[tuple[int, int]], budget: int) -> None:
        """Batch the small reads of ``spans`` (the bytes the load will read)."""
        if spans:
            self._ahead = ReadAhead(self._storage, self._name, spans, budget)
            self.read = self._read_ahead

    def _read_ahead(self, offset: int, out: memoryview) -> None:
        assert self._ahead is not None
        if not self._ahead.read(offset, out):
            self.ranges.read_into(offset, out)

    def close(self) -> None:
        self.ranges.close()


def execute_reads(
    storage: Storage,
    tasks: Sequence[ReadTask],
    *,
    block_bytes: int,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    max_threads: int = 8,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Run every task, one thread per file (bounded), raising the first failure."""
    by_file: dict[str, list[ReadTask]] = {}
    for t in tasks:
        by_file.setdefault(t.chunk.file, []).append(t)
    for group in by_file.values():
        group.sort(key=lambda t: t.chunk.offset + t.copy.byte_span[0])
    threads = max(1, min(max_threads, len(by_file)))
    window = max(1 << 16, min(_MAX_WINDOW, memory_budget // (2 * threads)))

    def run_file(name: str) -> None:
        src = _Source(storage, name)
        try:
            if not src.low_latency:  # each read a request: batch the small ones
                src.plan([_span(t, block_bytes) for t in by_file[name]], window)
            for t in by_file[name]:
                _run_task(src, t, block_bytes, window)
                if progress is not None:
                    progress(t.copy.overlap.numel * t.itemsize)
        finally:
            src.close()

    if threads == 1:
        for name in by_file:
            run_file(name)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="dckpt-read") as pool:
        for f in [pool.submit(run_file, name) for name in by_file]:
            f.result()


def _span(t: ReadTask, block_bytes: int) -> tuple[int, int]:
    """The bytes of its file that ``t`` will read: its byte span, widened to whole blocks."""
    s0, s1 = t.copy.byte_span
    end = min(-(-s1 // block_bytes) * block_bytes, t.chunk.nbytes)
    return t.chunk.offset + s0 // block_bytes * block_bytes, t.chunk.offset + end


def _run_task(src: _Source, t: ReadTask, block_bytes: int, window: int) -> None:
    chunk_box = Box(t.chunk.offsets, t.chunk.sizes)
    dest = t.dest
    if t.copy.contiguous and dest.device.type == "cpu" and dest.is_contiguous():
        span = contiguous_span(t.dest_box, t.copy.overlap, t.itemsize)
        if span is not None:
            out = byte_view(dest)[span[0] : span[1]]
            s0, s1 = t.copy.byte_span
            _read_verified(src, t, s0, s1, out, block_bytes)
            return
    # General path: whole source rows through a bounded buffer, then a strided copy.
    rb = row_bytes(chunk_box, t.itemsize)
    r0, r1 = t.copy.rows
    step = max(1, window // max(rb, 1))
    for w0 in range(r0, r1, step):
        w1 = min(r1, w0 + step)
        buf = np.empty((w1 - w0) * rb if chunk_box.ndim else t.chunk.nbytes, dtype=np.uint8)
        start = w0 * rb if chunk_box.ndim else 0
        _read_verified(src, t, start, start + buf.nbytes, buf, block_bytes)
        wbox = rows_box(chunk_box, (w0, w1))
        part = t.copy.overlap.intersect(wbox) if chunk_box.ndim else t.copy.overlap
        if part is None:
            continue
        shape = (w1 - w0, *chunk_box.sizes[1:]) if chunk_box.ndim else ()
        data = frombuffer(buf, t.dtype, shape)
        dest[part.relative_to(t.dest_box)].copy_(data[part.relative_to(wbox)])


def _read_verified(
    src: _Source, t: ReadTask, s0: int, s1: int, out: np.ndarray, block_bytes: int
) -> None:
    """Fill ``out`` with bytes [s0, s1) of the chunk, checking each block's crc32c."""
    c = t.chunk
    if s1 <= s0:
        return
    b0, b1 = s0 // block_bytes, -(-s1 // block_bytes)
    # Blocks wholly inside [s0, s1) go straight into ``out`` with one read.
    first_full = b0 if s0 == b0 * block_bytes else b0 + 1
    last_full = b1 if min(b1 * block_bytes, c.nbytes) <= s1 else b1 - 1  # exclusive
    if first_full < last_full:
        lo = first_full * block_bytes
        hi = min(last_full * block_bytes, c.nbytes)
        view = as_memoryview(out)[lo - s0 : hi - s0]
        local = src.low_latency
        if not local:
            src.read(c.offset + lo, view)  # remote: one ranged request, then the checks
        for b in range(first_full, last_full):
            blo = b * block_bytes
            block = view[blo - lo : min(blo + block_bytes, c.nbytes) - lo]
            if local:  # read a block, check it while it is still in the CPU cache
                src.read(c.offset + blo, block)
            _check(t, b, block, src)
    for b in {b0, b1 - 1}:
        if first_full <= b < last_full:
            continue
        blo = b * block_bytes
        bhi = min(blo + block_bytes, c.nbytes)
        scratch = np.empty(bhi - blo, dtype=np.uint8)
        src.read(c.offset + blo, as_memoryview(scratch))
        _check(t, b, as_memoryview(scratch), src)
        lo, hi = max(s0, blo), min(s1, bhi)
        out[lo - s0 : hi - s0] = scratch[lo - blo : hi - blo]


def _check(t: ReadTask, block: int, data: memoryview, src: _Source) -> None:
    if crc32c.crc32c(data) != t.chunk.crc32c[block]:
        raise CorruptCheckpointError(
            f"checksum mismatch in key {t.key!r}: block {block} of the chunk at byte "
            f"{t.chunk.offset} of {src.path} is damaged; restore the checkpoint from a copy "
            "or load an older one"
        )
