"""Retrying transient object-store failures, and naming the permanent ones safely.

Object stores fail transiently as a matter of course (HTTP 5xx, throttling, dropped
connections, timeouts); a checkpoint of many GiB makes thousands of requests, so one such
failure must cost a short wait, not the save. Retries back off exponentially with full
jitter and stop at a total time budget, so a dead endpoint still fails in bounded time.
Permanent failures (403, 400, an unexpected 404) are never retried.

A request that gets no answer is not left to the transport's timeouts: each try of an
async request is cancelled once the budget is spent (a transfer that keeps moving bytes
may run on until it stalls for a budget's length), and a :class:`Breaker` shared by a
store's requests gives the others a short budget after one of them waited out a whole
one, so a frozen endpoint costs about one budget, not one per request.

Errors name the object and the status, scrubbed of credentials (URL user info, secret
option values). Classification is by duck typing (``exc.response`` of botocore's
``ClientError``, class names along the MRO, errno), so no optional backend is imported.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from dckpt._errors import CheckpointError, StorageError

T = TypeVar("T")

# S3 / GCS / Azure error codes that mean "try again later".
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "ServerBusy",
        "OperationAborted",
        "ConditionalRequestConflict",  # S3: a concurrent conditional write; retry it
    }
)
# Exception classes (matched by name anywhere in the MRO) raised for a broken transport by
# botocore, aiohttp, urllib3, requests and fsspec.
_TRANSIENT_CLASSES = frozenset(
    {
        "HTTPClientError",  # botocore: ConnectionClosedError, ReadTimeoutError, ...
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "IncompleteRead",
        "ResponseParserError",
        "ClientPayloadError",  # aiohttp
        "ClientConnectionError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ProtocolError",  # urllib3
        "FSTimeoutError",  # fsspec
    }
)
_TRANSIENT_ERRNOS = frozenset(
    {
        _errno.ECONNRESET,
        _errno.ECONNREFUSED,
        _errno.ECONNABORTED,
        _errno.ETIMEDOUT,
        _errno.EPIPE,
        _errno.EAGAIN,
        _errno.EBUSY,  # s3fs's translation of 503 / SlowDown / 409
        getattr(_errno, "EREMOTEIO", _errno.EIO),  # s3fs's translation of 500
    }
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long to keep retrying one request: ``timeout`` seconds in all, at most."""

    timeout: float = 60.0
    initial: float = 0.1
    maximum: float = 5.0

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """Full-jitter exponential backoff: uniform(0, min(maximum, initial * 2**n))."""
        rng = rng or random.Random()
        cap = self.initial
        while True:
            yield rng.uniform(0.0, cap)
            cap = min(self.maximum, cap * 2)


@dataclass(frozen=True, slots=True)
class Failure:
    """What an exception from a backend means for us."""

    status: str  # "HTTP 503 SlowDown", "ConnectionResetError", ... (no credentials)
    transient: bool
    http_status: int | None = None
    code: str = ""

    @property
    def missing(self) -> bool:
        return self.http_status == 404 or self.code in ("NoSuchKey", "NoSuchUpload")

    @property
    def denied(self) -> bool:
        return self.http_status == 403 or self.code in ("AccessDenied", "Forbidden")

    @property
    def precondition_failed(self) -> bool:
        return self.http_status == 412 or self.code == "PreconditionFailed"

    @property
    def out_of_range(self) -> bool:
        return self.http_status == 416 or self.code == "InvalidRange"

    @property
    def errno(self) -> int:
        if self.denied:
            return _errno.EACCES
        if self.missing:
            return _errno.ENOENT
        return _errno.EIO


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then its causes/contexts (s3fs wraps botocore's error as the cause)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen and len(seen) < 8:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _http_failure(exc: BaseException) -> Failure | None:
    response: Any = getattr(exc, "response", None)
    if isinstance(response, dict) and ("Error" in response or "ResponseMetadata" in response):
        err = response.get("Error") or {}
        code = str(err.get("Code") or "")
        meta = response.get("ResponseMetadata") or {}
        status = meta.get("HTTPStatusCode")
        if status is None and code.isdigit():
            status = int(code)
        return _from_status(status if isinstance(status, int) else None, code)
    # aiohttp.ClientResponseError (.status), gcsfs HttpError / google errors (.code)
    for attr in ("status", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600 and not isinstance(value, bool):
            return _from_status(value, "")
    return None


def _from_status(status: int | None, code: str) -> Failure:
    transient = code in _TRANSIENT_CODES or (
        status is not None and (status >= 500 or status in (408, 429))
    )
    if status is not None and status in (501, 505):  # not implemented: never changes
        transient = False
    text = " ".join(p for p in ("HTTP" if status else "", str(status or ""), code) if p)
    return Failure(text or "unknown HTTP error", transient, status, code)


def classify(exc: BaseException) -> Failure:
    """Decide whether ``exc`` is worth retrying, and describe it without its message."""
    for e in _chain(exc):
        http = _http_failure(e)
        if http is not None:
            return http
    for e in _chain(exc):
        names = {k.__name__ for k in type(e).__mro__}
        if names & _TRANSIENT_CLASSES:
            return Failure(type(e).__name__, True)
    for e in _chain(exc):
        if isinstance(e, FileNotFoundError):
            return Failure("HTTP 404 not found", False, 404)
        if isinstance(e, PermissionError):
            return Failure("HTTP 403 access denied", False, 403)
        if isinstance(e, ConnectionError | TimeoutError):  # resets, asyncio timeouts
            return Failure(type(e).__name__, True)
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return Failure(f"{type(e).__name__} errno {e.errno}", True)
    return Failure(type(exc).__name__, False)


class Stalled(TimeoutError):
    """One try got no answer, and moved no bytes, until the request's time was up."""


class Progress:
    """When a transfer last moved bytes; one that keeps moving is slow, not stuck."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()


class Breaker:
    """Shortens the budget of a store's requests after one of them gave up on transient
    failures (no answer, or failures, for its whole budget).

    The operation that request belonged to fails anyway; the breaker spares the requests
    behind it (parts waiting for a slot, the cleanup after the failure, the next step of
    the same load), each of which would otherwise wait out a whole budget against the
    same dead endpoint. For the next ``policy.timeout`` seconds a request gets a tenth of
    the budget (at least 1 s): enough for a store that is back to answer, and any answer
    closes the breaker again.
    """

    def __init__(self) -> None:
        self._until = 0.0

    def budget(self, policy: RetryPolicy) -> float:
        if time.monotonic() < self._until:
            return min(policy.timeout, max(1.0, policy.timeout / 10))
        return policy.timeout

    def trip(self, policy: RetryPolicy) -> None:
        self._until = time.monotonic() + policy.timeout

    def reset(self) -> None:
        self._until = 0.0


@dataclass
class Attempts:
    """What a retried operation went through; used to word the final error."""

    count: int = 0
    started: float = 0.0
    budget: float = 0.0  # seconds it was given; less than the policy's behind a Breaker

    def start(self, policy: RetryPolicy, breaker: Breaker | None) -> float:
        """Begin; returns the deadline."""
        self.started = time.monotonic()
        self.budget = policy.timeout if breaker is None else breaker.budget(policy)
        return self.started + self.budget

    def summary(self) -> str:
        if self.count <= 1:
            return ""
        return f"; gave up after {self.count} attempts in {time.monotonic() - self.started:.1f} s"


def retry_sync(
    op: Callable[[], T],
    policy: RetryPolicy,
    attempts: Attempts | None = None,
    *,
    retry_if: Callable[[BaseException], bool] | None = None,
    breaker: Breaker | None = None,
) -> T:
    """Call ``op`` until it succeeds, fails permanently, or the policy's time is up.

    A synchronous call cannot be interrupted: its own timeouts bound each try.
    """
    attempts = attempts or Attempts()
    deadline = attempts.start(policy, breaker)
    delays = policy.delays()
    while True:
        attempts.count += 1
        try:
            result = op()
        except Exception as exc:
            delay = next(delays)
            if _give_up(exc, retry_if, deadline, delay, policy, breaker):
                raise
        else:
            if breaker is not None:
                breaker.reset()
            return result
        time.sleep(delay)


async def retry_async(
    op: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    attempts: Attempts | None = None,
    *,
    retry_if: Callable[[BaseException], bool] | None = None,
    breaker: Breaker | None = None,
    progress: Progress | None = None,
) -> T:
    """The coroutine twin of :func:`retry_sync`; ``op`` makes a fresh awaitable per try.

    Each try is cancelled when the time is up, unless ``progress`` (touched by the
    transfer as it moves bytes) shows it moved within that many seconds: then it runs
    until it stalls that long, so a large object on a slow link is not cut off while it
    is still arriving.
    """
    attempts = attempts or Attempts()
    deadline = attempts.start(policy, breaker)
    delays = policy.delays()
    while True:
        attempts.count += 1
        try:
            result = await _bounded(op(), deadline, progress, attempts.budget)
        except Exception as exc:
            delay = next(delays)
            if _give_up(exc, retry_if, deadline, delay, policy, breaker):
                raise
        else:
            if breaker is not None:
                breaker.reset()
            return result
        await asyncio.sleep(delay)


async def _bounded(
    aw: Awaitable[T], deadline: float, progress: Progress | None, window: float
) -> T:
    """``aw``, cancelled (with the request it makes) once it is past ``deadline`` and,
    with ``progress``, has not moved a byte for ``window`` seconds."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            limit = deadline if progress is None else max(deadline, progress.last + window)
            left = limit - time.monotonic()
            if left <= 0:
                raise Stalled("no answer in time")
            done, _ = await asyncio.wait((task,), timeout=left)
            if done:
                return task.result()
    finally:
        if not task.done():
            task.cancel()
            # Let it unwind (its connection closed) before the caller moves on; a task
            # that ignores cancellation is left to finish on its own.
            await asyncio.wait((task,), timeout=1.0)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: asyncio would log it as never retrieved


def _give_up(
    exc: BaseException,
    retry_if: Callable[[BaseException], bool] | None,
    deadline: float,
    delay: float,
    policy: RetryPolicy,
    breaker: Breaker | None,
) -> bool:
    if not _should_retry(exc, retry_if):
        return True
    if time.monotonic() + delay <= deadline:
        return False
    if breaker is not None:  # out of time on transient failures: the store is down
        breaker.trip(policy)
    return True


def _should_retry(exc: BaseException, retry_if: Callable[[BaseException], bool] | None) -> bool:
    if isinstance(exc, CheckpointError):  # our own verdicts (truncation, ...) are final
        return False
    if retry_if is not None:
        return retry_if(exc)
    return classify(exc).transient


# -- describing failures without secrets ---------------------------------------------------
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@?#\s]*@")
_SECRET_OPTION = re.compile(r"key|secret|token|password|passwd|credential|sas|signature", re.I)


def redact_url(text: str) -> str:
    """``text`` with the ``user:pass@`` of every URL in it removed."""
    return _USERINFO.sub(r"\1", text)


def secret_values(options: Mapping[str, Any]) -> list[str]:
    """String values of options that look like credentials, at any depth."""
    out: list[str] = []
    for k, v in options.items():
        if isinstance(v, Mapping):
            out.extend(secret_values(v))
        elif isinstance(v, str) and len(v) >= 4 and _SECRET_OPTION.search(str(k)):
            out.append(v)
    return out


def scrub(text: str, secrets: Sequence[str]) -> str:
    text = redact_url(text)
    for s in secrets:
        text = text.replace(s, "***")
    return text


def describe(
    action: str,
    url: str,
    exc: BaseException,
    attempts: Attempts | None,
    *,
    secrets: Sequence[str],
    retry_timeout: float,
) -> CheckpointError:
    """``exc`` as a StorageError naming the object and the status; never a credential."""
    if isinstance(exc, CheckpointError):
        return exc
    tries = attempts.summary() if attempts is not None else ""
    if any(isinstance(e, Stalled) for e in _chain(exc)):
        budget = f'storage_options["dckpt"]["retry_timeout"] ({retry_timeout:g} s)'
        if attempts is not None and 0 < attempts.budget < retry_timeout:
            budget = (
                f"{attempts.budget:g} s (shortened: another request to it had just waited "
                f"out the whole {budget})"
            )
        return StorageError(
            f"{action} {url} failed: the store did not answer within {budget}{tries}; check "
            "that it is up and reachable, or raise the budget for a slow one",
            errno=_errno.ETIMEDOUT,
        )
    f = classify(exc)
    detail = ""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            detail = str((response.get("Error") or {}).get("Message") or "")
            break
    else:
        lines = str(exc).strip().splitlines()
        detail = lines[0] if lines and lines[0] != type(exc).__name__ else ""
    what = f.status + (f" ({scrub(detail[:200], secrets)})" if detail else "")
    hint = ""
    if f.denied:
        hint = "; check the credentials and the permissions on the bucket"
    elif f.code == "NoSuchBucket":
        hint = "; the bucket does not exist"
    elif f.transient:
        hint = (
            f'; retried for up to {retry_timeout:g} s (storage_options["dckpt"]'
            '["retry_timeout"] waits longer)'
        )
    return StorageError(f"{action} {url} failed: {what}{tries}{hint}", errno=f.errno)
