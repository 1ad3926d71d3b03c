"""Random access to a committed checkpoint, one key at a time, for tools and conversion.

Unlike ``load`` (which fills a caller's state in place), a reader materialises one
whole tensor at a time, so tools such as ``dckpt convert`` stream a checkpoint with
memory near its largest tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from dckpt._bytes import torch_dtype
from dckpt._errors import CheckpointError
from dckpt._format import Manifest, PathPart
from dckpt._load import check_files, read_manifest
from dckpt._read import ReadTask, execute_reads
from dckpt._reshard import Box, ChunkIndex
from dckpt._values import decode_value
from dckpt.storage._base import Storage, open_storage

if TYPE_CHECKING:
    from dckpt.interop._dcp import DcpReader


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key: str
    path: tuple[PathPart, ...]
    kind: str  # "tensor" or "value"
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    nbytes: int = 0
    chunks: int = 0
    per_rank: bool = False


class CheckpointReader:
    """Reads a dckpt checkpoint; ``open_checkpoint`` also returns readers for DCP ones."""

    format = "dckpt"

    def __init__(self, storage: Storage, manifest: Manifest) -> None:
        self.storage = storage
        self.manifest = manifest
        self.world_size = manifest.world_size

    @property
    def location(self) -> str:
        return self.storage.location

    def infos(self) -> list[KeyInfo]:
        out = [
            KeyInfo(k, t.path, "tensor", t.dtype, t.shape, t.nbytes, len(t.chunks), t.per_rank)
            for k, t in self.manifest.tensors.items()
        ]
        out += [
            KeyInfo(k, v.path, "value", per_rank=v.per_rank is not None)
            for k, v in self.manifest.values.items()
        ]
        return sorted(out, key=lambda i: i.key)

    def keys(self) -> list[str]:
        return self.manifest.keys()

    def read_tensor(self, key: str, *, rank: int = 0) -> torch.Tensor:
        """The whole tensor (for per-rank tensors, the copy saved by ``rank``)."""
        entry = self.manifest.tensors.get(key)
        if entry is None:
            raise CheckpointError(f"{self.location} has no tensor {key!r}")
        chunks = entry.chunks
        if entry.per_rank:
            chunks = tuple(c for c in chunks if c.rank == rank)
        want = Box((0,) * len(entry.shape), entry.shape)
        if want.numel == 0:
            return torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
        try:
            copies = ChunkIndex([Box(c.offsets, c.sizes) for c in chunks]).plan_copies(
                want, entry.itemsize
            )
        except ValueError as exc:
            raise CheckpointError(f"key {key!r} is incomplete in {self.location}: {exc}") from None
        # The files first: the manifest's claims are only trusted once the files back them.
        check_files(self.storage, self.manifest, {chunks[c.source].file for c in copies})
        out = torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
        tasks = [
            ReadTask(key, chunks[c.source], c, out, want, out.dtype, entry.itemsize) for c in copies
        ]
        execute_reads(self.storage, tasks, block_bytes=self.manifest.block_bytes, max_threads=4)
        return out

    def read_value(self, key: str, *, rank: int = 0, allow_pickle: bool = False) -> Any:
        entry = self.manifest.values.get(key)
        if entry is None:
            raise CheckpointError(f"{self.location} has no value {key!r}")
        data = entry.value if entry.per_rank is None else entry.per_rank.get(rank)
        return decode_value(data, key, allow_pickle=allow_pickle)

    def verify(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Re-read every stored byte and check every checksum; returns the problems found.

        It finds a problem exactly when loading every key (on every rank, for per-rank
        keys) would fail: the manifest was checked when the reader opened, and this reads
        what such loads read, every non-empty chunk and the size of each file holding one.
        Pickled values are not unpickled: only their encoding is checked.
        """
        problems: list[str] = []
        bad_files: set[str] = set()
        needed = {c.file for t in self.manifest.tensors.values() for c in t.chunks if c.nbytes}
        for name in sorted(needed):
            try:
                check_files(self.storage, self.manifest, {name})
            except CheckpointError as exc:
                problems.append(str(exc))
                bad_files.add(name)
        for key, entry in sorted(self.manifest.tensors.items()):
            for c in entry.chunks:
                # A bad file was reported once above and its chunks cannot be read; an empty
                # chunk holds nothing to read (a load never touches it either).
                if c.file in bad_files or not c.nbytes:
                    if progress is not None:
                        progress(c.nbytes)
                    continue
                box = Box(c.offsets, c.sizes)
                scratch = torch.empty(c.sizes, dtype=torch_dtype(entry.dtype))
                plan = ChunkIndex([box]).plan_copies(box, entry.itemsize)
                task = ReadTask(key, c, plan[0], scratch, box, scratch.dtype, entry.itemsize)
                try:
                    execute_reads(self.storage, [task], block_bytes=self.manifest.block_bytes)
                except CheckpointError as exc:
                    problems.append(str(exc))
                if progress is not None:
                    progress(c.nbytes)
        return problems

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in sorted(self.manifest.tensors):
            yield key, self.read_tensor(key)


def open_checkpoint(
    path: Any, storage_options: dict[str, Any] | None = None
) -> CheckpointReader | DcpReader:
    storage = open_storage(path, storage_options)
    from dckpt.interop._dcp import DcpReader, is_dcp_checkpoint  # a torch DCP directory

    if is_dcp_checkpoint(storage):
        return DcpReader.open(storage)
    manifest, _raw = read_manifest(storage)
    return CheckpointReader(storage, manifest)
