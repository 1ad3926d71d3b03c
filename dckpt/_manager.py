"""``CheckpointManager``: numbered checkpoints under one root, with retention and cleanup.

Layout: ``<root>/step-<n>/`` is an ordinary dckpt checkpoint. New steps are written as
``step-{n:08d}`` so that a plain listing sorts by step; unpadded ``step-<n>`` names are
read too. A step counts only once committed (its ``manifest.json`` exists and is a valid
manifest), so a crashed save is never picked up as the latest.

Every method is collective where it touches checkpoints (``save``, ``load``, ``wait``);
listing is done by each rank on its own. Deletions happen on rank 0 only; a save returns
on every rank once rank 0 has applied them, so every rank then lists the same steps. All
access goes through :mod:`dckpt.storage._base`, so roots may be URLs as well as local paths.

Cleanup deletes only what is provably dead, so that several managers (or jobs) sharing a
root never delete each other's saves in progress:

- Local filesystems: for the whole save of a step, rank 0 holds a shared ``flock`` on
  ``<step>/.dckpt.writing`` (see :mod:`dckpt._tidy`). A cleanup touches a step (deletes
  it, or the data of killed saves inside it) only while it holds that lock exclusively,
  which it gets only when no live manager is saving the step: the kernel drops a dead
  process's lock. Files under a step written by something else than a manager (a plain
  ``dckpt.save`` into a step directory) are not protected by the lock.
- Object stores, and filesystems without ``flock`` (no lock to ask): an uncommitted step
  is deleted when this manager's own save of it failed, or when every data directory in
  it is named by a save id planned more than ``max(2 x timeout, 1 hour)`` ago; one whose
  data cannot be dated that way is never deleted automatically. Inside committed steps,
  the data of saves planned before the committed one, or beyond that grace period, goes.

Uncommitted steps are removed by the save of a later step only (a higher-numbered one may
be another job's save in progress); corrupt manifests are never deleted, so they can be
inspected.

Rollback: saving step ``s`` while committed steps newer than ``s`` exist means the run was
rolled back (it loaded an older step, or restarted from scratch). The newer steps belong
to the abandoned timeline; they would otherwise shadow the new one as the latest step,
and retention would delete the new steps first. So once ``s`` has committed, rank 0
deletes every committed step newer than ``s`` (logging their numbers at INFO level), and
retention then counts from ``s``. The step just saved is never removed by its own
retention.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dckpt._args import (
    check_bool,
    check_int,
    check_options,
    check_path,
    check_process_group,
    check_state,
    check_timeout,
)
from dckpt._coord import DEFAULT_TIMEOUT, coordinator_for
from dckpt._errors import CheckpointError, CorruptCheckpointError
from dckpt._format import DATA_DIR, MANIFEST_NAME, Manifest, manifest_from_bytes
from dckpt._tidy import StepCleaner, WriterMarker
from dckpt.storage._base import Storage, open_storage

log = logging.getLogger("dckpt")

# A torch DCP checkpoint in a step directory (a job switching to dckpt): not ours to delete.
_DCP_METADATA = ".metadata"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_name(step: int) -> str:
    """The directory name a new save of ``step`` gets (zero-padded: listings sort by step)."""
    return f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    """The step number of a ``step-<n>`` directory name (padded or not), else None."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True, slots=True)
class StepEntry:
    """One ``step-<n>`` directory under a root, committed or not.

    ``status`` is ``"committed"``, ``"incomplete"`` (no manifest: a save that never
    committed), ``"corrupt"`` (a manifest that does not parse; never deleted
    automatically, so it can be inspected) or ``"foreign"`` (a torch DCP checkpoint; never
    deleted or loaded by the manager). ``size`` counts data bytes: the manifest's
    files when committed, whatever is on storage otherwise (only with ``sizes=True``).
    """

    step: int
    name: str
    status: str
    created: float | None = None
    size: int | None = None
    save_id: str | None = None
    data_ids: tuple[str, ...] = ()
    error: str = ""

    @property
    def committed(self) -> bool:
        return self.status == "committed"


def join_path(root: str, name: str) -> str:
    """``root/name`` for local paths and URLs alike."""
    if "://" in root:
        return f"{root.rstrip('/')}/{name}"
    return os.path.join(root, name)


def scan_root(
    root: Any, storage_options: dict[str, Any] | None = None, *, sizes: bool = False
) -> list[StepEntry]:
    """Every ``step-<n>`` directory under ``root``, ascending by step.

    When two directories spell the same step (``step-7`` and ``step-00000007``) the
    committed one wins, then the zero-padded one.
    """
    storage = open_storage(root, storage_options)
    return _scan(storage, sizes=sizes)


def _scan_all(storage: Storage, *, sizes: bool = False) -> list[StepEntry]:
    """Every step directory, including several spellings of one step."""
    if not storage.exists():
        return []
    files: dict[str, list[str]] = {}
    for name in storage.list(""):
        head, _, rest = name.partition("/")
        if rest and parse_step(head) is not None:
            files.setdefault(head, []).append(rest)
    return [_entry(storage, name, rels, sizes) for name, rels in sorted(files.items())]


def _scan(storage: Storage, *, sizes: bool = False) -> list[StepEntry]:
    entries = _scan_all(storage, sizes=sizes)
    best: dict[int, StepEntry] = {}
    for e in entries:
        prior = best.get(e.step)
        if prior is None or _rank(e) > _rank(prior):
            best[e.step] = e
    return [best[s] for s in sorted(best)]


def _rank(e: StepEntry) -> tuple[bool, bool]:
    return (e.committed, e.name == step_name(e.step))


def _entry(storage: Storage, name: str, rels: list[str], sizes: bool) -> StepEntry:
    step = parse_step(name)
    assert step is not None
    data_ids = tuple(
        sorted(
            {r.split("/")[1] for r in rels if r.startswith(f"{DATA_DIR}/") and r.count("/") >= 2}
        )
    )
    if MANIFEST_NAME not in rels and _DCP_METADATA in rels:
        return StepEntry(step, name, "foreign", data_ids=data_ids)
    if MANIFEST_NAME not in rels:
        size = sum(storage.size(f"{name}/{r}") or 0 for r in rels) if sizes else None
        return StepEntry(step, name, "incomplete", size=size, data_ids=data_ids)
    try:
        manifest = _read_manifest(storage, name)
    except CheckpointError as exc:
        return StepEntry(step, name, "corrupt", data_ids=data_ids, error=str(exc))
    return StepEntry(
        step,
        name,
        "committed",
        created=manifest.created,
        size=manifest.total_bytes,
        save_id=manifest.save_id,
        data_ids=data_ids,
    )


def _read_manifest(storage: Storage, name: str) -> Manifest:
    source = f"{storage.location}/{name}/{MANIFEST_NAME}"
    raw = storage.read_file(f"{name}/{MANIFEST_NAME}")
    if raw is None:  # deleted between listing and reading
        raise CorruptCheckpointError(f"{source} disappeared while reading it")
    return manifest_from_bytes(raw, source=source)


@dataclass
class _InFlight:
    """An async save of this manager that has not been waited for yet."""

    handle: Any
    step: int
    name: str
    marker: WriterMarker | None


class CheckpointManager:
    """Saves numbered steps under ``root``; keeps the newest ``keep_last`` (plus every
    ``keep_every``-th step); loads the latest committed one.

    ``save`` overwrites a step that is already committed (the old copy stays loadable
    until the new one commits). With ``async_save=True`` a save returns once the state
    is staged and the previous async save (if any) has finished; its retention runs when
    it has committed, at the next ``save`` or at ``wait``. In async mode ``load`` also
    reserves the staging memory (:func:`dckpt.prepare_async_save`), so that the first save
    blocks no longer than later ones.

    Rollback: saving step ``s`` while committed steps newer than ``s`` exist (after
    ``load(state, step=s0)`` with ``s0 < s``, or a run restarted from scratch in the same
    root) abandons those newer steps: once ``s`` has committed they are deleted (rank 0,
    logged at INFO level), so that ``latest_step()`` and ``load()`` resume from ``s``, and
    retention counts from ``s``. The step just saved is never deleted by its own
    retention. If the process dies between the commit of ``s`` and that deletion, the
    newer steps are still there and the next start resumes from them.

    Several managers may share a root: a cleanup deletes only steps and files whose
    writers are provably gone (see the module docstring). Their retention and rollback
    deletions still apply to every step under the root, so jobs that must keep their
    own steps need their own roots.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = 3,
        keep_every: int | None = None,
        async_save: bool = False,
        process_group: Any = None,
        storage_options: dict[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        check_path(root, "root")
        check_int("keep_last", keep_last, minimum=0, optional=True)
        check_int("keep_every", keep_every, minimum=1, optional=True)
        check_bool("async_save", async_save)
        check_process_group(process_group)
        check_options(storage_options)
        check_timeout(timeout)
        self.root = os.fspath(root)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self.process_group = process_group
        self.storage_options = storage_options
        self.timeout = timeout
        self._storage = open_storage(self.root, storage_options)
        self._cleaner = StepCleaner(self._storage, timeout=timeout)
        self._inflight: _InFlight | None = None
        self._abandoned: set[int] = set()  # steps whose save by this manager failed

    # -- listing ----------------------------------------------------------------------

    def entries(self) -> list[StepEntry]:
        """Every step directory, committed or not (see :func:`scan_root`)."""
        return _scan(self._storage)

    def steps(self) -> list[int]:
        """Committed steps, ascending. Leftovers of crashed saves are not listed."""
        return [e.step for e in self.entries() if e.committed]

    def latest_step(self) -> int | None:
        """The step a resumed job should load: the newest committed one (after a rollback,
        the newer steps of the abandoned run are gone once the rolled-back save commits)."""
        steps = self.steps()
        return steps[-1] if steps else None

    def path_of(self, step: int) -> str:
        """Where ``step`` lives: its existing directory (committed preferred), else the
        zero-padded name."""
        return join_path(self.root, self._name_of(step))

    def _name_of(self, step: int) -> str:
        for e in self.entries():
            if e.step == step:
                return e.name
        return step_name(step)

    # -- saving -----------------------------------------------------------------------

    def save(self, step: int, state: Mapping[str, Any]) -> None:
        """Save ``state`` as ``step`` (collective), then apply rollback and retention on
        rank 0; returns on every rank once those deletions are done.

        In async mode this first finishes the previous async save, raising its error if
        it failed (this save is then not started).
        """
        check_int("step", step, minimum=0)
        check_state(state)
        self._finish_pending()
        rank = self._rank()
        name = self._name_of(step)
        marker = self._cleaner.hold(name) if rank == 0 else None
        path = join_path(self.root, name)
        options: dict[str, Any] = {
            "process_group": self.process_group,
            "overwrite": True,
            "timeout": self.timeout,
            "storage_options": self.storage_options,
        }
        try:
            if rank == 0:
                self._cleanup(saving=step)
            if self.async_save:
                from dckpt import _async

                handle = _async.async_save(state, path, **options)
                self._inflight = _InFlight(handle, step, name, marker)
                return
            from dckpt._save import save

            save(state, path, **options)
        except BaseException:
            if rank == 0:
                self._abandon(step, name, marker)
            raise
        self._committed(step, marker)

    def wait(self) -> None:
        """Block until the in-flight async save (if any) has committed; apply retention.

        Raises that save's error, if it failed (the manager is usable again afterwards).
        """
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
    def load(
        self, state: Mapping[str, Any], step: int | None = None, *, strict: bool = True
    ) -> int | None:
        """Load ``step`` (default: the latest committed one) into ``state``; return the step.

        Returns None, leaving ``state`` untouched, when no step has committed yet. Ranks
        agree on the step through rank 0, so they never load different ones.
        """
        check_state(state)
        check_int("step", step, minimum=0, optional=True)
        check_bool("strict", strict)
        self._finish_pending()
        coord = coordinator_for(self.process_group, timeout=self.timeout, namespace="manager")

        def local() -> tuple[int, str] | None:
            if coord.rank != 0:
                return None
            chosen = self.latest_step() if step is None else step
            return None if chosen is None else (chosen, self.path_of(chosen))

        target = coord.exchange("manager-pick", local, lambda picks: picks[0])
        if target is not None:
            from dckpt._load import load

            load(
                state,
                target[1],
                process_group=self.process_group,
                strict=strict,
                timeout=self.timeout,
                storage_options=self.storage_options,
            )
        if self.async_save:
            # The state is complete now: get the staging memory ready before the first save.
            # Best effort: whatever stops it stops the first save too, and is raised there.
            from dckpt._async import prepare_async_save

            try:
                prepare_async_save(state)
            except CheckpointError as exc:
                log.warning("could not reserve staging memory for async saves: %s", exc)
        return None if target is None else int(target[0])

    # -- deleting (rank 0) ------------------------------------------------------------

    def _rank(self) -> int:
        import torch.distributed as dist

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
        """Remove what crashed saves left, where provably dead: uncommitted steps older
        than ``saving``, and data directories inside committed steps that their manifest
        does not reference."""
        busy = self._busy() | {saving}
        for e in _scan_all(self._storage):
            if e.step in busy:
                continue
            if e.status == "incomplete" and e.step < saving:
                abandoned = e.step in self._abandoned
                self._cleaner.remove_dead_step(e.name, e.data_ids, abandoned=abandoned)
            elif e.committed and e.save_id is not None and set(e.data_ids) - {e.save_id}:
                self._cleaner.tidy_step(e.name, e.data_ids, e.save_id)
        self._abandoned = {s for s in self._abandoned if s >= saving}

    def _retire(self, *, saved: int) -> None:
        """After ``saved`` committed: delete the committed steps newer than it (an abandoned
        timeline), then those beyond the retention policy counted from ``saved``."""
        committed = [e for e in self.entries() if e.committed]
        busy = self._busy()
        newer = [e for e in committed if e.step > saved and e.step not in busy]
        removed = [e.step for e in newer if self._cleaner.delete_if_free(e.name)]
        if removed:
            log.info(
                "step %d was saved after steps %s under %s: the run was rolled back, so those "
                "steps of the abandoned run were deleted",
                saved,
                ", ".join(map(str, removed)),
                self._storage.location,
            )
        if len(removed) < len(newer):
            log.warning(
                "steps %s under %s are newer than the step just saved (%d) but could not be "
                "deleted (another job is writing them, or deleting failed); they stay the "
                "latest steps until removed",
                ", ".join(str(e.step) for e in newer if e.step not in removed),
                self._storage.location,
                saved,
            )
        older = [e for e in committed if e.step <= saved]
        keep = retained_steps(
            [e.step for e in older], keep_last=self.keep_last, keep_every=self.keep_every
        )
        keep.add(saved)
        for e in older:
            if e.step not in keep and e.step not in busy:
                self._cleaner.delete_if_free(e.name)


def retained_steps(steps: list[int], *, keep_last: int | None, keep_every: int | None) -> set[int]:
    """The committed steps a retention policy keeps (always including the newest)."""
    if not steps:
        return set()
    ordered = sorted(steps)
    keep = set(ordered) if keep_last is None else set(ordered[max(0, len(ordered) - keep_last) :])
    if keep_every is not None:
        keep |= {s for s in ordered if s % keep_every == 0}
    keep.add(ordered[-1])
    return keep
