"""Checkpoints in a local (or network-mounted) directory.

Data files are written in place under their final names (none is referenced until the
manifest naming it is committed); the manifest is committed by writing a temporary file
and renaming it over the old one, so a reader sees the old manifest or the new one. With
``durable=True`` files and their directories are fsync'ed before a close or commit returns.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import stat
from collections.abc import Iterator, Sequence

from dckpt._errors import StorageError, UnsafeCheckpointError
from dckpt._faults import fault_point
from dckpt.storage._base import MAX_READ_BYTES, Buffer, RangeReader, Storage, Writer
from dckpt.storage._localfs import (
    fsync_dir,
    open_dir,
    open_regular,
    oserror,
    read_fd_into,
    read_limited,
    refusal,
    require_inside,
    write_fd,
)


class LocalStorage(Storage):
    """A checkpoint directory on a local or network filesystem.

    What :func:`~dckpt.storage.open_storage` returns for a plain path or a ``file://``
    URL. Commits are atomic (a rename; ``durable=True`` also fsyncs the file and its
    directory), and :meth:`commit_lock` holds an ``flock`` on ``.dckpt.lock`` in the
    root. Nothing is created, written, renamed or deleted through a symbolic link below
    the root, and no file that is not regular is opened: such entries raise
    :class:`~dckpt.UnsafeCheckpointError`.

    Args:
        root: The checkpoint directory (created by the first write if missing).

    Example:
        >>> st = LocalStorage("/tmp/dckpt-example")
        >>> st.commit("notes.txt", b"hello", durable=False)
        >>> st.read_file("notes.txt")
        b'hello'
        >>> st.delete_prefix("")
    """

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
        return open_regular(self._checked(name), os.O_RDONLY, "read", "opening")

    def read_file(self, name: str, *, max_bytes: int = MAX_READ_BYTES) -> bytes | None:
        try:
            fd = self._open_read(name)
        except StorageError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        try:
            return read_limited(fd, self._abs(name), max_bytes)
        finally:
            os.close(fd)

    def read_into(self, name: str, offset: int, out: Buffer) -> None:
        fd = self._open_read(name)
        try:
            read_fd_into(fd, offset, out, self._abs(name))
        finally:
            os.close(fd)

    def open_ranges(self, name: str) -> RangeReader:
        """A reader over one open descriptor: ``pread`` per read, no per-read open."""
        return _FdRanges(self._open_read(name), self._abs(name))

    def size(self, name: str) -> int | None:
        path = self._checked(name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise oserror("inspecting", path, exc) from None
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeCheckpointError(
                f"{path} is a symbolic link; checkpoint files must be regular files"
            )
        return st.st_size

    def list(self, prefix: str = "") -> list[str]:
        base = self.root
        for part in prefix.split("/") if prefix else ():
            # a linked prefix would name files outside, which a later delete might target
            base = os.path.join(base, part)
            try:
                mode = os.lstat(base).st_mode
            except FileNotFoundError:
                return []
            except OSError as exc:
                raise oserror("listing", base, exc) from None
            if stat.S_ISLNK(mode):
                raise refusal(base, mode, "list files", "a directory")
            if not stat.S_ISDIR(mode):
                return []
        out: list[str] = []
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            for f in files:
                out.append(f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}")
        return sorted(out)

    def exists(self) -> bool:
        return os.path.isdir(self.root)

    # -- writing -------------------------------------------------------------------
    def _create(self, dir_fd: int, path: str) -> int:
        """Create ``path`` (in the directory open as ``dir_fd``) for writing, exclusively.

        By its full path, as the OS reports errors against it, then checked to be the
        entry of ``dir_fd``: a link swapped in above it meanwhile is refused unwritten.
        """
        try:
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
            )
        except OSError as exc:
            raise oserror("creating", path, exc) from None
        try:
            require_inside(fd, dir_fd, os.path.basename(path), path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_writer(self, name: str) -> Writer:
        fault_point("storage.create")
        *parents, base = name.split("/")
        dir_fd = open_dir(self.root, parents, "create files", create=True)
        assert dir_fd is not None
        try:
            fd = self._create(dir_fd, self._abs(name))
        except BaseException:
            os.close(dir_fd)
            raise
        return _LocalWriter(fd, self._abs(name), dir_fd, base)

    def commit(self, name: str, data: bytes, *, durable: bool) -> None:
        parents = name.split("/")[:-1]
        path = self._abs(name)
        tmp = f"{path}.tmp-{secrets.token_hex(6)}"
        dir_fd = open_dir(self.root, parents, "commit", create=True)
        assert dir_fd is not None
        try:
            fd = self._create(dir_fd, tmp)
            try:
                write_fd(fd, [memoryview(data)], tmp)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            fault_point("storage.commit.tmp")
            os.replace(tmp, path)
            fault_point("storage.commit.rename")
            if durable:
                fsync_dir(dir_fd, os.path.dirname(path))
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(os.path.basename(tmp), dir_fd=dir_fd)
            if isinstance(exc, OSError) and not isinstance(exc, StorageError):
                raise oserror("committing", path, exc) from None
            raise
        finally:
            os.close(dir_fd)

    def sync_dir(self, prefix: str) -> None:
        path = self._abs(prefix) if prefix else self.root
        fd = open_dir(self.root, prefix.split("/") if prefix else (), "sync", create=False)
        if fd is None:
            missing = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
            raise oserror("syncing directory", path, missing)
        try:
            fsync_dir(fd, path)
        finally:
            os.close(fd)

    def delete(self, name: str) -> None:
        fault_point("storage.delete")
        *parents, base = name.split("/")
        dir_fd = open_dir(self.root, parents, "delete files", create=False)
        if dir_fd is None:
            return
        try:
            os.unlink(base, dir_fd=dir_fd)  # a link itself goes, never what it points to
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise oserror("deleting", self._abs(name), exc) from None
        finally:
            os.close(dir_fd)

    def delete_prefix(self, prefix: str) -> None:
        fault_point("storage.delete")
        if not prefix:
            shutil.rmtree(self.root, ignore_errors=True)  # never follows links inside
            return
        *parents, base = prefix.split("/")
        dir_fd = open_dir(self.root, parents, "delete files", create=False)
        if dir_fd is None:
            return
        try:
            try:
                mode = os.stat(base, dir_fd=dir_fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                return
            if stat.S_ISLNK(mode):
                raise refusal(self._abs(prefix), mode, "delete files", "a directory")
            if stat.S_ISDIR(mode):
                # relative to a descriptor reached without links; rmtree follows none below
                shutil.rmtree(base, dir_fd=dir_fd, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(base, dir_fd=dir_fd)
        except OSError as exc:
            raise oserror("deleting", self._abs(prefix), exc) from None
        finally:
            os.close(dir_fd)

    @contextlib.contextmanager
    def commit_lock(self) -> Iterator[None]:
        path = os.path.join(self.root, ".dckpt.lock")
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise oserror("locking", path, exc) from None
        fd = open_regular(path, os.O_WRONLY | os.O_CREAT, "lock", "locking")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock, also if the process dies


class _LocalWriter(Writer):
    def __init__(self, fd: int, path: str, dir_fd: int, name: str) -> None:
        self.fd = fd
        self.path = path
        self.size = 0
        self._dir_fd = dir_fd  # where the file was created: abort unlinks it there
        self._name = name

    def write(self, buffers: Sequence[Buffer]) -> None:
        fault_point("storage.write")
        try:
            self.size += write_fd(self.fd, buffers, self.path)
        except OSError as exc:
            raise oserror("writing", self.path, exc) from None

    def close(self, *, durable: bool) -> int:
        try:
            if durable:
                fault_point("storage.fsync")
                os.fsync(self.fd)
        except OSError as exc:
            raise oserror("flushing (fsync)", self.path, exc) from None
        finally:
            self._close(file=True)
        self._close(file=False)  # kept after a failure: abort still unlinks there
        return self.size

    def abort(self) -> None:
        if self._dir_fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self._name, dir_fd=self._dir_fd)
        self._close(file=True)
        self._close(file=False)

    def _close(self, *, file: bool) -> None:
        fd = self.fd if file else self._dir_fd
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        if file:
            self.fd = -1
        else:
            self._dir_fd = -1


class _FdRanges(RangeReader):
    """Ranged reads of one local file through its descriptor (the load hot path)."""

    low_latency = True

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def read_into(self, offset: int, out: Buffer) -> None:
        read_fd_into(self.fd, offset, out, self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
