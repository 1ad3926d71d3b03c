"""Host staging buffers for async saves: one reusable copy of the local state.

Buffers are keyed by chunk identity and dtype, so a second save of the same structure
allocates nothing. Sources on a GPU are copied into page-locked buffers with
non-blocking copies on a side stream; the call returns once that stream has finished,
so the snapshot is complete when ``async_save`` returns.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from dckpt._errors import CheckpointError
from dckpt._reshard import Box

ChunkId = tuple[str, Box]


class StagingPool:
    """At most ``capacity`` bytes of host buffers, reused across saves."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self._buffers: dict[ChunkId, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._stream: torch.cuda.Stream | None = None

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def stage(self, sources: Mapping[ChunkId, torch.Tensor]) -> dict[ChunkId, torch.Tensor]:
        """Copy every source into its buffer; returns the buffers (valid until the next call)."""
        with self._lock:
            need = sum(t.numel() * t.element_size() for t in sources.values())
            if self.capacity is not None and need > self.capacity:
                raise CheckpointError(
                    f"async save needs {need} bytes of staging memory, over the configured "
                    f"limit of {self.capacity}; raise staging_bytes or use dckpt.save"
                )
            # Drop buffers this save does not use (the structure changed), then reuse or make.
            for cid in [c for c in self._buffers if c not in sources]:
                del self._buffers[cid]
            staged: dict[ChunkId, torch.Tensor] = {}
            on_gpu = False
            for cid, src in sources.items():
                buf = self._buffers.get(cid)
                if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                    pin = src.device.type == "cuda"
                    buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
                    self._buffers[cid] = buf
                if src.device.type == "cuda":
                    on_gpu = True
                    stream = self._side_stream()
                    stream.wait_stream(torch.cuda.current_stream(src.device))
                    with torch.cuda.stream(stream):
                        buf.copy_(src.detach(), non_blocking=True)
                else:
                    buf.copy_(src.detach())
                staged[cid] = buf
            if on_gpu and self._stream is not None:
                self._stream.synchronize()
            return staged

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def release(self) -> None:
        with self._lock:
            self._buffers.clear()
