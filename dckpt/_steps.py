"""The steps under a :class:`dckpt.CheckpointManager` root: naming, listing, retention, cleanup.

A step directory is ``step-<n>`` (new saves write ``step-{n:08d}``, so that a plain
listing sorts by step). Listing reads every step's manifest, so it tells a committed step
from the leftovers of a save that never committed, a corrupt manifest, or a torch DCP
checkpoint that another tool wrote there. ``dckpt ls`` prints what :func:`scan_root` finds.

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
from dataclasses import dataclass
from typing import Any, Literal

from dckpt._errors import CheckpointError, CorruptCheckpointError
from dckpt._format import DATA_DIR, MANIFEST_NAME, Manifest, manifest_from_bytes
from dckpt._tidy import StepCleaner
from dckpt.storage import Storage, open_storage

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


StepStatus = Literal["committed", "incomplete", "corrupt", "foreign"]


@dataclass(frozen=True, slots=True)
class StepEntry:
    """One ``step-<n>`` directory under a manager's root, committed or not.

    Returned by [`CheckpointManager.entries`][dckpt.CheckpointManager.entries].

    Attributes:
        step: The step number parsed from the directory name.
        name: The directory name (``step-00000007``, or an unpadded ``step-7``).
        status: ``"committed"`` (its manifest exists and parses), ``"incomplete"`` (no
            manifest: a save that never committed), ``"corrupt"`` (a manifest that does
            not parse; never deleted automatically, so it can be inspected) or
            ``"foreign"`` (a torch DCP checkpoint; never deleted or loaded by the manager).
        created: When the save committed (seconds since the epoch); None if uncommitted.
        size: Data bytes: the manifest's files when committed; whatever is on storage
            for an incomplete step when listed with ``sizes=True``; else None.
        save_id: The id of the committed save (names its ``data/<save_id>/`` directory).
        data_ids: Every ``data/<id>/`` directory present, committed or left by a killed save.
        error: Why a corrupt manifest did not parse; empty otherwise.

    Example:
        ```python
        for e in manager.entries():
            print(e.step, e.status, e.size)
        ```
    """

    step: int
    name: str
    status: StepStatus
    created: float | None = None
    size: int | None = None
    save_id: str | None = None
    data_ids: tuple[str, ...] = ()
    error: str = ""

    @property
    def committed(self) -> bool:
        """Whether the step committed (loadable)."""
        return self.status == "committed"


class StepListing:
    """The steps under a root, as each rank lists them alone (not collective).

    The listing half of [`CheckpointManager`][dckpt.CheckpointManager].
    """

    root: str
    _storage: Storage

    def entries(self) -> list[StepEntry]:
        """Every step directory under the root, committed or not, ascending by step.

        Local to this rank, like every listing method. Of two directories that spell one
        step (``step-7``, ``step-00000007``), the committed one is listed, else the padded.

        Returns:
            One [`StepEntry`][dckpt._steps.StepEntry] a step; its ``status`` tells a
            committed step from a save that never committed, a corrupt manifest, or a
            torch DCP checkpoint (``"foreign"``).

        Raises:
            StorageError: Listing the root or reading a manifest failed.

        Example:
            ```python
            for e in manager.entries():
                print(e.name, e.status, e.size)
            ```
        """
        return list_steps(self._storage)

    def steps(self) -> list[int]:
        """The committed steps, ascending: those [`load`][dckpt.CheckpointManager.load] takes.

        Raises:
            StorageError: Listing the root or reading a manifest failed.

        Example:
            ```python
            manager.steps()  # [1000, 1500, 2000]; a crashed save of 2500 is not listed
            ```
        """
        return [e.step for e in self.entries() if e.committed]

    def latest_step(self) -> int | None:
        """The newest committed step (the one a resumed job loads), or None if there is none.

        Raises:
            StorageError: Listing the root or reading a manifest failed.

        Example:
            ```python
            fresh_start = manager.latest_step() is None
            ```
        """
        steps = self.steps()
        return steps[-1] if steps else None

    def path_of(self, step: int) -> str:
        """Where ``step`` lives: its existing directory (committed first), else the new name.

        Args:
            step: The step number.

        Returns:
            A local path or URL, which [`dckpt.load`][dckpt.load] and the ``dckpt``
            command line accept.

        Raises:
            StorageError: Listing the root failed.

        Example:
            ```python
            path = manager.path_of(manager.latest_step())
            dckpt.load({"model": model}, path, strict=False)  # the weights alone
            ```
        """
        return join_path(self.root, self._name_of(step))

    def _name_of(self, step: int) -> str:
        for e in self.entries():
            if e.step == step:
                return e.name
        return step_name(step)


def join_path(root: str, name: str) -> str:
    """``root/name`` for local paths and URLs alike."""
    if "://" in root:
        return f"{root.rstrip('/')}/{name}"
    return os.path.join(root, name)


def scan_root(
    root: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    *,
    sizes: bool = False,
) -> list[StepEntry]:
    """Every ``step-<n>`` directory under ``root``, ascending by step.

    When two directories spell the same step (``step-7`` and ``step-00000007``) the
    committed one wins, then the zero-padded one. ``sizes=True`` also sizes the
    uncommitted steps (one request per file).
    """
    storage = open_storage(root, storage_options)
    return list_steps(storage, sizes=sizes)


def list_step_dirs(storage: Storage, *, sizes: bool = False) -> list[StepEntry]:
    """Every step directory, including several spellings of one step."""
    if not storage.exists():
        return []
    files: dict[str, list[str]] = {}
    for name in storage.list(""):
        head, _, rest = name.partition("/")
        if rest and parse_step(head) is not None:
            files.setdefault(head, []).append(rest)
    return [_entry(storage, name, rels, sizes) for name, rels in sorted(files.items())]


def list_steps(storage: Storage, *, sizes: bool = False) -> list[StepEntry]:
    """One entry a step, as :func:`scan_root` picks it among several spellings."""
    entries = list_step_dirs(storage, sizes=sizes)
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


def remove_dead(
    storage: Storage, cleaner: StepCleaner, *, saving: int, busy: set[int], abandoned: set[int]
) -> None:
    """Before saving ``saving`` (rank 0): remove what crashed saves left, where provably
    dead: uncommitted steps older than ``saving``, and data directories inside committed
    steps that their manifest does not reference. ``abandoned``: steps whose save by this
    manager failed; ``busy``: steps this manager is saving."""
    busy = busy | {saving}
    for e in list_step_dirs(storage):
        if e.step in busy:
            continue
        if e.status == "incomplete" and e.step < saving:
            cleaner.remove_dead_step(e.name, e.data_ids, abandoned=e.step in abandoned)
        elif e.committed and e.save_id is not None and set(e.data_ids) - {e.save_id}:
            cleaner.tidy_step(e.name, e.data_ids, e.save_id)


def retire(
    storage: Storage,
    cleaner: StepCleaner,
    *,
    saved: int,
    busy: set[int],
    keep_last: int | None,
    keep_every: int | None,
) -> None:
    """After ``saved`` committed (rank 0): delete the committed steps newer than it (an
    abandoned timeline), then those beyond the retention policy counted from ``saved``."""
    committed = [e for e in list_steps(storage) if e.committed]
    newer = [e for e in committed if e.step > saved and e.step not in busy]
    removed = [e.step for e in newer if cleaner.delete_if_free(e.name)]
    if removed:
        log.info(
            "step %d was saved after steps %s under %s: the run was rolled back, so those "
            "steps of the abandoned run were deleted",
            saved,
            ", ".join(map(str, removed)),
            storage.location,
        )
    if len(removed) < len(newer):
        log.warning(
            "steps %s under %s are newer than the step just saved (%d) but could not be "
            "deleted (another job is writing them, or deleting failed); they stay the "
            "latest steps until removed",
            ", ".join(str(e.step) for e in newer if e.step not in removed),
            storage.location,
            saved,
        )
    older = [e for e in committed if e.step <= saved]
    keep = retained_steps([e.step for e in older], keep_last=keep_last, keep_every=keep_every)
    keep.add(saved)
    for e in older:
        if e.step not in keep and e.step not in busy:
            cleaner.delete_if_free(e.name)
