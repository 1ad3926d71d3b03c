"""The per-file objects of a :class:`~dckpt.storage.Storage`: a :class:`Writer` for a data
file being written, a :class:`RangeReader` for one being read."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType

Buffer = memoryview


class Writer(ABC):
    """A data file being written sequentially from buffers.

    A save opens one writer per data file (:meth:`Storage.open_writer`), calls
    :meth:`write` any number of times, then exactly one of :meth:`close` (the file is
    complete) or :meth:`abort` (the save failed). Writers of different files are used from
    different threads at once; one writer is used by one thread at a time.

    Example:
        >>> w = storage.open_writer("data/s1/r0-0.bin")  # doctest: +SKIP
        >>> w.write([memoryview(b"abc"), memoryview(b"def")])  # doctest: +SKIP
        >>> w.close(durable=True)  # doctest: +SKIP
        6
    """

    @abstractmethod
    def write(self, buffers: Sequence[Buffer]) -> None:
        """Append ``buffers`` to the file, in order.

        They may be sent later, straight from their memory: the caller keeps them alive
        and unchanged until :meth:`close` or :meth:`abort` returns.

        Args:
            buffers: Byte buffers (any format; their raw bytes are written).

        Raises:
            StorageError: The write failed; the caller aborts the writer.
        """

    @abstractmethod
    def close(self, *, durable: bool) -> int:
        """Finish the file and make it visible under its name.

        Args:
            durable: Also flush it to stable storage (``fsync``) before returning. Stores
                where a completed write is durable ignore it.

        Returns:
            The file's size in bytes.

        Raises:
            StorageError: The file could not be completed; the caller aborts the writer.
        """

    @abstractmethod
    def abort(self) -> None:
        """Drop the partial (or completed) file. Never raises."""


class RangeReader(ABC):
    """Many ranged reads of one file, opened once: what a load reads chunks through.

    Returned by :meth:`Storage.open_ranges`; close it (or use it as a context manager)
    when done. One reader is used by one thread at a time.

    Attributes:
        low_latency: True where a small read costs about a memory copy (a local file): a
            load then reads one checksum block at a time and checks it while it is still
            in the CPU cache. False (the default) where each read is a request with its own
            latency: a load then batches its planned small reads and reads long runs in
            one request.

    Example:
        >>> with storage.open_ranges("data/s1/r0-0.bin") as ranges:  # doctest: +SKIP
        ...     out = bytearray(4096)
        ...     ranges.read_into(0, memoryview(out))
    """

    low_latency: bool = False

    @abstractmethod
    def read_into(self, offset: int, out: Buffer) -> None:
        """Fill ``out`` with the file's bytes from ``offset`` on.

        Args:
            offset: Where in the file to start (>= 0).
            out: A writable buffer; all of it is filled.

        Raises:
            CorruptCheckpointError: The file ends before ``out`` is full ("truncated").
            StorageError: The file is missing or cannot be read.
        """

    def read_ranges(self, ranges: Sequence[tuple[int, int]], outs: Sequence[Buffer]) -> None:
        """Fill ``outs[i]`` with bytes ``[start, end)`` of ``ranges[i]``, for every ``i``.

        The default reads them one by one; object stores batch them concurrently.

        Args:
            ranges: ``(start, end)`` byte ranges of the file.
            outs: One writable buffer per range, ``end - start`` bytes long.

        Raises:
            CorruptCheckpointError: A range runs past the end of the file.
            StorageError: The file is missing or cannot be read.
        """
        for (start, _end), out in zip(ranges, outs, strict=True):
            self.read_into(start, out)

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release what the reader holds (a file descriptor, say). Idempotent."""

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
