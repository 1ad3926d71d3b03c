"""A seekable request body over buffers, sent without joining them into one copy."""

from __future__ import annotations

import bisect
import io
import itertools
from collections.abc import Sequence
from typing import Any

from dckpt.storage._retry import Progress


class ViewsBody(io.RawIOBase):
    """A seekable request body over a list of buffers, without joining them.

    Request bodies point at the state's own memory (the writer's caller keeps it unchanged
    until ``close``), so an upload holds no copy of what it sends; botocore may read the
    body more than once (checksums, retries) and seeks back to the start each time.
    Every read marks ``progress``: an upload still being sent is slow, not stuck.
    """

    def __init__(self, views: Sequence[memoryview]) -> None:
        super().__init__()
        self.progress = Progress()
        self._views = list(views)
        self._starts = list(itertools.accumulate((v.nbytes for v in self._views), initial=0))
        self._size = self._starts[-1]
        self._pos = 0

    def __len__(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        self.progress.touch()
        return self._pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        n = 0
        i = bisect.bisect_right(self._starts, self._pos) - 1
        while n < out.nbytes and self._pos < self._size:
            view = self._views[i]
            off = self._pos - self._starts[i]
            k = min(view.nbytes - off, out.nbytes - n)
            out[n : n + k] = view[off : off + k]
            n += k
            self._pos += k
            i += 1
        self.progress.touch()
        return n

    def read(self, size: int | None = -1) -> bytes:
        left = max(0, self._size - self._pos)
        want = left if size is None or size < 0 else min(size, left)
        i = bisect.bisect_right(self._starts, self._pos) - 1
        if want and self._pos + want <= self._starts[i + 1]:  # within one view: one copy
            off = self._pos - self._starts[i]
            self._pos += want
            self.progress.touch()
            return bytes(self._views[i][off : off + want])
        out = bytearray(want)
        return bytes(out[: self.readinto(out)])
