"""dckpt._coord across real gloo groups (and the multi-rank harness that runs them)."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

from dckpt import _coord as _coord_module
from dckpt._coord import Coordinator, LocalCoordinator, Shared, coordinator_for
from dckpt._coordframes import content_digest, shared_frame
from dckpt._errors import CheckpointTimeoutError, RankFailureError, RemoteError
from tests._dist import RankError, RankPool, RankTimeoutError, run_fresh

Pools = Callable[[int], RankPool]
HANG_GUARD_S = 20.0  # generous: catches hangs, not a performance assertion


def _coord(timeout: float = 10.0) -> Coordinator:
    coord = coordinator_for(None, timeout=timeout)
    assert isinstance(coord, Coordinator)
    return coord


def _total(values: list[int]) -> int:
    return sum(values)


def _summary(err: RankFailureError) -> dict[str, Any]:
    """What a rank saw, in a form that travels back to the test process."""
    return {
        "type": type(err).__name__,
        "message": str(err),
        "failures": {r: (type(e).__name__, str(e)) for r, e in err.failures.items()},
        "missing": getattr(err, "missing_ranks", None),
        "cause": None if err.__cause__ is None else type(err.__cause__).__name__,
    }


# -- the harness itself ---------------------------------------------------------------


def _w_rank() -> int:
    return dist.get_rank()


def _w_fail_on_rank1() -> int:
    if dist.get_rank() == 1:
        print("output-from-rank-1")
        raise ValueError("marker-7f3a")
    return dist.get_rank()


def _w_hang_on_rank1() -> None:
    if dist.get_rank() == 1:
        time.sleep(1000)


def test_harness_reports_failing_rank_and_stays_usable(rank_pool: Pools) -> None:
    pool = rank_pool(2)
    with pytest.raises(RankError) as info:
        pool.run(_w_fail_on_rank1)
    text = str(info.value)
    assert "marker-7f3a" in text and "_w_fail_on_rank1" in text and "output-from-rank-1" in text
    assert not isinstance(info.value, RankTimeoutError)
    assert pool.run(_w_rank) == [0, 1]


def test_harness_kills_a_hung_pool_and_recovers(rank_pool: Pools) -> None:
    pool = rank_pool(2)  # the shared pool: it restarts on the next run, as any test's would
    start = time.monotonic()
    with pytest.raises(RankTimeoutError) as info:
        pool.run(_w_hang_on_rank1, timeout=2)
    assert time.monotonic() - start < HANG_GUARD_S
    assert "_w_hang_on_rank1" in str(info.value)  # the stack dump names where it hung
    assert not pool.started
    assert pool.run(_w_rank) == [0, 1]


def _w_env() -> str | None:
    return os.environ.get("DCKPT_TEST_MARKER")


def test_harness_workers_see_the_test_environment(
    rank_pool: Pools, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DCKPT_TEST_MARKER", "set-after-pool-start")
    assert rank_pool(2).run(_w_env) == ["set-after-pool-start"] * 2


# -- successful exchanges -------------------------------------------------------------


def _w_roundtrip() -> tuple[Any, ...]:
    rank = dist.get_rank()
    coord = _coord()
    values = coord.exchange("gather", lambda: rank * 10)
    total = coord.exchange("sum", lambda: rank, _total)
    again = coord.exchange("sum", lambda: rank + 1, _total)  # a phase name may repeat
    mine = coord.exchange(
        "plan", lambda: rank, lambda vs: [f"plan for {v}" for v in vs], scatter=True
    )
    return values, total, again, mine, coord.rank, coord.world_size


def test_exchange_round_trip(rank_pool: Pools) -> None:
    results = rank_pool(3).run(_w_roundtrip)
    for rank, result in enumerate(results):
        assert result == ([0, 10, 20], 3, 6, f"plan for {rank}", rank, 3)


def _w_background_thread() -> Any:
    rank = dist.get_rank()
    coord = _coord()  # allocated on the calling thread, used from another (async save)
    box: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: box.update(out=coord.exchange("bg", lambda: rank, _total)), daemon=True
    )
    thread.start()
    tensor = torch.ones(4)
    for _ in range(20):  # training's collectives keep running meanwhile
        dist.all_reduce(tensor)
    thread.join(HANG_GUARD_S)
    return box.get("out"), float(tensor[0])


def test_exchange_from_background_thread(rank_pool: Pools) -> None:
    assert rank_pool(2).run(_w_background_thread) == [(1, 2.0**20)] * 2


def _w_groups() -> tuple[Any, ...]:
    rank = dist.get_rank()
    singles = [dist.new_group([r]) for r in range(3)]
    pair = dist.new_group([1, 2])
    local = coordinator_for(singles[rank], timeout=5)
    assert isinstance(local, LocalCoordinator)
    if rank == 0:
        return (local.exchange("x", lambda: "solo"),)
    coord = coordinator_for(pair, timeout=5)
    return coord.rank, coord.world_size, coord.exchange("x", lambda: rank)


def test_subgroups_and_world_size_one(rank_pool: Pools) -> None:
    assert rank_pool(3).run(_w_groups) == [(["solo"],), (0, 2, [1, 2]), (1, 2, [1, 2])]


def test_local_coordinator_propagates_the_original_exception(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # whatever other tests did
    coord = coordinator_for(None, timeout=1)
    assert isinstance(coord, LocalCoordinator)
    assert (coord.rank, coord.world_size) == (0, 1)
    assert coord.exchange("x", lambda: 5) == [5]
    assert coord.exchange("x", lambda: 5, lambda vs: vs[0] + 1) == 6
    assert coord.exchange("x", lambda: 5, lambda vs: ["mine"], scatter=True) == "mine"
    boom = OSError(errno.ENOSPC, "No space left on device", "/ckpt/x")

    def fail() -> int:
        raise boom

    with pytest.raises(OSError) as info:
        coord.exchange("write", fail)
    assert info.value is boom


# -- failures -------------------------------------------------------------------------


def _w_local_failure_on_rank1() -> tuple[Any, ...]:
    rank = dist.get_rank()
    coord = _coord()
    mine = OSError(errno.ENOSPC, "No space left on device", f"/ckpt/rank{rank}")

    def local() -> int:
        if rank == 1:
            raise mine
        return rank

    try:
        coord.exchange("write", local, _total)
    except RankFailureError as err:
        same = err.failures[1] is mine and err.__cause__ is mine
        after = coord.exchange("after", lambda: rank, _total)  # the coordinator stays usable
        return _summary(err), isinstance(err.failures[1], OSError), same, after
    raise AssertionError("no error raised")


def test_local_failure_raises_on_every_rank(rank_pool: Pools) -> None:
    results = rank_pool(3).run(_w_local_failure_on_rank1)
    for rank, (summary, is_oserror, same, after) in enumerate(results):
        assert summary["type"] == "RankFailureError"
        assert summary["failures"] == {
            1: ("OSError", "[Errno 28] No space left on device: '/ckpt/rank1'")
        }
        assert (
            "'write' failed on rank 1: OSError: [Errno 28] No space left on device"
            in summary["message"]
        )
        assert is_oserror
        assert same == (rank == 1)
        assert summary["cause"] == ("OSError" if rank == 1 else None)
        assert after == 3


def _w_reduce_failure() -> tuple[Any, ...]:
    rank = dist.get_rank()
    coord = _coord()
    out = []
    for reduce, scatter in [(_bad_reduce, False), (lambda vs: [1], True)]:
        try:
            coord.exchange("plan", lambda: rank, reduce, scatter=scatter)
        except RankFailureError as err:
            out.append(_summary(err))
    return tuple(out)


def _bad_reduce(values: list[int]) -> int:
    raise ValueError("bad plan")


def test_reduce_failure_is_a_rank0_failure(rank_pool: Pools) -> None:
    for rank, (plain, scattered) in enumerate(rank_pool(2).run(_w_reduce_failure)):
        assert plain["failures"] == {0: ("ValueError", "bad plan")}
        assert plain["cause"] == ("ValueError" if rank == 0 else None)
        assert scattered["failures"][0][0] == "ValueError"
        assert "2 items" in scattered["failures"][0][1]


class _UnpicklableError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.callback = lambda: None  # lambdas do not pickle


class _NoUnpickleError(Exception):
    def __init__(self, a: str, b: str) -> None:  # args=(a-b,) -> unpickling calls it with 1
        super().__init__(f"{a}-{b}")


def _raise_unpicklable() -> None:
    raise _UnpicklableError("cannot travel")


def _w_unpicklable(kind: str) -> Any:
    rank = dist.get_rank()
    coord = _coord()

    def local() -> int:
        if rank == 1:
            if kind == "dump":
                _raise_unpicklable()
            raise _NoUnpickleError("x", "y")
        return rank

    try:
        coord.exchange("write", local)
    except RankFailureError as err:
        remote = err.failures[1]
        if rank == 1:
            return type(remote).__name__
        assert isinstance(remote, RemoteError)
        return remote.type_name, remote.remote_message, remote.traceback_text, str(err)
    raise AssertionError("no error raised")


@pytest.mark.parametrize("kind", ["dump", "load"])
def test_exception_that_cannot_travel_becomes_remote_error(rank_pool: Pools, kind: str) -> None:
    on_rank0, on_rank1 = rank_pool(2).run(_w_unpicklable, kind)
    if kind == "dump":
        assert on_rank1 == "_UnpicklableError"
        type_name, message, tb, text = on_rank0
        assert (type_name, message) == ("_UnpicklableError", "cannot travel")
        assert "_raise_unpicklable" in tb and "Traceback" in tb
        assert "rank 1: _UnpicklableError: cannot travel" in text
    else:
        assert on_rank1 == "_NoUnpickleError"
        assert on_rank0[:2] == ("_NoUnpickleError", "x-y")


def _w_interrupt_on_rank1() -> Any:
    rank = dist.get_rank()
    coord = _coord()

    def local() -> int:
        if rank == 1:
            raise KeyboardInterrupt
        return rank

    start = time.monotonic()
    try:
        coord.exchange("write", local)
    except KeyboardInterrupt:
        return "interrupted"
    except RankFailureError as err:
        return _summary(err)["failures"], time.monotonic() - start
    raise AssertionError("no error raised")


def test_interrupt_is_reraised_and_still_reported(rank_pool: Pools) -> None:
    (failures, elapsed), on_rank1 = rank_pool(2).run(_w_interrupt_on_rank1)
    assert on_rank1 == "interrupted"
    assert failures == {1: ("KeyboardInterrupt", "")}
    assert elapsed < 5  # reported at once, not after the timeout


# -- missing and dead ranks -----------------------------------------------------------


def _w_absent(absent: int, timeout: float) -> Any:
    rank = dist.get_rank()
    if rank == absent:
        return None
    coord = _coord(timeout)
    slack, _coord_module._FOLLOWER_SLACK_S = _coord_module._FOLLOWER_SLACK_S, 1.0
    start = time.monotonic()
    try:
        coord.exchange("write", lambda: rank)
    except CheckpointTimeoutError as err:
        return _summary(err), time.monotonic() - start
    finally:
        _coord_module._FOLLOWER_SLACK_S = slack
    raise AssertionError("no error raised")


def test_rank_that_never_arrives_is_named(rank_pool: Pools) -> None:
    results = rank_pool(3).run(_w_absent, 2, 2.0)
    assert results[2] is None
    for summary, elapsed in results[:2]:
        assert summary["missing"] == (2,)
        assert "rank 2 did not reach 'write' within 2.0 s" in summary["message"]
        assert 1.5 < elapsed < HANG_GUARD_S


def test_leader_that_never_arrives_is_named(rank_pool: Pools) -> None:
    (_, *followers) = rank_pool(3).run(_w_absent, 0, 0.5)
    for summary, elapsed in followers:
        assert summary["missing"] == (0,)
        assert "rank 0 did not publish the outcome of 'write' within 2.0 s" in summary["message"]
        assert elapsed < HANG_GUARD_S


def _w_killed(victim: int, when: str) -> Any:
    rank = dist.get_rank()
    if rank == victim and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    if rank != victim:
        time.sleep(0.5)  # let the victim die first (or, "during", let it start dying)
    coord = _coord(2.0)

    def local() -> int:
        if rank == victim:
            time.sleep(1.0)  # the others are now waiting on the store
            os.kill(os.getpid(), signal.SIGKILL)
        return rank

    start = time.monotonic()
    try:
        coord.exchange("write", local)
    except RankFailureError as err:
        return _summary(err), time.monotonic() - start
    raise AssertionError("no error raised")


@pytest.mark.parametrize(
    ("world_size", "victim", "when"), [(3, 2, "before"), (2, 0, "before"), (2, 0, "during")]
)
def test_killed_rank_is_named_without_a_hang(world_size: int, victim: int, when: str) -> None:
    outcomes = run_fresh(world_size, _w_killed, victim, when, timeout=40)
    assert outcomes[victim].exitcode == -signal.SIGKILL
    for o in outcomes:
        if o.rank == victim:
            continue
        assert o.ok, o.error_text
        summary, elapsed = o.value
        assert summary["type"] == "CheckpointTimeoutError"
        assert summary["missing"] == (victim,)
        assert elapsed < HANG_GUARD_S
        if victim == 0:
            assert "lost contact with the coordination store" in summary["message"]


# -- shared content -------------------------------------------------------------------

_BIG = bytes(range(256)) * 4096  # 1 MiB


def _w_shared() -> Any:
    rank = dist.get_rank()
    mine = b"other" if rank == 2 else _BIG

    def reduce(values: list[Shared]) -> Any:
        return (
            len({id(v.common) for v in values}),  # one object per distinct content
            [v.own for v in values],
            [v.common == (b"other" if r == 2 else _BIG) for r, v in enumerate(values)],
        )

    return _coord().exchange("shared", lambda: Shared(mine, str(rank).encode()), reduce)


def test_shared_content_reaches_rank_0_once_per_distinct_value(rank_pool: Pools) -> None:
    results = rank_pool(4).run(_w_shared)
    assert results == [(2, [b"0", b"1", b"2", b"3"], [True] * 4)] * 4


def test_a_reference_costs_its_digest_and_the_rank_s_own_bytes() -> None:
    value = Shared(_BIG, b"own")
    first = shared_frame(content_digest(_BIG), value, first=True)
    ref = shared_frame(content_digest(_BIG), value, first=False)
    assert len(first) > len(_BIG) and len(ref) == 1 + 16 + 3


# -- housekeeping ---------------------------------------------------------------------


def _w_key_count() -> Any:
    rank = dist.get_rank()
    store = dist.distributed_c10d._get_default_store()
    counts = []
    for _ in range(3):
        dist.barrier()  # everyone finished cleaning up the previous round
        counts.append(store.num_keys())
        dist.barrier()  # nobody starts publishing the next round before the count
        coord = _coord()
        for i in range(50):
            if i % 10 == 9:
                coord = _coord()  # a new save/load call: a new key space
            if i % 3 == 0:
                coord.exchange("scatter", lambda: rank, lambda vs: vs, scatter=True)
            elif i % 7 == 0:
                with pytest.raises(RankFailureError):
                    coord.exchange("fail", lambda: 1 // (rank - 1))
            elif i % 5 == 0:  # content counted in the store, then its count removed
                coord.exchange("shared", lambda: Shared(b"same" * 100, bytes([rank])), len)
            else:
                coord.exchange("plain", lambda: [rank] * 100, len)
    dist.barrier()
    counts.append(store.num_keys())
    return counts


def test_keys_are_cleaned_up(rank_pool: Pools) -> None:
    counts = rank_pool(3).run(_w_key_count)[0]
    assert len(set(counts)) == 1, counts
