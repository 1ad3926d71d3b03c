"""Reading the data files of a torch DCP checkpoint without trusting its metadata.

Every size in ``.metadata`` is a claim. :class:`DcpFiles` checks each claim against the
files on storage before a byte is read or a tensor allocated: an item must lie within its
file, a chunk's archive must be big enough for the chunk's elements, and a tensor read
whole must be no bigger than the files holding it. Each item is a complete ``torch.save``
archive, decoded with ``torch.load(weights_only=True)`` unless the caller opted in to
pickle. :func:`run_jobs` decodes each chunk a rank needs once and copies it into every
destination region it overlaps.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from dckpt._bytes import dtype_name
from dckpt._errors import CorruptCheckpointError, UnsafeCheckpointError
from dckpt._reshard import Box, ChunkIndex
from dckpt.interop._dcp_meta import DcpChunk, DcpItem, DcpTensor
from dckpt.storage import Storage

_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"


class DcpFiles:
    """Checks claims against the data files before anything is read or allocated: each file
    present, each item within its file, each tensor no bigger than the bytes holding it."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._sizes: dict[str, int] = {}

    def size(self, file: str) -> int:
        size = self._sizes.get(file)
        if size is None:
            got = self.storage.size(file)
            if got is None:
                raise CorruptCheckpointError(
                    f"data file {self.storage.location}/{file} is missing; "
                    "the checkpoint is damaged"
                )
            size = self._sizes[file] = got
        return size

    def require(self, item: DcpItem) -> None:
        size = self.size(item.file)
        if item.offset + item.length > size:
            raise CorruptCheckpointError(
                f"data file {self.storage.location}/{item.file} has {size} bytes but the "
                f"metadata places an item at byte {item.offset} of length {item.length}; "
                "it was truncated"
            )

    def require_chunk(self, tensor: DcpTensor, chunk: DcpChunk) -> None:
        """The chunk's archive lies within its file and can hold the chunk's elements (DCP
        saves each chunk as an uncompressed ``torch.save`` of exactly those elements)."""
        self.require(chunk.item)
        need = chunk.box.numel * tensor.dtype.itemsize
        if chunk.item.length < need:
            raise CorruptCheckpointError(
                f"key {tensor.key!r}: chunk {chunk.box} of {dtype_name(tensor.dtype)} needs "
                f"{need} bytes, but the metadata gives it {chunk.item.length} bytes of "
                f"{self.storage.location}/{chunk.item.file}; the DCP metadata is damaged"
            )

    def require_tensor(self, tensor: DcpTensor) -> None:
        """Before allocating ``tensor`` whole: every chunk checked, and its claimed size no
        more than its data files hold, so a metadata claim cannot reach the allocator."""
        for chunk in tensor.chunks:
            self.require_chunk(tensor, chunk)
        files = sorted({c.item.file for c in tensor.chunks})
        held = sum(self.size(f) for f in files)
        if tensor.nbytes > held:
            raise CorruptCheckpointError(
                f"key {tensor.key!r} claims {dtype_name(tensor.dtype)}{list(tensor.shape)} "
                f"({tensor.nbytes} bytes), but its data files in {self.storage.location} "
                f"({', '.join(files) or 'none'}) hold {held} bytes in all; the DCP "
                "metadata is damaged"
            )

    def read(self, item: DcpItem) -> bytes:
        self.require(item)
        buf = bytearray(item.length)
        self.storage.read_into(item.file, item.offset, memoryview(buf))
        return bytes(buf)


def _check_archive(data: bytes, what: str) -> None:
    """torch's zip reader ignores the CRC-32 each archive member carries; DCP has no other."""
    try:
        bad = zipfile.ZipFile(io.BytesIO(data)).testzip()
    except Exception as exc:
        raise CorruptCheckpointError(
            f"{what} is not a torch.save archive ({type(exc).__name__}: {exc})"
        ) from None
    if bad is not None:
        raise CorruptCheckpointError(f"{what} fails the CRC check of its member {bad!r}")


def decode(data: bytes, what: str, *, allow_pickle: bool = False) -> Any:
    """One ``torch.save`` archive, via ``weights_only`` unless the caller opted in to pickle."""
    _check_archive(data, what)
    for weights_only in (True, False):
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)
        except pickle.UnpicklingError as exc:
            if not weights_only or _WEIGHTS_ONLY_REFUSAL not in str(exc):
                raise CorruptCheckpointError(f"{what} cannot be unpickled: {exc}") from None
            if not allow_pickle:
                raise UnsafeCheckpointError(
                    f"{what} holds objects that torch.load(weights_only=True) refuses; it needs "
                    "an unsafe unpickle, which could run code from the checkpoint, and dckpt "
                    "refuses that. Pass allow_pickle=True only if you trust this checkpoint."
                ) from None
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise CorruptCheckpointError(
                f"{what} is not a readable torch.save archive ({type(exc).__name__}: {first})"
            ) from None
    raise AssertionError("unreachable")


def decode_tensor(data: bytes, what: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Any:
    """A chunk as a CPU tensor, checked against the metadata's dtype and shape."""
    try:
        obj = decode(data, what)
    except UnsafeCheckpointError:
        raise UnsafeCheckpointError(
            f"{what} holds objects that torch.load(weights_only=True) refuses; a tensor chunk "
            "never needs them, so dckpt refuses to unpickle it"
        ) from None
    if type(obj) is not torch.Tensor:
        raise CorruptCheckpointError(f"{what} holds a {type(obj).__name__}, not a tensor")
    if obj.dtype != dtype or tuple(obj.shape) != shape:
        raise CorruptCheckpointError(
            f"{what} holds {dtype_name(obj.dtype)}{list(obj.shape)}, the metadata promises "
            f"{dtype_name(dtype)}{list(shape)}"
        )
    return obj


# -- decoding chunks into destination tensors -----------------------------------------


@dataclass(frozen=True, slots=True)
class _Dest:
    overlap: Box
    dest: torch.Tensor
    dest_box: Box


@dataclass
class ChunkJob:
    """One chunk to decode once, and every destination region it fills on this rank."""

    tensor: DcpTensor
    chunk: DcpChunk
    dests: list[_Dest] = field(default_factory=list)


def add_copies(
    jobs: dict[tuple[str, int], ChunkJob], saved: DcpTensor, dests: list[tuple[Box, torch.Tensor]]
) -> None:
    """Add to ``jobs`` (keyed by archive) the chunks of ``saved`` that fill each (global
    box, destination) pair of ``dests``."""
    index = ChunkIndex([c.box for c in saved.chunks])
    for want, dest in dests:
        if want.numel == 0:
            continue
        try:
            copies = index.plan_copies(want, saved.dtype.itemsize)
        except ValueError as exc:
            raise CorruptCheckpointError(
                f"key {saved.key!r}: the DCP checkpoint does not hold the region {want} ({exc})"
            ) from None
        for cp in copies:
            chunk = saved.chunks[cp.source]
            job = jobs.setdefault((chunk.item.file, chunk.item.offset), ChunkJob(saved, chunk))
            job.dests.append(_Dest(cp.overlap, dest, want))


def run_job(files: DcpFiles, job: ChunkJob) -> None:
    """Decode the job's chunk, checked against the metadata, and copy it out."""
    t, c = job.tensor, job.chunk
    what = f"chunk {c.box} of {t.key!r} ({files.storage.location}/{c.item.file} @{c.item.offset})"
    files.require_chunk(t, c)
    src = decode_tensor(files.read(c.item), what, t.dtype, c.box.sizes)
    for d in job.dests:
        d.dest[d.overlap.relative_to(d.dest_box)].copy_(src[d.overlap.relative_to(c.box)])


def run_jobs(files: DcpFiles, jobs: list[ChunkJob], *, memory_budget: int, threads: int) -> None:
    """Decode each chunk once, copy it out, drop it; waves keep decoded bytes near the budget."""
    jobs = sorted(jobs, key=lambda j: (j.chunk.item.file, j.chunk.item.offset))
    limit = max(1, memory_budget // 2)  # an archive and its decoded tensor live together
    waves: list[list[ChunkJob]] = []
    used = limit
    for job in jobs:
        if used + job.chunk.item.length > limit:
            waves.append([])
            used = 0
        waves[-1].append(job)
        used += job.chunk.item.length
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="dckpt-dcp") as pool:
        for wave in waves:
            list(pool.map(lambda j: run_job(files, j), wave))


def read_whole(files: DcpFiles, saved: DcpTensor) -> torch.Tensor:
    """The whole tensor ``saved`` as a new CPU tensor."""
    files.require_tensor(saved)  # the shape is a claim: bound it by the files before allocating
    out = torch.empty(saved.shape, dtype=saved.dtype)
    jobs: dict[tuple[str, int], ChunkJob] = {}
    add_copies(jobs, saved, [(Box((0,) * out.ndim, saved.shape), out)])
    for job in jobs.values():
        run_job(files, job)
    return out
