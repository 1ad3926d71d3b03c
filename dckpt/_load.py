"""The dckpt format's side of a load: its manifest, planning reads for a resolved state,
growing containers to the saved keys, and checking the data files before any read.

The collective skeleton around it is ``dckpt._loadcore``; the reader that gives it these
functions is ``dckpt._reader.CheckpointReader``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dckpt._bytes import dtype_name, torch_dtype
from dckpt._dtensor import dtensor_chunks, is_dtensor
from dckpt._errors import CheckpointNotFoundError, CorruptCheckpointError
from dckpt._format import (
    DATA_DIR,
    MANIFEST_NAME,
    Manifest,
    PathPart,
    TensorEntry,
    manifest_from_bytes,
)
from dckpt._loadcore import Matching
from dckpt._read import ReadTask
from dckpt._reshard import Box, ChunkIndex
from dckpt._state import Resolved, TensorLeaf, ValueLeaf, flat_key
from dckpt._table import Tables
from dckpt._values import MAX_DEPTH, decode_value
from dckpt.storage import Storage


@dataclass
class LoadPlan(Matching):
    """A dckpt load's plan: the byte ranges to read, and the data files holding them."""

    tasks: list[ReadTask] = field(default_factory=list)
    files: set[str] = field(default_factory=set)


def read_manifest(storage: Storage) -> tuple[Manifest, bytes]:
    """The checkpoint's manifest, validated, and its raw bytes; without one, the error
    says whether nothing, an uncommitted save or something else is there."""
    raw = storage.read_file(MANIFEST_NAME)
    if raw is None:
        if not storage.exists():
            raise CheckpointNotFoundError(f"no checkpoint at {storage.location}")
        if storage.list(DATA_DIR):
            raise CheckpointNotFoundError(
                f"{storage.location} holds an incomplete checkpoint: a save started but never "
                "committed (it has no manifest.json), so it cannot be loaded; load an older "
                "checkpoint"
            )
        raise CheckpointNotFoundError(
            f"{storage.location} is not a committed checkpoint (no manifest.json)"
        )
    return manifest_from_bytes(raw, source=f"{storage.location}/{MANIFEST_NAME}"), raw


def plan_load(
    manifest: Manifest,
    resolved: Resolved,
    rank: int,
    world_size: int,
    *,
    allow_pickle: bool,
    tables: Tables | None = None,
) -> LoadPlan:
    """Match requested leaves to saved chunks; collects problems rather than stopping.
    ``tables`` reads the tables of layout tensors (version 2), when there are any."""
    lp = LoadPlan()
    for leaf in resolved.tensors:
        _plan_tensor_leaf(lp, manifest, leaf, rank, world_size, tables)
    for v in resolved.values:
        _plan_value_leaf(lp, manifest, v, rank, world_size, allow_pickle=allow_pickle)
    for key in resolved.skipped:
        if _per_rank(manifest, key) and manifest.world_size != world_size:
            lp.mismatched.append(key)
            lp.problems.append(_per_rank_message(key, manifest.world_size, world_size))
    return lp


def _plan_tensor_leaf(
    lp: LoadPlan,
    manifest: Manifest,
    leaf: TensorLeaf,
    rank: int,
    world_size: int,
    tables: Tables | None,
) -> None:
    entry = manifest.tensors.get(leaf.key)
    if entry is None:
        if leaf.key in manifest.values:
            lp.mismatched.append(leaf.key)
            lp.problems.append(f"{leaf.key!r}: saved as a non-tensor value, requested a tensor")
        else:
            lp.missing.append(leaf.key)
        return
    t = leaf.tensor
    want_dtype, want_shape = dtype_name(t.dtype), tuple(t.shape)
    if entry.dtype != want_dtype or entry.shape != want_shape:
        lp.mismatched.append(leaf.key)
        lp.problems.append(
            f"{leaf.key!r}: saved {entry.dtype}{list(entry.shape)}, requested "
            f"{want_dtype}{list(want_shape)}"
        )
        return
    chunks = entry.chunks
    if entry.per_rank:
        if manifest.world_size != world_size:
            lp.mismatched.append(leaf.key)
            lp.problems.append(_per_rank_message(leaf.key, manifest.world_size, world_size))
            return
        chunks = tuple(c for c in chunks if c.rank == rank)
    dests = dtensor_chunks(t) if is_dtensor(t) else [(Box((0,) * len(want_shape), want_shape), t)]
    if entry.layout is None:
        _plan_tensor(lp, leaf.key, entry, chunks, dests)
        return
    if tables is None:
        raise CorruptCheckpointError(f"key {leaf.key!r} is a layout entry; no tables to read")
    for want, dest in dests:
        if want.numel:  # only the pieces this rank's boxes overlap, from their writers' tables
            _plan_tensor(
                lp, leaf.key, entry, tables.chunks_for(leaf.key, entry, want), [(want, dest)]
            )


def _plan_value_leaf(
    lp: LoadPlan,
    manifest: Manifest,
    v: ValueLeaf,
    rank: int,
    world_size: int,
    *,
    allow_pickle: bool,
) -> None:
    ventry = manifest.values.get(v.key)
    if ventry is None:
        if v.key in manifest.tensors:
            lp.mismatched.append(v.key)
            lp.problems.append(f"{v.key!r}: saved as a tensor, requested a non-tensor value")
        else:
            lp.missing.append(v.key)
        return
    if ventry.per_rank is not None:
        if manifest.world_size != world_size:
            lp.mismatched.append(v.key)
            lp.problems.append(_per_rank_message(v.key, manifest.world_size, world_size))
            return
        if rank not in ventry.per_rank:
            lp.missing.append(v.key)
            return
        data = ventry.per_rank[rank]
    else:
        data = ventry.value
    lp.values.append((v.set, decode_value(data, v.key, allow_pickle=allow_pickle)))


_SKIP = object()  # what a saved key this rank cannot take builds to


class Saved:
    """What a checkpoint holds, so that a load can give the destination's dicts and lists
    the entries they lack (see ``resolve``).

    A Stateful's keys may depend on runtime data: a fresh data loader's state dict holds
    ``{"pos": {}}`` where the saved one held ``pos.worker0`` and ``pos.worker1``. A missing
    entry gets its decoded value, or a new CPU tensor that the load then reads into like
    any other. What is added depends only on the manifest and the rank, so every rank
    grows its state the same way before it plans its reads."""

    def __init__(
        self,
        manifest: Manifest,
        rank: int,
        world_size: int,
        *,
        allow_pickle: bool,
        storage: Storage,
        tables: Tables | None = None,
    ) -> None:
        self.storage = storage
        self.tables = tables if tables is not None else Tables(storage, manifest)
        self.manifest = manifest
        self.rank = rank
        self.world_size = world_size
        self.allow_pickle = allow_pickle
        self._keys: list[str] | None = None
        self._checked: set[str] = set()  # data files already found whole

    def value_at(self, path: tuple[PathPart, ...]) -> bool:
        entry = self.manifest.values.get(flat_key(path))
        return entry is not None and entry.path == path

    def grow(
        self, node: dict[Any, Any] | list[Any], path: tuple[PathPart, ...], out: Resolved
    ) -> None:
        """Add to ``node`` (at ``path``) every saved entry it lacks."""
        groups = _group(self._below(path))
        if isinstance(node, dict):
            have = {str(k) for k in node}
            for part, items in groups.items():
                if isinstance(part, str) and part not in have:
                    made = self._build(items, out)
                    if made is not _SKIP:
                        node[part] = made
            return
        while len(node) in groups:
            made = self._build(groups[len(node)], out)
            if made is _SKIP:
                break
            node.append(made)

    def _below(self, path: tuple[PathPart, ...]) -> _Below:
        m = self.manifest
        if self._keys is None:  # sorted once, and only by loads that grow something
            self._keys = sorted([*m.tensors, *m.values])
        keys, n = self._keys, len(path)
        prefix = flat_key(path) + "."
        out: _Below = []
        i = bisect.bisect_left(keys, prefix)
        while i < len(keys) and keys[i].startswith(prefix):
            key = keys[i]
            i += 1
            entry = m.tensors.get(key)
            full = (entry if entry is not None else m.values[key]).path
            # A "." inside a saved name can make the prefix match another path.
            if full[:n] == path and len(full) <= MAX_DEPTH:
                out.append((full[n:], key))
        return out

    def _build(self, items: _Below, out: Resolved) -> object:
        if len(items) == 1 and not items[0][0]:
            made = self._make(items[0][1])
            if made is _SKIP:
                out.skipped.append(items[0][1])
            return made
        if any(not rel for rel, _ in items):
            return _SKIP  # one name both a leaf and a container: no save writes that
        groups = _group(items)
        if all(isinstance(p, str) for p in groups):
            built = {p: self._build(sub, out) for p, sub in groups.items()}
            return {p: v for p, v in built.items() if v is not _SKIP} or _SKIP
        if set(groups) == set(range(len(groups))):
            elems = [self._build(groups[i], out) for i in range(len(groups))]
            # A list with a hole would shift the elements after it onto other keys.
            return _SKIP if any(e is _SKIP for e in elems) else elems
        return _SKIP

    def _make(self, key: str) -> object:
        m, rank = self.manifest, self.rank
        tensor = m.tensors.get(key)
        if tensor is not None:
            if tensor.per_rank and (
                m.world_size != self.world_size
                or (tensor.chunks and all(c.rank != rank for c in tensor.chunks))
            ):
                return _SKIP
            # The files must hold the bytes before the claimed shape is allocated.
            chunks = tensor.chunks
            if tensor.layout is not None:
                whole = Box((0,) * len(tensor.shape), tensor.shape)
                chunks = tuple(self.tables.chunks_for(key, tensor, whole)) if whole.numel else ()
            files = {c.file for c in chunks if c.nbytes} - self._checked
            check_files(self.storage, m, files)
            self._checked |= files
            return torch.empty(tensor.shape, dtype=torch_dtype(tensor.dtype))
        value = m.values[key]
        if value.per_rank is None:
            return decode_value(value.value, key, allow_pickle=self.allow_pickle)
        if m.world_size != self.world_size or rank not in value.per_rank:
            return _SKIP
        return decode_value(value.per_rank[rank], key, allow_pickle=self.allow_pickle)


_Below = list[tuple[tuple[PathPart, ...], str]]  # (path below a node, saved key)


def _group(items: _Below) -> dict[PathPart, _Below]:
    groups: dict[PathPart, _Below] = {}
    for rel, key in items:
        groups.setdefault(rel[0], []).append((rel[1:], key))
    return groups


def _per_rank(manifest: Manifest, key: str) -> bool:
    tensor = manifest.tensors.get(key)
    if tensor is not None:
        return tensor.per_rank
    value = manifest.values.get(key)
    return value is not None and value.per_rank is not None


def _per_rank_message(key: str, saved: int, now: int) -> str:
    return (
        f"{key!r} was saved per rank by {saved} ranks and cannot be split or merged for "
        f"{now} ranks; load it with {saved} ranks, or leave it out of the state"
    )


def _plan_tensor(
    lp: LoadPlan,
    key: str,
    entry: TensorEntry,
    chunks: Sequence[Any],
    dests: Sequence[tuple[Box, torch.Tensor]],
) -> None:
    index = ChunkIndex([Box(c.offsets, c.sizes) for c in chunks])
    dtype = torch_dtype(entry.dtype)
    for want, dest in dests:
        if want.numel == 0:
            continue
        try:
            copies = index.plan_copies(want, entry.itemsize)
        except ValueError as exc:
            raise CorruptCheckpointError(
                f"key {key!r}: the checkpoint does not hold the region {want} ({exc})"
            ) from None
        for cp in copies:
            chunk = chunks[cp.source]
            lp.files.add(chunk.file)
            lp.tasks.append(ReadTask(key, chunk, cp, dest, want, dtype, entry.itemsize))


def check_files(storage: Storage, manifest: Manifest, names: set[str]) -> None:
    """Missing or truncated data files fail before any byte is read."""
    for name in sorted(names):
        size = storage.size(name)
        expected = manifest.file_sizes[name]
        if size is None:
            raise CorruptCheckpointError(
                f"data file {storage.location}/{name} is missing; the checkpoint is damaged"
            )
        if size != expected:
            raise CorruptCheckpointError(
                f"data file {storage.location}/{name} has {size} bytes, the manifest promises "
                f"{expected}; the file was truncated or replaced"
            )
