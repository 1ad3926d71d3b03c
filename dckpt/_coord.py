"""Cross-rank coordination for collective save/load, with timeouts that name missing ranks.

Control messages travel through the c10d key-value store rather than process-group
collectives: a collective hangs forever when a peer dies and can deadlock with training's
own collectives, while every store operation takes a timeout, so a missing rank can be
named instead of waited for.

Protocol of one :meth:`Coordinator.exchange` (rank 0 leads)::

    follower r: run local -> set  <call>/<seq>/<phase>/in/<r>  -> wait for out (or out/<r>)
    leader:     run local -> wait for every in/<r> (timeout) -> read + delete them
                -> reduce -> set out (or out/<r> per rank with scatter=True)

Failures and missing ranks are published in place of the result, so every rank raises the
same error.  Result keys are deleted by the last follower to read them (an ``add`` count),
so thousands of saves do not grow the store.

Payloads that are ``bytes`` travel as they are (the save's plan and write messages are
encoded by ``dckpt._wire``). A :class:`Shared` payload is sent once per distinct content:
each rank counts its content's digest in the store (``add``), the first sends the bytes
and the others a 16-byte reference, and rank 0 hands ``reduce`` one ``bytes`` object per
distinct content, so ranks holding the same state cost O(1) bytes each. Anything else
(failures, the load's and the manager's small values) is pickled: this is the control
plane inside one training job, between processes that already trust each other; it is
never used for checkpoint files.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, overload

import torch.distributed as dist

from dckpt._args import check_process_group, check_timeout
from dckpt._coordframes import (
    FAIL,
    OK,
    Shared,
    claim_key,
    content_digest,
    decode,
    encode,
    outcome,
    shared_frame,
    sort_outcomes,
)
from dckpt._errors import ArgumentError, CheckpointTimeoutError, RankFailureError
from dckpt._failures import Failure, Record, failure_error
from dckpt._faults import fault_point
from dckpt._kvstore import KV, StoreLost, forget_clients, open_store

#: Seconds a collective save or load waits for the slowest rank before naming it.
DEFAULT_TIMEOUT = 600.0

__all__ = ["Coordinator", "LocalCoordinator", "Shared", "coordinator_for"]

T = TypeVar("T")
R = TypeVar("R")
S = TypeVar("S")

# Followers wait for the leader's answer: the leader's wait for the slowest rank (timeout),
# plus its reduce (bounded by another timeout), plus slack for the store round trips.
_FOLLOWER_SLACK_S = 5.0
_state_lock = threading.Lock()
_epoch = "0"
_calls: dict[tuple[str, str], int] = {}


def _set_epoch(epoch: str) -> None:
    """Start a fresh key space and reset the per-group call counters (test harness hook).

    Every rank must call it with the same value; a test that leaves ranks out of step
    (one never arrives) then cannot poison the next test.
    """
    global _epoch
    with _state_lock:
        _epoch = epoch
        _calls.clear()


def _next_call(group_name: str, namespace: str) -> tuple[str, int]:
    with _state_lock:
        key = (group_name, namespace)
        call = _calls.get(key, 0)
        _calls[key] = call + 1
        return _epoch, call


def coordinator_for(
    process_group: dist.ProcessGroup | None, *, timeout: float, namespace: str = "sync"
) -> Coordinator | LocalCoordinator:
    """Return the coordinator for one collective save or load on ``process_group``.

    Collective: every rank of the group must call it, once per save/load and in the same
    order, because each call allocates the next key space from an in-process counter.
    """
    timeout = check_timeout(timeout)
    check_process_group(process_group)
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return LocalCoordinator(timeout=timeout)
        group = dist.group.WORLD
        assert group is not None
    else:
        group = process_group
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ArgumentError(
            f"this process (global rank {dist.get_rank()}) is not a member of process_group "
            f"{group.group_name!r}; call save/load only on the group's ranks"
        )
    if world_size == 1:
        return LocalCoordinator(timeout=timeout)
    epoch, call = _next_call(group.group_name, namespace)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    # The restart count keeps a restarted job that shares the store from reading stale keys.
    prefix = f"dckpt/{namespace}/{group.group_name}/r{restart}.{epoch}/{call}"
    connect = functools.partial(open_store, prefix, timeout)
    return Coordinator(connect, rank=rank, world_size=world_size, timeout=timeout)


class _ExchangeAPI:
    """The interface shared by :class:`Coordinator` and :class:`LocalCoordinator`."""

    rank: int
    world_size: int
    timeout: float

    @overload
    def exchange(
        self,
        phase: str,
        local: Callable[[], T],
        reduce: None = None,
        *,
        scatter: Literal[False] = False,
    ) -> list[T]: ...

    @overload
    def exchange(
        self,
        phase: str,
        local: Callable[[], T],
        reduce: Callable[[list[T]], R],
        *,
        scatter: Literal[False] = False,
    ) -> R: ...

    @overload
    def exchange(
        self,
        phase: str,
        local: Callable[[], T],
        reduce: Callable[[list[T]], Sequence[S]],
        *,
        scatter: Literal[True],
    ) -> S: ...

    @overload
    def exchange(
        self,
        phase: str,
        local: Callable[[], T],
        reduce: Callable[[list[T]], Any] | None = None,
        *,
        scatter: bool,
    ) -> Any: ...

    def exchange(
        self,
        phase: str,
        local: Callable[[], Any],
        reduce: Callable[[list[Any]], Any] | None = None,
        *,
        scatter: bool = False,
    ) -> Any:
        """Run ``local`` on every rank, ``reduce`` the values (ordered by rank) on rank 0.

        Every rank returns the reduced result (the list of values when ``reduce`` is None);
        with ``scatter=True`` the result must be a sequence of ``world_size`` items and rank
        r gets item r.  A failure anywhere raises on every rank.
        """
        return self._exchange(phase, local, reduce, scatter)

    def _exchange(
        self,
        phase: str,
        local: Callable[[], Any],
        reduce: Callable[[list[Any]], Any] | None,
        scatter: bool,
    ) -> Any:
        raise NotImplementedError


def _scattered(result: Any, world_size: int) -> list[Any]:
    items = list(result)
    if len(items) != world_size:
        raise ValueError(
            f"a scatter reduce must return {world_size} items (one per rank), got {len(items)}"
        )
    return items


class LocalCoordinator(_ExchangeAPI):
    """Single process: no store, and errors propagate as their original type."""

    def __init__(self, *, timeout: float = 0.0) -> None:
        self.rank = 0
        self.world_size = 1
        self.timeout = timeout

    def _exchange(
        self,
        phase: str,
        local: Callable[[], Any],
        reduce: Callable[[list[Any]], Any] | None,
        scatter: bool,
    ) -> Any:
        values = [local()]
        result = values if reduce is None else reduce(values)
        return _scattered(result, 1)[0] if scatter else result


class Coordinator(_ExchangeAPI):
    """Coordinates one collective save or load across the ranks of a group.

    Create it with :func:`coordinator_for` on the calling thread; it may then be used from
    another thread (async save), by one thread at a time.
    """

    def __init__(
        self, connect: Callable[[], dist.Store], *, rank: int, world_size: int, timeout: float
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self._connect = connect
        self._kv: KV | None = None
        self._seq = itertools.count()  # next() on it is atomic
        self._lock = threading.Lock()

    def _store(self) -> KV:
        with self._lock:
            if self._kv is None:
                try:
                    self._kv = KV(self._connect())
                except RuntimeError as exc:
                    raise StoreLost from exc
            return self._kv

    def _exchange(
        self,
        phase: str,
        local: Callable[[], Any],
        reduce: Callable[[list[Any]], Any] | None,
        scatter: bool,
    ) -> Any:
        base = f"{next(self._seq)}/{phase}"
        value: Any = None
        local_exc: BaseException | None = None
        try:
            fault_point(f"coord.{phase}.enter")
            value = local()
        except BaseException as exc:  # published first; interrupts are re-raised after
            local_exc = exc
        try:
            if self.rank == 0:
                return self._lead(base, phase, value, local_exc, reduce, scatter)
            return self._follow(base, phase, value, local_exc, scatter)
        except StoreLost as lost:
            forget_clients()
            cause = lost.__cause__
            err = CheckpointTimeoutError(
                f"lost contact with the coordination store during {phase!r} (rank 0, which "
                f"usually hosts it, may have died): {type(cause).__name__}: {cause}",
                () if self.rank == 0 else (0,),
                {} if local_exc is None else {self.rank: local_exc},
            )
            raise err from (cause if local_exc is None else local_exc)

    # -- rank 0 -----------------------------------------------------------------------

    def _lead(
        self,
        base: str,
        phase: str,
        value: Any,
        local_exc: BaseException | None,
        reduce: Callable[[list[Any]], Any] | None,
        scatter: bool,
    ) -> Any:
        kv = self._store()
        failures: dict[int, Failure] = {}
        if local_exc is not None:
            failures[0] = Failure.of(local_exc)
            if not isinstance(local_exc, Exception):  # interrupt: tell the others, then go
                with contextlib.suppress(StoreLost):
                    record = Record(phase, failures, (), self.timeout)
                    self._publish(kv, base, encode(FAIL, record), scatter)
                raise local_exc
        values: list[Any] = [value] + [None] * (self.world_size - 1)
        commons: dict[bytes, bytes] = {}
        if isinstance(value, Shared):
            digest = content_digest(value.common)
            commons[digest] = value.common
            kv.add(claim_key(base, digest), 1)  # rank 0 may be the first: then all refer
        outcomes, missing = self._gather(kv, base)
        fault_point(f"coord.{phase}.gathered")
        claimed = sort_outcomes(outcomes, values, failures, commons)
        for digest in claimed:
            kv.delete(claim_key(base, digest))
        if not failures and not missing:
            try:
                result = values if reduce is None else reduce(values)
                if scatter:
                    items = _scattered(result, self.world_size)
                    self._publish(kv, base, [encode(OK, item) for item in items[1:]], True)
                    fault_point(f"coord.{phase}.published")
                    return items[0]
                self._publish(kv, base, encode(OK, result), False)
                fault_point(f"coord.{phase}.published")
                return result
            except StoreLost:
                raise
            except BaseException as exc:  # reduce (or encoding its result) failed on rank 0
                failures[0] = Failure.of(exc)
                local_exc = exc
        record = Record(phase, failures, missing, self.timeout)
        self._publish(kv, base, encode(FAIL, record), scatter)
        if local_exc is not None and not isinstance(local_exc, Exception):
            raise local_exc
        raise failure_error(record, local_exc, self.rank) from local_exc

    def _gather(self, kv: KV, base: str) -> tuple[dict[int, bytes], tuple[int, ...]]:
        """Wait up to ``timeout`` for the followers' outcomes; read and delete them."""
        keys = {r: f"{base}/in/{r}" for r in range(1, self.world_size)}
        if kv.wait(list(keys.values()), self.timeout):
            present = list(keys)
        else:
            present = [r for r, key in keys.items() if kv.check([key])]
        missing = tuple(r for r in keys if r not in present)
        blobs = kv.get_many([keys[r] for r in present])
        for r in present:
            kv.delete(keys[r])
        return dict(zip(present, blobs, strict=True)), missing

    def _publish(self, kv: KV, base: str, blob: bytes | list[bytes], scatter: bool) -> None:
        """Publish one blob for all (``out``) or, with scatter, one per follower (``out/<r>``)."""
        if not scatter:
            assert isinstance(blob, bytes)
            kv.set(f"{base}/out", blob)
            return
        blobs = blob if isinstance(blob, list) else [blob] * (self.world_size - 1)
        kv.set_many([f"{base}/out/{r}" for r in range(1, self.world_size)], blobs)

    # -- other ranks ------------------------------------------------------------------

    def _follow(
        self,
        base: str,
        phase: str,
        value: Any,
        local_exc: BaseException | None,
        scatter: bool,
    ) -> Any:
        kv = self._store()
        blob, local_exc, claim = _frame(kv, base, value, local_exc)
        kv.set(f"{base}/in/{self.rank}", blob)
        fault_point(f"coord.{phase}.sent")
        if local_exc is not None and not isinstance(local_exc, Exception):
            raise local_exc
        key = f"{base}/out/{self.rank}" if scatter else f"{base}/out"
        bound = 2 * self.timeout + _FOLLOWER_SLACK_S
        if not kv.wait([key], bound):
            err = CheckpointTimeoutError(
                f"rank 0 did not publish the outcome of {phase!r} within {bound:.1f} s "
                "(dead, hung, or not calling save/load)",
                (0,),
                {} if local_exc is None else {self.rank: local_exc},
            )
            raise err from local_exc
        raw = kv.get(key)
        self._release(kv, base, key, scatter)
        fault_point(f"coord.{phase}.received")
        try:
            kind, payload = decode(raw)
        except Exception as exc:
            raise RankFailureError(
                f"the outcome of {phase!r} from rank 0 did not decode on rank {self.rank}: "
                f"{type(exc).__name__}: {exc}",
                {self.rank: exc},
            ) from exc
        if kind == OK:
            if local_exc is None:
                return payload
            # Cannot happen (the leader saw our failure), but never drop a failure silently.
            payload = Record(phase, {}, (), self.timeout)
        assert isinstance(payload, Record)
        if self.rank in payload.missing:  # we came late: nobody else will read our outcome
            kv.delete(f"{base}/in/{self.rank}")
            if claim is not None:  # nor clean up the count we made
                kv.delete(claim)
        raise failure_error(payload, local_exc, self.rank) from local_exc

    def _release(self, kv: KV, base: str, key: str, scatter: bool) -> None:
        """Delete a result key once no follower needs it any more."""
        if scatter:  # out/<rank> is ours alone
            kv.delete(key)
            return
        if kv.add(f"{base}/ack", 1) == self.world_size - 1:  # the last reader cleans up
            kv.delete(key)
            kv.delete(f"{base}/ack")


def _frame(
    kv: KV, base: str, value: Any, local_exc: BaseException | None
) -> tuple[bytes, BaseException | None, str | None]:
    """A follower's blob: its failure, its value, or (a :class:`Shared` value) the content
    when it is the first to count it in the store, else a reference; and that count's key."""
    if local_exc is None and isinstance(value, Shared):
        digest = content_digest(value.common)
        claim = claim_key(base, digest)
        return shared_frame(digest, value, first=kv.add(claim, 1) == 1), None, claim
    blob, local_exc = outcome(value, local_exc)
    return blob, local_exc, None
