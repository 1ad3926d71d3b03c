"""Host staging buffers for async saves: one reusable copy of the local state.

Buffers are keyed by chunk identity and dtype, so a second save of the same structure
allocates nothing. Sources on a GPU are copied into page-locked buffers with
non-blocking copies on a side stream; the call returns once that stream has finished,
so the snapshot is complete when ``async_save`` returns.

Fresh memory is the first save's main cost: first-touch page faults on the CPU (several
times the copy itself), page-locking on a GPU host. ``reserve`` pays it ahead of time,
off the training thread, so that even the first save blocks for one warm copy.
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
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # one side stream per GPU

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())

    def check(self, sources: Mapping[ChunkId, torch.Tensor]) -> None:
        """Raise now if staging ``sources`` would exceed the configured limit."""
        need = sum(t.nbytes for t in sources.values())
        if self.capacity is not None and need > self.capacity:
            raise CheckpointError(
                f"async save needs {need} bytes of staging memory, over the configured "
                f"limit of {self.capacity}; raise staging_bytes or use dckpt.save"
            )

    def reserve(self, sources: Mapping[ChunkId, torch.Tensor]) -> None:
        """Make and touch the buffers a ``stage`` of ``sources`` will use (no copy).

        Reads only shapes, dtypes and devices of ``sources``, so it may run on another
        thread while training goes on."""
        with self._lock:
            self.check(sources)
            self._keep_only(sources)  # at most one copy of the state, as in stage
            for cid, src in sources.items():
                if self._reusable(cid, src) is None:
                    self._buffers[cid] = self._new_buffer(src).zero_()  # fault every page in

    def stage(self, sources: Mapping[ChunkId, torch.Tensor]) -> dict[ChunkId, torch.Tensor]:
        """Copy every source into its buffer; returns the buffers (valid until the next call)."""
        with self._lock:
            self.check(sources)
            self._keep_only(sources)  # the structure changed: drop what this save does not use
            staged: dict[ChunkId, torch.Tensor] = {}
            used: dict[torch.device, torch.cuda.Stream] = {}
            cpu_dst: list[torch.Tensor] = []
            cpu_src: list[torch.Tensor] = []
            for cid, src in sources.items():
                buf = self._reusable(cid, src)
                if buf is None:
                    buf = self._buffers[cid] = self._new_buffer(src)
                if src.is_cuda:
                    stream = used.get(src.device)
                    if stream is None:
                        # Wait for the work that produced the values, once per device.
                        stream = used[src.device] = self._side_stream(src.device)
                        stream.wait_stream(torch.cuda.current_stream(src.device))
                    with torch.cuda.stream(stream):
                        buf.copy_(src.detach(), non_blocking=True)
                else:
                    cpu_dst.append(buf)
                    cpu_src.append(src)
                staged[cid] = buf
            _copy_all(cpu_dst, cpu_src)
            for stream in used.values():
                stream.synchronize()  # the snapshot is complete before the call returns
            return staged

    def _keep_only(self, sources: Mapping[ChunkId, torch.Tensor]) -> None:
        for cid in [c for c in self._buffers if c not in sources]:
            del self._buffers[cid]  # a save still writing from it holds its own reference

    def _reusable(self, cid: ChunkId, src: torch.Tensor) -> torch.Tensor | None:
        """The buffer ``src`` can be staged into as it is, if the pool has one."""
        buf = self._buffers.get(cid)
        if (
            buf is not None
            and buf.shape == src.shape
            and buf.dtype == src.dtype
            and (not src.is_cuda or buf.is_pinned())
        ):
            return buf
        return None

    @staticmethod
    def _new_buffer(src: torch.Tensor) -> torch.Tensor:
        return torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream

    def release(self) -> None:
        with self._lock:
            self._buffers.clear()


def _copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """All CPU copies in one call: with thousands of small tensors, a ``copy_`` each
    costs more in per-call overhead than in copying."""
    if not dsts:
        return
    with torch.no_grad():  # sources may require grad; the buffers must not join a graph
        torch._foreach_copy_(dsts, srcs)
