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
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from dckpt._bytes import as_memoryview
from dckpt._errors import CheckpointError, CheckpointExistsError, CorruptCheckpointError
from dckpt._faults import fault_point
from dckpt.storage._base import MAX_READ_BYTES, Buffer, FileLayout, Storage, Writer
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
from dckpt.storage._retry import (
    Attempts,
    Progress,
    RetryPolicy,
    classify,
    describe,
    redact_url,
    retry_async,
    retry_sync,
    secret_values,
)
from dckpt.storage._s3write import ViewsBody

T = TypeVar("T")
log = logging.getLogger("dckpt")

_MiB = 1 << 20
_S3_MIN_PART = 5 * _MiB
_S3_MAX_PUT = 5 << 30  # S3's limit on one PUT or part


class FsspecStorage(Storage):
    """One checkpoint under an fsspec URL; see the module docstring for the guarantees."""

    atomic_commit = False

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        import fsspec.core

        options = dict(storage_options or {})
        self.options = o = FsspecOptions.parse(options.pop("dckpt", None))
        self.policy = RetryPolicy(o.retry_timeout, o.retry_initial, o.retry_max)
        self.location = redact_url(url).split("?", 1)[0].split("#", 1)[0].rstrip("/")
        userinfo = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://([^/@?#\s]*)@", url)
        user, _, password = (userinfo.group(1) if userinfo else "").partition(":")
        self._secrets = (*secret_values(options), *(s for s in (user, password) if s))
        protocol = (fsspec.core.split_protocol(url)[0] or "file").lower()
        cls = filesystem_class(protocol)
        try:
            if "::" in url:  # chained (simplecache::s3://...): fsspec builds the stack
                self.fs, root = fsspec.core.url_to_fs(url, **options)
            else:
                kwargs = {**cls._get_kwargs_from_urls(url), **options}
                if user and accepts(cls, "username") and "key" not in kwargs:
                    kwargs.setdefault("username", user)
                    kwargs.setdefault("password", password)
                self.fs = filesystem(cls, kwargs, o)
                root = cls._strip_protocol(redact_url(url))
        except Exception as exc:
            raise self._error("opening", "", exc) from None
        self.root = str(root).rstrip("/")
        self._s3 = hasattr(self.fs, "_call_s3") and hasattr(self.fs, "split_path")
        self._async = bool(getattr(self.fs, "async_impl", False))
        # Uploads in flight (parts and single PUTs), each a view of state memory.
        self._slots = threading.BoundedSemaphore(o.max_concurrency)
        self._gets: asyncio.Semaphore | None = None  # GETs in flight (made on the loop)
        self._guard: dict[str, str | None] | None = None  # ETags read under commit_lock
        self._breaker = breaker_of(self.fs)  # shared by this process's storages on it
        self._conditional = True
        if self._s3 and o.part_size < _S3_MIN_PART:
            raise CheckpointError(
                f'storage_options["dckpt"]["part_size"] must be at least {_S3_MIN_PART} on S3'
            )
        if self._s3 and max(o.part_size, o.multipart_threshold) > _S3_MAX_PUT:
            raise CheckpointError(
                'storage_options["dckpt"]["part_size"] and ["multipart_threshold"] must be at '
                f"most {_S3_MAX_PUT} on S3"
            )
        # Many objects of about a part each: parallel PUTs, and no multipart bookkeeping.
        self.file_layout = FileLayout(max_files=o.max_concurrency, target_bytes=o.part_size)

    # -- plumbing ------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def url(self, name: str) -> str:
        """A printable URL of ``name`` (no credentials)."""
        return f"{self.location}/{name}" if name else self.location

    def _error(
        self, action: str, name: str, exc: BaseException, att: Attempts | None = None
    ) -> CheckpointError:
        return describe(
            action,
            self.url(name),
            exc,
            att,
            secrets=self._secrets,
            retry_timeout=self.options.retry_timeout,
        )

    def _sync(self, action: str, name: str, op: Callable[[], T]) -> T:
        """``op`` with retries, from a plain thread (any backend)."""
        attempts = Attempts()
        try:
            return retry_sync(op, self.policy, attempts, breaker=self._breaker)
        except Exception as exc:
            raise self._error(action, name, exc, attempts) from None

    def _retried(
        self, op: Callable[[], Awaitable[T]], attempts: Attempts, progress: Progress | None = None
    ) -> Awaitable[T]:
        """``op`` retried, each try bounded by the budget; to await on the event loop."""
        return retry_async(op, self.policy, attempts, breaker=self._breaker, progress=progress)

    def _run(
        self,
        action: str,
        name: str,
        op: Callable[[], Awaitable[T]],
        progress: Progress | None = None,
    ) -> T:
        """A retried coroutine on the filesystem's event loop, from a plain thread."""
        from fsspec.asyn import sync

        attempts = Attempts()
        try:
            result: T = sync(self.fs.loop, self._retried, op, attempts, progress)
        except Exception as exc:
            raise self._error(action, name, exc, attempts) from None
        return result

    def _fs_call(self, action: str, name: str, method: str, *args: Any) -> Any:
        """``fs.<method>(*args)`` retried; on an async filesystem its coroutine, so that
        a try that gets no answer is cancelled when the budget is spent."""
        if self._async:
            return self._run(action, name, lambda: getattr(self.fs, f"_{method}")(*args))
        return self._sync(action, name, lambda: getattr(self.fs, method)(*args))

    def _call(self, action: str, name: str, method: str, **kwargs: Any) -> Any:
        """One retried S3 API call on ``name``'s object."""
        bucket, key, _ = self.fs.split_path(self._path(name))
        return self._run(
            action, name, lambda: self.fs._call_s3(method, Bucket=bucket, Key=key, **kwargs)
        )

    def _missing_ok(self, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except OSError as exc:  # StorageError
            if exc.errno != errno.ENOENT:
                raise
            return None

    def _invalidate(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self._path(name))

    # -- reading -------------------------------------------------------------------
    def read_file(self, name: str, *, max_bytes: int = MAX_READ_BYTES) -> bytes | None:
        """The whole object; one over ``max_bytes`` is refused before its body is read."""
        etag: str | None = ""
        if self._s3:
            progress = Progress()
            got = self._missing_ok(
                lambda: self._run(
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
        path, end = self._path(name), max_bytes + 1
        data = self._missing_ok(lambda: self._fs_call("reading", name, "cat_file", path, 0, end))
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
        bucket, key, _ = self.fs.split_path(self._path(name))
        resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            self._check_size(name, int(resp.get("ContentLength") or 0), max_bytes)
            data = await read_body(resp["Body"], max_bytes, progress)
        finally:
            resp["Body"].close()
        self._check_size(name, len(data), max_bytes, grew=True)
        return data, str(resp.get("ETag", ""))

    def size(self, name: str) -> int | None:
        if self._s3:
            head = self._missing_ok(lambda: self._call("inspecting", name, "head_object"))
            return None if head is None else int(head["ContentLength"])
        self._invalidate(name)
        path = self._path(name)
        info = self._missing_ok(lambda: self._fs_call("inspecting", name, "info", path))
        return None if info is None or info.get("type") == "directory" else int(info["size"])

    def read_into(self, name: str, offset: int, out: Buffer) -> None:
        self.read_ranges(name, [(offset, offset + memoryview(out).nbytes)], [out])

    def read_ranges(
        self, name: str, ranges: Sequence[tuple[int, int]], outs: Sequence[Buffer]
    ) -> None:
        """Fill ``outs[i]`` with bytes ``ranges[i]``: big ranges split into part-sized GETs,
        near ones merged into one, all run concurrently."""
        views = [as_memoryview(o) for o in outs]
        for (start, end), v in zip(ranges, views, strict=True):
            if end - start != v.nbytes or start < 0:
                raise ValueError(f"range {(start, end)} does not fit a {v.nbytes}-byte buffer")
        wanted = [(s, e, v) for (s, e), v in zip(ranges, views, strict=True) if e > s]
        groups = _plan_gets(wanted, self.options.part_size, self.options.coalesce_gap)
        if not groups:
            return
        if self._async:
            from fsspec.asyn import sync

            sync(self.fs.loop, self._get_groups, name, groups)
            return
        path = self._path(name)
        for g in groups:

            def get(g: Get = g) -> bytes:
                return bytes(self.fs.cat_file(path, g.start, g.end))

            self._scatter(name, g, self._sync("reading", name, get))

    async def _get_groups(self, name: str, groups: list[Get]) -> None:
        if self._gets is None:
            self._gets = asyncio.Semaphore(self.options.max_concurrency)
        gets, path = self._gets, self._path(name)
        bucket, key, _ = self.fs.split_path(path) if self._s3 else ("", "", None)

        async def get(g: Get, progress: Progress) -> bytes:
            if not self._s3:
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
                    data = await self._retried(lambda: get(g, progress), attempts, progress)
                except Exception as exc:
                    if not classify(exc).out_of_range:
                        raise self._error("reading", name, exc, attempts) from None
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
        base = self._path(prefix.rstrip("/"))
        self._invalidate(prefix)
        found = self._fs_call("listing", prefix, "find", base)
        skip = len(self.root) + 1 if self.root else 0
        return sorted(
            str(p)[skip:]
            for p in found
            if str(p).startswith(f"{base}/") and not str(p).endswith("/")
        )

    def exists(self) -> bool:
        self._invalidate("")
        return bool(self._fs_call("inspecting", "", "exists", self.root))

    # -- writing -------------------------------------------------------------------
    def open_writer(self, name: str) -> Writer:
        from dckpt.storage._s3write import S3Writer, StreamWriter

        return S3Writer(self, name) if self._s3 else StreamWriter(self, name)

    def commit(self, name: str, data: bytes, *, durable: bool) -> None:
        """One PUT. Under :meth:`commit_lock` on S3 it is conditional on what was read."""
        fault_point("storage.commit.tmp")  # the same steps as the local rename protocol
        if self._s3:
            self._commit_s3(name, data)
        else:
            self._fs_call("committing", name, "pipe_file", self._path(name), data)
        fault_point("storage.commit.rename")

    def _commit_s3(self, name: str, data: bytes) -> None:
        cond: dict[str, str] = {}
        if self._guard is not None and name in self._guard and self._conditional:
            etag = self._guard[name]
            cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            self._put(name, data, **cond)
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
            self._put(name, data)

    def _put(self, name: str, data: bytes | ViewsBody, **extra: str) -> None:
        body = data if isinstance(data, ViewsBody) else ViewsBody([memoryview(data)])
        bucket, key, _ = self.fs.split_path(self._path(name))

        async def put() -> Any:
            body.seek(0)  # every try sends the whole body
            return await self.fs._call_s3("put_object", Bucket=bucket, Key=key, Body=body, **extra)

        self._run("writing", name, put, body.progress)

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
        if self._s3:
            self._missing_ok(lambda: self._call("deleting", name, "delete_object"))
        else:
            path = self._path(name)
            self._missing_ok(lambda: self._fs_call("deleting", name, "rm_file", path))
        self._invalidate(name)

    def delete_prefix(self, prefix: str) -> None:
        # Objects only, by name: a recursive rm of a bucket-level root would drop the bucket.
        files = [f"{self.root}/{n}" if self.root else n for n in self.list(prefix)]
        if files:
            fault_point("storage.delete")
            self._missing_ok(lambda: self._fs_call("deleting", prefix, "rm", files))
        self._invalidate(prefix)
