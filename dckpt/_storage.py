"""Storage: the small interface a checkpoint needs from a disk or an object store.

Names are relative, '/'-separated and already validated by the caller (see
``_format.check_file_name``); implementations still refuse to follow anything that
resolves outside the checkpoint root. Every OS-level failure becomes a
:class:`StorageError` naming the file and what went wrong.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from dckpt._errors import CheckpointError, StorageError, UnsafeCheckpointError

Buffer = memoryview
_IOV_MAX = 512


class Writer(ABC):
    """A file being written sequentially from buffers; invisible to readers until committed."""

    @abstractmethod
    def write(self, buffers: Sequence[Buffer]) -> None:
        """Append ``buffers``. They may be sent later, straight from their memory: the
        caller keeps them alive and unchanged until ``close`` or ``abort`` returns."""

    @abstractmethod
    def close(self, *, durable: bool) -> int:
        """Finish the file (flushing to stable storage when ``durable``); returns its size."""

    @abstractmethod
    def abort(self) -> None:
        """Drop the partial file; never raises."""


@dataclass(frozen=True, slots=True)
class FileLayout:
    """How a save splits one rank's share into data files: up to ``max_files`` files of
    about ``target_bytes`` each, written in parallel. Local disks want a few large files;
    object stores want more objects, each small enough to go up as one PUT."""

    max_files: int = 4
    target_bytes: int = 64 << 20


LOCAL_LAYOUT = FileLayout()


class Storage(ABC):
    """One checkpoint's worth of storage, rooted at a directory or URL prefix."""

    #: A printable location without credentials, used in messages.
    location: str
    #: Whether ``commit`` replaces atomically (rename) rather than by last-writer-wins.
    atomic_commit: bool = True
    #: The data-file layout saves to this storage use.
    file_layout: FileLayout = LOCAL_LAYOUT

    @abstractmethod
    def read_file(self, name: str) -> bytes | None:
        """The whole file, or None when it does not exist."""

    @abstractmethod
    def read_into(self, name: str, offset: int, out: Buffer) -> None:
        """Fill ``out`` from ``offset``; a short file is a CorruptCheckpointError-worthy StorageError."""

    def read_ranges(
        self, name: str, ranges: Sequence[tuple[int, int]], outs: Sequence[Buffer]
    ) -> None:
        """Fill ``outs[i]`` with bytes ``[start, end)`` of ``ranges[i]``; object stores batch these."""
        for (start, _end), out in zip(ranges, outs, strict=True):
            self.read_into(name, start, out)

    @abstractmethod
    def size(self, name: str) -> int | None: ...

    @abstractmethod
    def open_writer(self, name: str) -> Writer: ...

    @abstractmethod
    def commit(self, name: str, data: bytes, *, durable: bool) -> None:
        """Publish ``data`` under ``name`` as one step: readers see the old or the new bytes."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove one file; missing is fine."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every file under ``prefix`` (a directory-like name); missing is fine."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Names of files under ``prefix``, relative to the root."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether the root exists at all."""

    @contextlib.contextmanager
    def commit_lock(self) -> Iterator[None]:
        """Held while checking for and publishing a commit, so two jobs cannot both win."""
        yield

    def sync_dir(self, prefix: str) -> None:  # noqa: B027 (optional hook)
        """Make newly created names under ``prefix`` durable (a no-op where that is implied)."""


def _oserror(action: str, path: str, exc: OSError) -> StorageError:
    what = exc.strerror or str(exc)
    hint = ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; free space or save elsewhere (older checkpoints are untouched)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; check the permissions of the checkpoint directory"
    return StorageError(f"{action} {path} failed: {what}{hint}", errno=exc.errno)


class LocalStorage(Storage):
    """A checkpoint directory on a local or network filesystem."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.location = self.root
        self._real_root: str | None = None

    # -- paths ---------------------------------------------------------------------
    def _abs(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/"))

    def _checked(self, name: str) -> str:
        """The absolute path of ``name``, refusing symlinked components that leave the root."""
        path = self._abs(name)
        if self._real_root is None:
            self._real_root = os.path.realpath(self.root)
        parent = os.path.realpath(os.path.dirname(path))
        if parent != self._real_root and not parent.startswith(self._real_root + os.sep):
            raise UnsafeCheckpointError(
                f"{path} resolves outside the checkpoint directory {self.root}; refusing it"
            )
        return path

    # -- reading -------------------------------------------------------------------
    def _open_read(self, name: str) -> int:
        path = self._checked(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeCheckpointError(
                    f"{path} is a symbolic link; checkpoint files must be regular files"
                ) from None
            raise _oserror("opening", path, exc) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise UnsafeCheckpointError(f"{path} is not a regular file; refusing to read it")
        return fd

    def read_file(self, name: str) -> bytes | None:
        try:
            fd = self._open_read(name)
        except StorageError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        try:
            chunks = []
            while True:
                b = os.read(fd, 1 << 24)
                if not b:
                    break
                chunks.append(b)
            return b"".join(chunks)
        except OSError as exc:
            raise _oserror("reading", self._abs(name), exc) from None
        finally:
            os.close(fd)

    def read_into(self, name: str, offset: int, out: Buffer) -> None:
        fd = self._open_read(name)
        try:
            read_fd_into(fd, offset, out, self._abs(name))
        finally:
            os.close(fd)

    def open_reader(self, name: str) -> int:
        """A raw descriptor for many ranged reads of one file (the load hot path)."""
        return self._open_read(name)

    def size(self, name: str) -> int | None:
        path = self._checked(name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _oserror("inspecting", path, exc) from None
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeCheckpointError(
                f"{path} is a symbolic link; checkpoint files must be regular files"
            )
        return st.st_size

    def list(self, prefix: str = "") -> list[str]:
        base = self._abs(prefix) if prefix else self.root
        out: list[str] = []
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            for f in files:
                out.append(f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}")
        return sorted(out)

    def exists(self) -> bool:
        return os.path.isdir(self.root)

    # -- writing -------------------------------------------------------------------
    def open_writer(self, name: str) -> Writer:
        path = self._abs(name)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            raise _oserror("creating", path, exc) from None
        return _LocalWriter(fd, path)

    def commit(self, name: str, data: bytes, *, durable: bool) -> None:
        path = self._abs(name)
        tmp = f"{path}.tmp-{secrets.token_hex(6)}"
        try:
            os.makedirs(self.root, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                write_fd(fd, [memoryview(data)], tmp)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _oserror("committing", path, exc) from None
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if durable:
            self.sync_dir("")

    def sync_dir(self, prefix: str) -> None:
        path = self._abs(prefix) if prefix else self.root
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _oserror("syncing directory", path, exc) from None
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
                raise _oserror("syncing directory", path, exc) from None
        finally:
            os.close(fd)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._checked(name))

    def delete_prefix(self, prefix: str) -> None:
        import shutil

        path = self._abs(prefix)
        if os.path.islink(path):
            os.unlink(path)
            return
        shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def commit_lock(self) -> Iterator[None]:
        import fcntl

        path = os.path.join(self.root, ".dckpt.lock")
        try:
            os.makedirs(self.root, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _oserror("locking", path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock, also if the process dies


class _LocalWriter(Writer):
    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self.size = 0

    def write(self, buffers: Sequence[Buffer]) -> None:
        try:
            self.size += write_fd(self.fd, buffers, self.path)
        except OSError as exc:
            raise _oserror("writing", self.path, exc) from None

    def close(self, *, durable: bool) -> int:
        try:
            if durable:
                os.fsync(self.fd)
        except OSError as exc:
            raise _oserror("flushing (fsync)", self.path, exc) from None
        finally:
            fd, self.fd = self.fd, -1
            if fd >= 0:
                os.close(fd)
        return self.size

    def abort(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def write_fd(fd: int, buffers: Sequence[Buffer], path: str) -> int:
    """Write every buffer, batching with writev and resuming after short writes."""
    total = 0
    pending = [b.cast("B") if b.format != "B" or b.ndim != 1 else b for b in buffers if b.nbytes]
    while pending:
        batch = pending[:_IOV_MAX]
        n = os.writev(fd, batch)
        total += n
        # drop fully written buffers; trim a partially written one
        i = 0
        while i < len(batch) and n >= batch[i].nbytes:
            n -= batch[i].nbytes
            i += 1
        pending = pending[i:]
        if n:
            pending[0] = pending[0][n:]
    return total


def read_fd_into(fd: int, offset: int, out: Buffer, path: str) -> None:
    view = out.cast("B") if out.format != "B" or out.ndim != 1 else out
    done = 0
    while done < view.nbytes:
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise _oserror("reading", path, exc) from None
        if n == 0:
            from dckpt._errors import CorruptCheckpointError

            raise CorruptCheckpointError(
                f"{path} is truncated: wanted {view.nbytes} bytes at offset {offset}, "
                f"file ends after {offset + done}"
            )
        done += n


def open_storage(path: object, storage_options: dict[str, object] | None = None) -> Storage:
    """Local paths and ``file://`` URLs go to the local filesystem; other URLs to fsspec."""
    if isinstance(path, Storage):
        return path
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise CheckpointError(
            f"a checkpoint path must be a non-empty str or PathLike, got {path!r}"
        )
    if path.startswith("file://"):
        return LocalStorage(path[len("file://") :])
    if "://" in path:
        try:
            from dckpt._fsspec import FsspecStorage
        except ImportError as exc:  # pragma: no cover - until the object-store backend lands
            raise CheckpointError(f"URL checkpoints are not available: {exc}") from None
        return FsspecStorage(path, storage_options or {})
    return LocalStorage(path)
