"""Random access to a committed dckpt checkpoint, one key at a time, and the dckpt format's
reader for the collective load.

Unlike ``load`` (which fills a caller's state in place), a reader materialises one
whole tensor at a time, so tools such as ``dckpt convert`` stream a checkpoint with
memory near its largest tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import crc32c
import torch

from dckpt._bytes import torch_dtype
from dckpt._errors import CheckpointError
from dckpt._format import ChunkRecord, Manifest, TensorEntry
from dckpt._layout import overlapping_shards
from dckpt._load import LoadPlan, Saved, check_files, plan_load, read_manifest
from dckpt._loadcore import KeyInfo, mismatch_message
from dckpt._read import ReadTask, execute_reads
from dckpt._reshard import Box, ChunkIndex
from dckpt._state import Resolved
from dckpt._table import Tables
from dckpt._values import decode_value
from dckpt.storage import Storage, open_storage

__all__ = ["CheckpointReader", "KeyInfo"]


class CheckpointReader:
    """A committed dckpt checkpoint, read one key at a time; also the dckpt format's reader
    for ``dckpt.load``.

    Get one with ``open_checkpoint`` (which also opens torch DCP checkpoints) or
    :meth:`open`. Opening reads and validates the manifest; data files are read only
    when a key is.

    Attributes:
        format (`str`): ``"dckpt"``.
        storage (`Storage`): where the checkpoint lives.
        manifest (`Manifest`): the validated manifest.
        world_size (`int`): the number of ranks that saved it.

    Example:

    ```python
    from dckpt._api import open_checkpoint

    reader = open_checkpoint("ckpt/step-1000")
    weight = reader.read_tensor("model.net.0.weight")
    ```
    """

    format = "dckpt"
    index_name = "manifests"

    def __init__(self, storage: Storage, manifest: Manifest, *, index_digest: int) -> None:
        self.storage = storage
        self.manifest = manifest
        self.world_size = manifest.world_size
        self.index_digest = index_digest
        self.tables = Tables(storage, manifest)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | Storage,
        storage_options: dict[str, Any] | None = None,
    ) -> CheckpointReader:
        """Open the dckpt checkpoint at ``path`` (no format detection).

        Args:
            path (`str`, `os.PathLike` or `Storage`):
                A local directory, a ``file://`` or fsspec URL, or an opened storage.
            storage_options (`dict`, *optional*):
                Options for the storage backend (endpoint, credentials, ...).

        Returns:
            `CheckpointReader`: the reader, its manifest read and validated.

        Raises:
            CheckpointNotFoundError: nothing, an uncommitted save, or no manifest is there.
            CorruptCheckpointError: the manifest is damaged or inconsistent.
            StorageError: the storage failed.
        """
        storage = open_storage(path, storage_options)
        manifest, raw = read_manifest(storage)
        return cls(storage, manifest, index_digest=int(crc32c.crc32c(raw)))

    @property
    def location(self) -> str:
        """Where the checkpoint is: a directory or URL."""
        return self.storage.location

    def infos(self) -> list[KeyInfo]:
        """Every saved key with its kind, dtype, shape, size and chunk count, sorted by key.

        Returns:
            `list[KeyInfo]`: one entry per key; reads nothing beyond the manifest.
        """
        out = [
            KeyInfo(k, t.path, "tensor", t.dtype, t.shape, t.nbytes, self._count(t), t.per_rank)
            for k, t in self.manifest.tensors.items()
        ]
        out += [
            KeyInfo(k, v.path, "value", per_rank=v.per_rank is not None)
            for k, v in self.manifest.values.items()
        ]
        return sorted(out, key=lambda i: i.key)

    def _count(self, t: TensorEntry) -> int:
        """How many pieces a tensor is stored in (a layout tensor's, by arithmetic)."""
        if t.layout is None:
            return len(t.chunks)
        mesh = self.manifest.meshes[t.layout.mesh]
        whole = Box((0,) * len(t.shape), t.shape)
        shards = overlapping_shards(t.shape, mesh.shape, t.layout.placements, whole)
        return sum(len(pieces) for _, pieces in shards)

    def keys(self) -> list[str]:
        """Every saved key (tensors and values), sorted."""
        return self.manifest.keys()

    def read_tensor(self, key: str, *, rank: int = 0) -> torch.Tensor:
        """Read one whole tensor into a new CPU tensor, checking every checksum on the way.

        Args:
            key (`str`):
                The flat key, as :meth:`keys` lists it (``"model.net.0.weight"``).
            rank (`int`, *optional*, defaults to 0):
                For a per-rank tensor, whose copy to read.

        Returns:
            `torch.Tensor`: the tensor with its saved dtype and shape.

        Raises:
            CheckpointError: the checkpoint has no tensor ``key``, or does not hold all of it.
            CorruptCheckpointError: a data file is missing, truncated or fails its checksum.

        Example:

        ```python
        reader = open_checkpoint("ckpt/step-1000")
        for info in reader.infos():
            if info.kind == "tensor":
                print(info.key, reader.read_tensor(info.key).norm())
        ```
        """
        entry = self.manifest.tensors.get(key)
        if entry is None:
            raise CheckpointError(f"{self.location} has no tensor {key!r}")
        chunks = entry.chunks
        if entry.per_rank:
            chunks = tuple(c for c in chunks if c.rank == rank)
        want = Box((0,) * len(entry.shape), entry.shape)
        if want.numel == 0:
            return torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
        if entry.layout is not None:
            chunks = tuple(self.tables.chunks_for(key, entry, want))
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
        """Decode one saved non-tensor value.

        Args:
            key (`str`):
                The flat key (``"step"``, ``"optimizer.param_groups"``).
            rank (`int`, *optional*, defaults to 0):
                For a per-rank value, whose copy to read.
            allow_pickle (`bool`, *optional*, defaults to `False`):
                Unpickle a value saved with ``allow_pickle=True``; only for trusted files.

        Returns:
            `Any`: the value as it was saved.

        Raises:
            CheckpointError: the checkpoint has no value ``key``.
            UnsafeCheckpointError: the value is pickled and ``allow_pickle`` is False.
        """
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

        Args:
            progress (`Callable[[int], None]`, *optional*):
                Called with the byte count of each chunk once it is checked.

        Returns:
            `list[str]`: one message per problem; empty when the checkpoint is intact.

        Example:

        ```python
        problems = open_checkpoint("ckpt/step-1000").verify()
        assert not problems, "\n".join(problems)
        ```
        """
        problems: list[str] = []
        bad_files: set[str] = set()
        stored = self._stored(problems)
        needed = {c.file for chunks in stored.values() for c in chunks if c.nbytes}
        for name in sorted(needed):
            try:
                check_files(self.storage, self.manifest, {name})
            except CheckpointError as exc:
                problems.append(str(exc))
                bad_files.add(name)
        for key, entry in sorted(self.manifest.tensors.items()):
            for c in stored.get(key, ()):
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

    def _stored(self, problems: list[str]) -> dict[str, tuple[ChunkRecord, ...]]:
        """Every tensor's stored chunks; for layout tensors, from every writer's table
        (each checked whole), a damaged table reported in ``problems``."""
        out: dict[str, tuple[ChunkRecord, ...]] = {}
        for key, entry in self.manifest.tensors.items():
            if entry.layout is None:
                out[key] = entry.chunks
                continue
            whole = Box((0,) * len(entry.shape), entry.shape)
            try:
                out[key] = tuple(self.tables.chunks_for(key, entry, whole)) if whole.numel else ()
            except CheckpointError as exc:
                if str(exc) not in problems:  # one damaged table fails many keys alike
                    problems.append(str(exc))
        for table in self.manifest.tables:  # those no shard needed are checked too
            try:
                self.tables.rows(table.rank)
            except CheckpointError as exc:
                if str(exc) not in problems:
                    problems.append(str(exc))
        return out

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` for every saved tensor in key order, one in memory at a time."""
        for key in sorted(self.manifest.tensors):
            yield key, self.read_tensor(key)

    # -- the collective load's Reader (dckpt._loadcore) ----------------------------------

    def grower(self, rank: int, world_size: int, *, allow_pickle: bool) -> Saved:
        """What a load grows the destination's containers from: the manifest's keys."""
        return Saved(
            self.manifest,
            rank,
            world_size,
            allow_pickle=allow_pickle,
            storage=self.storage,
            tables=self.tables,
        )

    def plan(
        self, resolved: Resolved, rank: int, world_size: int, *, allow_pickle: bool
    ) -> LoadPlan:
        """This rank's byte ranges to read, decoded values, and the keys that do not match."""
        m = self.manifest
        lp = plan_load(m, resolved, rank, world_size, allow_pickle=allow_pickle, tables=self.tables)
        lp.unexpected = sorted(
            (set(m.tensors) | set(m.values)) - resolved.keys() - set(lp.mismatched)
        )
        return lp

    def mismatch_message(self, plan: LoadPlan) -> str:
        """The strict load's report, naming the closest saved keys for a missing one."""
        return mismatch_message(self.location, plan, plan.unexpected)

    def check_files(self, plan: LoadPlan) -> None:
        """Every data file the plan reads is there with the size the manifest promises."""
        check_files(self.storage, self.manifest, plan.files)

    def read(self, plan: LoadPlan, *, memory_budget: int, threads: int) -> None:
        """Read the planned byte ranges straight into the destination tensors."""
        execute_reads(
            self.storage,
            plan.tasks,
            block_bytes=self.manifest.block_bytes,
            memory_budget=memory_budget,
            max_threads=threads,
        )
