"""The node-local tier: one directory per node, one dckpt checkpoint per step in it.

``<local_dir>/step-<n>/`` has the layout of a durable step (``manifest.json``, the data
files ``data/<save_id>/r<rank>-<i>.bin`` and, for DTensors stored by their layout (format
version 2), each writer's shard files ``r<rank>-s<i>.bin`` and its table ``r<rank>.tab``)
and holds the files of the node's own ranks and of the ranks it replicates. Its ``manifest.json`` has the same bytes on every node (and in
the durable tier, once persisted) and is written last, so the step loads with the
ordinary load wherever the files that load reads are present. ``tiers.json`` beside it
records, per rank, which data files that rank's load reads (recovery fetches those).

Only the node's leader deletes (retention), and only after a newer step committed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import crc32c
import numpy as np
import torch.distributed as dist

from dckpt._bytes import as_memoryview, block_crcs
from dckpt._errors import CheckpointError
from dckpt._format import MANIFEST_NAME, ChunkRecord, Manifest, TableRecord
from dckpt._steps import join_path, parse_step, step_name
from dckpt._table import check_table
from dckpt._tidy import remove_stale_data
from dckpt.storage import LocalStorage, Storage, open_storage
from dckpt.tiers import _transfer
from dckpt.tiers._errors import LocalTierError

log = logging.getLogger("dckpt")

#: Beside the manifest: the data files each rank's load reads, by rank.
NEEDS_NAME = "tiers.json"


@dataclass
class StepHolding:
    """What one node holds of one step: its manifest, its needs and its data files."""

    manifest: bytes | None = None
    needs: bytes | None = None
    files: dict[str, int] = field(default_factory=dict)  # name -> size


Chunks = list[tuple[str, ChunkRecord]]


class ChunkIndex(dict[str, Chunks]):
    """The chunks of a step, by the data file holding them: ``(key, chunk)`` each.

    Chunk entries are in the manifest. The pieces of layout tensors (format version 2) are
    in their writer's table: a table's rows join the index once the table passed its
    checks (:meth:`learn`, when it is received or copied), or when :meth:`chunks` first
    needs them and reads the table from ``storage`` (a copy the node holds)."""

    def __init__(self, manifest: Manifest, storage: Storage | None = None) -> None:
        super().__init__()
        self.manifest = manifest
        self.storage = storage
        self.tables = {t.name: t for t in manifest.tables}
        self.table_of = {f: t for t in manifest.tables for f in t.files}  # shard file -> table
        self.learned: set[str] = set()
        self.problems: dict[str, str] = {}  # table name -> why its rows are unknown
        for key, entry in manifest.tensors.items():
            for c in entry.chunks:
                self.setdefault(c.file, []).append((key, c))

    def learn(self, record: TableRecord, data: bytes) -> str | None:
        """Check a table's bytes (all of the format's rules); its rows join the index.
        Returns why the table is refused, or None."""
        try:
            rows = check_table(self.manifest, record, data)
        except CheckpointError as exc:
            self.problems[record.name] = f"fails its checks ({exc})"
            return str(exc)
        if record.name not in self.learned:
            self.learned.add(record.name)
            for (key, _piece), c in rows.items():
                self.setdefault(c.file, []).append((key, c))
        self.problems.pop(record.name, None)
        return None

    def chunks(self, name: str) -> Chunks | None:
        """The chunks of data file ``name``; None for a shard file whose table is not
        known to be good (not held, or damaged: see :attr:`problems`)."""
        record = self.table_of.get(name)
        if record is None:
            return self.get(name, [])
        if record.name not in self.learned and record.name not in self.problems:
            self._read(record)
        return self.get(name, []) if record.name in self.learned else None

    def unknown(self, name: str) -> str:
        """Why shard file ``name`` cannot be checked (``chunks`` returned None)."""
        table = self.table_of[name].name
        why = self.problems.get(table, "is missing")
        return f"{name} cannot be checked: its table {table} {why}"

    def _read(self, record: TableRecord) -> None:
        if self.storage is None:
            self.problems[record.name] = "is not held here"
            return
        try:
            data = self.storage.read_file(record.name, max_bytes=record.size + 1)
        except (CheckpointError, OSError) as exc:
            self.problems[record.name] = f"cannot be read ({exc})"
            return
        if data is None:
            self.problems[record.name] = "is missing"
            return
        self.learn(record, data)


def chunk_index(manifest: Manifest, storage: Storage | None = None) -> ChunkIndex:
    """The chunks of ``manifest``, by the data file holding them (see :class:`ChunkIndex`;
    ``storage``: where the step's tables may be read from, when needed)."""
    return ChunkIndex(manifest, storage)


def stored_sizes(manifest: Manifest) -> dict[str, int]:
    """Every file a step stores besides its manifest, with its size: data files and tables."""
    sizes = dict(manifest.file_sizes)
    sizes.update((t.name, t.size) for t in manifest.tables)
    return sizes


def check_file(
    storage: Storage,
    manifest: Manifest,
    name: str,
    *,
    at: str | None = None,
    index: ChunkIndex | None = None,
) -> str | None:
    """Why the file ``at`` (default: ``name``) is not the file ``name`` of ``manifest``
    (missing, its size, a checksum; a table: any of its rules), or None. Reads a data file
    in pieces of at most :data:`~dckpt.tiers._transfer.PIECE` bytes."""
    at = name if at is None else at
    index = chunk_index(manifest, storage) if index is None else index
    table = index.tables.get(name)
    want = manifest.file_sizes.get(name) if table is None else table.size
    got = storage.size(at)
    if got is None or got != want:
        return f"{name} has {got} bytes, the manifest says {want}"
    if table is not None:
        data = storage.read_file(at, max_bytes=table.size + 1)
        return f"{name} is missing" if data is None else index.learn(table, data)
    chunks = index.chunks(name)
    if chunks is None:
        return index.unknown(name)
    block = manifest.block_bytes
    step = max(block, _transfer.PIECE // block * block)
    buf = np.empty(min(step, max((c.nbytes for _, c in chunks), default=0)), dtype=np.uint8)
    for key, c in chunks:
        crcs: list[int] = []
        for start in range(0, c.nbytes, step):
            view = buf[: min(step, c.nbytes - start)]
            storage.read_into(at, c.offset + start, as_memoryview(view))
            crcs += block_crcs(view, block)
        if c.nbytes and tuple(crcs) != c.crc32c:
            return f"{name} fails the checksum of a chunk of {key!r}"
    return None


class StreamCheck:
    """Checks the bytes of file ``name`` against ``manifest``'s block checksums as they go
    by, in file order: a transfer or a copy checks what it moves without reading it back.
    ``feed`` each piece in turn, then ``problem`` says what was wrong, or None. A table
    (small) is kept whole and checked at the end; its rows then join ``index``, so that
    the shard files it lists can be checked after it."""

    def __init__(self, manifest: Manifest, name: str, index: ChunkIndex) -> None:
        self.name = name
        self.index = index
        self.table = index.tables.get(name)
        self.data: bytearray | None = None if self.table is None else bytearray()
        self.size = manifest.file_sizes.get(name) if self.table is None else self.table.size
        self.bad: str | None = None
        chunks = [] if self.table is not None else index.chunks(name)
        if chunks is None:
            self.bad, chunks = index.unknown(name), []
        block = manifest.block_bytes
        spans: list[tuple[int, int, str, int]] = []  # (start, end, key, crc) per block
        for key, c in chunks:
            for i, crc in enumerate(c.crc32c if c.nbytes else ()):
                start = c.offset + i * block
                spans.append((start, min(start + block, c.offset + c.nbytes), key, crc))
        self.spans = sorted(spans)
        self.next = 0  # the block being summed
        self.crc = 0  # its checksum so far (a block may span pieces)
        self.pos = 0

    def feed(self, data: memoryview) -> None:
        start, end = self.pos, self.pos + data.nbytes
        self.pos = end
        if self.data is not None:
            if self.size is not None and end <= self.size:  # more is refused by its size
                self.data += data
            return
        while self.bad is None and self.next < len(self.spans):
            lo, hi, key, want = self.spans[self.next]
            if lo >= end:
                return
            a, b = max(lo, start) - start, min(hi, end) - start
            if a < b:
                self.crc = crc32c.crc32c(data[a:b], self.crc)
            if hi > end:
                return  # the block goes on in the next piece
            if self.crc != want:
                self.bad = f"{self.name} fails the checksum of a chunk of {key!r}"
            self.crc, self.next = 0, self.next + 1

    def problem(self) -> str | None:
        if self.pos != self.size:
            return f"{self.name} has {self.pos} bytes, the manifest says {self.size}"
        if self.table is not None and self.data is not None:
            return self.index.learn(self.table, bytes(self.data))
        if self.bad is None and self.next < len(self.spans):
            return f"{self.name} ends before a chunk of {self.spans[self.next][2]!r} does"
        return self.bad


def transfer_checked(
    group: dist.ProcessGroup | None,
    storage: Storage,
    index: ChunkIndex,
    sends: Sequence[_transfer.Send],
    recvs: Sequence[_transfer.Recv],
    *,
    timeout: float,
    tag: int,
) -> _transfer.Landed:
    """:func:`~dckpt.tiers._transfer.transfer` of a step's files, each checked as it
    arrives against ``index``. When tables move, in two rounds, the tables first: a shard
    file is checked against its table's rows, which the receiver may not hold before. A
    shard file whose table failed to land in the first round is dropped without being
    reported (the table is, and a retry fetches both)."""
    check = functools.partial(StreamCheck, index.manifest, index=index)
    first_s = [s for s in sends if s.name in index.tables]
    first_r = [r for r in recvs if r.name in index.tables]
    if not first_s and not first_r:
        return _transfer.transfer(
            group, storage, sends, recvs, timeout=timeout, tag=tag, check=check
        )
    landed = _transfer.transfer(
        group, storage, first_s, first_r, timeout=timeout, tag=tag, check=check
    )
    rest_s = [s for s in sends if s.name not in index.tables]
    rest_r = [r for r in recvs if r.name not in index.tables]
    try:
        more = _transfer.transfer(
            group, storage, rest_s, rest_r, timeout=timeout, tag=tag, check=check
        )
    except BaseException:
        for tmp in landed.staged.values():
            with contextlib.suppress(Exception):
                storage.delete(tmp)
        raise
    lost = {r.name for r in first_r} - set(landed.staged)
    for name in list(more.bad):
        table = index.table_of.get(name)
        if table is not None and table.name in lost:
            del more.bad[name]
    landed.staged.update(more.staged)
    landed.bad.update(more.bad)
    landed.full += more.full
    return landed


def promote(storage: Storage, tmp: str, name: str) -> None:
    """Rename the checked file ``tmp`` to ``name``, replacing a damaged copy atomically."""
    assert isinstance(storage, LocalStorage)  # local_dir is a local directory (checked)
    src = os.path.join(storage.root, *tmp.split("/"))
    dst = os.path.join(storage.root, *name.split("/"))
    try:
        os.replace(src, dst)
    except OSError as exc:
        raise LocalTierError(
            f"renaming the received {src} to {dst} failed: {exc}", errno=exc.errno
        ) from exc


class LocalTier:
    """One node's local directory (every rank of the node opens the same one)."""

    def __init__(self, local_dir: str) -> None:
        self.root = local_dir
        self.storage = open_storage(local_dir)

    def step_storage(self, step: int) -> Storage:
        return open_storage(self.step_dir(step))

    def step_dir(self, step: int) -> str:
        for name in self._step_names().get(step, []):
            return join_path(self.root, name)
        return join_path(self.root, step_name(step))

    def _step_names(self) -> dict[int, list[str]]:
        names: dict[int, list[str]] = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(os.listdir(self.root)):
                step = parse_step(entry)
                if step is not None:
                    names.setdefault(step, []).append(entry)
        return names

    def holdings(self, steps: Collection[int] | None = None) -> dict[int, StepHolding]:
        """What this node holds, step by step (only ``steps``, when given)."""
        out: dict[int, StepHolding] = {}
        if not self.storage.exists():
            return out
        for name in self.storage.list(""):
            head, _, rest = name.partition("/")
            step = parse_step(head)
            if step is None or (steps is not None and step not in steps) or not rest:
                continue
            held = out.setdefault(step, StepHolding())
            if rest == MANIFEST_NAME:
                held.manifest = self.storage.read_file(name)
            elif rest == NEEDS_NAME:
                held.needs = self.storage.read_file(name)
            elif rest.startswith("data/"):
                held.files[rest] = self.storage.size(name) or 0
        return out

    def committed_steps(self) -> list[int]:
        """The steps whose manifest this node holds, ascending (local to this rank)."""
        steps = []
        for step, names in self._step_names().items():
            if any(os.path.isfile(os.path.join(self.root, n, MANIFEST_NAME)) for n in names):
                steps.append(step)
        return sorted(steps)

    def publish(self, step: int, manifest: bytes, needs: bytes, save_id: str) -> None:
        """Write the needs, then the manifest (atomically, last); drop older saves' data."""
        storage = self.step_storage(step)
        storage.commit(NEEDS_NAME, needs, durable=False)
        storage.commit(MANIFEST_NAME, manifest, durable=False)
        with contextlib.suppress(Exception):  # leftovers go at a later retention
            remove_stale_data(storage, save_id)

    def retain(self, *, saved: int, keep: int, busy: Collection[int]) -> None:
        """After ``saved`` committed (node leader): keep the newest ``keep`` committed steps
        up to ``saved``; delete newer steps (a rolled-back timeline) and older uncommitted
        ones, except ``busy`` steps (a persist reads them)."""
        committed = set(self.committed_steps())
        kept = sorted(s for s in committed if s <= saved)[-keep:] if keep else [saved]
        for step, names in self._step_names().items():
            if step in busy or step in kept or step == saved:
                continue
            for name in names:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def used_bytes(self) -> int:
        """Bytes under the local directory now (they are replaced by new steps in time)."""
        total = 0
        for top, _dirs, files in os.walk(self.root):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.path.getsize(os.path.join(top, f))
        return total

    def unwritable(self) -> str | None:
        """Why files cannot be created in the local directory (creating it if missing), or
        None: a probe file is written and removed."""
        probe = os.path.join(self.root, f".dckpt-probe-{os.getpid()}-{threading.get_ident()}")
        try:
            os.makedirs(self.root, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"dckpt")
            os.remove(probe)
        except OSError as exc:
            return f"local_dir {self.root} cannot be written: {exc}"
        return None

    def free_bytes(self) -> int:
        os.makedirs(self.root, exist_ok=True)
        return shutil.disk_usage(self.root).free


def needs_text(needs: Mapping[int, Collection[str]], world_size: int) -> bytes:
    return json.dumps(
        {"world_size": world_size, "needs": {str(r): sorted(n) for r, n in sorted(needs.items())}},
        sort_keys=True,
    ).encode()


def needs_of(raw: bytes | None, rank: int) -> set[str] | None:
    """The files ``rank``'s load reads, from a ``tiers.json``; None when unknown."""
    if raw is None:
        return None
    try:
        got = json.loads(raw)["needs"][str(rank)]
        return {str(n) for n in got}
    except (ValueError, KeyError, TypeError):
        return None
