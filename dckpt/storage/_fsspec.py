"""Checkpoints on object stores and other fsspec filesystems (``s3://``, ``gs://``, ``memory://``).

Object stores have no rename, so nothing here is atomic except single PUTs: data objects go
to a fresh ``data/<save_id>/`` prefix, and the manifest is published last, as one PUT, after
every rank has confirmed its objects. A save that dies earlier leaves no manifest and so
never loads. A completed PUT is durable, so ``durable=`` changes nothing here. On S3 the
manifest PUT is conditional (``If-Match`` / ``If-None-Match``) on what the commit saw, so
two jobs cannot both win; other backends are last-writer-wins.

Speed: a save spreads each rank's share over up to ``max_concurrency`` objects of about a
part each, which go up in parallel as single PUTs straight from the state's memory; only
objects over ``multipart_threshold`` become multipart uploads (measured against moto, one
PUT per object did about half the server work of multipart, which assembles the object
again at completion). Reads are ranged GETs, split and coalesced, run concurrently on
fsspec's event loop. Transient failures are retried (``dckpt.storage._retry``); permanent ones
raise :class:`StorageError` naming the object and the status, never a credential.

``retry_timeout`` bounds each request, retries included: on async filesystems (S3, GCS)
a try that gets no answer is cancelled when the budget is spent, so an endpoint that
stops answering fails the operation with a :class:`StorageError` after about that long,
and the requests queued behind it (or the cleanup after it) get a short budget instead of
each waiting out a whole one (:class:`dckpt.storage._retry.Breaker`).

dckpt's own knobs ride in ``storage_options={"dckpt": {...}}`` (see :class:`FsspecOptions`);
everything else goes to the fsspec filesystem unchanged, which also reads its standard
environment (for S3: ``AWS_*``, ``AWS_ENDPOINT_URL``, ``~/.aws``). A multipart upload cut
short by a killed process stays behind (invisible, but billed): give the bucket a lifecycle
rule that aborts incomplete multipart uploads after a day.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from dckpt._errors import CheckpointError, CheckpointExistsError, CorruptCheckpointError
from dckpt._faults import fault_point
from dckpt.storage._base import (
    MAX_READ_BYTES,
    Buffer,
    FileLayout,
    Storage,
    Writer,
    as_bytes_view,
)
from dckpt.storage._fsspec_support import (
    FsspecOptions,
    Get,
    accepts,
    breaker_of,
    filesystem,
    filesystem_class,
    read_body,
)
from dckpt.storage._fsspec_support import (
    plan_gets as _plan_gets,
)
from dckpt.storage._ops import ObjectOps
from dckpt.storage._retry import (
    Attempts,
    Progress,
    RetryPolicy,
    classify,
    describe,
    redact_url,
    secret_values,
)
from dckpt.storage._s3write import S3Writer, StreamWriter

T = TypeVar("T")
log = logging.getLogger("dckpt")

_MiB = 1 << 20
_S3_MIN_PART = 5 * _MiB
_S3_MAX_PUT = 5 << 30  # S3's limit on one PUT or part


class FsspecStorage(Storage):
    """One checkpoint under an fsspec URL; see the module docstring for the guarantees."""

    atomic_commit = False

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        options = dict(storage_options or {})
        self.options = o = FsspecOptions.parse(options.pop("dckpt", None))
        self.policy = RetryPolicy(o.retry_timeout, o.retry_initial, o.retry_max)
        self.location = redact_url(url).split("?", 1)[0].split("#", 1)[0].rstrip("/")
        userinfo = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://([^/@?#\s]*)@", url)
        user, _, password = (userinfo.group(1) if userinfo else "").partition(":")
        secrets = (*secret_values(options), *(s for s in (user, password) if s))
        self.fs, self.root = self._open_fs(url, options, user, password, secrets)
        s3 = hasattr(self.fs, "_call_s3") and hasattr(self.fs, "split_path")
        if s3:
            _check_s3_limits(o)
        self.ops = ObjectOps(
            fs=self.fs,
            root=self.root,
            location=self.location,
            policy=self.policy,
            breaker=breaker_of(self.fs),  # shared by this process's storages on it
            secrets=secrets,
            part_size=o.part_size,
            multipart_threshold=o.multipart_threshold,
            # Uploads in flight (parts and single PUTs), each a view of state memory.
            slots=threading.BoundedSemaphore(o.max_concurrency),
            s3=s3,
            is_async=bool(getattr(self.fs, "async_impl", False)),
            size=self.size,
            delete=self.delete,
        )
        self._gets: asyncio.Semaphore | None = None  # GETs in flight (made on the loop)
        self._guard: dict[str, str | None] | None = None  # ETags read under commit_lock
        self._conditional = True
        # Many objects of about a part each: parallel PUTs, and no multipart bookkeeping.
        self.file_layout = FileLayout(max_files=o.max_concurrency, target_bytes=o.part_size)

    def _open_fs(
        self, url: str, options: dict[str, Any], user: str, password: str, secrets: tuple[str, ...]
    ) -> tuple[Any, str]:
        """The filesystem for ``url`` and the root path on it."""
        import fsspec.core  # lazy: fsspec is heavy, and only URLs need it

        protocol = (fsspec.core.split_protocol(url)[0] or "file").lower()
        cls = filesystem_class(protocol)
        try:
            if "::" in url:  # chained (simplecache::s3://...): fsspec builds the stack
                fs, root = fsspec.core.url_to_fs(url, **options)
            else:
                kwargs = {**cls._get_kwargs_from_urls(url), **options}
                if user and accepts(cls, "username") and "key" not in kwargs:
                    kwargs.setdefault("username", user)
                    kwargs.setdefault("password", password)
                fs = filesystem(cls, kwargs, self.options)
                root = cls._strip_protocol(redact_url(url))
        except Exception as exc:
            policy, location = self.policy, self.location
            raise describe(
                "opening", location, exc, None, secrets=secrets, retry_timeout=policy.timeout
            ) from None
        return fs, str(root).rstrip("/")

    # -- plumbing ------------------------------------------------------------------
    def url(self, name: str) -> str:
        """A printable URL of ``name`` (no credentials)."""
        return self.ops.url(name)

    def _missing_ok(self, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except OSError as exc:  # StorageError
            if exc.errno != errno.ENOENT:
                raise
            return None

    def _invalidate(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.ops.path(name))

    # -- reading -------------------------------------------------------------------
    def read_file(self, name: str, *, max_bytes: int = MAX_READ_BYTES) -> bytes | None:
        """The whole object; one over ``max_bytes`` is refused before its body is read."""
        etag: str | None = ""
        if self.ops.s3:
            progress = Progress()
            got = self._missing_ok(
                lambda: self.ops.run(
                    "reading", name, lambda: self._get(name, max_bytes, progress), progress
                )
            )
            data, etag = got if got is not None else (None, None)
        else:
            data = self._read_whole(name, max_bytes)
        if self._guard is not None:
            self._guard[name] = etag
        return data

    def _read_whole(self, name: str, max_bytes: int) -> bytes | None:
        size = self.size(name)
        if size is None:
            return None
        self._check_size(name, size, max_bytes)
        if size == 0:
            return b""  # a range of an empty object is out of range on some stores
        # One byte more than allowed: an object replaced since is refused, not cut short.
        path, end = self.ops.path(name), max_bytes + 1
        data = self._missing_ok(lambda: self.ops.fs_call("reading", name, "cat_file", path, 0, end))
        if data is not None:
            self._check_size(name, len(data), max_bytes, grew=True)
        return None if data is None else bytes(data)

    def _check_size(self, name: str, size: int, max_bytes: int, *, grew: bool = False) -> None:
        if size <= max_bytes:
            return
        if grew:
            raise CorruptCheckpointError(
                f"{self.url(name)} grew past the {max_bytes}-byte limit for this file while "
                "it was being read; something else is writing it, or it is not a checkpoint file"
            )
        raise CorruptCheckpointError(
            f"{self.url(name)} is {size} bytes, over the {max_bytes}-byte limit for this file; "
            "it is damaged or not a checkpoint file (nothing was read)"
        )

    async def _get(self, name: str, max_bytes: int, progress: Progress) -> tuple[bytes, str]:
        """The object and its ETag from one GET: its length is checked before its body is
        read, and no more than one byte past ``max_bytes`` is ever read."""
        bucket, key = self.ops.bucket_key(name)
        resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            self._check_size(name, int(resp.get("ContentLength") or 0), max_bytes)
            data = await read_body(resp["Body"], max_bytes, progress)
        finally:
            resp["Body"].close()
        self._check_size(name, len(data), max_bytes, grew=True)
        return data, str(resp.get("ETag", ""))

    def size(self, name: str) -> int | None:
        if self.ops.s3:
            head = self._missing_ok(lambda: self.ops.call("inspecting", name, "head_object"))
            return None if head is None else int(head["ContentLength"])
        self._invalidate(name)
        path = self.ops.path(name)
        info = self._missing_ok(lambda: self.ops.fs_call("inspecting", name, "info", path))
        return None if info is None or info.get("type") == "directory" else int(info["size"])

    def read_into(self, name: str, offset: int, out: Buffer) -> None:
        self.read_ranges(name, [(offset, offset + memoryview(out).nbytes)], [out])

    def read_ranges(
        self, name: str, ranges: Sequence[tuple[int, int]], outs: Sequence[Buffer]
    ) -> None:
        """Fill ``outs[i]`` with bytes ``ranges[i]``: big ranges split into part-sized GETs,
        near ones merged into one, all run concurrently."""
        views = [as_bytes_view(o) for o in outs]
        for (start, end), v in zip(ranges, views, strict=True):
            if end - start != v.nbytes or start < 0:
                raise ValueError(f"range {(start, end)} does not fit a {v.nbytes}-byte buffer")
        wanted = [(s, e, v) for (s, e), v in zip(ranges, views, strict=True) if e > s]
        groups = _plan_gets(wanted, self.options.part_size, self.options.coalesce_gap)
        if not groups:
            return
        if self.ops.is_async:
            from fsspec.asyn import sync  # lazy: fsspec is heavy, and only URLs need it

            sync(self.fs.loop, self._get_groups, name, groups)
            return
        path = self.ops.path(name)
        for g in groups:

            def get(g: Get = g) -> bytes:
                return bytes(self.fs.cat_file(path, g.start, g.end))

            self._scatter(name, g, self.ops.sync("reading", name, get))

    async def _get_groups(self, name: str, groups: list[Get]) -> None:
        if self._gets is None:
            self._gets = asyncio.Semaphore(self.options.max_concurrency)
        gets, path = self._gets, self.ops.path(name)
        bucket, key = self.ops.bucket_key(name) if self.ops.s3 else ("", "")

        async def get(g: Get, progress: Progress) -> bytes:
            if not self.ops.s3:
                return bytes(await self.fs._cat_file(path, start=g.start, end=g.end))
            resp = await self.fs._call_s3(
                "get_object", Bucket=bucket, Key=key, Range=f"bytes={g.start}-{g.end - 1}"
            )
            try:
                return await read_body(resp["Body"], g.end - g.start, progress)
            finally:
                resp["Body"].close()

        async def one(g: Get) -> None:
            attempts, progress = Attempts(), Progress()
            async with gets:
                try:
                    data = await self.ops.retried(lambda: get(g, progress), attempts, progress)
                except Exception as exc:
                    if not classify(exc).out_of_range:
                        raise self.ops.error("reading", name, exc, attempts) from None
                    data = b""  # starts past the end: truncated
            self._scatter(name, g, data)

        tasks = [asyncio.ensure_future(one(g)) for g in groups]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    def _scatter(self, name: str, g: Get, data: bytes) -> None:
        if len(data) < g.end - g.start:
            raise CorruptCheckpointError(
                f"{self.url(name)} is truncated: wanted bytes {g.start}..{g.end}, the object "
                f"ends after {g.start + len(data)}"
            )
        src = memoryview(data)
        for offset, view in g.parts:
            view[:] = src[offset - g.start : offset - g.start + view.nbytes]

    def list(self, prefix: str = "") -> list[str]:
        base = self.ops.path(prefix.rstrip("/"))
        self._invalidate(prefix)
        found = self.ops.fs_call("listing", prefix, "find", base)
        skip = len(self.root) + 1 if self.root else 0
        return sorted(
            str(p)[skip:]
            for p in found
            if str(p).startswith(f"{base}/") and not str(p).endswith("/")
        )

    def exists(self) -> bool:
        self._invalidate("")
        return bool(self.ops.fs_call("inspecting", "", "exists", self.root))

    # -- writing -------------------------------------------------------------------
    def open_writer(self, name: str) -> Writer:
        return S3Writer(self.ops, name) if self.ops.s3 else StreamWriter(self.ops, name)

    def commit(self, name: str, data: bytes, *, durable: bool) -> None:
        """One PUT. Under :meth:`commit_lock` on S3 it is conditional on what was read."""
        fault_point("storage.commit.tmp")  # the same steps as the local rename protocol
        if self.ops.s3:
            self._commit_s3(name, data)
        else:
            self.ops.fs_call("committing", name, "pipe_file", self.ops.path(name), data)
        fault_point("storage.commit.rename")

    def _commit_s3(self, name: str, data: bytes) -> None:
        cond: dict[str, str] = {}
        if self._guard is not None and name in self._guard and self._conditional:
            etag = self._guard[name]
            cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            self.ops.put(name, data, **cond)
        except CheckpointError as exc:
            failure = classify(exc.__context__ or exc)  # the backend's error it replaced
            if cond and failure.precondition_failed:
                if self.read_file(name) == data:
                    return  # our own earlier try (maybe botocore's) landed; its answer was lost
                raise CheckpointExistsError(
                    f"another save committed to {self.location} while this one was running; "
                    "this save was discarded and the other checkpoint kept. Give concurrent "
                    "jobs different paths."
                ) from None
            if not (cond and failure.code in ("NotImplemented", "InvalidArgument")):
                raise
            log.warning(
                "%s does not support conditional writes; committing without the check for a "
                "concurrent writer",
                self.location,
            )
            self._conditional = False
            self.ops.put(name, data)

    @contextlib.contextmanager
    def commit_lock(self) -> Iterator[None]:
        """Best effort: on S3, the commit PUT is conditional on the manifest's ETag as read
        inside this block (``If-Match``, or ``If-None-Match: *`` when there was none), so a
        concurrent commit makes ours fail instead of both winning. Elsewhere: no lock."""
        self._guard = {}
        try:
            yield
        finally:
            self._guard = None

    def delete(self, name: str) -> None:
        fault_point("storage.delete")
        if self.ops.s3:
            self._missing_ok(lambda: self.ops.call("deleting", name, "delete_object"))
        else:
            path = self.ops.path(name)
            self._missing_ok(lambda: self.ops.fs_call("deleting", name, "rm_file", path))
        self._invalidate(name)

    def delete_prefix(self, prefix: str) -> None:
        # Objects only, by name: a recursive rm of a bucket-level root would drop the bucket.
        files = [f"{self.root}/{n}" if self.root else n for n in self.list(prefix)]
        if files:
            fault_point("storage.delete")
            self._missing_ok(lambda: self.ops.fs_call("deleting", prefix, "rm", files))
        self._invalidate(prefix)


def _check_s3_limits(o: FsspecOptions) -> None:
    if o.part_size < _S3_MIN_PART:
        raise CheckpointError(
            f'storage_options["dckpt"]["part_size"] must be at least {_S3_MIN_PART} on S3'
        )
    if max(o.part_size, o.multipart_threshold) > _S3_MAX_PUT:
        raise CheckpointError(
            'storage_options["dckpt"]["part_size"] and ["multipart_threshold"] must be at '
            f"most {_S3_MAX_PUT} on S3"
        )
