"""The node-local tier: one directory per node, one dckpt checkpoint per step in it.

``<local_dir>/step-<n>/`` has the layout of a durable step (``manifest.json`` and
``data/<save_id>/r<rank>-<i>.bin``) and holds the data files of the node's own ranks and
of the ranks it replicates. Its ``manifest.json`` has the same bytes on every node (and in
the durable tier, once persisted) and is written last, so the step loads with the
ordinary load wherever the files that load reads are present. ``tiers.json`` beside it
records, per rank, which data files that rank's load reads (recovery fetches those).

Only the node's leader deletes (retention), and only after a newer step committed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import crc32c
import numpy as np

from dckpt._bytes import as_memoryview, block_crcs
from dckpt._format import MANIFEST_NAME, ChunkRecord, Manifest
from dckpt._steps import join_path, parse_step, step_name
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


ChunkIndex = dict[str, list[tuple[str, ChunkRecord]]]


def chunk_index(manifest: Manifest) -> ChunkIndex:
    """The chunks of ``manifest``, by the data file holding them: ``(key, chunk)`` each."""
    index: ChunkIndex = {}
    for key, entry in manifest.tensors.items():
        for c in entry.chunks:
            index.setdefault(c.file, []).append((key, c))
    return index


def check_file(
    storage: Storage,
    manifest: Manifest,
    name: str,
    *,
    at: str | None = None,
    index: ChunkIndex | None = None,
) -> str | None:
    """Why the file ``at`` (default: ``name``) is not the data file ``name`` of
    ``manifest`` (missing, its size, a checksum), or None. Reads it in pieces of at most
    :data:`~dckpt.tiers._transfer.PIECE` bytes."""
    at = name if at is None else at
    want = manifest.file_sizes.get(name)
    got = storage.size(at)
    if got is None or got != want:
        return f"{name} has {got} bytes, the manifest says {want}"
    chunks = (chunk_index(manifest) if index is None else index).get(name, [])
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
    """Checks the bytes of data file ``name`` against ``manifest``'s block checksums as
    they go by, in file order: a transfer or a copy checks what it moves without reading
    it back. ``feed`` each piece in turn, then ``problem`` says what was wrong, or None."""

    def __init__(self, manifest: Manifest, name: str, index: ChunkIndex) -> None:
        self.name = name
        self.size = manifest.file_sizes.get(name)
        block = manifest.block_bytes
        spans: list[tuple[int, int, str, int]] = []  # (start, end, key, crc) per block
        for key, c in index.get(name, []):
            for i, crc in enumerate(c.crc32c if c.nbytes else ()):
                start = c.offset + i * block
                spans.append((start, min(start + block, c.offset + c.nbytes), key, crc))
        self.spans = sorted(spans)
        self.next = 0  # the block being summed
        self.crc = 0  # its checksum so far (a block may span pieces)
        self.pos = 0
        self.bad: str | None = None

    def feed(self, data: memoryview) -> None:
        start, end = self.pos, self.pos + data.nbytes
        self.pos = end
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
        if self.bad is None and self.next < len(self.spans):
            return f"{self.name} ends before a chunk of {self.spans[self.next][2]!r} does"
        return self.bad


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
