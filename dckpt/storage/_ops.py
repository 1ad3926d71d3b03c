"""The operations an object-store storage and its writers share: one small object.

:class:`~dckpt.storage._fsspec.FsspecStorage` builds an :class:`ObjectOps` (its filesystem,
where its objects live, its retry policy and breaker, its upload limits) and sends its own
requests through it; the writers of :mod:`dckpt.storage._s3write` get the same object, so
neither reaches into the other's private members, and neither module imports the other's.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from dckpt._errors import CheckpointError
from dckpt.storage._body import ViewsBody
from dckpt.storage._retry import (
    Attempts,
    Breaker,
    Progress,
    RetryPolicy,
    describe,
    retry_async,
    retry_sync,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ObjectOps:
    """Requests to one storage's objects, retried within its budget, errors named safely.

    Attributes:
        fs: The fsspec filesystem (on S3: s3fs, whose ``_call_s3`` and event loop are used).
        root: The storage's root path on ``fs`` (bucket/prefix), no protocol.
        location: The printable root URL (no credentials).
        policy: How long one request may take, retries included.
        breaker: Shortens the budget of requests queued behind one that got no answer.
        secrets: Strings to scrub from error messages (credentials).
        part_size: Bytes per multipart-upload part (and per ranged GET).
        multipart_threshold: The largest object sent as one PUT.
        slots: Bounds the uploads in flight (parts and single PUTs) on this storage.
        s3: Whether ``fs`` is S3 (its API is called directly), else any fsspec backend.
        is_async: Whether ``fs`` is async (its requests run on its event loop).
        size: The storage's own ``size`` (after a lost answer: did the upload land?).
        delete: The storage's own ``delete`` (abort removes a completed object with it).
    """

    fs: Any
    root: str
    location: str
    policy: RetryPolicy
    breaker: Breaker
    secrets: tuple[str, ...]
    part_size: int
    multipart_threshold: int
    slots: threading.BoundedSemaphore
    s3: bool
    is_async: bool
    size: Callable[[str], int | None]
    delete: Callable[[str], None]

    def path(self, name: str) -> str:
        """``name``'s path on ``fs``."""
        return f"{self.root}/{name}" if name else self.root

    def url(self, name: str) -> str:
        """A printable URL of ``name`` (no credentials)."""
        return f"{self.location}/{name}" if name else self.location

    def bucket_key(self, name: str) -> tuple[str, str]:
        """The S3 bucket and key of ``name``."""
        bucket, key, _ = self.fs.split_path(self.path(name))
        return str(bucket), str(key)

    def error(
        self, action: str, name: str, exc: BaseException, att: Attempts | None = None
    ) -> CheckpointError:
        """``exc`` as the StorageError to raise: the object, the status, no credential."""
        return describe(
            action,
            self.url(name),
            exc,
            att,
            secrets=self.secrets,
            retry_timeout=self.policy.timeout,
        )

    def sync(self, action: str, name: str, op: Callable[[], T]) -> T:
        """``op`` with retries, from a plain thread (any backend)."""
        attempts = Attempts()
        try:
            return retry_sync(op, self.policy, attempts, breaker=self.breaker)
        except Exception as exc:
            raise self.error(action, name, exc, attempts) from None

    def retried(
        self, op: Callable[[], Awaitable[T]], attempts: Attempts, progress: Progress | None = None
    ) -> Awaitable[T]:
        """``op`` retried, each try bounded by the budget; to await on the event loop."""
        return retry_async(op, self.policy, attempts, breaker=self.breaker, progress=progress)

    def run(
        self,
        action: str,
        name: str,
        op: Callable[[], Awaitable[T]],
        progress: Progress | None = None,
    ) -> T:
        """A retried coroutine on the filesystem's event loop, from a plain thread."""
        from fsspec.asyn import sync  # lazy: fsspec is heavy, and only URLs need it

        attempts = Attempts()
        try:
            result: T = sync(self.fs.loop, self.retried, op, attempts, progress)
        except Exception as exc:
            raise self.error(action, name, exc, attempts) from None
        return result

    def fs_call(self, action: str, name: str, method: str, *args: Any) -> Any:
        """``fs.<method>(*args)`` retried; on an async filesystem its coroutine, so that
        a try that gets no answer is cancelled when the budget is spent."""
        if self.is_async:
            return self.run(action, name, lambda: getattr(self.fs, f"_{method}")(*args))
        return self.sync(action, name, lambda: getattr(self.fs, method)(*args))

    def call(self, action: str, name: str, method: str, **kwargs: Any) -> Any:
        """One retried S3 API call on ``name``'s object."""
        bucket, key = self.bucket_key(name)
        return self.run(
            action, name, lambda: self.fs._call_s3(method, Bucket=bucket, Key=key, **kwargs)
        )

    def put(self, name: str, data: bytes | ViewsBody, **extra: str) -> None:
        """One retried S3 PUT of ``data`` as ``name`` (``extra``: conditions)."""
        body = data if isinstance(data, ViewsBody) else ViewsBody([memoryview(data)])
        bucket, key = self.bucket_key(name)

        async def put() -> Any:
            body.seek(0)  # every try sends the whole body
            return await self.fs._call_s3("put_object", Bucket=bucket, Key=key, Body=body, **extra)

        self.run("writing", name, put, body.progress)
