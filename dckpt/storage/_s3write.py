"""Writers for object stores: on S3 one PUT per file (a multipart upload past a
threshold), sent from views of the caller's buffers; fsspec's buffered files elsewhere.

A data file is invisible to readers until its writer closes it: on S3 the PUT is made,
or the multipart upload completed, in ``close``; other backends' files are written whole.
Writers work through the storage's :class:`~dckpt.storage._ops.ObjectOps`, never the
storage itself.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
from collections.abc import Sequence
from typing import Any

from dckpt._errors import CheckpointError
from dckpt._faults import fault_point
from dckpt.storage._base import Buffer, Writer, as_bytes_view
from dckpt.storage._body import ViewsBody
from dckpt.storage._ops import ObjectOps
from dckpt.storage._retry import Attempts

_S3_MAX_PARTS = 10_000  # S3's limit on parts per multipart upload


class S3Writer(Writer):
    """One PUT for a file up to ``multipart_threshold``; past that, a multipart upload whose
    parts of ``part_size`` go up in parallel as the file is written. Nothing is visible
    until ``close``. Bodies are views of the caller's buffers, never copies."""

    def __init__(self, ops: ObjectOps, name: str) -> None:
        fault_point("storage.create")  # nothing exists on the store until close
        self.ops = ops
        self.name = name
        self.bucket, self.key = ops.bucket_key(name)
        self.part_size = ops.part_size
        self.threshold = max(ops.multipart_threshold, self.part_size)
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
            view = as_bytes_view(b)
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
        ops = self.ops
        if self.upload_id is None:
            mpu = ops.call("writing", self.name, "create_multipart_upload")
            self.upload_id = str(mpu["UploadId"])
        number = len(self.parts) + 1
        if number > _S3_MAX_PARTS:
            raise CheckpointError(
                f"writing {ops.url(self.name)} failed: more than {_S3_MAX_PARTS} parts; raise "
                'storage_options["dckpt"]["part_size"]'
            )
        ops.slots.acquire()  # bounds the parts in flight
        attempts = Attempts()
        try:
            if self.parts:
                self._raise_failed()  # waited for a slot: an earlier part may have failed
            coro = self._upload(number, ViewsBody(views), attempts)
            fut = asyncio.run_coroutine_threadsafe(coro, ops.fs.loop)
        except BaseException:
            ops.slots.release()
            raise
        fut.add_done_callback(lambda _f: ops.slots.release())
        self.parts.append((fut, attempts))
        self._raise_failed()

    async def _upload(self, number: int, body: ViewsBody, attempts: Attempts) -> dict[str, Any]:
        async def once() -> dict[str, Any]:
            body.seek(0)
            out = await self.ops.fs._call_s3(
                "upload_part",
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=body,
            )
            return {"PartNumber": number, "ETag": out["ETag"]}

        return await self.ops.retried(once, attempts, body.progress)

    def _raise_failed(self) -> None:
        for fut, attempts in self.parts:
            if fut.done() and not fut.cancelled() and (exc := fut.exception()) is not None:
                raise self.ops.error("writing", self.name, exc, attempts) from None

    def close(self, *, durable: bool) -> int:
        ops = self.ops
        fault_point("storage.fsync")  # the object is made whole and visible below
        if self.upload_id is None:
            with ops.slots:  # one request in flight, counted like a part
                ops.put(self.name, ViewsBody(self._take(self.pending_bytes)))
        else:
            if self.pending_bytes:
                self._send_part(self._take(self.pending_bytes))
            parts = []
            for fut, attempts in self.parts:
                try:
                    parts.append(fut.result())
                except Exception as exc:
                    raise ops.error("writing", self.name, exc, attempts) from None
            try:
                ops.call(
                    "writing",
                    self.name,
                    "complete_multipart_upload",
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except OSError as exc:  # StorageError
                # A retry (ours or botocore's) after a lost answer finds the upload gone:
                # check whether it did complete.
                if exc.errno != errno.ENOENT or ops.size(self.name) != self.size:
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
                self.ops.delete(self.name)
            elif self.upload_id is not None:
                self.ops.call(
                    "aborting", self.name, "abort_multipart_upload", UploadId=self.upload_id
                )
        self.pending.clear()
        self.pending_bytes = 0


class StreamWriter(Writer):
    """Any other fsspec backend: its own buffered file (e.g. resumable uploads on GCS)."""

    def __init__(self, ops: ObjectOps, name: str) -> None:
        fault_point("storage.create")
        self.ops = ops
        self.name = name
        self.size = 0
        path = ops.path(name)
        if not ops.is_async:  # local-like backends (sftp, memory) want the parent to exist
            with contextlib.suppress(Exception):
                ops.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        try:
            self.file = ops.fs.open(path, "wb", block_size=ops.part_size)
        except Exception as exc:
            raise ops.error("creating", name, exc) from None

    def write(self, buffers: Sequence[Buffer]) -> None:
        fault_point("storage.write")
        try:
            for b in buffers:
                view = as_bytes_view(b)
                self.file.write(view)
                self.size += view.nbytes
        except Exception as exc:
            raise self.ops.error("writing", self.name, exc) from None

    def close(self, *, durable: bool) -> int:
        fault_point("storage.fsync")  # the file is made whole and visible below
        try:
            self.file.close()
        except Exception as exc:
            raise self.ops.error("writing", self.name, exc) from None
        return self.size

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            discard = getattr(self.file, "discard", None)
            (discard or self.file.close)()
        with contextlib.suppress(Exception):
            self.ops.delete(self.name)
