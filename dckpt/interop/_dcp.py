"""Reading torch DCP checkpoints (``torch.distributed.checkpoint``) without trusting them.

A DCP checkpoint is a ``.metadata`` pickle plus ``__<rank>_<i>.distcp`` files in which every
tensor chunk and every non-tensor value is a complete ``torch.save`` archive at a recorded
(offset, length). Plain ``pickle.load`` of ``.metadata`` would run whatever the file asks,
so it goes through an unpickler that can build only the handful of classes DCP metadata is
made of; chunks and values are decoded with ``torch.load(weights_only=True)``. Loads reshard
like dckpt's own: each rank reads only the chunks that overlap what it holds.

:class:`DcpReader` is both the random-access reader and the format's reader for the
collective load (``dckpt._loadcore``); :data:`DCP_FORMAT` is its registry entry.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import crc32c
import torch

from dckpt._bytes import dtype_name
from dckpt._dtensor import dtensor_chunks, is_dtensor
from dckpt._errors import CheckpointError, CorruptCheckpointError
from dckpt._format import PathPart
from dckpt._formats import CheckpointFormat
from dckpt._loadcore import KeyInfo, Matching, mismatch_message
from dckpt._reshard import Box, ChunkIndex
from dckpt._state import Resolved, TensorLeaf, ValueLeaf, flat_key
from dckpt.interop._dcp_files import (
    ChunkJob,
    DcpFiles,
    add_copies,
    decode,
    read_whole,
    run_job,
    run_jobs,
)
from dckpt.interop._dcp_meta import (
    DCP_METADATA,
    RANK_FILE,
    DcpMetadata,
    read_metadata,
)
from dckpt.storage import Storage, open_storage

__all__ = ["DCP_FORMAT", "DCP_METADATA", "DcpMetadata", "DcpPlan", "DcpReader"]


# -- loading into a state -------------------------------------------------------------------


@dataclass
class DcpPlan(Matching):
    """A DCP load's plan: the chunks to decode, and the saved keys some leaf used."""

    jobs: dict[tuple[str, int], ChunkJob] = field(default_factory=dict)
    consumed: set[str] = field(default_factory=set)


class _Planner:
    def __init__(self, files: DcpFiles, md: DcpMetadata, allow_pickle: bool) -> None:
        self.files = files
        self.md = md
        self.allow_pickle = allow_pickle
        self.plan = DcpPlan()
        self._below: dict[str, list[tuple[str, tuple[PathPart, ...]]]] | None = None
        self._decoded: dict[str, Any] = {}

    def tensor(self, leaf: TensorLeaf) -> None:
        plan, key, t = self.plan, leaf.key, leaf.tensor
        saved = self.md.tensors.get(key)
        if saved is None:
            holder = key if key in self.md.values else self._ancestor(leaf.path)[0]
            if holder is None:
                plan.missing.append(key)
                return
            plan.consumed.add(holder)
            plan.mismatched.append(key)
            plan.problems.append(
                f"{key!r}: saved as a non-tensor value, requested a tensor"
                if holder == key
                else f"{key!r}: saved inside the non-tensor value {holder!r} (a DCP save "
                "without flatten_state_dict); dckpt cannot load tensors from inside it"
            )
            return
        plan.consumed.add(key)
        if saved.dtype != t.dtype or saved.shape != tuple(t.shape):
            plan.mismatched.append(key)
            plan.problems.append(
                f"{key!r}: saved {dtype_name(saved.dtype)}{list(saved.shape)}, requested "
                f"{dtype_name(t.dtype)}{list(t.shape)}"
            )
            return
        whole = Box((0,) * t.ndim, tuple(t.shape))
        dests = dtensor_chunks(t) if is_dtensor(t) else [(whole, t)]
        add_copies(plan.jobs, saved, dests)

    def value(self, leaf: ValueLeaf) -> None:
        plan, key, md = self.plan, leaf.key, self.md
        if key in md.values:
            plan.consumed.add(key)
            plan.values.append((leaf.set, self._decode(key)))
            return
        if key in md.tensors:
            plan.consumed.add(key)
            plan.mismatched.append(key)
            plan.problems.append(f"{key!r}: saved as a tensor, requested a non-tensor value")
            return
        below = self._descendants().get(key)
        if below:
            # DCP flattens lists of dicts (optimizer param_groups) into one key per leaf.
            plan.consumed.update(k for k, _ in below)
            parts = [(rel, self._whole(k)) for k, rel in below]
            plan.values.append((leaf.set, _assemble(key, parts)))
            return
        holder, depth = self._ancestor(leaf.path)
        if holder is not None:
            plan.consumed.add(holder)
            found, value = _descend(self._decode(holder), leaf.path[depth:])
            if found:
                plan.values.append((leaf.set, value))
                return
        elif isinstance(leaf.value, Mapping) and not leaf.value:
            return  # DCP's flattening stores nothing for an empty dict
        plan.missing.append(key)

    def _decode(self, key: str) -> Any:
        if key not in self._decoded:
            data = self.files.read(self.md.values[key])
            self._decoded[key] = decode(
                data, f"the DCP value {key!r}", allow_pickle=self.allow_pickle
            )
        return self._decoded[key]

    def _whole(self, key: str) -> Any:
        saved = self.md.tensors.get(key)
        return self._decode(key) if saved is None else read_whole(self.files, saved)

    def _ancestor(self, path: tuple[PathPart, ...]) -> tuple[str | None, int]:
        """The saved value holding ``path`` whole (DCP saves without flattening), if any."""
        for n in range(len(path) - 1, 0, -1):
            k = flat_key(path[:n])
            if k in self.md.values:
                return k, n
        return None, 0

    def _descendants(self) -> dict[str, list[tuple[str, tuple[PathPart, ...]]]]:
        """Flat key of every proper path prefix -> (saved key, path below that prefix)."""
        if self._below is None:
            self._below = {}
            for key in [*self.md.values, *self.md.tensors]:
                path = self.md.path(key)
                for n in range(1, len(path)):
                    self._below.setdefault(flat_key(path[:n]), []).append((key, path[n:]))
        return self._below


class _Branch(dict[PathPart, Any]):
    """A container being rebuilt from flattened keys (as opposed to a dict value read back)."""


def _assemble(key: str, parts: list[tuple[tuple[PathPart, ...], Any]]) -> Any:
    root = _Branch()
    for rel, value in parts:
        node = root
        for p in rel[:-1]:
            node = node.setdefault(p, _Branch())
            if not isinstance(node, _Branch):
                raise CorruptCheckpointError(f"DCP keys under {key!r} overlap at {p!r}")
        if rel[-1] in node:
            raise CorruptCheckpointError(f"DCP keys under {key!r} repeat {rel!r}")
        node[rel[-1]] = value
    return _unbranch(key, root)


def _unbranch(key: str, node: Any) -> Any:
    if not isinstance(node, _Branch):
        return node
    items = {k: _unbranch(key, v) for k, v in node.items()}
    ints = [isinstance(k, int) for k in items]
    if not any(ints):
        return items
    if all(ints) and sorted(items) == list(range(len(items))):
        return [items[i] for i in range(len(items))]
    raise CorruptCheckpointError(f"the list under {key!r} has missing or mixed indices")


def _descend(value: Any, rel: tuple[PathPart, ...]) -> tuple[bool, Any]:
    for p in rel:
        if isinstance(value, Mapping):
            if p in value:
                value = value[p]
            elif str(p).isdigit() and int(p) in value:
                value = value[int(p)]
            else:
                return False, None
        elif isinstance(value, (list, tuple)) and str(p).isdigit() and int(p) < len(value):
            value = value[int(p)]
        else:
            return False, None
    return True, value


# -- the reader: random access for tools, and the load's Reader ---------------------------


class DcpReader:
    """A torch DCP checkpoint, read one key at a time; also the DCP format's reader for
    ``dckpt.load``.

    It offers :class:`dckpt._reader.CheckpointReader`'s interface. ``has_checksums`` is
    False: DCP's metadata records none (see :meth:`verify`).

    Attributes:
        format (`str`): ``"dcp"``.
        storage (`Storage`): where the checkpoint lives.
        metadata (`DcpMetadata`): the validated ``.metadata``.

    Example:

    ```python
    from dckpt.interop._dcp import DcpReader

    reader = DcpReader.open("dcp/step-1000")
    print(reader.world_size, reader.keys()[:5])
    ```
    """

    format = "dcp"
    has_checksums = False
    index_name = "DCP metadata"

    def __init__(self, storage: Storage, metadata: DcpMetadata, *, index_digest: int) -> None:
        self.storage = storage
        self.metadata = metadata
        self.index_digest = index_digest
        self._files = DcpFiles(storage)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | Storage,
        storage_options: dict[str, Any] | None = None,
    ) -> DcpReader:
        """Open the DCP checkpoint at ``path`` (no format detection).

        Args:
            path (`str`, `os.PathLike` or `Storage`):
                A local directory, a ``file://`` or fsspec URL, or an opened storage.
            storage_options (`dict`, *optional*):
                Options for the storage backend (endpoint, credentials, ...).

        Returns:
            `DcpReader`: the reader, its ``.metadata`` read and validated.

        Raises:
            CorruptCheckpointError: ``.metadata`` is missing, damaged or inconsistent.
            UnsafeCheckpointError: ``.metadata`` asks for a class DCP metadata never holds.
        """
        storage = open_storage(path, storage_options)
        metadata, raw = read_metadata(storage)
        return cls(storage, metadata, index_digest=int(crc32c.crc32c(raw)))

    @property
    def location(self) -> str:
        """Where the checkpoint is: a directory or URL."""
        return self.storage.location

    @functools.cached_property
    def world_size(self) -> int:
        """The number of ranks that saved it, from the data file names (a listing, so it
        is read on first use and never by a load)."""
        md = self.metadata
        names = {i.file for i in md.values.values()}
        names |= {c.item.file for t in md.tensors.values() for c in t.chunks}
        names |= {n for n in self.storage.list() if "/" not in n}
        ranks = {int(m.group(1)) for n in names if (m := RANK_FILE.match(n))}
        return max(1, len(ranks))

    def infos(self) -> list[KeyInfo]:
        """Every saved key with its kind, dtype, shape, size and chunk count, sorted by key."""
        md = self.metadata
        out = [
            KeyInfo(k, md.path(k), "tensor", dtype_name(t.dtype), t.shape, t.nbytes, len(t.chunks))
            for k, t in md.tensors.items()
        ]
        out += [KeyInfo(k, md.path(k), "value") for k in md.values]
        return sorted(out, key=lambda i: i.key)

    def keys(self) -> list[str]:
        """Every saved key (tensors and values), sorted."""
        return self.metadata.keys()

    def read_tensor(self, key: str, *, rank: int = 0) -> torch.Tensor:
        """Read one whole tensor into a new CPU tensor.

        Args:
            key (`str`):
                The flat key, as :meth:`keys` lists it.
            rank (`int`, *optional*, defaults to 0):
                Accepted for interface parity: DCP saves nothing per rank.

        Returns:
            `torch.Tensor`: the tensor with its saved dtype and shape.

        Raises:
            CheckpointError: the checkpoint has no tensor ``key``.
            CorruptCheckpointError: the files cannot back the metadata's claims, or an
                archive is damaged.
        """
        saved = self.metadata.tensors.get(key)
        if saved is None:
            raise CheckpointError(f"{self.location} has no tensor {key!r}")
        return read_whole(self._files, saved)

    def read_value(self, key: str, *, rank: int = 0, allow_pickle: bool = False) -> Any:
        """Decode one saved non-tensor value.

        Args:
            key (`str`):
                The flat key.
            rank (`int`, *optional*, defaults to 0):
                Accepted for interface parity: DCP saves nothing per rank.
            allow_pickle (`bool`, *optional*, defaults to `False`):
                Allow what ``torch.load(weights_only=True)`` refuses; only for trusted files.

        Returns:
            `Any`: the value as it was saved.

        Raises:
            CheckpointError: the checkpoint has no value ``key``.
            UnsafeCheckpointError: the value needs an unsafe unpickle and ``allow_pickle``
                is False.
        """
        item = self.metadata.values.get(key)
        if item is None:
            raise CheckpointError(f"{self.location} has no value {key!r}")
        return decode(self._files.read(item), f"the DCP value {key!r}", allow_pickle=allow_pickle)

    def verify(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Every file long enough, every archive intact and as the metadata describes it.

        DCP's metadata records no checksums; what is checked is the CRC-32 that each
        ``torch.save`` archive keeps per member, so a damaged ``.metadata`` that still
        parses, or a consistent rewrite of an archive, goes unnoticed.

        Args:
            progress (`Callable[[int], None]`, *optional*):
                Called with the byte count of each archive once it is checked.

        Returns:
            `list[str]`: one message per problem; empty when nothing was found.
        """
        problems: list[str] = []
        for key, saved in sorted(self.metadata.tensors.items()):
            try:
                ChunkIndex([c.box for c in saved.chunks]).plan_copies(
                    Box((0,) * len(saved.shape), saved.shape), saved.dtype.itemsize
                )
            except ValueError as exc:
                problems.append(f"tensor {key!r} is incomplete: {exc}")
            for c in saved.chunks:
                try:
                    run_job(self._files, ChunkJob(saved, c))
                except CheckpointError as exc:
                    problems.append(str(exc))
                if progress is not None:
                    progress(c.item.length)
        for key, item in sorted(self.metadata.values.items()):
            try:
                self.read_value(key)
            except CheckpointError as exc:
                problems.append(str(exc))
            if progress is not None:
                progress(item.length)
        return problems

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` for every saved tensor in key order, one in memory at a time."""
        for key in sorted(self.metadata.tensors):
            yield key, self.read_tensor(key)

    # -- the collective load's Reader (dckpt._loadcore) ----------------------------------

    def grower(self, rank: int, world_size: int, *, allow_pickle: bool) -> None:
        """None: a DCP load grows no containers (flattened lists are assembled instead)."""
        return None

    def plan(
        self, resolved: Resolved, rank: int, world_size: int, *, allow_pickle: bool
    ) -> DcpPlan:
        """The chunks to decode for this rank, decoded values, and the keys that do not match."""
        planner = _Planner(self._files, self.metadata, allow_pickle)  # decodes values now
        for t in resolved.tensors:
            planner.tensor(t)
        for v in resolved.values:
            planner.value(v)
        plan = planner.plan
        plan.unexpected = sorted(set(self.metadata.keys()) - plan.consumed)
        return plan

    def mismatch_message(self, plan: DcpPlan) -> str:
        """The strict load's report."""
        return mismatch_message(self.location, plan)

    def check_files(self, plan: DcpPlan) -> None:
        """Every planned chunk lies within its file and can hold its elements."""
        for job in plan.jobs.values():
            self._files.require_chunk(job.tensor, job.chunk)

    def read(self, plan: DcpPlan, *, memory_budget: int, threads: int) -> None:
        """Decode each planned chunk once and copy it into its destinations."""
        run_jobs(
            self._files, list(plan.jobs.values()), memory_budget=memory_budget, threads=threads
        )


def _has_dcp_metadata(storage: Storage) -> bool:
    # Sniffed after dckpt's format: no manifest.json is there.
    return storage.size(DCP_METADATA) is not None


DCP_FORMAT = CheckpointFormat("dcp", "dcp-load", _has_dcp_metadata, DcpReader.open)
