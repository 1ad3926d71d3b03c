"""Writers for object stores: S3 multipart uploads, and fsspec's buffered files elsewhere.

A data file is invisible to readers until its writer closes it: S3 multipart uploads
become objects only when completed, and other backends' files are written whole.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dckpt._bytes import as_memoryview
from dckpt._errors import CheckpointError
from dckpt._retry import Attempts, retry_async
from dckpt._storage import Buffer, Writer

if TYPE_CHECKING:
    from dckpt._fsspec import FsspecStorage

_S3_MAX_PARTS = 10_000  # S3's limit on parts per multipart upload


class S3Writer(Writer):
    """Multipart upload: parts of ``part_size`` go up in parallel as the file is written;
    a file smaller than one part is a single PUT. Nothing is visible until ``close``."""

    def __init__(self, st: FsspecStorage, name: str) -> None:
        self.st = st
        self.name = name
        self.bucket, self.key, _ = st.fs.split_path(st._path(name))
        self.part_size = st.options.part_size
        self.buf = io.BytesIO()  # a file object: aiohttp streams it rather than copying
        self.size = 0
        self.upload_id: str | None = None
        self.parts: list[tuple[concurrent.futures.Future[dict[str, Any]], Attempts]] = []
        self.done = False

    def write(self, buffers: Sequence[Buffer]) -> None:
        self._raise_failed()
        for b in buffers:
            view = as_memoryview(b)
            pos = 0
            while pos < view.nbytes:
                n = min(self.part_size - self.buf.tell(), view.nbytes - pos)
                self.buf.write(view[pos : pos + n])
                pos += n
                if self.buf.tell() == self.part_size:
                    self._send_part()
            self.size += view.nbytes

    def _send_part(self) -> None:
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
        body, self.buf = self.buf, io.BytesIO()
        st._slots.acquire()  # bounds the parts in flight, and so their memory
        attempts = Attempts()
        try:
            coro = self._upload(number, body, attempts)
            fut = asyncio.run_coroutine_threadsafe(coro, st.fs.loop)
        except BaseException:
            st._slots.release()
            raise
        fut.add_done_callback(lambda _f: st._slots.release())
        self.parts.append((fut, attempts))
        self._raise_failed()

    async def _upload(self, number: int, body: io.BytesIO, attempts: Attempts) -> dict[str, Any]:
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

        return await retry_async(once, self.st.policy, attempts)

    def _raise_failed(self) -> None:
        for fut, attempts in self.parts:
            if fut.done() and not fut.cancelled() and (exc := fut.exception()) is not None:
                raise self.st._error("writing", self.name, exc, attempts) from None

    def close(self, *, durable: bool) -> int:
        st = self.st
        if self.upload_id is None:
            st._put(self.name, self.buf)
        else:
            if self.buf.tell():
                self._send_part()
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
        self.buf = io.BytesIO()
        return self.size

    def abort(self) -> None:
        for fut, _ in self.parts:
            fut.cancel()
        with contextlib.suppress(Exception):
            concurrent.futures.wait([f for f, _ in self.parts], timeout=10)
        with contextlib.suppress(Exception):
            if self.done:
                self.st.delete(self.name)
            elif self.upload_id is not None:
                self.st._call(
                    "aborting", self.name, "abort_multipart_upload", UploadId=self.upload_id
                )
        self.buf = io.BytesIO()


class StreamWriter(Writer):
    """Any other fsspec backend: its own buffered file (e.g. resumable uploads on GCS)."""

    def __init__(self, st: FsspecStorage, name: str) -> None:
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
        try:
            for b in buffers:
                view = as_memoryview(b)
                self.file.write(view)
                self.size += view.nbytes
        except Exception as exc:
            raise self.st._error("writing", self.name, exc) from None

    def close(self, *, durable: bool) -> int:
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
