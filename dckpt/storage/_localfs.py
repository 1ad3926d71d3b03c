"""File steps for :class:`~dckpt.storage.LocalStorage` that a hostile directory cannot subvert.

A checkpoint directory may hold what its writer never put there: a symbolic link in place
of ``data`` or ``data/<save_id>`` (a save would then write, and its cleanup delete,
wherever the link points), or a FIFO in place of ``manifest.json`` (a plain ``open`` waits
forever for a writer, ignoring every timeout). The helpers here walk each directory below
the root with ``O_NOFOLLOW | O_DIRECTORY`` and open files with ``O_NONBLOCK``, refusing
anything that is not a plain directory or regular file with an
:class:`UnsafeCheckpointError` that names the path. The root itself is followed: the user
chose it. The descriptor-level read and write loops live here too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence

from dckpt._errors import CorruptCheckpointError, StorageError, UnsafeCheckpointError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_READ_PIECE = 1 << 24
_IOV_MAX = 512


def oserror(action: str, path: str, exc: OSError) -> StorageError:
    what = exc.strerror or str(exc)
    hint = ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; free space or save elsewhere (older checkpoints are untouched)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; check the permissions of the checkpoint directory"
    return StorageError(f"{action} {path} failed: {what}{hint}", errno=exc.errno)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "an unknown kind of file"


def refusal(path: str, mode: int, verb: str, expected: str) -> UnsafeCheckpointError:
    """The error for finding ``mode`` at ``path`` where ``expected`` belongs; ``verb`` says
    what dckpt was about to do (``"create files"``)."""
    if stat.S_ISLNK(mode):
        return UnsafeCheckpointError(
            f"{path} is a symbolic link; dckpt refuses to {verb} through it, as it may lead "
            "outside the checkpoint directory (nothing was written or deleted through it). "
            "Remove the link (put what it points to in its place if the checkpoint needs it)"
        )
    return UnsafeCheckpointError(
        f"{path} is {_kind(mode)} where a checkpoint holds {expected}, so dckpt refuses to "
        f"{verb} there. Move it out of the way (dckpt itself only creates regular files and "
        "directories in a checkpoint)"
    )


def _lstat_mode(name: str, dir_fd: int) -> int | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return None


def open_dir(root: str, parts: Sequence[str], verb: str, *, create: bool) -> int | None:
    """A descriptor of ``root/parts...`` reached without following any link below ``root``.

    Missing directories are made when ``create``, otherwise the answer is None. A
    component that is a link or not a directory raises :class:`UnsafeCheckpointError`.
    """
    try:
        if create:
            os.makedirs(root, exist_ok=True)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT and not create:
            return None
        raise oserror("opening directory", root, exc) from None
    path = root
    try:
        for part in parts:
            path = os.path.join(path, part)
            try:
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                mode = _lstat_mode(part, fd)
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and mode is not None:
                    raise refusal(path, mode, verb, "a directory") from None
                doing = "creating directory" if create else "opening directory"
                raise oserror(doing, path, exc) from None
            os.close(fd)
            fd = child
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return fd


def open_regular(path: str, flags: int, verb: str, doing: str, mode: int = 0o644) -> int:
    """Open ``path`` (whose final component must not be a link) as a regular file.

    ``O_NONBLOCK`` keeps a FIFO from blocking the open; anything but a regular file is
    refused before a byte moves, and blocking mode is restored for the regular file.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise refusal(path, stat.S_IFLNK, verb, "a regular file") from None
        if exc.errno == errno.ENXIO:  # a FIFO opened for writing with no reader
            raise refusal(path, stat.S_IFIFO, verb, "a regular file") from None
        raise oserror(doing, path, exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refusal(path, st.st_mode, verb, "a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def require_inside(fd: int, dir_fd: int, name: str, path: str) -> None:
    """The file open as ``fd`` is ``name`` in the directory ``dir_fd`` (no link swapped in
    between walking the directories and opening the file by its path)."""
    try:
        here = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        here = None
    st = os.fstat(fd)
    if here is None or (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
        raise UnsafeCheckpointError(
            f"{path} is not where dckpt created it: a directory on its path was replaced "
            "(perhaps by a symbolic link) meanwhile; refusing to write to it"
        )


def fsync_dir(fd: int, path: str) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise oserror("syncing directory", path, exc) from None


def read_limited(fd: int, path: str, max_bytes: int) -> bytes:
    """The whole file, refused unread when its size is over ``max_bytes`` and refused when
    it grows past the limit while being read. A file read in one piece is never copied."""
    size = os.fstat(fd).st_size
    if size > max_bytes:
        raise CorruptCheckpointError(
            f"{path} is {size} bytes, over the {max_bytes}-byte limit for this file; it is "
            "damaged or not a checkpoint file (nothing was read)"
        )
    pieces: list[bytes] = []
    total = 0
    want = size + 1  # one byte more than expected: the file may have grown
    while True:
        try:
            got = os.read(fd, want)
        except OSError as exc:
            raise oserror("reading", path, exc) from None
        if not got:
            break
        pieces.append(got)
        total += len(got)
        if total > max_bytes:
            raise CorruptCheckpointError(
                f"{path} grew past the {max_bytes}-byte limit for this file while it was "
                "being read; it is being written by something else, or is not a checkpoint file"
            )
        want = min(_READ_PIECE, max_bytes + 1 - total)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def write_fd(fd: int, buffers: Sequence[memoryview], path: str) -> int:
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


def read_fd_into(fd: int, offset: int, out: memoryview, path: str) -> None:
    view = out.cast("B") if out.format != "B" or out.ndim != 1 else out
    done = 0
    while done < view.nbytes:
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise oserror("reading", path, exc) from None
        if n == 0:
            raise CorruptCheckpointError(
                f"{path} is truncated: wanted {view.nbytes} bytes at offset {offset}, "
                f"file ends after {offset + done}"
            )
        done += n
