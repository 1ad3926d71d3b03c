"""Writers for object stores: on S3 one PUT per file (a multipart upload past a
threshold), sent from views of the caller's buffers; fsspec's buffered files elsewhere.

A data file is invisible to readers until its writer closes it: on S3 the PUT is made,
or the multipart upload completed, in ``close``; other backends' files are written whole.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import contextlib
import errno
import io
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dckpt._bytes import as_memoryview
from dckpt._errors import CheckpointError
from dckpt._faults import fault_point
from dckpt.storage._base import Buffer, Writer
from dckpt.storage._retry import Attempts, Progress

if TYPE_CHECKING:
    from dckpt.storage._fsspec import FsspecStorage

_S3_MAX_PARTS = 10_000  # S3's limit on parts per multipart upload


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


class S3Writer(Writer):
    """One PUT for a file up to ``multipart_threshold``; past that, a multipart upload whose
    parts of ``part_size`` go up in parallel as the file is written. Nothing is visible
    until ``close``. Bodies are views of the caller's buffers, never copies."""

    def __init__(self, st: FsspecStorage, name: str) -> None:
        fault_point("storage.create")  # nothing exists on the store until close
        self.st = st
        self.name = name
        self.bucket, self.key, _ = st.fs.split_path(st._path(name))
        self.part_size = st.options.part_size
        self.threshold = max(st.options.multipart_threshold, self.part_size)
        self.pending: collections.deque[memoryview] = collections.deque()  # not yet sent
        self.pending_bytes = 0
        self.size = 0
        self.upload_id: str | None = None
        self.parts: list[tuple[concurrent.futures.Future[dict[str, Any]], Attempts]] = []
        self.done = False

    def write(self, buffers: Sequence[Buffer]) -> None:
        fault_point("storage.write")
        self._raise_failed()
        for b in buffers:
            view = as_memoryview(b)
            if view.nbytes:
                self.pending.append(view)
                self.pending_bytes += view.nbytes
                self.size += view.nbytes
        if self.upload_id is None and self.pending_bytes <= self.threshold:
            return  # may still be one PUT
        while self.pending_bytes >= self.part_size:
            self._send_part(self._take(self.part_size))

    def _take(self, nbytes: int) -> list[memoryview]:
        """The first ``nbytes`` of the pending views (the last one split if need be)."""
        out: list[memoryview] = []
        got = 0
        while got < nbytes:
            view = self.pending[0]
            if got + view.nbytes <= nbytes:
                out.append(self.pending.popleft())
                got += view.nbytes
            else:
                out.append(view[: nbytes - got])
                self.pending[0] = view[nbytes - got :]
                got = nbytes
        self.pending_bytes -= got
        return out

    def _send_part(self, views: list[memoryview]) -> None:
        st = self.st
        if self.upload_id is None:
            mpu = st._call("writing", self.name, "create_multipart_upload")
            self.upload_id = str(mpu["UploadId"])
        number = len(self.parts) + 1
        if number > _S3_MAX_PARTS:
            raise CheckpointError(
                f"writing {st.url(self.name)} failed: more than {_S3_MAX_PARTS} parts; raise "
                'storage_options["dckpt"]["part_size"]'
            )
        st._slots.acquire()  # bounds the parts in flight
        attempts = Attempts()
        try:
            if self.parts:
                self._raise_failed()  # waited for a slot: an earlier part may have failed
            coro = self._upload(number, ViewsBody(views), attempts)
            fut = asyncio.run_coroutine_threadsafe(coro, st.fs.loop)
        except BaseException:
            st._slots.release()
            raise
        fut.add_done_callback(lambda _f: st._slots.release())
        self.parts.append((fut, attempts))
        self._raise_failed()

    async def _upload(self, number: int, body: ViewsBody, attempts: Attempts) -> dict[str, Any]:
        async def once() -> dict[str, Any]:
            body.seek(0)
            out = await self.st.fs._call_s3(
                "upload_part",
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=body,
            )
            return {"PartNumber": number, "ETag": out["ETag"]}

        return await self.st._retried(once, attempts, body.progress)

    def _raise_failed(self) -> None:
        for fut, attempts in self.parts:
            if fut.done() and not fut.cancelled() and (exc := fut.exception()) is not None:
                raise self.st._error("writing", self.name, exc, attempts) from None

    def close(self, *, durable: bool) -> int:
        st = self.st
        fault_point("storage.fsync")  # the object is made whole and visible below
        if self.upload_id is None:
            with st._slots:  # one request in flight, counted like a part
                st._put(self.name, ViewsBody(self._take(self.pending_bytes)))
        else:
            if self.pending_bytes:
                self._send_part(self._take(self.pending_bytes))
            parts = []
            for fut, attempts in self.parts:
                try:
                    parts.append(fut.result())
                except Exception as exc:
                    raise st._error("writing", self.name, exc, attempts) from None
            try:
                st._call(
                    "writing",
                    self.name,
                    "complete_multipart_upload",
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except OSError as exc:  # StorageError
                # A retry (ours or botocore's) after a lost answer finds the upload gone:
                # check whether it did complete.
                if exc.errno != errno.ENOENT or st.size(self.name) != self.size:
                    raise
        self.done = True
        return self.size

    def abort(self) -> None:
        for fut, _ in self.parts:
            fut.cancel()  # cancels the request itself, on the event loop
        with contextlib.suppress(Exception):
            concurrent.futures.wait([f for f, _ in self.parts], timeout=10)
        with contextlib.suppress(Exception):
            if self.done:
                self.st.delete(self.name)
            elif self.upload_id is not None:
                self.st._call(
                    "aborting", self.name, "abort_multipart_upload", UploadId=self.upload_id
                )
        self.pending.clear()
        self.pending_bytes = 0


class StreamWriter(Writer):
    """Any other fsspec backend: its own buffered file (e.g. resumable uploads on GCS)."""

    def __init__(self, st: FsspecStorage, name: str) -> None:
        fault_point("storage.create")
        self.st = st
        self.name = name
        self.size = 0
        path = st._path(name)
        if not st._async:  # local-like backends (sftp, memory) want the parent to exist
            with contextlib.suppress(Exception):
                st.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        try:
            self.file = st.fs.open(path, "wb", block_size=st.options.part_size)
        except Exception as exc:
            raise st._error("creating", name, exc) from None

    def write(self, buffers: Sequence[Buffer]) -> None:
        fault_point("storage.write")
        try:
            for b in buffers:
                view = as_memoryview(b)
                self.file.write(view)
                self.size += view.nbytes
        except Exception as exc:
            raise self.st._error("writing", self.name, exc) from None

    def close(self, *, durable: bool) -> int:
        fault_point("storage.fsync")  # the file is made whole and visible below
        try:
            self.file.close()
        except Exception as exc:
            raise self.st._error("writing", self.name, exc) from None
        return self.size

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            discard = getattr(self.file, "discard", None)
            (discard or self.file.close)()
        with contextlib.suppress(Exception):
            self.st.delete(self.name)
