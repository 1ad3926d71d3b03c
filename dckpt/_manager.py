"""``CheckpointManager``: numbered checkpoints under one root, with retention and cleanup.

``save``, ``load`` and ``wait`` are collective; listing is done by each rank on its own.
Deletions happen on rank 0 only; a save returns on every rank once rank 0 has applied
them, so every rank then lists the same steps. Naming, listing, retention and the cleanup
policy (what is provably dead) live in :mod:`dckpt._steps`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch.distributed as dist

from dckpt import _api, _async, _save
from dckpt._args import (
    check_bool,
    check_int,
    check_options,
    check_path,
    check_process_group,
    check_state,
    check_tiers,
    check_timeout,
)
from dckpt._async import AsyncSaveHandle
from dckpt._coord import DEFAULT_TIMEOUT, coordinator_for
from dckpt._errors import ArgumentTypeError, CheckpointError
from dckpt._steps import (
    StepEntry,
    join_path,
    remove_dead,
    retained_steps,
    retire,
    scan_root,
    step_name,
)
from dckpt._tidy import StepCleaner, WriterMarker
from dckpt.storage import open_storage
from dckpt.tiers import TieredCheckpoints
from dckpt.tiers._listing import TierListing

# The CLI and the tests take the step helpers from here as well as from dckpt._steps.
__all__ = ["CheckpointManager", "StepEntry", "retained_steps", "scan_root", "step_name"]

log = logging.getLogger("dckpt")

_Method = TypeVar("_Method", bound=Callable[..., Any])


def _step_by_keyword(method: _Method) -> _Method:
    """Refuse a step passed by position (``load(state, 7)``): the order of ``save(step,
    state)`` would make it easy to swap them, so ``load`` takes the step only by keyword."""

    @functools.wraps(method)
    def checked(self: CheckpointManager, state: object, *extra: object, **kwargs: Any) -> Any:
        if extra:
            raise ArgumentTypeError(
                f"CheckpointManager.{method.__name__}() takes the step by keyword only: call "
                f"{method.__name__}(state, step={extra[0]!r}); got {len(extra)} positional "
                f"argument(s) after state"
            )
        return method(self, state, **kwargs)

    return cast(_Method, checked)


@dataclass
class _InFlight:
    """An async save of this manager that has not been waited for yet."""

    handle: AsyncSaveHandle
    step: int
    name: str
    marker: WriterMarker | None


class CheckpointManager(TierListing):
    """Numbered checkpoints under one root, with retention, rollback and crash cleanup.

    Each step is an ordinary dckpt checkpoint in ``<root>/step-<n>/`` (``step-00000042``:
    listings sort by step), which [`dckpt.load`][dckpt.load] and the command line read
    too. A step counts once committed, so a crashed save is never taken for the latest.
    ``save``, ``load`` and ``wait`` are collective (every rank calls them, in the same
    order); the listing methods work on each rank alone.

    Retention: once a save has committed, rank 0 keeps the newest ``keep_last`` steps and
    the multiples of ``keep_every``, and deletes the other committed steps; the step just
    saved is never deleted by its own retention. Saving a step that exists overwrites it;
    the old copy stays loadable until the new one commits.

    Rollback: saving step ``s`` while newer committed steps exist (after
    ``load(state, step=s0)``, or a run restarted from scratch in the same root) abandons
    them: once ``s`` commits they are deleted (logged at INFO level), so that
    [`latest_step`][dckpt.CheckpointManager.latest_step] and ``load`` resume from ``s``.

    Async mode: ``save`` returns once the state is copied to host memory and the previous
    async save has finished; writing, commit and retention complete in the background
    (seen at the next ``save``, ``load`` or ``wait``). ``load`` also reserves the staging
    memory ([`dckpt.prepare_async_save`][dckpt.prepare_async_save]) for the first save.

    Managers may share a root: cleanup deletes only what is provably dead (a step whose
    saving process is gone, data older than ``max(2 x timeout, 1 hour)`` on object
    stores), but retention and rollback apply to every step, so separate jobs need
    separate roots.

    Args:
        root: The directory (or fsspec URL, such as ``s3://bucket/run``) that holds the
            steps. Created by the first save.
        keep_last: How many of the newest committed steps to keep; None keeps every step.
        keep_every: Also keep every step that is a multiple of this (for example 1000,
            to keep a long-term history); None keeps no extra steps.
        async_save: Save in the background ([`dckpt.async_save`][dckpt.async_save]); see
            above.
        process_group: The ranks that save and load together; None means the default
            group, or one plain process when ``torch.distributed`` is not initialized.
        storage_options: Options for the storage backend of a URL root (endpoint,
            credentials profile, ``{"dckpt": {...}}`` tuning), as for
            [`dckpt.save`][dckpt.save].
        timeout: Seconds each collective step waits for the other ranks before raising
            [`CheckpointTimeoutError`][dckpt.CheckpointTimeoutError].
        durable: Flush every file to stable storage (fsync) before a save commits. False
            is faster and fits scratch runs: a power loss or kernel crash may then lose
            or damage the latest steps (a load detects damage by checksum).
        allow_pickle: Let saves pickle values that are not tensors or plain data, and let
            loads unpickle them. Only for checkpoints you trust: unpickling runs code.
        local_dir: Tiered mode: a node-local directory (RAM disk or local drive, one per
            node) where every save lands, replicated to other nodes; the root becomes the
            durable tier. Construction is then collective. See dckpt.tiers.
        replicas: How many other nodes hold a copy of each rank's files (tiered mode).
        persist_every: Steps that are multiples of this also reach the root, in the
            background, copied from the local tier (tiered mode).
        keep_local: How many committed steps each node keeps in ``local_dir``.
        node_of: ``rank -> node label`` (ranks with equal labels share a node); None:
            torchrun's node rank, else the host name.

    Raises:
        ArgumentError: An argument has a bad value (``keep_last=-1``); the message
            names it. Nothing is created.
        ArgumentTypeError: An argument has the wrong type (``keep_last="3"``).

    Example:
        ```python
        import dckpt

        manager = dckpt.CheckpointManager("runs/exp1", keep_last=3, keep_every=1000)
        state = {"model": model, "optimizer": optimizer, "step": 0}
        start = manager.load(state)  # None on a fresh start
        for step in range(0 if start is None else start + 1, 10_000):
            train_one_step(model, optimizer)
            state["step"] = step
            if step % 500 == 0:
                manager.save(step, state)
        manager.wait()
        ```
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = 3,
        keep_every: int | None = None,
        async_save: bool = False,
        process_group: dist.ProcessGroup | None = None,
        storage_options: dict[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        durable: bool = True,
        allow_pickle: bool = False,
        local_dir: str | os.PathLike[str] | None = None,
        replicas: int = 1,
        persist_every: int = 1,
        keep_local: int = 2,
        node_of: Callable[[int], Hashable] | None = None,
    ) -> None:
        check_path(root, "root")
        check_tiers(local_dir, replicas, persist_every, keep_local, node_of)
        check_int("keep_last", keep_last, minimum=0, optional=True)
        check_int("keep_every", keep_every, minimum=1, optional=True)
        check_bool("async_save", async_save)
        check_process_group(process_group)
        check_options(storage_options)
        check_timeout(timeout)
        check_bool("durable", durable)
        check_bool("allow_pickle", allow_pickle)
        self.root = os.fspath(root)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self.process_group = process_group
        self.storage_options = storage_options
        self.timeout = timeout
        self.durable = durable
        self.allow_pickle = allow_pickle
        if local_dir is None:  # tiered: the tiers open the root off the recovery's path
            self._storage = open_storage(self.root, storage_options)
            self._cleaner = StepCleaner(self._storage, timeout=timeout)
        self._inflight: _InFlight | None = None
        self._abandoned: set[int] = set()  # steps whose save by this manager failed
        self._tiers = None
        if local_dir is not None:
            self._tiers = TieredCheckpoints.for_manager(
                self, local_dir=os.fspath(local_dir), replicas=replicas,
                persist_every=persist_every, keep_local=keep_local, node_of=node_of,
            )  # fmt: skip

    # -- saving -----------------------------------------------------------------------

    def save(self, step: int, state: Mapping[str, Any]) -> None:
        """Save ``state`` as ``step``, then apply rollback and retention (collective).

        Every rank calls it with its own state. Before saving, rank 0 removes what crashed
        saves of older steps left, where provably dead; after the commit it deletes the
        steps that rollback and retention drop, and every rank returns once that is done,
        so that all ranks list the same steps. In async mode it first waits for the
        previous async save, raising its error if it failed (this save is then not
        started), and returns once ``state`` is copied to host memory.

        Args:
            step: The step number, 0 or more.
            state: What to save: a dict whose values are modules, optimizers, tensors,
                DTensors, Stateful objects and plain values, as for
                [`dckpt.save`][dckpt.save].

        Raises:
            ArgumentError: ``step`` is negative, or another argument is bad.
            ArgumentTypeError: ``step`` is not an int, or ``state`` not a dict.
            UnsupportedStateError: A value in ``state`` cannot be saved (the message names
                its key).
            StorageError: Writing failed (disk full, permissions, the object store).
            RankFailureError: The save failed on another rank (``.failures`` holds each
                rank's error).
            CheckpointTimeoutError: A rank did not arrive within ``timeout``.

        Example:
            ```python
            manager.save(step, {"model": model, "optimizer": optimizer, "step": step})
            ```
        """
        check_int("step", step, minimum=0)
        check_state(state)
        if self._tiers is not None:
            return self._tiers.save(step, state)
        self._finish_pending()
        rank = self._rank()
        name = self._name_of(step)
        marker = self._cleaner.hold(name) if rank == 0 else None
        path = join_path(self.root, name)
        options: dict[str, Any] = {
            "process_group": self.process_group,
            "overwrite": True,
            "durable": self.durable,
            "timeout": self.timeout,
            "allow_pickle": self.allow_pickle,
            "storage_options": self.storage_options,
        }
        try:
            if rank == 0:
                self._cleanup(saving=step)
            if self.async_save:
                handle = _async.async_save(state, path, **options)
                self._inflight = _InFlight(handle, step, name, marker)
                return
            _save.save(state, path, **options)
        except BaseException:
            if rank == 0:
                self._abandon(step, name, marker)
            raise
        self._committed(step, marker)

    def wait(self) -> None:
        """Wait until the in-flight async save (if any) has committed, then apply retention.

        Collective in async mode: every rank calls it. A no-op when nothing is in flight
        (always, in sync mode). Call it at the end of training, so that the last
        step is committed, retention applied, and a failure raised here; a normal exit of
        the interpreter completes the save too, but applies no retention.

        Raises:
            StorageError: The async save failed writing (the manager is usable again
                afterwards; the step is not committed).
            RankFailureError: The async save failed on another rank.
            CheckpointTimeoutError: A rank did not arrive within ``timeout``.

        Example:
            ```python
            manager.save(final_step, state)
            manager.wait()  # the final step is committed
            ```
        """
        if self._tiers is not None:
            return self._tiers.wait()
        self._finish_pending()

    def _finish_pending(self) -> None:
        job, self._inflight = self._inflight, None
        if job is None:
            return
        try:
            job.handle.result()
        except BaseException:
            if self._rank() == 0:
                self._abandon(job.step, job.name, job.marker)
            raise
        self._committed(job.step, job.marker)

    def _committed(self, step: int, marker: WriterMarker | None) -> None:
        """After ``step`` committed: rank 0 applies rollback and retention while the other
        ranks wait, so that no rank lists steps that are about to go."""
        if marker is not None:
            marker.release()
        self._abandoned.discard(step)
        coord = coordinator_for(self.process_group, timeout=self.timeout, namespace="manager")

        def local() -> None:
            if coord.rank == 0:
                self._retire(saved=step)

        try:
            coord.exchange("manager-retire", local)
        except CheckpointError as exc:
            # The step is committed; only the cleanup, or waiting for it, went wrong.
            log.warning(
                "step %d was saved under %s, but cleaning up after it failed: %s",
                step,
                self._storage.location,
                exc,
            )

    # -- loading ----------------------------------------------------------------------

    @_step_by_keyword
    def load(
        self, state: Mapping[str, Any], *, step: int | None = None, strict: bool = True
    ) -> int | None:
        """Load a committed step into ``state`` in place (collective); return its number.

        Every rank calls it with its own state (built as for training, under any world
        size or sharding). Rank 0 picks the step and tells the others, so ranks never
        load different steps. In async mode this first waits for the in-flight save,
        and afterwards reserves the staging memory for the next save.

        Args:
            state: The dict to load into, as for [`dckpt.load`][dckpt.load]: its tensors
                are filled in place, Stateful objects get ``load_state_dict``, plain
                values are replaced.
            step: The step to load (keyword only); None loads the latest committed one.
            strict: When True, a key of ``state`` that the checkpoint lacks, or a
                shape or dtype that differs, raises; when False, whatever matches loads.

        Returns:
            The step loaded, or None when no step has committed yet (``state`` is then
            left untouched: a fresh start).

        Raises:
            ArgumentTypeError: ``step`` was passed by position (``load(state, 7)``), is
                not an int, or ``state`` is not a dict.
            ArgumentError: ``step`` is negative.
            CheckpointNotFoundError: ``step`` was given and has no committed checkpoint.
            StateMismatchError: With ``strict=True``, keys are absent or shapes/dtypes
                differ; the message names every such key.
            CorruptCheckpointError: The step's data fails its checksums.
            RankFailureError: The load failed on another rank.
            CheckpointTimeoutError: A rank did not arrive within ``timeout``.

        Example:
            ```python
            state = {"model": model, "optimizer": optimizer, "step": 0}
            step = manager.load(state)  # the latest; or manager.load(state, step=1000)
            start = 0 if step is None else step + 1
            ```
        """
        check_state(state)
        check_int("step", step, minimum=0, optional=True)
        check_bool("strict", strict)
        if self._tiers is not None:
            return self._tiers.load(state, step=step, strict=strict)
        self._finish_pending()
        coord = coordinator_for(self.process_group, timeout=self.timeout, namespace="manager")

        def local() -> tuple[int, str] | None:
            if coord.rank != 0:
                return None
            chosen = self.latest_step() if step is None else step
            return None if chosen is None else (chosen, self.path_of(chosen))

        target = coord.exchange("manager-pick", local, lambda picks: picks[0])
        if target is not None:
            _api.load(
                state,
                target[1],
                process_group=self.process_group,
                strict=strict,
                timeout=self.timeout,
                allow_pickle=self.allow_pickle,
                storage_options=self.storage_options,
            )
        if self.async_save:
            # The state is complete now: get the staging memory ready before the first save.
            # Best effort: whatever stops it stops the first save too, and is raised there.
            try:
                _async.prepare_async_save(state)
            except CheckpointError as exc:
                log.warning("could not reserve staging memory for async saves: %s", exc)
        return None if target is None else int(target[0])

    # -- deleting (rank 0) ------------------------------------------------------------

    def _rank(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 0
        return int(dist.get_rank(self.process_group))

    def _busy(self) -> set[int]:
        return set() if self._inflight is None else {self._inflight.step}

    def _abandon(self, step: int, name: str, marker: WriterMarker | None) -> None:
        """After this manager's save of ``step`` failed (rank 0)."""
        self._abandoned.add(step)
        self._cleaner.abandon(name, marker)

    def _cleanup(self, *, saving: int) -> None:
        remove_dead(
            self._storage,
            self._cleaner,
            saving=saving,
            busy=self._busy(),
            abandoned=self._abandoned,
        )
        self._abandoned = {s for s in self._abandoned if s >= saving}

    def _retire(self, *, saved: int) -> None:
        retire(
            self._storage,
            self._cleaner,
            saved=saved,
            busy=self._busy(),
            keep_last=self.keep_last,
            keep_every=self.keep_every,
        )
