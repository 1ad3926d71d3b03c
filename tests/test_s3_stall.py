"""An object store that stops answering: saves, loads and commits fail with a clear error
within about ``retry_timeout``, leave no request running, and never damage what was
committed before. Also: ``read_file``'s size limit and the storage fault points on S3.

Each freezing test runs its own moto server in a subprocess (freezing the session's one
would stall the other tests). The server can freeze itself (SIGSTOP) when a chosen request
arrives, so "mid-upload", "at the commit" and "mid-read" need no timing; it is always
continued (SIGCONT) and closed when the test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import dckpt
from dckpt import _faults
from dckpt._errors import CorruptCheckpointError
from dckpt.storage._fsspec import FsspecStorage
from dckpt.storage._retry import Breaker, Progress, RetryPolicy, Stalled, retry_async
from tests._s3 import S3Server, aws_env, moto_process

MiB = 1 << 20
BUDGET = 4.0  # retry_timeout for the freezing tests
SLACK = 20.0  # the bug this guards against took about 46 s with a 10 s budget
OPTS = {
    "part_size": 5 * MiB,
    "multipart_threshold": 5 * MiB,
    "retry_initial": 0.01,
    "retry_timeout": BUDGET,
}

# moto behind a WSGI wrapper that stops the whole process (SIGSTOP) when the armed request
# arrives: GET /__freeze_on__?method=PUT&path=/data/&after=1 arms it for the second PUT whose
# path holds "/data/", which waits until the first one has been answered, then freezes.
# The SIGSTOP is sent to the thread serving that request: sent to the process (kill(getpid))
# it is taken by whichever thread the kernel picks, usually the main one, and until that one
# runs the serving thread goes on and answers the request it should have frozen on.
_SERVER = r"""
import os, signal, sys, threading, urllib.parse
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

app = DomainDispatcherApplication(create_backend_app)
cond = threading.Condition()
trap = {}

def matches(environ):
    return (
        bool(trap)
        and environ["REQUEST_METHOD"] == trap["method"]
        and trap["path"] in environ.get("PATH_INFO", "")
    )

def wrapped(environ, start_response):
    if environ.get("PATH_INFO") == "/__freeze_on__":
        q = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        with cond:
            trap.update(method=q["method"][0], path=q["path"][0], after=int(q["after"][0]))
            trap.update(arrived=0, answered=0)
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]
    hit = False
    with cond:
        if matches(environ):
            trap["arrived"] += 1
            hit = trap["arrived"] == trap["after"] + 1
            if hit:
                cond.wait_for(lambda: trap["answered"] >= trap["after"], timeout=30)
    if hit:
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
    out = app(environ, start_response)
    with cond:
        if matches(environ):
            trap["answered"] += 1
            cond.notify_all()
    return out

server = make_server("127.0.0.1", 0, wrapped, threaded=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(server.server_address[1], flush=True)
sys.stdin.read()
"""


class StallServer(S3Server):
    """A private moto server that the test may freeze."""

    def __init__(self, proc: subprocess.Popen[str], endpoint: str, bucket: str) -> None:
        super().__init__(endpoint, bucket)
        self.proc = proc

    def freeze(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        # The stop reaches the server's threads some time after kill returns; until all
        # have it, one could still answer the next request.
        deadline = time.monotonic() + 30
        while not self.stopped():
            assert time.monotonic() < deadline, "the moto server did not stop on SIGSTOP"
            time.sleep(0.01)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def freeze_on(self, method: str, path: str, *, after: int = 0) -> None:
        """Freeze on the ``after + 1``-th ``method`` request on a path holding ``path``,
        once the ``after`` before it have been answered."""
        q = urllib.parse.urlencode({"method": method, "path": path, "after": after})
        with urllib.request.urlopen(f"{self.endpoint}/__freeze_on__?{q}", timeout=10):
            pass

    def stopped(self) -> bool:
        """Whether every thread of the server is stopped (one that is exiting counts)."""
        tasks = f"/proc/{self.proc.pid}/task"
        for tid in os.listdir(tasks):
            try:
                with open(f"{tasks}/{tid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:  # it ended after the listing
                continue
            if state not in ("T", "Z", "X"):
                return False
        return True


@pytest.fixture
def stall_server() -> Iterator[StallServer]:
    with moto_process(_SERVER) as (proc, endpoint):
        server = StallServer(proc, endpoint, "dckpt-stall")
        try:
            with aws_env(server, endpoint_env=False):
                yield server
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()


def options(server: S3Server) -> dict[str, Any]:
    return {**server.options, "dckpt": OPTS}


def state(value: float) -> dict[str, Any]:
    """About 24 MiB in several objects, one of them a multipart upload."""
    return {
        "big": torch.full((3 * MiB,), value),  # 12 MiB: multipart
        **{f"w{i}": torch.full((MiB // 2,), value + i) for i in range(6)},
        "step": int(value),
    }


def zeros() -> dict[str, Any]:
    return {
        k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in state(0).items()
    }


def assert_state(got: dict[str, Any], value: float) -> None:
    want = state(value)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(got[k], v), k
        else:
            assert got[k] == v, k


def fails_within_budget(
    server: StallServer, url: str, call: Callable[[], object]
) -> BaseException:
    """``call`` against the frozen server fails within the budget with an error naming the
    checkpoint and the budget, and leaves no request or thread running; thaws the server."""
    try:
        before = threads()
        exc, took = timed(call)
        assert server.stopped(), "the call never reached the frozen request"
        assert took < BUDGET + SLACK, f"failed after {took:.1f} s: {exc}"
        assert url in str(exc) and f"{BUDGET:g} s" in str(exc), exc
        nothing_left_running(url, server, before)
        return exc
    finally:
        server.thaw()


def nothing_left_running(storage_url: str, server: S3Server, before: set[threading.Thread]) -> None:
    """No dckpt worker thread started since ``before`` and no request task of ours alive
    (idle pools of earlier tests, such as async_save's, may stay)."""
    threads = [
        t.name for t in threading.enumerate() if t.name.startswith("dckpt-") and t not in before
    ]
    assert threads == []
    loop = FsspecStorage(storage_url, options(server)).fs.loop

    async def ours() -> list[str]:
        me = asyncio.current_task()
        return [repr(t) for t in asyncio.all_tasks() if t is not me and "dckpt" in repr(t)]

    assert asyncio.run_coroutine_threadsafe(ours(), loop).result(10) == []


def threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def timed(fn: Callable[[], object]) -> tuple[BaseException, float]:
    start = time.monotonic()
    with pytest.raises(dckpt.CheckpointError) as info:
        fn()
    return info.value, time.monotonic() - start


# -------------------------------------------------------------------- a frozen store


def test_a_save_to_a_store_frozen_before_it_starts_fails_within_the_budget(
    stall_server: StallServer,
) -> None:
    url, opts = stall_server.url(uuid.uuid4().hex), options(stall_server)
    dckpt.save(state(1), url, storage_options=opts)
    stall_server.freeze()
    exc = fails_within_budget(
        stall_server, url, lambda: dckpt.save(state(2), url, overwrite=True, storage_options=opts)
    )
    assert "retry_timeout" in str(exc)
    got = zeros()
    dckpt.load(got, url, storage_options=opts)
    assert_state(got, 1)


@pytest.mark.parametrize(
    ("method", "path", "after"),
    [("PUT", "/data/", 1), ("PUT", "/manifest.json", 0)],
    ids=["mid-upload", "at-the-commit"],
)
def test_a_save_frozen_mid_way_fails_within_the_budget_and_keeps_a_whole_checkpoint(
    stall_server: StallServer, method: str, path: str, after: int
) -> None:
    url, opts = stall_server.url(uuid.uuid4().hex), options(stall_server)
    dckpt.save(state(1), url, storage_options=opts)
    stall_server.freeze_on(method, path, after=after)
    fails_within_budget(
        stall_server, url, lambda: dckpt.save(state(2), url, overwrite=True, storage_options=opts)
    )
    got = zeros()
    dckpt.load(got, url, storage_options=opts)
    if path == "/data/":
        assert_state(got, 1)  # never committed
    else:
        # The frozen manifest PUT was already sent: the store may apply it when it wakes,
        # after the save reported failure. Either way one whole checkpoint loads, and the
        # failed save deleted nothing the late manifest needs.
        assert got["step"] in (1, 2)
        assert_state(got, got["step"])


@pytest.mark.parametrize("when", ["before", "mid-read"])
def test_a_load_from_a_frozen_store_fails_within_the_budget(
    stall_server: StallServer, when: str
) -> None:
    url, opts = stall_server.url(uuid.uuid4().hex), options(stall_server)
    dckpt.save(state(1), url, storage_options=opts)
    if when == "before":
        stall_server.freeze()
    else:
        stall_server.freeze_on("GET", "/data/", after=1)
    fails_within_budget(stall_server, url, lambda: dckpt.load(zeros(), url, storage_options=opts))
    got = zeros()
    dckpt.load(got, url, storage_options=opts)
    assert_state(got, 1)


# -------------------------------------------------------------- per-try bounds


def test_a_try_without_an_answer_is_cancelled_at_the_deadline() -> None:
    cancelled = threading.Event()

    async def never() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    start = time.monotonic()
    with pytest.raises(Stalled):
        asyncio.run(retry_async(never, RetryPolicy(timeout=0.5)))
    assert time.monotonic() - start < 5
    assert cancelled.is_set()


def test_a_transfer_that_keeps_moving_may_outlive_the_deadline() -> None:
    progress = Progress()

    async def slow() -> str:
        for _ in range(25):  # 2.5 s of steady progress against a 1 s budget
            await asyncio.sleep(0.1)
            progress.touch()
        return "done"

    policy = RetryPolicy(timeout=1.0)
    assert asyncio.run(retry_async(slow, policy, progress=progress)) == "done"


def test_after_a_request_waits_out_its_budget_the_next_get_a_short_one() -> None:
    policy = RetryPolicy(timeout=30.0)
    breaker = Breaker()

    async def never() -> None:
        await asyncio.sleep(3600)

    async def answer() -> str:
        return "ok"

    assert breaker.budget(policy) == 30.0
    breaker.trip(policy)  # what a request that got no answer for 30 s does
    assert breaker.budget(policy) == 3.0
    start = time.monotonic()
    with pytest.raises(Stalled):
        asyncio.run(retry_async(never, policy, breaker=breaker))
    assert time.monotonic() - start < 15  # 3 s, not 30
    assert asyncio.run(retry_async(answer, policy, breaker=breaker)) == "ok"
    assert breaker.budget(policy) == 30.0  # the store answered: whole budgets again


# ------------------------------------------------------------------- read_file limit


def _limit_cases(st: FsspecStorage) -> None:
    st.commit("small", b"x" * 100, durable=True)
    st.commit("empty", b"", durable=True)
    assert st.read_file("small", max_bytes=100) == b"x" * 100
    assert st.read_file("empty", max_bytes=100) == b""
    assert st.read_file("absent", max_bytes=100) is None
    with pytest.raises(CorruptCheckpointError) as info:
        st.read_file("small", max_bytes=99)
    msg = str(info.value)
    assert st.url("small") in msg and "100 bytes" in msg and "99-byte limit" in msg


def test_read_file_refuses_an_object_over_the_limit_on_s3(s3_server: S3Server) -> None:
    url = s3_server.url(uuid.uuid4().hex)
    st = FsspecStorage(url, s3_server.options)
    try:
        _limit_cases(st)
        with st.commit_lock():  # the ETag is still recorded for the conditional commit
            assert st.read_file("small") == b"x" * 100
            st.commit("small", b"y", durable=True)
        assert st.read_file("small") == b"y"
    finally:
        st.delete_prefix("")


def test_read_file_refuses_an_object_over_the_limit_on_memory() -> None:
    st = FsspecStorage(f"memory://dckpt-limit-{uuid.uuid4().hex}")
    try:
        _limit_cases(st)
    finally:
        st.delete_prefix("")


# ------------------------------------------------------------------------ fault points


@pytest.mark.parametrize("backend", ["s3", "memory"])
def test_storage_fault_points_on_object_stores(s3_server: S3Server, backend: str) -> None:
    if backend == "s3":
        url, opts = s3_server.url(uuid.uuid4().hex), {**s3_server.options, "dckpt": OPTS}
    else:
        url, opts = f"memory://dckpt-faults-{uuid.uuid4().hex}", {}
    dckpt.save({"w": torch.ones(10)}, url, storage_options=opts)
    _faults.record(True)
    try:
        dckpt.save({"w": torch.ones(10)}, url, overwrite=True, storage_options=opts)
    finally:
        seen = _faults.record(False)
        FsspecStorage(url, opts).delete_prefix("")
    steps = [p for p in seen if p.startswith("storage.")]
    order = ["storage.create", "storage.write", "storage.fsync", "storage.commit.tmp"]
    order += ["storage.commit.rename", "storage.delete"]  # the old save's data goes last
    assert [steps.index(p) for p in order] == sorted(steps.index(p) for p in order), steps
