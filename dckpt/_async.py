"""``async_save``: snapshot now, write and commit in the background.

The call blocks for the staging copy only. The write runs on one background thread per
process: measured with ``bench/bench_writer.py``, a writer thread slows training compute
no more than a writer process (writes and checksums release the GIL), and it needs no
shared-memory copy of the state or inter-process protocol.
Coordination goes through the c10d store under its own namespace, never through the
training's process-group collectives, so it cannot deadlock with them.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from dckpt._coord import DEFAULT_TIMEOUT, coordinator_for
from dckpt._errors import CheckpointError, CheckpointTimeoutError
from dckpt._gc import paused_gc
from dckpt._save import SaveOptions, Staged, _cache_for, run_save, stage, staging_sources
from dckpt._staging import StagingPool
from dckpt._storage import open_storage

_log = logging.getLogger("dckpt")


class AsyncSaveHandle:
    """The future of one ``async_save``: ``result()`` waits for its commit."""

    def __init__(self, future: Future[None], path: str) -> None:
        self._future = future
        self.path = path
        self._observed = False

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> None:
        """Wait for the commit; re-raises the save's error (the original exception)."""
        try:
            self._future.result(timeout)
        except CheckpointError:
            raise  # the save's own error (a CheckpointTimeoutError is a TimeoutError too)
        except FutureTimeout:
            raise CheckpointTimeoutError(
                f"async save to {self.path} did not finish within {timeout} s"
            ) from None
        finally:
            if self._future.done():
                self._observed = True

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"<AsyncSaveHandle {self.path} {state}>"


class _Saver:
    """Per-process: one background writer, one staging pool, the save in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.executor: ThreadPoolExecutor | None = None
        self.pool = StagingPool()
        self.inflight: AsyncSaveHandle | None = None
        self.reserving: Future[None] | None = None  # a prepare_async_save in progress

    def submit(self, fn: Any) -> Future[None]:
        if self.executor is None:
            self.executor = ThreadPoolExecutor(1, thread_name_prefix="dckpt-async")
        return self.executor.submit(fn)


_saver = _Saver()


def drain() -> None:
    """Wait for the save in flight; raise its error if nobody has seen it yet."""
    handle = _saver.inflight
    if handle is None:
        return
    try:
        handle._future.result()
    except BaseException:
        if not handle._observed:
            handle._observed = True
            _saver.inflight = None
            raise
    _saver.inflight = None


def wait() -> None:
    """Wait for every async save of this process to commit (also run at interpreter exit),
    and for a :func:`prepare_async_save` in progress."""
    drain()
    reserving, _saver.reserving = _saver.reserving, None
    if reserving is not None:
        reserving.result()  # its failures are logged there, not raised


def prepare_async_save(state: Mapping[str, Any], *, staging_bytes: int | None = None) -> None:
    """Reserve, in the background, the host buffers an ``async_save`` of ``state`` stages into.

    The first ``async_save`` of a process otherwise pays for fresh memory while training
    waits: first-touch page faults for CPU state (several times the copy itself), page
    locking for GPU state. Call this once the state exists, e.g. after the first step or a
    resume (optimizers without state yet are left out, never stepped), and the first save
    blocks for one warm copy. Local to this process, not collective; returns at once, and
    :func:`wait` waits for it. A ``CheckpointManager(async_save=True)`` calls it in ``load``.
    """
    with _saver.lock:
        if staging_bytes is not None:
            _saver.pool.capacity = staging_bytes
        with paused_gc():
            sources = staging_sources(state)
        _saver.pool.check(sources)

        def reserve() -> None:
            try:
                _saver.pool.reserve(sources)
            except Exception as exc:  # not fatal: the first save allocates its own buffers
                _log.warning("reserving staging memory for async saves failed: %s", exc)

        _saver.reserving = _saver.submit(reserve)


def async_save(
    state: Mapping[str, Any],
    path: Any,
    *,
    process_group: Any = None,
    overwrite: bool = False,
    durable: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    allow_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
    staging_bytes: int | None = None,
) -> AsyncSaveHandle:
    """Snapshot ``state`` into reusable host buffers and save it in the background.

    Collective like :func:`dckpt.save`. When it returns, every tensor may be modified:
    the checkpoint holds the values at the call. At most one save is in flight per
    process: a new call first waits for the previous one's commit.
    """
    with _saver.lock:
        drain()
        if staging_bytes is not None:
            _saver.pool.capacity = staging_bytes
        coord = coordinator_for(process_group, timeout=timeout, namespace="async")
        storage = open_storage(path, storage_options)
        error: BaseException | None = None
        staged: Staged | None = None
        try:
            with paused_gc():
                s = stage(state, coord.rank, allow_pickle=allow_pickle)
                staged = Staged(s.offer, _saver.pool.stage(s.sources))
        except BaseException as exc:
            error = exc

        def prepare() -> Staged:
            if error is not None:
                raise error
            assert staged is not None
            return staged

        options = SaveOptions(overwrite=overwrite, durable=durable)
        cache = _cache_for("async", process_group)
        future = _saver.submit(lambda: run_save(coord, storage, prepare, options, cache))
        handle = AsyncSaveHandle(future, str(storage.location))
        _saver.inflight = handle
        if error is not None:
            # The other ranks learn of it through the background exchange; this rank now.
            handle._observed = True
            raise error
        return handle


@atexit.register
def _wait_at_exit() -> None:
    handle = _saver.inflight
    if handle is not None:
        # A failure was reported by result(), or is lost with the process anyway.
        with contextlib.suppress(BaseException):
            handle._future.result()
