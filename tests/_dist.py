"""Multi-rank test harness: real gloo process groups on the CPU, reused across tests.

``RankPool(n)`` starts n spawned workers once (each imports torch and joins a gloo group),
then runs many tasks: ``pool.run(fn, *args)`` calls the module-level ``fn`` on every rank
and returns the per-rank results.  A task finds its rank with ``dist.get_rank()``.
``run_fresh`` starts a one-off group for tests that kill ranks or break the group, and
reports what happened to each rank instead of raising.

A pool never outlives a hang: a task past its timeout, or a dead worker, kills every
worker (after dumping their stacks into the error), and the next ``run`` starts afresh.
Workers also exit when the parent does (interpreter exit, or even SIGKILL).
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import Any

from tests import _worker

START_TIMEOUT = 120.0
# Once a rank has failed, the others get this long to finish before the pool is reset.
FAILURE_GRACE = 15.0
_LOG_TAIL = 4000

_task_ids = itertools.count()
_live: set[RankPool] = set()


class RankError(AssertionError):
    """One or more ranks failed a task; the message holds their tracebacks and output."""

    def __init__(self, message: str, outcomes: list[Outcome] | None = None) -> None:
        super().__init__(message)
        self.outcomes = outcomes or []


class RankTimeoutError(RankError):
    """A task did not finish in time (or a worker died); the pool was killed."""


@dataclass(frozen=True)
class Outcome:
    """What happened to one rank in a task."""

    rank: int
    ok: bool
    value: Any = None
    error_text: str = ""
    exitcode: int | None = None  # set when the worker process died (-9: SIGKILL)
    timed_out: bool = False


class RankPool:
    """``world_size`` worker processes in one gloo group, started on first use."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        self._logdir = ""

    @property
    def started(self) -> bool:
        return bool(self._procs)

    def run(
        self, fn: Callable[..., Any], *args: Any, timeout: float = 60.0, **kwargs: Any
    ) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order."""
        outcomes, broken = self._run(fn, args, kwargs, timeout, grace=FAILURE_GRACE)
        if broken:
            self.close()
        failed = [o for o in outcomes if not o.ok]
        if failed:
            cls = RankTimeoutError if broken else RankError
            raise cls(_report(fn, failed, self.world_size, broken), outcomes)
        return [o.value for o in outcomes]

    def start(self) -> None:
        if self.started:
            return
        ctx = _context()
        self._logdir = tempfile.mkdtemp(prefix=f"dckpt-ranks{self.world_size}-")
        _live.add(self)
        for rank in range(self.world_size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(
                target=_worker.main,
                args=(rank, self.world_size, child_end, self._log_path(rank), dict(os.environ)),
                name=f"dckpt-rank{rank}",
                daemon=True,
            )
            proc.start()
            child_end.close()
            self._procs.append(proc)
            self._conns.append(parent_end)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            _, port = self._expect(0, "port", deadline)
            for conn in self._conns[1:]:
                conn.send(("port", port))
            for rank in range(self.world_size):
                self._expect(rank, "ready", deadline)
        except BaseException as exc:
            tails = "\n".join(
                f"--- rank {r} output ---\n{self._tail(r, 0)}" for r in range(self.world_size)
            )
            self.close()
            raise RankTimeoutError(
                f"starting {self.world_size} ranks failed: {exc}\n{tails}"
            ) from exc

    def close(self) -> None:
        """Kill every worker (no graceful path: a broken group can hang on the way out)."""
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(10)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        if self._logdir:
            shutil.rmtree(self._logdir, ignore_errors=True)
            self._logdir = ""
        _live.discard(self)

    # -- internals --------------------------------------------------------------------

    def _log_path(self, rank: int) -> str:
        return os.path.join(self._logdir, f"rank{rank}.log")

    def _tail(self, rank: int, offset: int) -> str:
        try:
            with open(self._log_path(rank), errors="replace") as f:
                f.seek(offset)
                text = f.read()
        except OSError:
            return ""
        return text[-_LOG_TAIL:]

    def _expect(self, rank: int, kind: str, deadline: float) -> tuple[Any, ...]:
        conn, proc = self._conns[rank], self._procs[rank]
        while not conn.poll(0):
            if not proc.is_alive():
                raise RuntimeError(f"rank {rank} exited with code {proc.exitcode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank} sent no {kind!r} in {START_TIMEOUT:.0f} s")
            wait([conn, proc.sentinel], timeout=0.5)
        message: tuple[Any, ...] = conn.recv()
        if message[0] != kind:
            raise RuntimeError(f"rank {rank} sent {message[0]!r}, expected {kind!r}")
        return message

    def _run(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float,
        *,
        grace: float | None,
    ) -> tuple[list[Outcome], bool]:
        """Run one task; return the outcomes and whether the pool must be killed."""
        module, qualname = fn.__module__, fn.__qualname__
        if "<locals>" in qualname or module == "__main__":
            raise TypeError(f"{qualname} must be a module-level function of an importable module")
        self.start()
        task_id = f"t{os.getpid()}.{next(_task_ids)}"
        offsets = [_size(self._log_path(r)) for r in range(self.world_size)]
        for conn in self._conns:
            conn.send(("task", task_id, module, qualname, args, kwargs, dict(os.environ)))
        results: dict[int, Outcome] = {}
        deadline = time.monotonic() + timeout
        while len(results) < self.world_size:
            pending = [r for r in range(self.world_size) if r not in results]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready = wait(
                [self._conns[r] for r in pending] + [self._procs[r].sentinel for r in pending],
                timeout=remaining,
            )
            for r in pending:
                if self._conns[r] in ready or self._conns[r].poll(0):
                    results[r] = self._receive(r, task_id, offsets[r])
                elif self._procs[r].sentinel in ready:
                    results[r] = self._died(r, offsets[r])
            if grace is not None and any(not o.ok for o in results.values()):
                deadline = min(deadline, time.monotonic() + grace)
        hung = [r for r in range(self.world_size) if r not in results]
        if hung:
            self._dump_stacks(hung)
        for r in hung:
            tail = self._tail(r, offsets[r])
            text = f"did not finish within the timeout; stacks and output:\n{tail}"
            results[r] = Outcome(r, False, error_text=text, timed_out=True)
        broken = bool(hung) or any(o.exitcode is not None for o in results.values())
        return [results[r] for r in range(self.world_size)], broken

    def _receive(self, rank: int, task_id: str, offset: int) -> Outcome:
        try:
            _, got_id, ok, value, error = self._conns[rank].recv()
        except (EOFError, OSError):
            return self._died(rank, offset)
        assert got_id == task_id, f"rank {rank} answered task {got_id}, expected {task_id}"
        if ok:
            return Outcome(rank, True, value)
        return Outcome(
            rank, False, error_text=f"{error}\n--- output ---\n{self._tail(rank, offset)}"
        )

    def _died(self, rank: int, offset: int) -> Outcome:
        # The sentinel and the pipe close a moment before the process can be reaped.
        self._procs[rank].join(5)
        code = self._procs[rank].exitcode
        text = f"worker died (exit code {code})\n{self._tail(rank, offset)}"
        return Outcome(rank, False, error_text=text, exitcode=code)

    def _dump_stacks(self, ranks: list[int]) -> None:
        for r in ranks:
            pid = self._procs[r].pid
            if self._procs[r].is_alive() and pid is not None:
                os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)  # let faulthandler write


# Imported lazily by torch on a process's first DeviceMesh / DTensor.from_local (torch._dynamo
# pulls torch._inductor and triton): about 1 s of CPU in every fresh rank, which the fault
# matrices' hundreds of fresh groups paid again and again. Not imported by dckpt itself.
_HEAVY_LAZY = ("torch._dynamo",)
_PRELOAD = ("torch", "torch.distributed", "torch.distributed.tensor", "dckpt", "tests._worker")


def _context() -> ForkServerContext:
    """Fork workers from a clean server process that has already imported torch.

    Not ``fork`` (the pytest process has threads and state), and not plain ``spawn``: a
    spawned worker pays the torch import (~2 s of CPU) every time, the forkserver once.
    Workers take the test process's environment at start and again with every task, so
    a fixture's ``setenv`` reaches them even when the pool was started before it.
    """
    ctx = get_context("forkserver")
    assert isinstance(ctx, ForkServerContext)
    ctx.set_forkserver_preload([*_PRELOAD, *_HEAVY_LAZY])
    return ctx


def run_fresh(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 60.0, **kwargs: Any
) -> list[Outcome]:
    """Run ``fn`` once in a new group that is torn down afterwards; never raises for ranks.

    For tests that SIGKILL a rank or otherwise break the group.  A rank that dies shows its
    exit code (-9 for SIGKILL); ranks still running at the timeout are killed and reported
    with ``timed_out=True``.
    """
    pool = RankPool(world_size)
    try:
        outcomes, _ = pool._run(fn, args, kwargs, timeout, grace=None)
        return outcomes
    finally:
        pool.close()


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _report(fn: Callable[..., Any], failed: list[Outcome], world_size: int, broken: bool) -> str:
    name = f"{fn.__module__}.{fn.__qualname__}"
    ranks = ", ".join(str(o.rank) for o in failed)
    lines = [f"{name} failed on rank(s) {ranks} of {world_size}"]
    if broken:
        lines[0] += " (hung or died: the pool was killed and will restart)"
    for o in failed:
        lines.append(f"--- rank {o.rank} ---\n{o.error_text.rstrip()}")
    return "\n".join(lines)


_pools: dict[int, RankPool] = {}


def get_pool(world_size: int) -> RankPool:
    """The session's shared pool of ``world_size`` ranks (started on first use)."""
    if world_size not in _pools:
        _pools[world_size] = RankPool(world_size)
    return _pools[world_size]


def close_all() -> None:
    for pool in list(_live):
        pool.close()
    _pools.clear()


atexit.register(close_all)
