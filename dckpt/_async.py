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
import functools
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from dckpt._args import check_int, check_state
from dckpt._coord import DEFAULT_TIMEOUT, Coordinator, LocalCoordinator
from dckpt._describe import (
    Captured,
    Description,
    capture,
    describe_captured,
    skeletons_for,
    staging_sources,
)
from dckpt._errors import CheckpointTimeoutError
from dckpt._gc import paused_gc
from dckpt._inflight import AsyncSaveHandle, claim, current, drain, join, track
from dckpt._plancache import PlanCache, cache_for
from dckpt._request import SaveOptions, SaveRequest
from dckpt._save import run_save
from dckpt._staging import ChunkId, StagingPool
from dckpt.storage import Storage

__all__ = ["AsyncSaveHandle", "async_save", "prepare_async_save", "wait"]

_log = logging.getLogger("dckpt")


class _Saver:
    """Per-process: one background writer, one staging pool, a reservation in progress."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.executor: ThreadPoolExecutor | None = None
        self.pool = StagingPool()
        self.reserving: Future[None] | None = None  # a prepare_async_save in progress

    def submit(self, fn: Callable[[], None]) -> Future[None]:
        if self.executor is None:
            self.executor = ThreadPoolExecutor(1, thread_name_prefix="dckpt-async")
        return self.executor.submit(fn)


_saver = _Saver()


def wait() -> None:
    """Wait for this process's async save to commit, and for a staging reservation.

    Local to this process, not collective. Also runs at a normal interpreter exit, where
    a save still writing completes first; a failure there is printed to stderr and makes
    the exit status 1.

    Returns:
        None, once no save or :func:`prepare_async_save` of this process is running.

    Raises:
        CheckpointError: The save in flight failed and no ``AsyncSaveHandle.result()``
            call has raised its error yet (the original error, e.g. ``RankFailureError``).

    Example:
        ```python
        dckpt.async_save(state, "ckpt/step-300")
        dckpt.wait()  # committed (or raised) here
        ```
    """
    drain()
    reserving, _saver.reserving = _saver.reserving, None
    if reserving is not None:
        reserving.result()  # its failures are logged there, not raised


def prepare_async_save(state: Mapping[str, Any], *, staging_bytes: int | None = None) -> None:
    """Reserve, in the background, the host buffers an ``async_save`` of ``state`` stages into.

    The first ``async_save`` of a process otherwise pays for fresh memory while training
    waits: first-touch page faults for CPU state, page locking for GPU state. Call this
    once the state exists (after the first step or a resume; optimizers without state
    yet are left out, never stepped) and the first save blocks for one warm copy. Local
    to this process, not collective; returns at once. ``CheckpointManager(async_save=True)``
    calls it in ``load``.

    Args:
        state: The state later ``async_save`` calls will save.
        staging_bytes: The most host memory staging may use, in bytes, from now on in
            this process; None keeps the current limit (none at first).

    Returns:
        None at once; :func:`wait` waits for the reservation (whose failures are logged).

    Raises:
        ArgumentError: An argument is invalid (``ArgumentTypeError``: of the wrong type).
        UnsupportedStateError: A tensor cannot be saved; the message names its key.
        CheckpointError: ``state`` needs more staging memory than the limit.

    Example:
        ```python
        dckpt.load(state, "ckpt/step-1000")
        dckpt.prepare_async_save(state)
        ```
    """
    check_state(state)
    check_int("staging_bytes", staging_bytes, minimum=1, optional=True)
    with _saver.lock:
        if staging_bytes is not None:
            _saver.pool.capacity = staging_bytes
        with paused_gc():
            sources = staging_sources(state)
        _saver.pool.check(sources)
        _saver.reserving = _saver.submit(functools.partial(_reserve, sources))


def _reserve(sources: Mapping[ChunkId, torch.Tensor]) -> None:
    try:
        _saver.pool.reserve(sources)
    except Exception as exc:  # not fatal: the first save allocates its own buffers
        _log.warning("reserving staging memory for async saves failed: %s", exc)


def async_save(
    state: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    process_group: dist.ProcessGroup | None = None,
    overwrite: bool = False,
    durable: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    allow_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
    staging_bytes: int | None = None,
) -> AsyncSaveHandle:
    """Snapshot ``state`` into reusable host buffers and save it in the background.

    Collective like :func:`dckpt.save`. It blocks for the copy to host only: when it
    returns, every tensor may be modified; the checkpoint holds the values at the call.
    One save is in flight per process: a new one first waits for its commit.

    Args:
        state: A dict of what to save; keys may differ between ranks.
        path: A local directory, or a URL (``s3://bucket/run/step-100``, ``memory://x``).
        process_group: The ranks saving together; None: the default group, or this process.
        overwrite: Replace a checkpoint committed at ``path``.
        durable: fsync data and manifest before the commit; False for scratch checkpoints.
        timeout: Seconds each collective step waits for the other ranks.
        allow_pickle: Store values JSON cannot hold by pickling them.
        storage_options: Options for an fsspec URL's filesystem; dckpt's own under "dckpt".
        staging_bytes: Cap on staging memory in bytes, kept for later calls; None: unchanged.

    Returns:
        The handle of the save: ``result()`` waits for its commit and raises its error.

    Raises:
        ArgumentError: An argument is invalid (``ArgumentTypeError``: of the wrong type).
        UnsupportedStateError: A value cannot be saved; the message names its key.
        CheckpointError: The previous async save failed unseen, or staging needs more
            than ``staging_bytes``; the save's own errors come from ``result()``.

    Example:
        ```python
        handle = dckpt.async_save({"model": model, "optimizer": optim}, "ckpt/step-200")
        handle.result()  # later, e.g. before the next save
        ```
    """
    request = SaveRequest(
        state, path, process_group, overwrite, durable, timeout, allow_pickle, storage_options
    )
    return _start(request, staging_bytes)


def _start(request: SaveRequest, staging_bytes: int | None) -> AsyncSaveHandle:
    check_int("staging_bytes", staging_bytes, minimum=1, optional=True)
    with _saver.lock:
        drain()
        if staging_bytes is not None:
            _saver.pool.capacity = staging_bytes
        coord = request.coordinator("async")
        storage = request.storage()
        snapshot = _snapshot(request, coord.rank)

        options = request.options
        cache = cache_for("async", request.process_group)
        multi = coord.world_size > 1
        memo = skeletons_for(cache) if multi else None

        def prepare() -> Description:
            if isinstance(snapshot, BaseException):
                raise snapshot
            return describe_captured(*snapshot, layouts=True, checksums=multi, memo=memo)

        future = _saver.submit(lambda: _save_job(coord, storage, prepare, options, cache))
        handle = AsyncSaveHandle(future, str(storage.location))
        track(handle)
        if isinstance(snapshot, BaseException):
            # The other ranks learn of it through the background exchange; this rank now.
            claim(handle)
            raise snapshot
        return handle


def _snapshot(
    request: SaveRequest, rank: int
) -> tuple[Captured, dict[ChunkId, torch.Tensor]] | BaseException:
    """This rank's state captured and copied into the staging buffers, or why not; the
    save thread describes it (``prepare``)."""
    try:
        with paused_gc():
            captured = capture(request.state, rank, allow_pickle=request.allow_pickle)
            return captured, _saver.pool.stage(captured.sources)
    except BaseException as exc:
        return exc


# ----------------------------------------------------------------------------- the job


_BYE = "bye"  # under the save's own store prefix, beside the coordinator's numbered keys


def _save_job(
    coord: Coordinator | LocalCoordinator,
    storage: Storage,
    prepare: Callable[[], Description],
    options: SaveOptions,
    cache: PlanCache,
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
    handle, reserving = current(), _saver.reserving
    if handle is None and reserving is None:
        return
    try:
        if reserving is not None:
            reserving.result()  # never raises: reserve() logs its failures
        if handle is not None:
            join(handle)
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
        if handle is None or not claim(handle):
            return  # result() already raised it to someone
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
    # never finish there: the child must not wait for it at exit (nor reuse the executor;
    # dckpt._inflight forgets the save in flight itself).
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
