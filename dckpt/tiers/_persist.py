"""Persist: copy a committed local step to the durable tier, in the background.

Each rank copies the files it wrote (data files, and in format version 2 its shard files
and table), from its node's local tier (never from the live state), into the durable
``step-<n>/data/<save_id>/``, checking each against the manifest (a shard file against
the rows of its table, read and checked first); then rank 0 commits the same
manifest bytes there with the engine's commit (under the commit lock, after checking every
file is there), so the durable step is an ordinary dckpt checkpoint. The exchanges go
through the coordinator under their own namespace, never through the tiers' gloo group,
so a persist runs beside the next tier saves. Afterwards rank 0 applies the durable
tier's rollback and retention, as the plain manager does. A step the local tier had no
room for is saved to the durable tier directly instead (:func:`save_direct`), by the
engine's ordinary save from the staged state, under the same rules.

A failed persist raises :class:`PersistError` (naming the step) on every rank; what it
copied is removed when provably dead, as after a failed save of the plain manager.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch.distributed as dist

from dckpt._commit import commit
from dckpt._coord import Coordinator, LocalCoordinator
from dckpt._describe import Description
from dckpt._errors import CheckpointError, CorruptCheckpointError
from dckpt._faults import fault_point
from dckpt._format import MANIFEST_NAME, manifest_from_bytes
from dckpt._plancache import cache_for
from dckpt._request import SaveOptions
from dckpt._save import run_save
from dckpt._steps import join_path, remove_dead, retire, step_name
from dckpt._tidy import StepCleaner
from dckpt.storage import Storage, open_storage
from dckpt.tiers import _transfer
from dckpt.tiers._errors import PersistError
from dckpt.tiers._localtier import StreamCheck, chunk_index
from dckpt.tiers._tsave import Committed

log = logging.getLogger("dckpt")


class DurableTier:
    """The durable root: its storage and its cleaner, opened off the critical path.

    Opening an object-store root imports and sets up its client (about a second of CPU
    for ``s3://``). A recovery from the local tier needs it on rank 0 only (to list the
    durable steps), and a save needs it there first (its file layout), so rank 0
    (``eager``) opens it on a thread from construction on, overlapping the node map, the
    group and the local work, while the other ranks open it when they first use it (a
    persist opens its step's storage by itself), sparing the recovery their CPU.
    ``opened`` (the manager's storage and cleaner, when it opened the root) skips that."""

    def __init__(
        self,
        root: str,
        storage_options: dict[str, object] | None,
        *,
        durable: bool,
        keep_last: int | None,
        keep_every: int | None,
        timeout: float,
        eager: bool,
        opened: tuple[Storage, StepCleaner] | None = None,
    ) -> None:
        self.root = root
        self.storage_options = storage_options
        self.durable = durable
        self.keep_last = keep_last
        self.keep_every = keep_every
        self._timeout = timeout
        self._lock = threading.Lock()
        self._opened: Future[tuple[Storage, StepCleaner]] = Future()
        self._opening = opened is not None or eager  # once True, the future will settle
        if opened is not None:
            self._opened.set_result(opened)
        elif eager:
            threading.Thread(target=self._open, name="dckpt-durable-open", daemon=True).start()

    def _open(self) -> None:
        try:
            storage = open_storage(self.root, self.storage_options)
            self._opened.set_result((storage, StepCleaner(storage, timeout=self._timeout)))
        except BaseException as exc:  # raised by the first use, on the caller's thread
            self._opened.set_exception(exc)

    def _resolved(self) -> tuple[Storage, StepCleaner]:
        with self._lock:
            opening, self._opening = self._opening, True
        if not opening:
            self._open()
        return self._opened.result()

    @property
    def storage(self) -> Storage:
        return self._resolved()[0]

    @property
    def cleaner(self) -> StepCleaner:
        return self._resolved()[1]


def copy_files(
    src: Storage,
    dst: Storage,
    files: Sequence[tuple[str, int]],
    check: Callable[[str], StreamCheck] | None = None,
) -> None:
    """Stream each file from ``src`` to ``dst`` in pieces of at most ``PIECE`` bytes,
    checking it on the way with ``check(name)`` when given.

    Each piece gets its own buffer: a writer may send later, straight from the buffers it
    was given (the S3 writer does), so none is reused before ``close``. Memory stays
    bounded by what the writer holds: one piece for a local directory, the parts in
    flight for an object store. A file that fails its check is aborted, never closed, so
    a damaged local copy never becomes a durable file.

    Raises:
        CorruptCheckpointError: A file failed its check (the message names it).
    """
    piece = _transfer.PIECE
    for name, size in files:
        fault_point("tiers.persist.copy")
        checker = None if check is None else check(name)
        writer = dst.open_writer(name)
        try:
            for start in range(0, size, piece):
                view = memoryview(bytearray(min(piece, size - start)))
                src.read_into(name, start, view)
                if checker is not None:
                    checker.feed(view)
                writer.write([view])
            problem = None if checker is None else checker.problem()
            if problem is not None:
                raise CorruptCheckpointError(
                    f"the local tier's copy of {name} in {src.location} is damaged "
                    f"({problem}), so it was not persisted"
                )
            writer.close(durable=False)
        except BaseException:
            with contextlib.suppress(Exception):
                writer.abort()
            raise


def run_persist(
    tier: DurableTier,
    coord: Coordinator | LocalCoordinator,
    local_step: Storage,
    job: Committed,
    *,
    name: str,
    abandoned: set[int],
) -> None:
    """The collective persist of ``job`` into ``<root>/<name>`` (see the module doc)."""
    dst = open_storage(join_path(tier.root, name), tier.storage_options)
    names: list[str] = []

    manifest = manifest_from_bytes(job.manifest, source=f"local step {job.step}")
    index = chunk_index(manifest, local_step)  # this rank's own table, read when needed

    def copy() -> list[str]:
        copy_files(local_step, dst, job.mine, lambda f: StreamCheck(manifest, f, index))
        if tier.durable:
            dst.sync_dir(f"data/{job.save_id}")
        return [f for f, _ in job.mine]

    def copied(all_files: list[list[str]]) -> None:
        names.extend(f for per_rank in all_files for f in per_rank)

    def publish(_: list[None]) -> None:
        previous = dst.read_file(MANIFEST_NAME)
        commit(dst, job.manifest, previous, durable=tier.durable, save_id=job.save_id, files=names)

    def run() -> None:
        coord.exchange("tiers-persist", copy, copied)
        # Every rank passes the commit point, so a rank lost there leaves nothing committed.
        coord.exchange("tiers-persist-commit", lambda: fault_point("tiers.persist.commit"), publish)

    _durably(tier, coord, job.step, name, abandoned, run, "persisting")


def save_direct(
    tier: DurableTier,
    coord: Coordinator | LocalCoordinator,
    step: int,
    prepare: Callable[[], Description],
    *,
    process_group: dist.ProcessGroup | None,
    abandoned: set[int],
) -> None:
    """Collective: an ordinary engine save of ``step`` into the durable tier, from the
    staged state, for a step the local tier had no room for."""
    name = step_name(step)
    dst = open_storage(join_path(tier.root, name), tier.storage_options)
    options = SaveOptions(overwrite=True, durable=tier.durable)
    cache = cache_for("tiers-durable", process_group)

    def run() -> None:
        run_save(coord, dst, prepare, options, cache)

    _durably(tier, coord, step, name, abandoned, run, "saving")


def _durably(
    tier: DurableTier,
    coord: Coordinator | LocalCoordinator,
    step: int,
    name: str,
    abandoned: set[int],
    run: Callable[[], None],
    doing: str,
) -> None:
    """Write durable step ``name`` with ``run`` as the plain manager saves one: rank 0
    clears what crashed saves left, holds the step against cleanup, and afterwards
    applies rollback and retention; a failure is raised as a ``PersistError``."""
    marker = tier.cleaner.hold(name) if coord.rank == 0 else None
    try:
        if coord.rank == 0:
            remove_dead(tier.storage, tier.cleaner, saving=step, busy=set(), abandoned=abandoned)
        run()
    except BaseException as exc:
        if coord.rank == 0:
            abandoned.add(step)
            tier.cleaner.abandon(name, marker)
        if not isinstance(exc, Exception):
            raise
        raise PersistError(
            f"{doing} step {step} to the durable tier {tier.root} failed: "
            f"{type(exc).__name__}: {exc}; the local tier keeps saving, and the durable "
            "steps before it are intact",
            errno=getattr(exc, "errno", None),
        ) from exc
    abandoned.discard(step)
    if marker is not None:
        marker.release()
    _retire(tier, coord, step)


def _retire(tier: DurableTier, coord: Coordinator | LocalCoordinator, step: int) -> None:
    def local() -> None:
        if coord.rank == 0:
            retire(
                tier.storage,
                tier.cleaner,
                saved=step,
                busy=set(),
                keep_last=tier.keep_last,
                keep_every=tier.keep_every,
            )

    try:
        coord.exchange("tiers-persist-retire", local)
    except CheckpointError as exc:  # the step is persisted; only the cleanup failed
        log.warning("step %d was persisted to %s, but retention failed: %s", step, tier.root, exc)
