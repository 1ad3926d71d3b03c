"""``async_save``: snapshot now, write and commit in the background.

The call blocks for the staging copy only. The write runs on one background thread per
process: measured with ``bench/bench_writer.py``, a writer thread slows training compute
no more than a writer process (writes and checksums release the GIL), and it needs no
shared-memory copy of the state or inter-process protocol.
Coordination goes through the c10d store under its own namespace, never through the
training's process-group collectives, so it cannot deadlock with them.

A save still running when the interpreter exits normally (end of the script,
``sys.exit``, an uncaught exception) is finished first, on every rank; if it fails, the
error is printed and the process exits with status 1. See :func:`_install_exit_hooks`
for why the wait runs where it does.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (registers its exit hook before ours: see below)
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, NoReturn

from dckpt._args import check_int, check_save, check_state
from dckpt._coord import DEFAULT_TIMEOUT, Coordinator, LocalCoordinator, coordinator_for
from dckpt._errors import CheckpointError, CheckpointTimeoutError
from dckpt._gc import paused_gc
from dckpt._save import (
    SaveOptions,
    Staged,
    _cache_for,
    _PlanCache,
    run_save,
    stage,
    staging_sources,
)
from dckpt._staging import StagingPool
from dckpt.storage._base import Storage, open_storage

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
    check_state(state)
    check_int("staging_bytes", staging_bytes, minimum=1, optional=True)
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
    check_save(
        state=state,
        path=path,
        process_group=process_group,
        timeout=timeout,
        storage_options=storage_options,
        allow_pickle=allow_pickle,
        overwrite=overwrite,
        durable=durable,
    )
    check_int("staging_bytes", staging_bytes, minimum=1, optional=True)
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
        future = _saver.submit(lambda: _save_job(coord, storage, prepare, options, cache))
        handle = AsyncSaveHandle(future, str(storage.location))
        _saver.inflight = handle
        if error is not None:
            # The other ranks learn of it through the background exchange; this rank now.
            handle._observed = True
            raise error
        return handle


# ----------------------------------------------------------------------------- the job


_BYE = "bye"  # under the save's own store prefix, beside the coordinator's numbered keys


def _save_job(
    coord: Coordinator | LocalCoordinator,
    storage: Storage,
    prepare: Callable[[], Staged],
    options: SaveOptions,
    cache: _PlanCache,
) -> None:
    error: BaseException | None = None
    try:
        run_save(coord, storage, prepare, options, cache)
    except BaseException as exc:
        error = exc
        raise
    finally:
        if isinstance(coord, Coordinator):
            _farewell(coord, error)


def _farewell(coord: Coordinator, error: BaseException | None) -> None:
    """Rank 0's save ends only once every other rank is done with the store.

    Under ``init_process_group`` the store's server lives in rank 0's process. Rank 0's
    part of a save ends when it publishes the commit's outcome, which the other ranks
    read afterwards; a rank 0 that exits then (at exit it waits for its own save only)
    takes the server along, and a rank still reading loses the store mid-save: at best it
    learns from storage that the save committed, and a failed save's real error is lost.
    So the other ranks say goodbye once their save is over, and rank 0 waits for that
    here, on the writer thread: training does not wait, and rank 0's exit waits no longer
    than the slowest rank's last store round trip.
    """
    if isinstance(error, CheckpointTimeoutError):
        return  # a rank is missing or the store is gone: some goodbyes never come
    keys = [f"{_BYE}/{r}" for r in range(1, coord.world_size)]
    try:
        kv = coord._store()  # the save's own connection and key prefix
        if coord.rank != 0:
            kv.set(keys[coord.rank - 1], b"")
            return
        if not kv.wait(keys, coord.timeout):
            _log.warning(
                "async save: not every rank confirmed the end of the save within %.0f s "
                "(a rank may have died after it)",
                coord.timeout,
            )
        for key in keys:
            kv.delete(key)
    except Exception as exc:  # the save's own outcome stands; this is housekeeping
        _log.debug("async save: the end-of-save handshake failed: %r", exc)


# ----------------------------------------------------------------------------- exit


_exit_status: int | None = None  # set when a save failed at exit


def _wait_at_exit() -> None:
    """Finish the save in flight (and a staging reservation) before the process exits.

    Instant when nothing is in flight. A failure nobody has seen yet is printed and makes
    the process exit with status 1 (see :func:`_exit_if_failed`).
    """
    global _exit_status
    saver = _saver
    handle, reserving = saver.inflight, saver.reserving
    if handle is None and reserving is None:
        return
    try:
        if reserving is not None:
            reserving.result()  # never raises: reserve() logs its failures
        if handle is not None:
            handle._future.result()
    except KeyboardInterrupt:
        # An interrupt while waiting at exit means "stop now": the writer thread would
        # otherwise be joined anyway by the executors' own exit hook.
        where = "" if handle is None else f" to {handle.path}"
        _print(
            f"dckpt: interrupted while waiting for the async save{where} at exit; it was "
            "abandoned (a checkpoint committed earlier at that path stays intact)\n"
        )
        _leave(130)
    except BaseException as exc:
        if handle is None or handle._observed:
            return  # result() already raised it to someone
        handle._observed = True
        text = "".join(traceback.format_exception(exc))
        _print(
            f"dckpt: the async save to {handle.path} failed while the process was exiting and "
            "was not committed (a checkpoint committed earlier at that path stays intact):\n"
            f"{text}"
        )
        _exit_status = 1


def _exit_if_failed() -> None:
    if _exit_status is not None:
        _leave(_exit_status)


def _print(text: str) -> None:
    stream = sys.stderr
    if stream is not None:
        try:
            stream.write(text)
            stream.flush()
        except Exception:
            pass  # stderr closed or broken: the exit status still tells


def _leave(status: int) -> NoReturn:
    """End the process now with ``status``, after flushing what would be lost.

    By the time exit hooks run, Python has fixed the exit status: a ``SystemExit`` raised
    from a hook is printed and ignored. ``os._exit`` is the one way to report failure
    through the status; it skips the exit handlers registered before dckpt was imported
    and the interpreter's final teardown, so the few things those would do that matter
    (log handlers, stdio buffers, daemonic child processes) are done here.
    """
    try:
        logging.shutdown()
        mp = sys.modules.get("multiprocessing")
        if mp is not None:
            for child in mp.active_children():
                if child.daemon:
                    child.terminate()
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except Exception:
        pass  # best effort: the status matters more
    os._exit(status)


def _forget_after_fork() -> None:
    # A forked child has none of its parent's threads, so the parent's save in flight can
    # never finish there: the child must not wait for it at exit (nor reuse the executor).
    global _saver, _exit_status
    _saver = _Saver()
    _exit_status = None


def _install_exit_hooks() -> None:
    """Register the exit wait where the writer's thread pools still accept work.

    At exit Python first runs ``threading._shutdown``: it calls the hooks registered
    with ``threading._register_atexit``, newest first, then joins non-daemon threads; only
    then does it run ``atexit`` handlers. ``concurrent.futures.thread`` registers such a
    hook when imported (above, before this runs), and after that hook every
    ``ThreadPoolExecutor.submit`` raises "cannot schedule new futures after interpreter
    shutdown" -- the writer makes new pools for each save, so an ``atexit`` wait would
    see the save fail. Ours is registered after it, so it runs before it. Without the
    private hook (another Python), ``atexit`` is the best left: it still waits, and
    reports a save that fails there.

    The exit status is set from an ``atexit`` handler registered first, so it runs after
    the wait and after handlers registered later (the user's); see :func:`_leave`.
    """
    atexit.register(_exit_if_failed)
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError("no threading._register_atexit")
        register(_wait_at_exit)
    except RuntimeError:  # also raised once shutdown has begun
        atexit.register(_wait_at_exit)  # runs before _exit_if_failed: atexit is LIFO
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_forget_after_fork)


_install_exit_hooks()
