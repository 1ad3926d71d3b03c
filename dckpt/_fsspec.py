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
fsspec's event loop. Transient failures are retried (``dckpt._retry``); permanent ones
raise :class:`StorageError` naming the object and the status, never a credential.

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
import inspect
import io
import logging
import os
import re
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from dckpt._bytes import as_memoryview
from dckpt._errors import CheckpointError, CheckpointExistsError, CorruptCheckpointError
from dckpt._retry import (
    Attempts,
    RetryPolicy,
    classify,
    describe,
    redact_url,
    retry_async,
    retry_sync,
    secret_values,
)
from dckpt._storage import Buffer, FileLayout, Storage, Writer

T = TypeVar("T")
log = logging.getLogger("dckpt")

_MiB = 1 << 20
_S3_MIN_PART = 5 * _MiB
_S3_MAX_PUT = 5 << 30  # S3's limit on one PUT or part
_INSTALL = {"s3": "'dckpt[s3]'", "s3a": "'dckpt[s3]'"}  # otherwise: the missing module


@dataclass(frozen=True, slots=True)
class FsspecOptions:
    """dckpt's knobs for object stores: ``storage_options={"dckpt": {"part_size": ...}}``.

    ``max_concurrency`` bounds parts in flight and ranged GETs per storage (reads buffer
    about ``max_concurrency * part_size``; uploads send views of the state, no copies, and
    GPU tensors' host copies live until their object is sent), and
    a save spreads each rank's data over up to that many objects of about ``part_size``.
    An object up to ``multipart_threshold`` goes up as one PUT (no multipart bookkeeping,
    no server-side assembly, nothing left behind by a killed process), a larger one as a
    multipart upload in parts of ``part_size``. ``retry_timeout`` bounds the total time one
    request is retried; ``coalesce_gap`` merges planned reads that close into one GET.
    """

    max_concurrency: int = 16
    part_size: int = 16 * _MiB
    multipart_threshold: int = 64 * _MiB
    retry_timeout: float = 60.0
    retry_initial: float = 0.1
    retry_max: float = 5.0
    coalesce_gap: int = 1 * _MiB

    @classmethod
    def parse(cls, raw: object) -> FsspecOptions:
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise CheckpointError(f'storage_options["dckpt"] must be a dict, not {type(raw)}')
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise CheckpointError(
                f'unknown storage_options["dckpt"] keys {unknown}; known: {sorted(known)}'
            )
        values: dict[str, Any] = {}
        for k, v in raw.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                raise CheckpointError(f'storage_options["dckpt"]["{k}"] must be a positive number')
            values[k] = int(v) if known[k].type == "int" else float(v)
        return cls(**values)


def _filesystem_class(protocol: str) -> Any:
    import fsspec

    try:
        return fsspec.get_filesystem_class(protocol)
    except ImportError as exc:  # fsspec knows the backend; its package is not installed
        cause = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc
        module = cause.name or "its fsspec backend"
        why = "" if protocol not in _INSTALL or module == "s3fs" else f" (missing {module})"
        module = "s3fs" if protocol in _INSTALL else module
        raise CheckpointError(
            f"{protocol}:// needs {module}{why}: pip install {_INSTALL.get(protocol, module)}"
        ) from None
    except ValueError:
        raise CheckpointError(
            f"{protocol}:// is not a storage fsspec knows; use a local path or a URL such as "
            "s3://bucket/prefix"
        ) from None


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
        cls = _filesystem_class(protocol)
        try:
            if "::" in url:  # chained (simplecache::s3://...): fsspec builds the stack
                self.fs, root = fsspec.core.url_to_fs(url, **options)
            else:
                kwargs = {**cls._get_kwargs_from_urls(url), **options}
                if user and _accepts(cls, "username") and "key" not in kwargs:
                    kwargs.setdefault("username", user)
                    kwargs.setdefault("password", password)
                self.fs = _filesystem(cls, kwargs, o)
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
            return retry_sync(op, self.policy, attempts)
        except Exception as exc:
            raise self._error(action, name, exc, attempts) from None

    def _run(self, action: str, name: str, op: Callable[[], Awaitable[T]]) -> T:
        """A retried coroutine on the filesystem's event loop, from a plain thread."""
        from fsspec.asyn import sync

        attempts = Attempts()
        try:
            result: T = sync(self.fs.loop, retry_async, op, self.policy, attempts)
        except Exception as exc:
            raise self._error(action, name, exc, attempts) from None
        return result

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
    def read_file(self, name: str) -> bytes | None:
        if self._s3:
            got = self._missing_ok(lambda: self._run("reading", name, lambda: self._get(name)))
            data, etag = got if got is not None else (None, None)
        else:
            path = self._path(name)
            data = self._missing_ok(
                lambda: self._sync("reading", name, lambda: self.fs.cat_file(path))
            )
            etag = ""
        if self._guard is not None:
            self._guard[name] = etag
        return data

    async def _get(self, name: str) -> tuple[bytes, str]:
        bucket, key, _ = self.fs.split_path(self._path(name))
        resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await resp["Body"].read(), str(resp.get("ETag", ""))
        finally:
            resp["Body"].close()

    def size(self, name: str) -> int | None:
        if self._s3:
            head = self._missing_ok(lambda: self._call("inspecting", name, "head_object"))
            return None if head is None else int(head["ContentLength"])
        self._invalidate(name)
        path = self._path(name)
        info = self._missing_ok(lambda: self._sync("inspecting", name, lambda: self.fs.info(path)))
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

            def get(g: _Get = g) -> bytes:
                return bytes(self.fs.cat_file(path, g.start, g.end))

            self._scatter(name, g, self._sync("reading", name, get))

    async def _get_groups(self, name: str, groups: list[_Get]) -> None:
        if self._gets is None:
            self._gets = asyncio.Semaphore(self.options.max_concurrency)
        gets, path = self._gets, self._path(name)

        async def one(g: _Get) -> None:
            attempts = Attempts()
            async with gets:
                try:
                    data = await retry_async(
                        lambda: self.fs._cat_file(path, start=g.start, end=g.end),
                        self.policy,
                        attempts,
                    )
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

    def _scatter(self, name: str, g: _Get, data: bytes) -> None:
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
        found = self._sync("listing", prefix, lambda: self.fs.find(base))
        skip = len(self.root) + 1 if self.root else 0
        return sorted(
            str(p)[skip:]
            for p in found
            if str(p).startswith(f"{base}/") and not str(p).endswith("/")
        )

    def exists(self) -> bool:
        self._invalidate("")
        return bool(self._sync("inspecting", "", lambda: self.fs.exists(self.root)))

    # -- writing -------------------------------------------------------------------
    def open_writer(self, name: str) -> Writer:
        from dckpt._fsspec_write import S3Writer, StreamWriter

        return S3Writer(self, name) if self._s3 else StreamWriter(self, name)

    def commit(self, name: str, data: bytes, *, durable: bool) -> None:
        """One PUT. Under :meth:`commit_lock` on S3 it is conditional on what was read."""
        if not self._s3:
            path = self._path(name)
            self._sync("committing", name, lambda: self.fs.pipe_file(path, data))
            return
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

    def _put(self, name: str, data: bytes | io.IOBase, **extra: str) -> None:
        body = data if isinstance(data, io.IOBase) else io.BytesIO(data)
        bucket, key, _ = self.fs.split_path(self._path(name))

        async def put() -> Any:
            body.seek(0)  # every try sends the whole body
            return await self.fs._call_s3("put_object", Bucket=bucket, Key=key, Body=body, **extra)

        self._run("writing", name, put)

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
        if self._s3:
            self._missing_ok(lambda: self._call("deleting", name, "delete_object"))
        else:
            path = self._path(name)
            self._missing_ok(lambda: self._sync("deleting", name, lambda: self.fs.rm_file(path)))
        self._invalidate(name)

    def delete_prefix(self, prefix: str) -> None:
        # Objects only, by name: a recursive rm of a bucket-level root would drop the bucket.
        files = [f"{self.root}/{n}" if self.root else n for n in self.list(prefix)]
        if files:
            self._missing_ok(lambda: self._sync("deleting", prefix, lambda: self.fs.rm(files)))
        self._invalidate(prefix)


@dataclass(frozen=True, slots=True)
class _Get:
    """One ranged GET and the caller buffers it fills."""

    start: int
    end: int
    parts: tuple[tuple[int, memoryview], ...]


def _plan_gets(
    ranges: Sequence[tuple[int, int, memoryview]], part_size: int, gap: int
) -> list[_Get]:
    """Split ranges over ``part_size`` into pieces; merge neighbours closer than ``gap``."""
    pieces = sorted(
        (
            (lo, min(end, lo + part_size), view[lo - start : min(end, lo + part_size) - start])
            for start, end, view in ranges
            for lo in range(start, end, part_size)
        ),
        key=lambda p: p[0],
    )
    out: list[_Get] = []
    cur: list[tuple[int, memoryview]] = []
    c0 = c1 = 0
    for lo, hi, view in pieces:
        if cur and lo - c1 <= gap and max(c1, hi) - c0 <= part_size:
            cur.append((lo, view))
            c1 = max(c1, hi)
            continue
        if cur:
            out.append(_Get(c0, c1, tuple(cur)))
        cur, c0, c1 = [(lo, view)], lo, hi
    if cur:
        out.append(_Get(c0, c1, tuple(cur)))
    return out


# -- helpers -------------------------------------------------------------------------------
def _accepts(cls: type, param: str) -> bool:
    try:
        return param in inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    except (TypeError, ValueError):
        return False


_instances: dict[str, Any] = {}
_instances_lock = threading.Lock()


def _filesystem(cls: type, kwargs: dict[str, Any], opts: FsspecOptions) -> Any:
    """A filesystem for ``kwargs``, shared by this process's storages (connection reuse).

    S3 instances are our own (not in fsspec's shared cache) because we tune them: botocore
    retries a little (it rewinds request bodies; we retry the rest within our time budget),
    s3fs does not retry at all (its retries re-send a consumed body stream: an empty one),
    the connection pool fits our concurrency, and listings are never cached (other ranks
    write behind our back).
    """
    if not (hasattr(cls, "_call_s3") and hasattr(cls, "split_path")):
        return cls(**kwargs)
    from fsspec.utils import tokenize

    config = dict(kwargs.get("config_kwargs") or {})
    config["retries"] = dict(config.get("retries") or {"mode": "standard", "total_max_attempts": 3})
    config.setdefault("max_pool_connections", max(10, 2 * opts.max_concurrency))
    kwargs = {**kwargs, "config_kwargs": config, "skip_instance_cache": True}
    kwargs.setdefault("use_listings_cache", False)
    key = tokenize(os.getpid(), cls.__module__, cls.__qualname__, kwargs)
    with _instances_lock:
        fs = _instances.get(key)
        if fs is None:
            fs = _instances[key] = cls(**kwargs)
            fs.retries = 1  # one try per s3fs call: see above
    return fs
