"""Support for :mod:`dckpt.storage._fsspec`: dckpt's own options, the backend for a protocol, the
tuned S3 instances shared by a process's storages, and planning and reading GETs."""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from dckpt._errors import CheckpointError
from dckpt.storage._retry import Breaker, Progress

_MiB = 1 << 20
_READ_CHUNK = 1 * _MiB  # a response body is read in pieces this big, marking progress
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
    multipart upload in parts of ``part_size``. ``retry_timeout`` bounds the time one
    request may take, retries included (a transfer still moving bytes runs on until it
    stalls that long); ``coalesce_gap`` merges planned reads that close into one GET.
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


def filesystem_class(protocol: str) -> Any:
    import fsspec  # lazy: fsspec is heavy, and only URLs need it

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


def accepts(cls: type, param: str) -> bool:
    try:
        return param in inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    except (TypeError, ValueError):
        return False


_instances: dict[str, Any] = {}
_instances_lock = threading.Lock()


def breaker_of(fs: Any) -> Breaker:
    """The filesystem's :class:`Breaker`: a store that stopped answering one storage has
    stopped answering the next one too (a load opens two, say)."""
    with _instances_lock:
        breaker = getattr(fs, "_dckpt_breaker", None)
        if not isinstance(breaker, Breaker):
            breaker = Breaker()
            with contextlib.suppress(AttributeError):  # a class with __slots__
                fs._dckpt_breaker = breaker
        return breaker


def filesystem(cls: type, kwargs: dict[str, Any], opts: FsspecOptions) -> Any:
    """A filesystem for ``kwargs``, shared by this process's storages (connection reuse).

    S3 instances are our own (not in fsspec's shared cache) because we tune them: neither
    botocore nor s3fs retries (we do, within our time budget, rewinding the body each
    time; s3fs's retries would re-send a consumed body stream: an empty one), botocore's
    connect and read timeouts never exceed the budget, the connection pool fits our
    concurrency, and listings are never cached (other ranks write behind our back).
    """
    if not (hasattr(cls, "_call_s3") and hasattr(cls, "split_path")):
        return cls(**kwargs)
    from fsspec.utils import tokenize  # lazy: fsspec is heavy, and only URLs need it

    config = dict(kwargs.get("config_kwargs") or {})
    config["retries"] = dict(config.get("retries") or {"mode": "standard", "total_max_attempts": 1})
    for timeout, default in (("connect_timeout", 5.0), ("read_timeout", 15.0)):
        given = config.get(timeout, getattr(cls, timeout, default))
        config[timeout] = min(float(given), opts.retry_timeout)
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


# -- reads ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Get:
    """One ranged GET and the caller buffers it fills."""

    start: int
    end: int
    parts: tuple[tuple[int, memoryview], ...]


def plan_gets(ranges: Sequence[tuple[int, int, memoryview]], part_size: int, gap: int) -> list[Get]:
    """Split ranges over ``part_size`` into pieces; merge neighbours closer than ``gap``."""
    pieces = sorted(
        (
            (lo, min(end, lo + part_size), view[lo - start : min(end, lo + part_size) - start])
            for start, end, view in ranges
            for lo in range(start, end, part_size)
        ),
        key=lambda p: p[0],
    )
    out: list[Get] = []
    cur: list[tuple[int, memoryview]] = []
    c0 = c1 = 0
    for lo, hi, view in pieces:
        if cur and lo - c1 <= gap and max(c1, hi) - c0 <= part_size:
            cur.append((lo, view))
            c1 = max(c1, hi)
            continue
        if cur:
            out.append(Get(c0, c1, tuple(cur)))
        cur, c0, c1 = [(lo, view)], lo, hi
    if cur:
        out.append(Get(c0, c1, tuple(cur)))
    return out


async def read_body(body: Any, limit: int, progress: Progress) -> bytes:
    """A response body read to its end, or to one byte past ``limit`` if it is longer;
    each piece marks ``progress``, so a slow download is not taken for a stuck one."""
    pieces: list[bytes] = []
    total = 0
    while total <= limit:
        piece = await body.read(min(_READ_CHUNK, limit + 1 - total))
        if not piece:
            break
        pieces.append(piece)
        total += len(piece)
        progress.touch()
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)
