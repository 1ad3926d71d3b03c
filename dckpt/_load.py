"""``load``: read a committed checkpoint into the caller's state, in place, under any layout."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import crc32c
import torch

from dckpt._bytes import dtype_name, torch_dtype
from dckpt._coord import DEFAULT_TIMEOUT, coordinator_for
from dckpt._dtensor import dtensor_chunks, is_dtensor
from dckpt._errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StateMismatchError,
)
from dckpt._format import DATA_DIR, MANIFEST_NAME, Manifest, TensorEntry, manifest_from_bytes
from dckpt._gc import paused_gc
from dckpt._read import DEFAULT_MEMORY_BUDGET, ReadTask, execute_reads
from dckpt._reshard import Box, ChunkIndex
from dckpt._state import Resolved, resolve
from dckpt._storage import Storage, open_storage
from dckpt._values import decode_value


@dataclass(frozen=True)
class LoadResult:
    """What a load did not do. Empty tuples mean the state matched the checkpoint exactly.

    ``missing_keys``: asked for, absent from the checkpoint (left untouched).
    ``unexpected_keys``: in the checkpoint, not asked for.
    ``mismatched_keys``: present in both but with a different shape, dtype or kind
    (left untouched; only with ``strict=False``, otherwise an error).
    """

    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    mismatched_keys: tuple[str, ...] = ()


@dataclass
class LoadPlan:
    tasks: list[ReadTask] = field(default_factory=list)
    values: list[tuple[Any, object]] = field(default_factory=list)  # (setter, value)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    files: set[str] = field(default_factory=set)


def read_manifest(storage: Storage) -> tuple[Manifest, bytes]:
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
    manifest: Manifest, resolved: Resolved, rank: int, world_size: int, *, allow_pickle: bool
) -> LoadPlan:
    """Match requested leaves to saved chunks; collects problems rather than stopping."""
    lp = LoadPlan()
    for leaf in resolved.tensors:
        entry = manifest.tensors.get(leaf.key)
        if entry is None:
            if leaf.key in manifest.values:
                lp.mismatched.append(leaf.key)
                lp.problems.append(f"{leaf.key!r}: saved as a non-tensor value, requested a tensor")
            else:
                lp.missing.append(leaf.key)
            continue
        t = leaf.tensor
        want_dtype, want_shape = dtype_name(t.dtype), tuple(t.shape)
        if entry.dtype != want_dtype or entry.shape != want_shape:
            lp.mismatched.append(leaf.key)
            lp.problems.append(
                f"{leaf.key!r}: saved {entry.dtype}{list(entry.shape)}, requested "
                f"{want_dtype}{list(want_shape)}"
            )
            continue
        chunks = entry.chunks
        if entry.per_rank:
            if manifest.world_size != world_size:
                lp.mismatched.append(leaf.key)
                lp.problems.append(_per_rank_message(leaf.key, manifest.world_size, world_size))
                continue
            chunks = tuple(c for c in chunks if c.rank == rank)
        if is_dtensor(t):
            dests = dtensor_chunks(t)
        else:
            dests = [(Box((0,) * len(want_shape), want_shape), t)]
        _plan_tensor(lp, leaf.key, entry, chunks, dests)
    for v in resolved.values:
        ventry = manifest.values.get(v.key)
        if ventry is None:
            if v.key in manifest.tensors:
                lp.mismatched.append(v.key)
                lp.problems.append(f"{v.key!r}: saved as a tensor, requested a non-tensor value")
            else:
                lp.missing.append(v.key)
            continue
        if ventry.per_rank is not None:
            if manifest.world_size != world_size:
                lp.mismatched.append(v.key)
                lp.problems.append(_per_rank_message(v.key, manifest.world_size, world_size))
                continue
            if rank not in ventry.per_rank:
                lp.missing.append(v.key)
                continue
            data = ventry.per_rank[rank]
        else:
            data = ventry.value
        lp.values.append((v.set, decode_value(data, v.key, allow_pickle=allow_pickle)))
    return lp


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


def load(
    state: Mapping[str, Any],
    path: Any,
    *,
    process_group: Any = None,
    strict: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    allow_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> LoadResult:
    coord = coordinator_for(process_group, timeout=timeout)
    from dckpt._dcp import is_dcp_checkpoint, load_dcp  # a torch DCP directory

    if is_dcp_checkpoint(path, storage_options):
        return load_dcp(
            state,
            path,
            coord,
            strict=strict,
            allow_pickle=allow_pickle,
            storage_options=storage_options,
            memory_budget=memory_budget,
        )
    ctx: dict[str, Any] = {}

    def local_prepare() -> int:
        storage = open_storage(path, storage_options)
        manifest, raw = read_manifest(storage)
        resolved = resolve(state, strict=strict)
        lp = plan_load(manifest, resolved, coord.rank, coord.world_size, allow_pickle=allow_pickle)
        if strict and (lp.missing or lp.problems):
            raise StateMismatchError(_mismatch_message(storage.location, lp))
        check_files(storage, manifest, lp.files)
        unexpected = sorted((set(manifest.tensors) | set(manifest.values)) - resolved.keys())
        ctx.update(storage=storage, manifest=manifest, resolved=resolved, plan=lp)
        ctx["result"] = LoadResult(
            tuple(sorted(lp.missing)), tuple(unexpected), tuple(sorted(lp.mismatched))
        )
        return int(crc32c.crc32c(raw))

    with paused_gc():
        coord.exchange(
            "load-plan",
            local_prepare,
            lambda digests: require_same(digests, "manifests", ctx["storage"].location),
        )

    def local_read() -> None:
        lp: LoadPlan = ctx["plan"]
        manifest: Manifest = ctx["manifest"]
        execute_reads(
            ctx["storage"],
            lp.tasks,
            block_bytes=manifest.block_bytes,
            memory_budget=memory_budget,
            max_threads=_read_threads(),
        )
        apply_loaded(lp.values, ctx["resolved"])

    coord.exchange("load-read", local_read)
    result: LoadResult = ctx["result"]
    return result


def apply_loaded(values: list[tuple[Any, object]], resolved: Resolved) -> None:
    """Once the tensors are in: put the non-tensor values back, then let every Stateful
    object (modules and optimizers through torch's helpers) take its state dict."""
    for setter, value in values:
        setter(value)
    for finish in resolved.finish:
        finish()


def require_same(digests: list[int], what: str, location: str) -> None:
    """Rank 0's check that every rank read the same bytes of the checkpoint's index."""
    if len(set(digests)) > 1:
        raise CorruptCheckpointError(
            f"ranks read different {what} at {location}: the checkpoint was replaced during "
            "the load; load again"
        )


def _read_threads() -> int:
    return max(2, min(8, (os.cpu_count() or 2) * 2))


def _mismatch_message(location: str, lp: LoadPlan) -> str:
    lines = [f"the state does not match the checkpoint at {location}:"]
    if lp.missing:
        shown = ", ".join(repr(k) for k in sorted(lp.missing)[:20])
        more = f" (and {len(lp.missing) - 20} more)" if len(lp.missing) > 20 else ""
        lines.append(f"  missing from the checkpoint: {shown}{more}")
    lines.extend(f"  {p}" for p in lp.problems[:20])
    if len(lp.problems) > 20:
        lines.append(f"  ... and {len(lp.problems) - 20} more")
    lines.append("Pass strict=False to load what matches and get the rest in the result.")
    return "\n".join(lines)
