"""``CheckpointManager``: numbered checkpoints under one root, with retention and cleanup.

Layout: ``<root>/step-<n>/`` is an ordinary dckpt checkpoint. New steps are written as
``step-{n:08d}`` so that a plain listing sorts by step; unpadded ``step-<n>`` names are
read too. A step counts only once committed (its ``manifest.json`` exists and is a valid
manifest), so a crashed save is never picked up as the latest.

Every method is collective where it touches checkpoints (``save``, ``load``, ``wait``);
listing is done by each rank on its own. Deletions (retention, leftovers of crashed saves)
happen on rank 0 only, after the new step has committed, and never touch a step that a
save of this manager is still writing. All access goes through :mod:`dckpt._storage`, so
roots may be URLs as well as local paths.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dckpt._coord import DEFAULT_TIMEOUT, coordinator_for
from dckpt._errors import CheckpointError, CorruptCheckpointError
from dckpt._format import DATA_DIR, MANIFEST_NAME, Manifest, data_dir, manifest_from_bytes
from dckpt._storage import Storage, open_storage

log = logging.getLogger("dckpt")

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
    committed) or ``"corrupt"`` (a manifest that does not parse; never deleted
    automatically, so it can be inspected). ``size`` counts data bytes: the manifest's
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


class CheckpointManager:
    """Saves numbered steps under ``root``; keeps the newest ``keep_last`` (plus every
    ``keep_every``-th step); loads the latest committed one.

    ``save`` overwrites a step that is already committed (the old copy stays loadable
    until the new one commits). With ``async_save=True`` a save returns once the state
    is staged and the previous async save (if any) has finished; its retention runs when
    it has committed, at the next ``save`` or at ``wait``. In async mode ``load`` also
    reserves the staging memory (:func:`dckpt.prepare_async_save`), so that the first save
    blocks no longer than later ones.
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
        if keep_last is not None and (isinstance(keep_last, bool) or keep_last < 0):
            raise ValueError(f"keep_last must be None or >= 0, got {keep_last!r}")
        if keep_every is not None and (isinstance(keep_every, bool) or keep_every < 1):
            raise ValueError(f"keep_every must be None or >= 1, got {keep_every!r}")
        self.root = os.fspath(root)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self.process_group = process_group
        self.storage_options = storage_options
        self.timeout = timeout
        self._storage = open_storage(self.root, storage_options)
        self._pending: Any = None  # the handle of the in-flight async save
        self._pending_step: int | None = None

    # -- listing ----------------------------------------------------------------------

    def entries(self) -> list[StepEntry]:
        """Every step directory, committed or not (see :func:`scan_root`)."""
        return _scan(self._storage)

    def steps(self) -> list[int]:
        """Committed steps, ascending. Leftovers of crashed saves are not listed."""
        return [e.step for e in self.entries() if e.committed]

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def path_of(self, step: int) -> str:
        """Where ``step`` lives: its existing directory (committed preferred), else the
        zero-padded name."""
        for e in self.entries():
            if e.step == step:
                return join_path(self.root, e.name)
        return join_path(self.root, step_name(step))

    # -- saving -----------------------------------------------------------------------

    def save(self, step: int, state: Mapping[str, Any]) -> None:
        """Save ``state`` as ``step`` (collective), then apply retention on rank 0.

        In async mode this first finishes the previous async save, raising its error if
        it failed (this save is then not started).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self._finish_pending()
        rank = self._rank()
        if rank == 0:
            self._cleanup(saving=step)
        path = self.path_of(step)
        options: dict[str, Any] = {
            "process_group": self.process_group,
            "overwrite": True,
            "timeout": self.timeout,
            "storage_options": self.storage_options,
        }
        if self.async_save:
            from dckpt import _async

            self._pending = _async.async_save(state, path, **options)
            self._pending_step = step
            return
        from dckpt._save import save

        save(state, path, **options)
        if rank == 0:
            self._retain()

    def wait(self) -> None:
        """Block until the in-flight async save (if any) has committed; apply retention.

        Raises that save's error, if it failed (the manager is usable again afterwards).
        """
        self._finish_pending()

    def _finish_pending(self) -> None:
        handle, self._pending = self._pending, None
        self._pending_step = None
        if handle is None:
            return
        handle.result()
        if self._rank() == 0:
            self._retain()

    # -- loading ----------------------------------------------------------------------

    def load(
        self, state: Mapping[str, Any], step: int | None = None, *, strict: bool = True
    ) -> int | None:
        """Load ``step`` (default: the latest committed one) into ``state``; return the step.

        Returns None, leaving ``state`` untouched, when no step has committed yet. Ranks
        agree on the step through rank 0, so they never load different ones.
        """
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
        return set() if self._pending_step is None else {self._pending_step}

    def _cleanup(self, *, saving: int) -> None:
        """Remove what crashed saves left: uncommitted steps older than ``saving`` and
        data directories inside committed steps that their manifest does not reference."""
        busy = self._busy() | {saving}
        for e in _scan_all(self._storage):
            if e.step in busy:
                continue
            if e.status == "incomplete" and e.step < saving:
                self._delete_step(e)
            elif e.committed:
                for sid in e.data_ids:
                    if sid != e.save_id:
                        self._quietly(self._storage.delete_prefix, f"{e.name}/{data_dir(sid)}")

    def _retain(self) -> None:
        """Delete committed steps beyond the retention policy (never the newest one)."""
        committed = [e for e in self.entries() if e.committed]
        keep = retained_steps(
            [e.step for e in committed], keep_last=self.keep_last, keep_every=self.keep_every
        )
        busy = self._busy()
        for e in committed:
            if e.step not in keep and e.step not in busy:
                self._delete_step(e)

    def _delete_step(self, e: StepEntry) -> None:
        # The manifest goes first, so a half-deleted step never looks committed.
        if self._quietly(self._storage.delete, f"{e.name}/{MANIFEST_NAME}"):
            self._quietly(self._storage.delete_prefix, e.name)

    def _quietly(self, fn: Callable[[str], None], name: str) -> bool:
        """Deletion failures must not fail a save that has already committed."""
        try:
            fn(name)
        except (CheckpointError, OSError) as exc:
            warnings.warn(
                f"dckpt: could not remove an old checkpoint under {self._storage.location}: {exc}",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        return True


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
