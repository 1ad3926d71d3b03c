"""The storage interface: what a checkpoint needs from a disk or an object store.

Names are relative, '/'-separated and already validated by the caller (dckpt checks
every name a manifest holds before it reaches a backend); implementations still refuse to
follow anything that resolves outside the checkpoint root. Every failure of the
underlying system becomes a :class:`~dckpt.StorageError` naming the file and what went
wrong.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dckpt.storage._files import Buffer, RangeReader, Writer

__all__ = [
    "LOCAL_LAYOUT",
    "MAX_READ_BYTES",
    "Buffer",
    "FileLayout",
    "RangeReader",
    "Storage",
    "Writer",
    "as_bytes_view",
]
# Storage's own limit; the manifest codec keeps its own constant.
MAX_READ_BYTES = 1 << 30
"""The most :meth:`Storage.read_file` reads by default (1 GiB); a larger file is refused
before it is read."""


def as_bytes_view(data: Any) -> memoryview:
    """``data`` (a buffer: memoryview, bytes, numpy array) as a flat byte memoryview."""
    mv = data if isinstance(data, memoryview) else memoryview(data)
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


@dataclass(frozen=True, slots=True)
class FileLayout:
    """How a save splits one rank's share into data files.

    Up to ``max_files`` files of about ``target_bytes`` each, written in parallel. Local
    disks want a few large files; object stores want more objects, each small enough to go
    up as one PUT.

    Args:
        max_files: The most data files one rank writes per save (at least 1).
        target_bytes: About how many bytes go into one file before the next is started.

    Example:
        >>> FileLayout(max_files=16, target_bytes=16 << 20)
        FileLayout(max_files=16, target_bytes=16777216)
    """

    max_files: int = 4
    target_bytes: int = 64 << 20


LOCAL_LAYOUT = FileLayout()


class _StorageRanges(RangeReader):
    """The default :class:`RangeReader`: each read goes through the storage's own methods."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage = storage
        self.name = name

    def read_into(self, offset: int, out: Buffer) -> None:
        self.storage.read_into(self.name, offset, out)

    def read_ranges(self, ranges: Sequence[tuple[int, int]], outs: Sequence[Buffer]) -> None:
        self.storage.read_ranges(self.name, ranges, outs)


class Storage(ABC):
    """One checkpoint's worth of storage, rooted at a directory or URL prefix.

    This is the seam for new backends: subclass it, implement the abstract methods, and
    make :func:`dckpt.storage.open_storage` find it with
    :func:`dckpt.storage.register_backend` (or the ``dckpt.storage`` entry point group).
    Every ``dckpt.save``, ``dckpt.load`` and ``CheckpointManager`` then works on it.

    The contract a backend meets:

    * **Names** are relative and ``/``-separated (``manifest.json``,
      ``data/<save_id>/r0-0.bin``); directories, where the backend has them, are created
      as needed by :meth:`open_writer` and :meth:`commit`. Nothing outside the root is
      ever read, written or deleted.
    * **Data files** are written through :meth:`open_writer`, each under a fresh name
      that nothing refers to until the manifest naming it is committed, so a partial file
      may be visible while it is written (local disks) or not (object stores). When
      :meth:`Writer.close` returns the file is complete (and, with ``durable=True``, on
      stable storage); :meth:`Writer.abort` removes whatever was written. Writers of
      different files run in parallel threads.
    * **Commit** (:meth:`commit`) publishes a small file (the manifest) as one step:
      a reader sees the old bytes or the new ones, never a mix or nothing. With
      ``atomic_commit = True`` the backend replaces atomically (rename); ``False`` says
      it is last-writer-wins, and :meth:`commit_lock` is then the only guard against two
      concurrent jobs. With ``durable=True`` the file, and the name, survive a power loss
      when ``commit`` returns.
    * **Reads**: :meth:`read_file` returns None for a missing file (not an error);
      ranged reads of a missing file raise :class:`~dckpt.StorageError`; a file shorter
      than a read raises :class:`~dckpt.CorruptCheckpointError` whose message says
      "truncated". :meth:`read_file` refuses a file over ``max_bytes`` before reading it.
    * **Deletes** of missing files or prefixes succeed silently.
    * **Errors**: every failure raises a subclass of :class:`~dckpt.CheckpointError`,
      :class:`~dckpt.StorageError` for the store's own failures (set its ``errno`` to
      ``errno.ENOENT`` for a missing file), never a raw ``OSError`` or a client library's
      exception, and the message names the file and never a credential.
    * **Threads**: one storage is used from several threads at once.

    Attributes:
        location: A printable location without credentials, used in messages.
        atomic_commit: Whether :meth:`commit` replaces atomically (rename) rather than by
            last-writer-wins.
        file_layout: The data-file layout saves to this storage use.

    Example:
        A backend for ``kv://`` URLs over some key-value client (only two methods shown;
        the other abstract ones follow the same pattern)::

            class KVStorage(dckpt.storage.Storage):
                atomic_commit = True  # the client's put replaces atomically

                def __init__(self, url: str, storage_options: dict) -> None:
                    self.location = url
                    self.client = kv.connect(url, **storage_options)

                def read_file(self, name, *, max_bytes=dckpt.storage.MAX_READ_BYTES):
                    size = self.size(name)
                    if size is None:
                        return None
                    if size > max_bytes:
                        raise dckpt.CorruptCheckpointError(
                            f"{self.location}/{name} is {size} bytes, over {max_bytes}"
                        )
                    return self.client.get(name)

                def commit(self, name, data, *, durable):
                    try:
                        self.client.put(name, data)
                    except kv.Error as exc:
                        raise dckpt.StorageError(f"writing {self.location}/{name}: {exc}")
                ...

            dckpt.storage.register_backend("kv", KVStorage)
            dckpt.save(state, "kv://host/run1/step-10")
    """

    location: str
    atomic_commit: bool = True
    file_layout: FileLayout = LOCAL_LAYOUT

    @abstractmethod
    def read_file(self, name: str, *, max_bytes: int = MAX_READ_BYTES) -> bytes | None:
        """The whole file, or None when it does not exist.

        Args:
            name: The file's name under the root.
            max_bytes: The largest file accepted.

        Returns:
            The file's bytes, or None if there is no such file.

        Raises:
            CorruptCheckpointError: The file is over ``max_bytes`` (raised before reading
                it, and also if it grows past the limit while being read); the message
                names the file, its size and the limit.
            StorageError: The file exists but cannot be read.
        """

    @abstractmethod
    def read_into(self, name: str, offset: int, out: Buffer) -> None:
        """Fill ``out`` with bytes of ``name`` from ``offset`` on.

        Args:
            name: The file's name under the root.
            offset: Where in the file to start (>= 0).
            out: A writable buffer; all of it is filled.

        Raises:
            CorruptCheckpointError: The file ends before ``out`` is full ("truncated").
            StorageError: The file is missing (``errno.ENOENT``) or cannot be read.
        """

    def read_ranges(
        self, name: str, ranges: Sequence[tuple[int, int]], outs: Sequence[Buffer]
    ) -> None:
        """Fill ``outs[i]`` with bytes ``[start, end)`` of ``ranges[i]`` of ``name``.

        The default calls :meth:`read_into` once per range; object stores batch them.

        Args:
            name: The file's name under the root.
            ranges: ``(start, end)`` byte ranges.
            outs: One writable buffer per range, ``end - start`` bytes long.

        Raises:
            CorruptCheckpointError: A range runs past the end of the file.
            StorageError: The file is missing or cannot be read.
        """
        for (start, _end), out in zip(ranges, outs, strict=True):
            self.read_into(name, start, out)

    def open_ranges(self, name: str) -> RangeReader:
        """A reader for many ranged reads of ``name`` (how a load reads data files).

        The default reads through :meth:`read_into` and :meth:`read_ranges` and opens
        nothing; a backend with a cheaper way (a local file descriptor) overrides it.

        Args:
            name: The file's name under the root.

        Returns:
            A :class:`RangeReader`, to close when done.

        Raises:
            StorageError: The file cannot be opened (where opening is a step at all).
        """
        return _StorageRanges(self, name)

    @abstractmethod
    def size(self, name: str) -> int | None:
        """The size of a file.

        Args:
            name: The file's name under the root.

        Returns:
            Its size in bytes, or None when there is no such file.

        Raises:
            StorageError: The store could not be asked.
        """

    @abstractmethod
    def open_writer(self, name: str) -> Writer:
        """Start writing a data file.

        Args:
            name: The file's name under the root (a fresh one: it does not exist yet).

        Returns:
            A :class:`Writer`; the file is complete under ``name`` when it is closed.

        Raises:
            StorageError: The file cannot be created.
        """

    @abstractmethod
    def commit(self, name: str, data: bytes, *, durable: bool) -> None:
        """Publish ``data`` under ``name`` as one step: readers see the old or the new bytes.

        Args:
            name: The file to create or replace (the manifest).
            data: Its complete new contents.
            durable: Whether the new contents must survive a power loss once this returns.

        Raises:
            CheckpointExistsError: Under :meth:`commit_lock`, another job committed first
                (backends that can tell).
            StorageError: The commit failed; the old contents are still there.
        """

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove one file; a missing one is fine.

        Args:
            name: The file's name under the root.

        Raises:
            StorageError: The file exists and could not be removed.
        """

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every file under a prefix; a missing prefix is fine.

        Args:
            prefix: A directory-like name; ``""`` removes everything under the root.

        Raises:
            StorageError: Files could not be removed.
        """

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Names of the (complete) files under ``prefix``, relative to the root.

        Args:
            prefix: A directory-like name; ``""`` lists everything.

        Returns:
            The names, sorted.

        Raises:
            StorageError: The store could not be listed.
        """

    @abstractmethod
    def exists(self) -> bool:
        """Whether the root exists at all.

        Returns:
            True if the root exists (on an object store: if anything is under it).

        Raises:
            StorageError: The store could not be asked.
        """

    @contextlib.contextmanager
    def commit_lock(self) -> Iterator[None]:
        """Held while checking for and publishing a commit, so two jobs cannot both win.

        The default holds nothing; a backend that can lock, or make its commit
        conditional on what was read inside the block, overrides it.
        """
        yield

    def sync_dir(self, prefix: str) -> None:  # noqa: B027 (optional hook)
        """Make newly created names under a prefix durable (a no-op where that is implied).

        Args:
            prefix: A directory-like name; ``""`` is the root.

        Raises:
            StorageError: The directory could not be synced.
        """
