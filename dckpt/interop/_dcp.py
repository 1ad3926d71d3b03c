"""Reading torch DCP checkpoints (``torch.distributed.checkpoint``) without trusting them.

A DCP checkpoint is a ``.metadata`` pickle plus ``__<rank>_<i>.distcp`` files in which every
tensor chunk and every non-tensor value is a complete ``torch.save`` archive at a recorded
(offset, length). Plain ``pickle.load`` of ``.metadata`` would run whatever the file asks,
so it goes through an unpickler that can build only the handful of classes DCP metadata is
made of; chunks and values are decoded with ``torch.load(weights_only=True)``. Loads reshard
like dckpt's own: each rank reads only the chunks that overlap what it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import crc32c
import torch

from dckpt._bytes import dtype_name
from dckpt._errors import (
    CheckpointError,
    CorruptCheckpointError,
    StateMismatchError,
)
from dckpt._format import MANIFEST_NAME, PathPart
from dckpt._load import (
    LoadPlan,
    LoadResult,
    _mismatch_message,
    _read_threads,
    apply_loaded,
    require_same,
)
from dckpt._read import DEFAULT_MEMORY_BUDGET
from dckpt._reader import KeyInfo
from dckpt._reshard import Box, ChunkIndex
from dckpt._state import TensorLeaf, ValueLeaf, flat_key, resolve
from dckpt.interop._dcp_files import DcpFiles, decode, decode_tensor
from dckpt.interop._dcp_meta import (
    _RANK_FILE,
    DCP_METADATA,
    DcpChunk,
    DcpMetadata,
    DcpTensor,
    read_metadata,
)
from dckpt.storage._base import Storage, open_storage

__all__ = ["DCP_METADATA", "DcpMetadata", "DcpReader", "is_dcp_checkpoint", "load_dcp"]


def is_dcp_checkpoint(path: Any, storage_options: dict[str, Any] | None = None) -> bool:
    """True for a directory with DCP's ``.metadata`` and no dckpt manifest; never raises."""
    try:
        storage = open_storage(path, storage_options)
        return storage.size(MANIFEST_NAME) is None and storage.size(DCP_METADATA) is not None
    except Exception:  # let the ordinary load path report it, collectively
        return False


# -- reading archives -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Dest:
    overlap: Box
    dest: torch.Tensor
    dest_box: Box


@dataclass
class _Job:
    """One chunk to decode once, and every destination region it fills on this rank."""

    tensor: DcpTensor
    chunk: DcpChunk
    dests: list[_Dest] = field(default_factory=list)


def _add_copies(
    jobs: dict[tuple[str, int], _Job], saved: DcpTensor, dests: list[tuple[Box, torch.Tensor]]
) -> None:
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
            job = jobs.setdefault((chunk.item.file, chunk.item.offset), _Job(saved, chunk))
            job.dests.append(_Dest(cp.overlap, dest, want))


def _run_job(files: DcpFiles, job: _Job) -> None:
    t, c = job.tensor, job.chunk
    what = f"chunk {c.box} of {t.key!r} ({files.storage.location}/{c.item.file} @{c.item.offset})"
    files.require_chunk(t, c)
    src = decode_tensor(files.read(c.item), what, t.dtype, c.box.sizes)
    for d in job.dests:
        d.dest[d.overlap.relative_to(d.dest_box)].copy_(src[d.overlap.relative_to(c.box)])


def _run_jobs(files: DcpFiles, jobs: list[_Job], *, memory_budget: int, threads: int) -> None:
    """Decode each chunk once, copy it out, drop it; waves keep decoded bytes near the budget."""
    jobs = sorted(jobs, key=lambda j: (j.chunk.item.file, j.chunk.item.offset))
    limit = max(1, memory_budget // 2)  # an archive and its decoded tensor live together
    waves: list[list[_Job]] = []
    used = limit
    for job in jobs:
        if used + job.chunk.item.length > limit:
            waves.append([])
            used = 0
        waves[-1].append(job)
        used += job.chunk.item.length
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="dckpt-dcp") as pool:
        for wave in waves:
            list(pool.map(lambda j: _run_job(files, j), wave))


def read_whole(files: DcpFiles, saved: DcpTensor) -> torch.Tensor:
    files.require_tensor(saved)  # the shape is a claim: bound it by the files before allocating
    out = torch.empty(saved.shape, dtype=saved.dtype)
    jobs: dict[tuple[str, int], _Job] = {}
    _add_copies(jobs, saved, [(Box((0,) * out.ndim, saved.shape), out)])
    for job in jobs.values():
        _run_job(files, job)
    return out


# -- loading into a state -------------------------------------------------------------------


@dataclass
class _DcpPlan:
    lp: LoadPlan = field(default_factory=LoadPlan)
    jobs: dict[tuple[str, int], _Job] = field(default_factory=dict)
    consumed: set[str] = field(default_factory=set)


class _Planner:
    def __init__(self, files: DcpFiles, md: DcpMetadata, allow_pickle: bool) -> None:
        self.files = files
        self.md = md
        self.allow_pickle = allow_pickle
        self.plan = _DcpPlan()
        self._below: dict[str, list[tuple[str, tuple[PathPart, ...]]]] | None = None
        self._decoded: dict[str, Any] = {}

    def tensor(self, leaf: TensorLeaf) -> None:
        from torch.distributed.tensor import DTensor

        from dckpt._dtensor import dtensor_chunks

        lp, key, t = self.plan.lp, leaf.key, leaf.tensor
        saved = self.md.tensors.get(key)
        if saved is None:
            holder = key if key in self.md.values else self._ancestor(leaf.path)[0]
            if holder is None:
                lp.missing.append(key)
                return
            self.plan.consumed.add(holder)
            lp.mismatched.append(key)
            lp.problems.append(
                f"{key!r}: saved as a non-tensor value, requested a tensor"
                if holder == key
                else f"{key!r}: saved inside the non-tensor value {holder!r} (a DCP save "
                "without flatten_state_dict); dckpt cannot load tensors from inside it"
            )
            return
        self.plan.consumed.add(key)
        if saved.dtype != t.dtype or saved.shape != tuple(t.shape):
            lp.mismatched.append(key)
            lp.problems.append(
                f"{key!r}: saved {dtype_name(saved.dtype)}{list(saved.shape)}, requested "
                f"{dtype_name(t.dtype)}{list(t.shape)}"
            )
            return
        if isinstance(t, DTensor):
            dests = dtensor_chunks(t)
        else:
            dests = [(Box((0,) * t.ndim, tuple(t.shape)), t)]
        _add_copies(self.plan.jobs, saved, dests)

    def value(self, leaf: ValueLeaf) -> None:
        lp, key, md = self.plan.lp, leaf.key, self.md
        if key in md.values:
            self.plan.consumed.add(key)
            lp.values.append((leaf.set, self._decode(key)))
            return
        if key in md.tensors:
            self.plan.consumed.add(key)
            lp.mismatched.append(key)
            lp.problems.append(f"{key!r}: saved as a tensor, requested a non-tensor value")
            return
        below = self._descendants().get(key)
        if below:
            # DCP flattens lists of dicts (optimizer param_groups) into one key per leaf.
            self.plan.consumed.update(k for k, _ in below)
            parts = [(rel, self._whole(k)) for k, rel in below]
            lp.values.append((leaf.set, _assemble(key, parts)))
            return
        holder, depth = self._ancestor(leaf.path)
        if holder is not None:
            self.plan.consumed.add(holder)
            found, value = _descend(self._decode(holder), leaf.path[depth:])
            if found:
                lp.values.append((leaf.set, value))
                return
        elif isinstance(leaf.value, Mapping) and not leaf.value:
            return  # DCP's flattening stores nothing for an empty dict
        lp.missing.append(key)

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


def load_dcp(
    state: Mapping[str, Any],
    path: Any,
    coord: Any,
    *,
    strict: bool = True,
    allow_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> LoadResult:
    """``dckpt.load`` for a DCP checkpoint: collective over ``coord``'s ranks, resharding."""
    ctx: dict[str, Any] = {}

    def local_prepare() -> int:
        storage = open_storage(path, storage_options)
        md, raw = read_metadata(storage)
        files = DcpFiles(storage)
        resolved = resolve(state, strict=strict)
        planner = _Planner(files, md, allow_pickle)  # collects problems; decodes values now
        for t in resolved.tensors:
            planner.tensor(t)
        for v in resolved.values:
            planner.value(v)
        plan, lp = planner.plan, planner.plan.lp
        if strict and (lp.missing or lp.problems):
            raise StateMismatchError(_mismatch_message(storage.location, lp))
        for job in plan.jobs.values():
            files.require_chunk(job.tensor, job.chunk)
        unexpected = sorted(set(md.keys()) - plan.consumed)
        ctx.update(files=files, plan=plan, resolved=resolved)
        ctx["result"] = LoadResult(
            tuple(sorted(lp.missing)), tuple(unexpected), tuple(sorted(lp.mismatched))
        )
        return int(crc32c.crc32c(raw))

    coord.exchange(
        "dcp-load-plan",
        local_prepare,
        lambda digests: require_same(digests, "DCP metadata", ctx["files"].storage.location),
    )

    def local_read() -> None:
        plan: _DcpPlan = ctx["plan"]
        _run_jobs(
            ctx["files"],
            list(plan.jobs.values()),
            memory_budget=memory_budget,
            threads=_read_threads(),
        )
        apply_loaded(plan.lp.values, ctx["resolved"])

    coord.exchange("dcp-load-read", local_read)
    result: LoadResult = ctx["result"]
    return result


# -- random access, for tools -----------------------------------------------------------------


class DcpReader:
    """``CheckpointReader``'s interface over a DCP checkpoint.

    ``has_checksums`` is False: DCP's metadata records none (see :meth:`verify`).
    """

    format = "dcp"
    has_checksums = False

    def __init__(self, storage: Storage, metadata: DcpMetadata) -> None:
        self.storage = storage
        self.metadata = metadata
        self._files = DcpFiles(storage)
        names = {i.file for i in metadata.values.values()}
        names |= {c.item.file for t in metadata.tensors.values() for c in t.chunks}
        names |= {n for n in storage.list() if "/" not in n}
        ranks = {int(m.group(1)) for n in names if (m := _RANK_FILE.match(n))}
        self.world_size = max(1, len(ranks))

    @classmethod
    def open(cls, path: Any, storage_options: dict[str, Any] | None = None) -> DcpReader:
        storage = open_storage(path, storage_options)
        return cls(storage, read_metadata(storage)[0])

    @property
    def location(self) -> str:
        return self.storage.location

    def infos(self) -> list[KeyInfo]:
        md = self.metadata
        out = [
            KeyInfo(k, md.path(k), "tensor", dtype_name(t.dtype), t.shape, t.nbytes, len(t.chunks))
            for k, t in md.tensors.items()
        ]
        out += [KeyInfo(k, md.path(k), "value") for k in md.values]
        return sorted(out, key=lambda i: i.key)

    def keys(self) -> list[str]:
        return self.metadata.keys()

    def read_tensor(self, key: str, *, rank: int = 0) -> torch.Tensor:
        """The whole tensor (``rank`` is accepted for interface parity: DCP has no per-rank)."""
        saved = self.metadata.tensors.get(key)
        if saved is None:
            raise CheckpointError(f"{self.location} has no tensor {key!r}")
        return read_whole(self._files, saved)

    def read_value(self, key: str, *, rank: int = 0, allow_pickle: bool = False) -> Any:
        item = self.metadata.values.get(key)
        if item is None:
            raise CheckpointError(f"{self.location} has no value {key!r}")
        return decode(self._files.read(item), f"the DCP value {key!r}", allow_pickle=allow_pickle)

    def verify(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Every file long enough, every archive intact and as the metadata describes it.

        DCP's metadata records no checksums; what is checked is the CRC-32 that each
        ``torch.save`` archive keeps per member, so a damaged ``.metadata`` that still
        parses, or a consistent rewrite of an archive, goes unnoticed.
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
                    _run_job(self._files, _Job(saved, c))
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
        for key in sorted(self.metadata.tensors):
            yield key, self.read_tensor(key)
