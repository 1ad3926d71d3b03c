"""Removing what killed saves leave behind, without touching what a live save still needs.

Two tools:

- :func:`remove_stale_data` deletes the ``data/<save_id>/`` directories of one checkpoint
  that belong to saves planned before the committed one. Such a save can never commit
  any more (a commit checks that the manifest it read when planning is still the current
  one, and a newer save has replaced it), so its files are garbage whether its writer is
  dead or still running. ``_commit.commit`` calls it under the commit lock right after
  publishing a manifest; ``CheckpointManager`` calls it for the steps it keeps. A save id
  is ``<hex time.time_ns() at planning><8 hex random digits>`` (``_save.new_save_id``);
  names that are not such ids are never touched, and neither are ids planned after the
  committed one: another job may be writing them right now. Save ids compare by the
  clock of each job's rank 0, so clocks that disagree by more than the time between two
  saves of one checkpoint can misjudge which save is older.

- Writer markers (local filesystems only). While rank 0 of a ``CheckpointManager`` saves
  a step, it holds a shared ``flock`` on ``<step>/.dckpt.writing`` (:class:`WriterMarker`).
  A cleaner may treat the step's writers as gone only while it holds an exclusive lock
  on that file (:func:`claim`), which it gets only when no live process holds the shared
  one: the kernel releases a dead process's flock, so a free lock proves the writer is
  gone, and while the cleaner holds it no new manager save of that step can start. The
  marker is never ``.dckpt.lock``, which ``Storage.commit_lock`` takes exclusively from
  the same process: two flocks on two open descriptions of one file would deadlock.
  Whoever unlinks the marker does so while holding it exclusively; whoever acquires it
  checks afterwards that the path still names the file it locked, and starts over if not
  (the usual lock-file protocol). A marker left behind by a crash is harmless: nobody
  holds it, so it reads as "no live writer".
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import stat
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from dckpt._errors import CheckpointError, StorageError, UnsafeCheckpointError
from dckpt._format import DATA_DIR, MANIFEST_NAME, data_dir
from dckpt.storage import LocalStorage, Storage

#: The marker a manager's rank 0 holds shared for the whole save of a step.
MARKER_NAME = ".dckpt.writing"
#: Floor of the grace period after which an uncommitted save on an object store counts as
#: dead: ``max(2 x timeout, this)``. A rank's own writing is not bounded by ``timeout``
#: (only waiting for the other ranks is), so a short timeout alone would misjudge a large
#: save that is still running.
REMOTE_GRACE_FLOOR_S = 3600.0

log = logging.getLogger("dckpt")

# 15 or 16 hex digits of nanoseconds (1972..2262), then the 8 random hex digits.
_SAVE_ID = re.compile(r"^([0-9a-f]{15,16})[0-9a-f]{8}$")
_POLL_S = 0.01
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN)


def save_id_time_ns(save_id: str) -> int | None:
    """When a save with this id was planned (ns since the epoch), or None if the name is
    not a save id ``_save.new_save_id`` makes."""
    m = _SAVE_ID.match(save_id)
    return int(m.group(1), 16) if m else None


def data_ids(storage: Storage) -> list[str]:
    """The names under ``data/``: from the listing, plus (on a local disk) directories
    that hold no file yet, which a save killed right after creating one leaves."""
    ids = {n.split("/")[1] for n in storage.list(DATA_DIR) if n.count("/") >= 2}
    top = os.path.join(storage.root, DATA_DIR) if isinstance(storage, LocalStorage) else ""
    if top and _is_real_dir(top):  # never list through a symbolic link
        with contextlib.suppress(OSError):
            ids.update(os.listdir(top))
    return sorted(ids)


def remove_stale_data(storage: Storage, committed_save_id: str) -> list[str]:
    """Delete every ``data/<id>`` of ``storage`` whose ``id`` is a save id planned strictly
    before ``committed_save_id`` (the id in the manifest just published); return the
    deleted ``data/<id>`` names.

    Names that are not save ids, and ids planned at or after the committed one, are left
    alone; so is everything when ``committed_save_id`` is not a save id itself (a
    manifest from another writer), since nothing can then be dated against it. Storage
    errors propagate: the caller decides whether a failed cleanup matters.
    """
    return _remove(storage, stale_selector(committed_save_id))


def remove_data_except(storage: Storage, keep_save_id: str) -> list[str]:
    """Delete every ``data/<id>`` but ``data/<keep_save_id>``. Only for a checkpoint whose
    writers are provably gone (a :func:`claim` is held on it)."""
    return _remove(storage, lambda sid: sid != keep_save_id)


def stale_selector(
    committed_save_id: str, *, dead_before_ns: int | None = None
) -> Callable[[str], bool]:
    """Which data ids a checkpoint committed as ``committed_save_id`` no longer needs:
    save ids planned before it, and (when ``dead_before_ns`` is given) any save id planned
    before that time, as a save older than a grace period is taken to be dead."""
    committed = save_id_time_ns(committed_save_id)

    def stale(sid: str) -> bool:
        t = save_id_time_ns(sid)
        if t is None or sid == committed_save_id:
            return False
        if committed is not None and t < committed:
            return True
        return dead_before_ns is not None and t < dead_before_ns

    return stale


def _remove(storage: Storage, select: Callable[[str], bool]) -> list[str]:
    removed = []
    for sid in data_ids(storage):
        if select(sid):
            storage.delete_prefix(data_dir(sid))
            removed.append(data_dir(sid))
    return removed


# ----------------------------------------------------------------------------- markers


def _open_marker(step_dir: str) -> int:
    # O_NONBLOCK: a FIFO planted under the marker's name must not hang the open.
    flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    path = os.path.join(step_dir, MARKER_NAME)
    fd = os.open(path, flags, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeCheckpointError(f"{path} is not a regular file; remove it by hand")
    return fd


def _linked(fd: int, step_dir: str) -> bool:
    """Whether the marker's path still names the file ``fd`` has open."""
    try:
        on_disk = os.lstat(os.path.join(step_dir, MARKER_NAME))
    except OSError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


class WriterMarker:
    """A writer's shared lock on ``<step_dir>/.dckpt.writing``, held for a whole save."""

    def __init__(self, step_dir: str, fd: int) -> None:
        self.step_dir = step_dir
        self._fd = fd

    @classmethod
    def hold(cls, step_dir: str, *, timeout: float) -> WriterMarker | None:
        """Create the step directory and take the marker shared. Waits (up to ``timeout``)
        only while a cleaner holds it exclusively, which lasts one deletion. None on a
        filesystem without ``flock`` (cleaners then fall back to the grace rules)."""
        deadline = time.monotonic() + timeout
        path = os.path.join(step_dir, MARKER_NAME)
        while True:
            if time.monotonic() > deadline:
                raise StorageError(
                    f"{path} stayed locked by another process for {timeout:g} s: another "
                    "job is cleaning up this step. Give concurrent jobs different roots.",
                    errno=errno.ETIMEDOUT,
                )
            try:
                os.makedirs(step_dir, exist_ok=True)
                fd = _open_marker(step_dir)
            except FileNotFoundError:
                continue  # a cleaner removed the directory between makedirs and open
            except OSError as exc:
                raise StorageError(
                    f"creating {path} failed: {exc.strerror or exc}; check the permissions "
                    "of the checkpoint root",
                    errno=exc.errno,
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in _BUSY:
                    log.debug("no flock on %s (%s): saving without a writer marker", path, exc)
                    return None
                time.sleep(_POLL_S)
                continue
            if _linked(fd, step_dir):
                return cls(step_dir, fd)
            _unlock_and_close(fd)  # a cleaner unlinked the marker we locked: start over

    def release(self, while_exclusive: Callable[[], None] | None = None) -> None:
        """Drop the lock. If no other writer holds the marker, first remove it, running
        ``while_exclusive`` before that (e.g. to delete a step this writer abandoned)."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            # A shared -> exclusive conversion is not atomic: a cleaner may slip in between,
            # which is fine, as this writer is done with the step either way.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _unlock_and_close(fd)  # another writer (or a cleaner) holds it: theirs now
            return
        try:
            if _linked(fd, self.step_dir):
                if while_exclusive is not None:
                    while_exclusive()
                # A marker left behind is harmless (nobody holds it): never fail over it.
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.step_dir, MARKER_NAME))
        finally:
            _unlock_and_close(fd)


@contextlib.contextmanager
def claim(step_dir: str) -> Iterator[bool | None]:
    """Yield True while this process holds ``step_dir``'s marker exclusively (no live
    manager is saving the step, and none can start until the block ends); False when a
    writer holds it or the step cannot be locked (missing, read-only, a symbolic link);
    None on a filesystem without ``flock``, where nothing can be proven either way. The
    block may delete the whole step directory, marker included."""
    if not _is_real_dir(step_dir):
        yield False
        return
    try:
        fd = _open_marker(step_dir)
    except (OSError, UnsafeCheckpointError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            yield False if exc.errno in _BUSY else None
            return
        if not _linked(fd, step_dir):
            yield False
            return
        try:
            yield True
        finally:
            if _linked(fd, step_dir):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(step_dir, MARKER_NAME))
    finally:
        _unlock_and_close(fd)


def _unlock_and_close(fd: int) -> None:
    # Unlock explicitly: a process forked meanwhile (a data-loader worker) shares the open
    # file description, and closing our descriptor alone would leave the lock held by it.
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def committed_save_id(storage: Storage) -> str | None:
    """The ``save_id`` of the checkpoint's current manifest; None when there is none or it
    does not parse (a corrupt manifest is left for a person to inspect)."""
    raw = storage.read_file(MANIFEST_NAME)
    if raw is None:
        return None
    with contextlib.suppress(ValueError, TypeError, KeyError):
        sid = json.loads(raw)["save_id"]
        if isinstance(sid, str) and sid.isalnum():
            return sid
    return None


# ----------------------------------------------------------------------------- a manager root


class StepCleaner:
    """Every deletion rank 0 of a ``CheckpointManager`` makes under its root.

    Steps are named by their directory under the root. Failures to delete are warnings:
    they must not fail a save that has already committed.
    """

    def __init__(self, storage: Storage, *, timeout: float) -> None:
        self.storage = storage
        self.local = isinstance(storage, LocalStorage)
        self.timeout = timeout
        # See the manager's module docstring: an object-store save older than this is dead.
        self.grace_s = max(2 * timeout, REMOTE_GRACE_FLOOR_S)

    def step_dir(self, name: str) -> str:
        assert isinstance(self.storage, LocalStorage)
        return os.path.join(self.storage.root, name)

    def dead_before_ns(self) -> int:
        return time.time_ns() - int(self.grace_s * 1e9)

    def hold(self, name: str) -> WriterMarker | None:
        """Mark ``name`` as being written, for as long as this save runs (local roots)."""
        if not self.local:
            return None
        return WriterMarker.hold(self.step_dir(name), timeout=self.timeout)

    def claim(self, name: str) -> contextlib.AbstractContextManager[bool | None]:
        """For the duration of the block: True when ``name``'s writers are provably gone,
        False when one is alive, None when there is no lock to ask (object stores, or a
        filesystem without ``flock``): callers then apply the grace rules."""
        if not self.local:
            return contextlib.nullcontext(None)
        return claim(self.step_dir(name))

    def has_manifest(self, name: str) -> bool:
        return self.storage.size(f"{name}/{MANIFEST_NAME}") is not None

    def abandon(self, name: str, marker: WriterMarker | None) -> None:
        """After this process's save of ``name`` failed: if it never committed and nobody
        else is writing it, delete it now. Never raises: the caller is raising the save's
        own error."""
        if marker is None:
            return

        def drop() -> None:
            if not self.has_manifest(name):
                self.quietly(self.storage.delete_prefix, name)

        try:
            marker.release(drop)
        except Exception as exc:
            log.warning("could not clean up the failed save of %s: %s", name, exc)

    def remove_dead_step(self, name: str, ids: Sequence[str], *, abandoned: bool) -> None:
        """Delete the uncommitted step ``name`` (holding data ``ids``) if provably dead: no
        writer holds its marker; without a lock, when this manager abandoned it or every
        id in it was planned before the grace period."""
        with self.claim(name) as free:
            if free is None:
                times = [save_id_time_ns(sid) for sid in ids]
                dead_before = self.dead_before_ns()
                free = abandoned or (
                    bool(times) and all(t is not None and t < dead_before for t in times)
                )
            # Re-checked last: a writer may have committed since the listing.
            if free and not self.has_manifest(name):
                self.delete_step(name)

    def tidy_step(self, name: str, ids: Sequence[str], save_id: str) -> None:
        """Delete the data of killed saves inside the committed step ``name``."""
        with self.claim(name) as free:
            if free is None:
                stale = stale_selector(save_id, dead_before_ns=self.dead_before_ns())
                for sid in ids:
                    if stale(sid):
                        self.quietly(self.storage.delete_prefix, f"{name}/{data_dir(sid)}")
            elif free:
                step = LocalStorage(self.step_dir(name))
                # Under the commit lock no other save is half-way through publishing a
                # manifest; re-read which save is the committed one now.
                with step.commit_lock():
                    current = committed_save_id(step)
                    if current is not None:
                        self.quietly(remove_data_except, step, current)

    def delete_if_free(self, name: str) -> bool:
        """Delete the committed step ``name`` (retention, rollback) unless a live writer
        is rewriting it; without a lock to ask, delete it (as before locks existed)."""
        with self.claim(name) as free:
            return free is not False and self.delete_step(name)

    def delete_step(self, name: str) -> bool:
        # The manifest goes first, so a half-deleted step never looks committed.
        if self.quietly(self.storage.delete, f"{name}/{MANIFEST_NAME}"):
            return self.quietly(self.storage.delete_prefix, name)
        return False

    def quietly(self, fn: Callable[..., object], *args: Any) -> bool:
        try:
            fn(*args)
        except (CheckpointError, OSError) as exc:
            warnings.warn(
                f"dckpt: could not remove an old checkpoint under {self.storage.location}: {exc}",
                RuntimeWarning,
                stacklevel=4,
            )
            return False
        return True
