"""The tiered checkpoints a ``CheckpointManager`` with a ``local_dir`` delegates to.

``save`` stages the state (async mode: into reusable host buffers, the one copy training
waits for) and runs the tier save (:mod:`._tsave`) on a background thread, or inline.
Every ``persist_every``-th step (a step that is a multiple of it) is then persisted
(:mod:`._persist`) on a second thread; at most one persist is in flight: when the next is
due, the save thread first waits for the previous one (training waits only if it saves
again meanwhile). A persist's failure is raised, as a ``PersistError``, by the next
``save`` (after starting that save), ``load`` or ``wait`` on every rank: each rank
collects a persist's outcome at the same point (a tier save's commit, once every rank's
persist has ended; the next persist; ``wait``; ``load``), so the ranks agree on when.

A step some node's local tier has no room for (the room check, or a full disk while
writing, receiving or publishing it) is dropped from the local tier on every rank; if it
is due for persistence it is saved straight to the durable tier from the staged state
(the ordinary engine save), so the durable tier never stops while the local tier is full.
Either way a ``LocalTierError`` (``is_disk_full``) naming the step, the full nodes, their
``local_dir`` and the bytes, and saying whether the step reached the durable tier, is
raised once on every rank: by that ``save`` in sync mode, else by the next ``save``
(after starting that save, so that catching it never costs a step), ``load`` or
``wait``. Every save tries the local tier again, so it recovers once space frees up.
Pending errors are raised in the order they happened, one per call.
"""

from __future__ import annotations

import datetime
import errno
import functools
import logging
import threading
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import crc32c
import torch
import torch.distributed as dist

from dckpt._coord import Coordinator, LocalCoordinator, coordinator_for
from dckpt._describe import Captured, Description, capture, describe_captured, staging_sources
from dckpt._errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    RankFailureError,
)
from dckpt._format import Manifest
from dckpt._gc import paused_gc
from dckpt._inflight import AsyncSaveHandle, claim, track
from dckpt._loadcore import LoadOptions, run_load
from dckpt._read import DEFAULT_MEMORY_BUDGET
from dckpt._reader import CheckpointReader
from dckpt._staging import ChunkId, StagingPool
from dckpt._steps import join_path, list_steps, step_name
from dckpt.storage import FileLayout, open_storage
from dckpt.tiers._errors import LocalTierError
from dckpt.tiers._localtier import LocalTier
from dckpt.tiers._nodes import discover
from dckpt.tiers._persist import DurableTier, run_persist, save_direct
from dckpt.tiers._recover import newer_durable, recover
from dckpt.tiers._tsave import Committed, LocalFull, SaveContext, run_tier_save

log = logging.getLogger("dckpt")

Tier = Literal["local", "durable"]


class TieredCheckpoints:
    """A node-local tier with replicas, persisted every ``persist_every`` steps.

    Construction is collective (it exchanges node labels and creates a gloo group)."""

    def __init__(
        self,
        durable: DurableTier,
        *,
        local_dir: str,
        replicas: int,
        persist_every: int,
        keep_local: int,
        node_of: Callable[[int], Hashable] | None,
        async_save: bool,
        process_group: dist.ProcessGroup | None,
        timeout: float,
        allow_pickle: bool,
    ) -> None:
        self.durable = durable
        self.persist_every = persist_every
        self.async_save = async_save
        self.process_group = process_group
        self.timeout = timeout
        self.allow_pickle = allow_pickle
        coord = coordinator_for(process_group, timeout=timeout, namespace="tiers-setup")
        nodes = discover(coord, node_of, replicas)
        local = LocalTier(local_dir)
        _refuse_unwritable(coord, local)
        group = _new_group(process_group, timeout) if coord.world_size > 1 else None
        self.ctx = SaveContext(local, nodes, group, keep_local, timeout, self._durable_layout)
        self._pool = StagingPool()
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="dckpt-tiers")
        self._persister = ThreadPoolExecutor(1, thread_name_prefix="dckpt-persist")
        self._inflight: AsyncSaveHandle | None = None
        self._persisting: tuple[Future[None], int] | None = None
        self._errors: list[BaseException] = []  # to raise, oldest first, one per call
        self._abandoned: set[int] = set()  # durable steps whose persist failed (rank 0)
        self._saves = 0
        self._room_checked = False  # a save passed the room check: only ENOSPC now

    @classmethod
    def for_manager(
        cls,
        manager: Any,
        *,
        local_dir: str,
        replicas: int,
        persist_every: int,
        keep_local: int,
        node_of: Callable[[int], Hashable] | None,
    ) -> TieredCheckpoints:
        """The tiers of a ``CheckpointManager`` (its root is the durable tier)."""
        m = manager
        # A manager that left its root unopened (tiered mode) lets it open in the background.
        storage = getattr(m, "_storage", None)
        durable = DurableTier(
            m.root,
            m.storage_options,
            durable=m.durable,
            keep_last=m.keep_last,
            keep_every=m.keep_every,
            timeout=m.timeout,
            eager=_rank(m.process_group) == 0,
            opened=None if storage is None else (storage, m._cleaner),
        )
        return cls(
            durable,
            local_dir=local_dir,
            replicas=replicas,
            persist_every=persist_every,
            keep_local=keep_local,
            node_of=node_of,
            async_save=m.async_save,
            process_group=m.process_group,
            timeout=m.timeout,
            allow_pickle=m.allow_pickle,
        )

    def _durable_layout(self) -> FileLayout:
        return self.durable.storage.file_layout

    # -- saving -------------------------------------------------------------------------

    def save(self, step: int, state: Mapping[str, Any]) -> None:
        self._finish_pending()
        coord = coordinator_for(self.process_group, timeout=self.timeout, namespace="tiers-save")
        snapshot = self._snapshot(state, coord.rank)

        def prepare() -> Description:
            if isinstance(snapshot, BaseException):
                raise snapshot
            return describe_captured(*snapshot, layouts=True)

        job = functools.partial(self._job, coord, step, prepare)
        if self.async_save:
            handle = AsyncSaveHandle(self._saver.submit(job), self.ctx.local.root)
            track(handle)  # the exit hook and other saves of this process wait for it
            self._inflight = handle
            if isinstance(snapshot, BaseException):
                claim(handle)  # the other ranks learn of it through the exchanges
                raise snapshot
        else:
            job()
        self._raise_pending()

    def _snapshot(
        self, state: Mapping[str, Any], rank: int
    ) -> tuple[Captured, Mapping[ChunkId, torch.Tensor]] | BaseException:
        """This rank's state captured, and copied into the staging buffers when the save
        runs in the background (else the save writes from the live state), or why not."""
        try:
            with paused_gc():
                captured = capture(state, rank, allow_pickle=self.allow_pickle)
                if not self.async_save:
                    return captured, captured.sources
                return captured, self._pool.stage(captured.sources)
        except BaseException as exc:
            return exc

    def _job(
        self, coord: Coordinator | LocalCoordinator, step: int, prepare: Callable[[], Description]
    ) -> None:
        self._saves += 1
        try:
            committed, all_ready = run_tier_save(
                self.ctx,
                coord,
                step,
                prepare,
                check_space=not self._room_checked,
                busy=lambda: set() if self._persisting is None else {self._persisting[1]},
                ready=lambda: self._persisting is None or self._persisting[0].done(),
                tag=self._saves % (1 << 20),
            )
        except LocalFull as full:
            self._local_full(coord, step, prepare, full)
            return
        self._room_checked = True
        if all_ready:
            self._collect_persist()  # ended on every rank: its outcome, at the same point
        if step % self.persist_every == 0:
            self._collect_persist()  # at most one in flight: wait for the previous one
            pcoord = coordinator_for(
                self.process_group, timeout=self.timeout, namespace="tiers-persist"
            )
            future = self._persister.submit(self._persist, pcoord, committed)
            self._persisting = (future, step)

    def _local_full(
        self,
        coord: Coordinator | LocalCoordinator,
        step: int,
        prepare: Callable[[], Description],
        full: LocalFull,
    ) -> None:
        """No room in the local tier (every rank): a step due for persistence goes to the
        durable tier directly; a ``LocalTierError`` saying so is raised later, once (and
        after it the durable save's failure, if that failed too)."""
        failed: CheckpointError | None = None
        if step % self.persist_every:
            outcome = (
                f"step {step} is not saved: it is not a multiple of persist_every="
                f"{self.persist_every}, so it was not due for the durable tier"
            )
        else:
            self._collect_persist()  # one durable writer at a time
            outcome = f"step {step} was saved to the durable tier {self.durable.root} instead"
            try:
                save_direct(
                    self.durable,
                    coord,
                    step,
                    prepare,
                    process_group=self.process_group,
                    abandoned=self._abandoned,
                )
            except CheckpointError as exc:
                outcome = f"step {step} is not saved: saving it to the durable tier failed too"
                failed = exc
        text = (
            f"{full}; {outcome}. Every save tries the local tier again: free space in "
            "local_dir, lower keep_local, or save without local_dir"
        )
        self._errors.append(LocalTierError(text, errno=errno.ENOSPC))
        if failed is not None:
            self._errors.append(failed)

    def _persist(self, coord: Coordinator | LocalCoordinator, job: Committed) -> None:
        local_step = self.ctx.local.step_storage(job.step)
        name = step_name(job.step)
        run_persist(self.durable, coord, local_step, job, name=name, abandoned=self._abandoned)

    def wait(self) -> None:
        self._finish_pending()
        self._collect_persist()
        self._raise_pending()

    def _finish_pending(self) -> None:
        handle, self._inflight = self._inflight, None
        if handle is not None:
            handle.result()

    def _collect_persist(self) -> None:
        job, self._persisting = self._persisting, None
        if job is None:
            return
        try:
            job[0].result()
        except BaseException as exc:
            self._errors.append(exc)

    def _raise_pending(self) -> None:
        if self._errors:
            raise self._errors.pop(0)

    # -- loading ------------------------------------------------------------------------

    def load(self, state: Mapping[str, Any], *, step: int | None, strict: bool) -> int | None:
        self.wait()
        listing: Future[list[int]] = Future()
        if _rank(self.process_group) == 0:  # only rank 0 compares the tiers
            job = functools.partial(self.steps, "durable")
            threading.Thread(target=_settle, args=(listing, job), daemon=True).start()
        for verify in (False, True):
            coord = coordinator_for(
                self.process_group, timeout=self.timeout, namespace="tiers-load"
            )
            # The durable tier is compared after the load (newer_durable), so that its
            # listing overlaps the load too instead of holding up the fetch's end.
            kind, chosen, manifest, raw = recover(
                self.ctx, coord, listing, step, verify=verify, compare=False
            )
            if chosen is None:
                if step is not None:
                    raise CheckpointNotFoundError(
                        f"step {step} is in neither the local tier {self.ctx.local.root} nor "
                        f"the durable tier {self.durable.root}"
                    )
                return None
            try:
                self._load_step(state, coord, kind, chosen, manifest, raw, strict)
            except CheckpointError as exc:
                if kind != "local" or verify or not _damaged(exc):
                    raise
                if coord.rank == 0:
                    log.warning(
                        "tiers: local step %d failed its checksums while loading (%s); "
                        "checking every copy and recovering again",
                        chosen,
                        exc,
                    )
                continue
            break
        if kind == "local" and step is None and chosen is not None:
            newer = newer_durable(coord, listing, chosen)
            if newer is not None:  # rare: a step saved straight to the durable tier
                self._load_step(state, coord, "durable", newer, None, None, strict)
                chosen = newer
        if self.async_save:
            self._reserve(state)
        return chosen

    def _load_step(
        self,
        state: Mapping[str, Any],
        coord: Coordinator | LocalCoordinator,
        kind: str,
        chosen: int,
        manifest: Manifest | None,
        raw: bytes | None,
        strict: bool,
    ) -> None:
        if kind == "local":
            assert manifest is not None and raw is not None
            storage = self.ctx.local.step_storage(chosen)
            digest = int(crc32c.crc32c(raw))
            reader = functools.partial(CheckpointReader, storage, manifest, index_digest=digest)
        else:
            path = join_path(self.durable.root, self._durable_name(chosen))
            storage = open_storage(path, self.durable.storage_options)
            reader = functools.partial(CheckpointReader.open, storage)
        options = LoadOptions(strict, self.allow_pickle, DEFAULT_MEMORY_BUDGET)
        run_load(reader, state, coord, "load", options)

    def _reserve(self, state: Mapping[str, Any]) -> None:
        """Fault in the staging buffers for the first save, off the training thread."""
        try:
            sources = staging_sources(state)
        except Exception as exc:  # best effort: the first save raises it if it matters
            log.warning("could not reserve staging memory for tier saves: %s", exc)
            return
        self._saver.submit(self._pool.reserve, sources)

    def _durable_name(self, step: int) -> str:
        for e in list_steps(self.durable.storage):
            if e.step == step and e.committed:
                return e.name
        return step_name(step)

    # -- listing (each rank alone) ------------------------------------------------------

    def steps(self, tier: Tier | None = None) -> list[int]:
        local = self.ctx.local.committed_steps() if tier in (None, "local") else []
        durable = []
        if tier in (None, "durable"):
            durable = [e.step for e in list_steps(self.durable.storage) if e.committed]
        return sorted(set(local) | set(durable))


def _refuse_unwritable(coord: Coordinator | LocalCoordinator, local: LocalTier) -> None:
    """Collective: every rank can create files in its ``local_dir``, or every rank raises.

    The room a save needs is known only at the first save (from the state), where the
    room check runs; what construction can check without a state, it does here."""
    problems = coord.exchange("tiers-probe", local.unwritable)
    bad = [f"rank {r}: {p}" for r, p in enumerate(problems) if p is not None]
    if bad:
        raise LocalTierError(
            "the local tier cannot be used: " + "; ".join(bad) + ": give each node a local "
            "directory it can write (a RAM disk or a local drive), or save without local_dir"
        )


def _new_group(process_group: dist.ProcessGroup | None, timeout: float) -> dist.ProcessGroup:
    """The tiers' own gloo group (collective): file transfers never meet training's
    collectives, and a dead peer fails them after ``timeout``."""
    limit = datetime.timedelta(seconds=timeout)
    if process_group is None:
        group = dist.new_group(backend="gloo", timeout=limit)
    else:
        ranks = dist.get_process_group_ranks(process_group)
        group = dist.new_group(
            ranks=ranks, backend="gloo", timeout=limit, use_local_synchronization=True
        )
    assert group is not None
    return group


def _rank(process_group: dist.ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return int(dist.get_rank(process_group))


def _settle(future: Future[list[int]], job: Callable[[], list[int]]) -> None:
    try:
        future.set_result(job())
    except BaseException as exc:  # raised where rank 0 reads the result
        future.set_exception(exc)


def _damaged(exc: CheckpointError) -> bool:
    """Whether a load failed (on some rank) because the data failed its checksums."""
    if isinstance(exc, CorruptCheckpointError):
        return True
    failures = exc.failures.values() if isinstance(exc, RankFailureError) else ()
    return any(isinstance(f, CorruptCheckpointError) for f in failures)
