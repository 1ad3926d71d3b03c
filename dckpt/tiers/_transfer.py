"""Data files sent between ranks over the tiers' own gloo group, streamed.

Both ends know every transfer in advance (names and sizes come from the plan or the
recovery decision, agreed through the coordinator), so nothing but file bytes crosses the
group. Files go in pieces of at most :data:`PIECE` bytes, up to :data:`WINDOW` pieces in
flight per direction, each in its own buffer: a sender thread reads the next piece from
the local tier while the previous one travels, ordered by (destination, name, offset);
the calling thread receives, ordered by (source, name, offset), posting the next receive
before it appends a piece to a temporary file beside the file's final name. Gloo matches
the messages of a pair in posting order, and because a sender's order rises with the
destination and a receiver's with the source, no cycle of waits can form. So a transfer
holds ``2 * WINDOW`` pieces of memory (64 MiB), whatever the sizes of the files. Given a
``check``, the receiver feeds each piece to the file's checker
(the manifest's block checksums, summed as the bytes go by, so nothing is read back):
a file that fails it is removed and reported in :attr:`Landed.bad`, the others come
back complete and checked, for the caller to rename into place.

Every wait for a piece is bounded by the timeout, so a dead or hung peer raises
:class:`TransferError` naming it. A receiver whose disk is full keeps draining the pieces
(so its sender is not left waiting) and reports the error with what it received; a sender
that cannot read a file sends zeros in its place (the receiver's checksum then fails) and
raises the read error afterwards.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import errno
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from dckpt._bytes import as_memoryview
from dckpt._errors import CheckpointError
from dckpt._faults import fault_point
from dckpt.storage import Storage, Writer
from dckpt.tiers._errors import TransferError

#: The largest message, and each end's buffer: bounds a transfer's memory.
PIECE = 16 << 20

#: Pieces in flight per direction: while one travels, the next is read (sender) or the
#: last one written and checked (receiver).
WINDOW = 2

#: Errors of a full device or quota: the local tier's room, not a broken transfer.
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True, slots=True)
class Send:
    name: str
    size: int
    dst: int


@dataclass(frozen=True, slots=True)
class Recv:
    name: str
    size: int
    src: int


class Check(Protocol):
    """Checks one file's bytes as they arrive, in order (``_localtier.StreamCheck``)."""

    def feed(self, data: memoryview) -> None: ...

    def problem(self) -> str | None: ...


@dataclass
class Landed:
    """What a transfer received: per file, the temporary name holding its bytes (checked,
    when the transfer was given checks); the files that failed their check, with the
    sending rank and why (their temporary files are removed); and the disk-full errors
    that kept some files from being stored (their bytes were drained)."""

    staged: dict[str, str] = field(default_factory=dict)
    bad: dict[str, tuple[int, str]] = field(default_factory=dict)
    full: list[OSError] = field(default_factory=list)


def is_space_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the device or the quota is full."""
    return isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS


def part_name(name: str, tag: int) -> str:
    """The temporary name a received ``name`` is written under (hidden, beside it)."""
    head, _, base = name.rpartition("/")
    return f"{head}/.{base}.part-{tag}" if head else f".{base}.part-{tag}"


def transfer(
    group: dist.ProcessGroup | None,
    storage: Storage,
    sends: Sequence[Send],
    recvs: Sequence[Recv],
    *,
    timeout: float,
    tag: int,
    check: Callable[[str], Check] | None = None,
) -> Landed:
    """Send ``sends`` (read from ``storage``) and receive ``recvs`` into temporary files
    of ``storage`` (see the module doc), each checked on the way in by ``check(name)``
    when given. A name received from two sources would be ambiguous, so the callers
    never ask for that."""
    if not sends and not recvs:
        return Landed()
    assert group is not None, "transfers need the tiers' process group"
    sender = _Sender(group, storage, sends, timeout, tag)
    fault_point("tiers.replicate.send")
    sender.start()
    landed = Landed()
    try:
        _receive(group, storage, recvs, (timeout, tag), check, landed)
    except BaseException:
        _discard(storage, landed)
        sender.finish(timeout, quiet=True)
        raise
    try:
        sender.finish(timeout)
    except BaseException:
        _discard(storage, landed)
        raise
    fault_point("tiers.replicate.recv")
    return landed


def _discard(storage: Storage, landed: Landed) -> None:
    for tmp in landed.staged.values():
        with contextlib.suppress(Exception):
            storage.delete(tmp)
    landed.staged.clear()


def _wait(work: dist.Work | None, what: str, timeout: float) -> None:
    assert work is not None
    try:
        done = work.wait(timeout=datetime.timedelta(seconds=timeout))
    except Exception as exc:
        raise TransferError(
            f"{what} failed (the peer died, or the network failed): {type(exc).__name__}: {exc}"
        ) from exc
    if done is False:
        raise TransferError(f"{what} did not finish within {timeout:.1f} s")


def _buffer(sizes: Sequence[int]) -> torch.Tensor:
    return torch.empty(min(PIECE, max(sizes, default=0)), dtype=torch.uint8)


def _receive(
    group: dist.ProcessGroup,
    storage: Storage,
    recvs: Sequence[Recv],
    limits: tuple[float, int],
    check: Callable[[str], Check] | None,
    landed: Landed,
) -> None:
    """Receive every file in order into a temporary file, checking it on the way; a
    write error other than a full disk is raised once every piece has been drained."""
    timeout, tag = limits
    ordered = sorted(recvs, key=lambda r: (r.src, r.name))
    pieces = [(r, start) for r in ordered for start in range(0, r.size, PIECE)]
    bufs = [_buffer([r.size for r in recvs]) for _ in range(WINDOW)]
    posted: dict[int, tuple[dist.Work | None, torch.Tensor]] = {}

    def post(i: int) -> None:  # piece i goes into the buffer piece i - WINDOW left
        if i < len(pieces):
            r, start = pieces[i]
            piece = bufs[i % WINDOW][: min(PIECE, r.size - start)]
            posted[i] = (dist.irecv(piece, group=group, group_src=r.src, tag=tag), piece)

    for i in range(WINDOW):
        post(i)
    failed: BaseException | None = None
    i = 0
    for r in ordered:
        tmp = part_name(r.name, tag)
        sink = _Sink(storage, tmp)
        checker = None if check is None else check(r.name)
        for _start in range(0, r.size, PIECE):
            work, piece = posted.pop(i)
            _wait(work, f"receiving {r.name} from rank {r.src}", timeout)
            sink.write(piece)
            if checker is not None:
                checker.feed(as_memoryview(piece.numpy()))
            post(i + WINDOW)
            i += 1
        error = _sort(storage, landed, r, tmp, sink.close(), checker)
        failed = failed or error
    if failed is not None:
        raise failed


def _sort(
    storage: Storage,
    landed: Landed,
    r: Recv,
    tmp: str,
    error: BaseException | None,
    checker: Check | None,
) -> BaseException | None:
    """File a received ``tmp`` as staged, damaged or kept out by a full disk; return a
    write error of another kind."""
    problem = None if checker is None or error is not None else checker.problem()
    if problem is not None:
        landed.bad[r.name] = (r.src, problem)
        with contextlib.suppress(Exception):
            storage.delete(tmp)
    elif error is None:
        landed.staged[r.name] = tmp
    elif is_space_error(error):
        assert isinstance(error, OSError)
        landed.full.append(error)
    else:
        return error
    return None


class _Sink:
    """A temporary file being received; after a write error it swallows the rest."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage = storage
        self.error: BaseException | None = None
        self.writer: Writer | None = None
        try:
            fault_point("tiers.replica.write")
            storage.delete(name)  # a leftover of a killed transfer
            self.writer = storage.open_writer(name)
        except (CheckpointError, OSError) as exc:
            self.error = exc

    def write(self, piece: torch.Tensor) -> None:
        # The local tier's writer (a local directory) has written the piece when ``write``
        # returns, so the receive buffer may take the next piece at once.
        if self.writer is None:
            return
        try:
            self.writer.write([as_memoryview(piece.numpy())])
        except (CheckpointError, OSError) as exc:
            self._abort(exc)

    def close(self) -> BaseException | None:
        if self.writer is not None:
            try:
                self.writer.close(durable=False)
            except (CheckpointError, OSError) as exc:
                self._abort(exc)
        return self.error

    def _abort(self, exc: BaseException) -> None:
        self.error = exc
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.abort()
        self.writer = None


class _Sender(threading.Thread):
    """Sends one rank's files, piece by piece, beside the receiving thread."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        storage: Storage,
        sends: Sequence[Send],
        timeout: float,
        tag: int,
    ) -> None:
        super().__init__(name="dckpt-tiers-send", daemon=True)
        self.args = (group, storage, sorted(sends, key=lambda s: (s.dst, s.name)), timeout, tag)
        self.error: BaseException | None = None  # the transfer broke
        self.unread: BaseException | None = None  # a file could not be read: zeros went

    def run(self) -> None:
        group, storage, sends, timeout, tag = self.args
        try:
            bufs = [_buffer([s.size for s in sends]) for _ in range(WINDOW)]
            pieces = [(s, start) for s in sends for start in range(0, s.size, PIECE)]
            inflight: collections.deque[tuple[dist.Work | None, str]] = collections.deque()
            for i, (s, start) in enumerate(pieces):
                if len(inflight) == WINDOW:  # its buffer is the one to fill next
                    _wait(*inflight.popleft(), timeout)
                piece = bufs[i % WINDOW][: min(PIECE, s.size - start)]
                self._read(storage, s, start, piece)
                work = dist.isend(piece, group=group, group_dst=s.dst, tag=tag)
                inflight.append((work, f"sending {s.name} to rank {s.dst}"))
            while inflight:
                _wait(*inflight.popleft(), timeout)
        except BaseException as exc:  # raised on the calling thread by finish()
            self.error = exc

    def _read(self, storage: Storage, s: Send, start: int, piece: torch.Tensor) -> None:
        try:
            storage.read_into(s.name, start, as_memoryview(piece.numpy()))
        except (CheckpointError, OSError) as exc:
            piece.zero_()
            if self.unread is None:
                self.unread = exc

    def finish(self, timeout: float, *, quiet: bool = False) -> None:
        """Wait for the last piece (bounded by its own wait); raise what went wrong."""
        self.join(timeout + 5.0)
        if quiet:
            return
        if self.is_alive():
            raise TransferError(f"sending did not finish within {timeout:.1f} s")
        if self.error is not None:
            raise self.error
        if self.unread is not None:
            raise TransferError(
                f"reading a file to send failed ({self.unread}); zeros were sent in its "
                "place, which the receiver's checksum refuses"
            ) from self.unread
