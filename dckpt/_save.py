"""``save``: plan -> write -> commit, collectively over the ranks of a process group.

A save is two exchanges through the coordinator. In the first ("plan") every rank
describes its state (:mod:`dckpt._describe`) and rank 0 plans the files, from the plan
cache when the structure is unchanged (:mod:`dckpt._plancache`). In the second ("write")
every rank writes its files and rank 0 renders the manifest and commits it
(:mod:`dckpt._commit`); a failed write or commit is cleaned up on every rank.
:func:`write_share` and :func:`publish` are the save's tail, shared with the
one-process save of ``convert`` (:func:`save_alone`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch.distributed as dist

from dckpt import _wireout as wireout
from dckpt._commit import abandon, commit, commit_uncertain
from dckpt._coord import DEFAULT_TIMEOUT, Coordinator, LocalCoordinator, Shared
from dckpt._describe import Description, plain_checksums, skeletons_for
from dckpt._errors import CheckpointExistsError
from dckpt._faults import fault_point
from dckpt._format import DEFAULT_BLOCK_BYTES, MANIFEST_NAME, data_dir
from dckpt._gc import gc_paused, paused_gc
from dckpt._inflight import drain
from dckpt._manifest_build import merge_layouts
from dckpt._owned import OwnPlan, Split, owned_part
from dckpt._plan import (
    Crcs,
    FilePlan,
    FileResult,
    ManifestTemplate,
    RankOffer,
    RankPlan,
    RankWritten,
    SavePlan,
    manifest_template,
    plan_save,
    render_manifest,
    structure_key,
)
from dckpt._plancache import RESEND, Answer, Brief, CachedPlan, PlanCache, cache_for
from dckpt._request import SaveOptions, SaveRequest
from dckpt._version import __version__
from dckpt._wire import decode_messages, encode_message
from dckpt._write import KnownCrcs, SourceMap, finish_layouts, with_layout_files, write_rank
from dckpt.storage import FileLayout, Storage

_log = logging.getLogger("dckpt")
_clock = time.time  # replaced by the golden-format tests for byte-identical output


def _library_version() -> str:
    return f"dckpt {__version__}"


def new_save_id() -> str:
    """Sortable by time, unique across concurrent jobs."""
    return f"{time.time_ns():x}{secrets.token_hex(4)}"


# ----------------------------------------------------------------------------- the tail


def write_share(
    storage: Storage,
    plan: RankPlan,
    offer: RankOffer,
    sources: SourceMap,
    *,
    durable: bool,
    known: KnownCrcs | None = None,
    progress: Callable[[int], None] | None = None,
    planned: Callable[[RankPlan], None] | None = None,
    own: OwnPlan | None = None,
) -> RankWritten:
    """Write one rank's share of a save in one pass: its planned files, the tensors it
    alone holds (``own``) and the shards of its layout tensors with their table
    (``planned`` hears of every file first)."""
    fault_point("save.write.before")
    every, pieces, table = with_layout_files(plan, offer, storage.file_layout, own)
    if planned is not None:
        planned(RankPlan(every.save_id, every.rank, (*every.files, FilePlan(table, (), 0))))
    results = write_rank(
        storage, every, sources, durable=durable, block_bytes=DEFAULT_BLOCK_BYTES,
        known_crcs=known, progress=progress,
    )  # fmt: skip
    n = len(plan.files)
    written = finish_layouts(storage, offer, n, every, results, pieces, durable=durable, own=own)
    fault_point("save.write.after")
    return written


def rendered(
    plan: SavePlan,
    template: ManifestTemplate,
    written: Sequence[RankWritten],
    split: Split | None = None,
) -> tuple[bytes, list[str]]:
    """The manifest of a written save and every file it names (rank 0); ``split`` says
    which tensors each rank wrote and rendered alone."""
    results = [w.files for w in written]
    reports = [w.layouts for w in written]
    layouts = None
    if any(r is not None for r in reports):
        # the keys no layout key may take: a set of 160k at 8 x 20k tensors, so only here
        taken = {*plan.tensors, *plan.values, *(() if split is None else split.keys)}
        layouts = merge_layouts(reports, plan.world_size, taken)
    owned = None if split is None else owned_part([w.own for w in written], split.own_keys)
    manifest = render_manifest(
        template, plan, results, created=_clock(), block_bytes=DEFAULT_BLOCK_BYTES,
        library=_library_version(), layouts=layouts, owned=owned,
    )  # fmt: skip
    files = [f.name for rank_files in results for f in rank_files]
    if layouts is not None:
        files += [f.name for f in layouts.files] + [t.name for t in layouts.tables]
    if owned is not None:
        files += [f.name for f in owned.files]
    return manifest, files


def publish(
    storage: Storage,
    plan: SavePlan,
    template: ManifestTemplate,
    written: Sequence[RankWritten],
    previous: bytes | None,
    *,
    durable: bool,
    split: Split | None = None,
) -> None:
    """Render the manifest of a written save and commit it over ``previous`` (rank 0)."""
    manifest, files = rendered(plan, template, written, split)
    commit(storage, manifest, previous, durable=durable, save_id=plan.save_id, files=files)
    fault_point("save.commit.after")


def save_alone(
    storage: Storage,
    offer: RankOffer,
    sources: SourceMap,
    *,
    layout: FileLayout,
    progress: Callable[[int], None] | None = None,
) -> list[FileResult]:
    """plan -> write -> manifest -> commit in one process, durably, where no checkpoint is
    committed yet: no coordination and no plan cache. On a failure the save's data files
    are removed, unless its commit may still land."""
    plan = plan_save([offer], new_save_id(), layout=layout)
    try:
        written = write_share(
            storage, plan.ranks[0], offer, sources, durable=True, progress=progress
        )
        publish(storage, plan, manifest_template(plan), [written], None, durable=True)
    except BaseException as exc:
        if not commit_uncertain(exc):
            with contextlib.suppress(Exception):
                storage.delete_prefix(data_dir(plan.save_id))
        raise
    return list(written.files)


# ----------------------------------------------------------------------------- the save


@dataclass(frozen=True)
class _Mine:
    """This rank's part of the save, described once (at its first plan message)."""

    sources: SourceMap
    offer: RankOffer  # its chunks without checksums on a multi-rank save: those are in
    crcs: Crcs | None  # the plain tensors' checksums per offered tensor (multi-rank)
    known: KnownCrcs  # those checksums and bytes, so the writer does not redo them
    key: bytes  # the structure key the plan cache knows it by


@dataclass(frozen=True)
class _Leading:
    """What only rank 0 keeps between the plan and the commit."""

    cached: CachedPlan
    previous: bytes | None  # the manifest this save replaces, to commit over


class _Round:
    """One save on this rank: the two exchanges, and what their callbacks learn."""

    def __init__(
        self,
        coord: Coordinator | LocalCoordinator,
        storage: Storage,
        prepare: Callable[[], Description],
        options: SaveOptions,
        cache: PlanCache,
    ) -> None:
        self.coord = coord
        self.storage = storage
        self.prepare = prepare
        self.options = options
        self.cache = cache
        self.mine: _Mine | None = None  # set by this rank's first plan message
        self.leading: _Leading | None = None  # rank 0, once planned
        self.planned: RankPlan | None = None  # once this rank knows its plan

    def plan(self) -> Answer:
        """The plan exchange: this rank's plan or a reuse note, from rank 0."""
        reduce = gc_paused(self._reduce_plan)
        answer = self._answer(
            self.coord.exchange("plan", gc_paused(self._message, False), reduce, scatter=True)
        )
        if isinstance(answer, str):  # == RESEND: a brief named an offer rank 0 no longer has
            answer = self._answer(
                self.coord.exchange(
                    "plan-full", gc_paused(self._message, True), reduce, scatter=True
                )
            )
        assert not isinstance(answer, str), "rank 0 plans from full offers"
        self.cache.received(answer)
        return answer

    def _answer(self, raw: bytes | Answer | str) -> Answer | str:
        return wireout.decode_answer(raw, self.coord.rank) if isinstance(raw, bytes) else raw

    def _message(self, full: bool) -> Shared | RankOffer | Brief:
        """This rank's plan message; encoded (:mod:`dckpt._wire`) when it travels, as a
        :class:`Shared` value, so that ranks holding the same state send it once."""
        if self.mine is None:
            self.mine = _describe_mine(self.prepare(), multi=self.coord.world_size > 1)
        multi = self.coord.world_size > 1
        mine = self.mine
        message = self.cache.message(mine.offer, mine.key, brief=multi and not full, crcs=mine.crcs)
        if not multi:
            return message
        if isinstance(message, RankOffer):  # layouts are planned where they live, not sent
            message = dataclasses.replace(message, layouts=(), meshes=())
        return Shared(*encode_message(message, mine.key, mine.crcs))

    def _reduce_plan(self, sent: list[Any]) -> Sequence[bytes | Answer | str]:
        """Rank 0: decode the messages (a one-rank save skips the wire), plan, answer."""
        multi = self.coord.world_size > 1
        decoded = decode_messages(sent) if multi else [(m, b"") for m in sent]
        keys = [k for _, k in decoded] if multi else None
        messages = [m for m, _ in decoded]
        cached = self.cache.plan(messages, self.storage.file_layout, new_save_id(), keys)
        if cached is None:
            return [wireout.encode_answer(RESEND)] * len(messages)
        previous = self.storage.read_file(MANIFEST_NAME)
        if previous is not None and not self.options.overwrite:
            raise CheckpointExistsError(
                f"{self.storage.location} already holds a committed checkpoint; pass "
                "overwrite=True to replace it (the old one stays loadable until the new one "
                "commits), or save to a new path"
            )
        self.leading = _Leading(cached, previous)
        answers = self.cache.answers(cached)
        if not multi:
            return answers
        return wireout.encode_answers(answers)

    def write_and_commit(self, answer: Answer) -> None:
        """The write exchange: every rank writes its files, rank 0 commits the manifest."""
        write = functools.partial(self._write, answer)
        try:
            self.coord.exchange("write", write, gc_paused(self._reduce_commit))
        except BaseException as exc:
            if commit_uncertain(exc):
                raise  # the manifest may land later: deleting its files could break it
            if not self._abandon():
                raise
            # The commit happened although this rank lost contact before hearing of it
            # (rank 0 left right after committing, say): the save succeeded.
            _log.warning(
                "lost contact with the other ranks after checkpoint %s was committed; "
                "the save succeeded",
                self.storage.location,
            )

    def _write(self, answer: Answer) -> bytes | RankWritten:
        self.planned = self.cache.rank_plan(answer)
        assert self.mine is not None  # described in the plan exchange
        mine = self.mine

        def planned(every: RankPlan) -> None:  # the layout files too, for _abandon
            self.planned = every

        world, layout = self.coord.world_size, self.storage.file_layout
        own = None
        if world > 1:  # allocation-heavy at many tensors: without the collector
            own = gc_paused(self.cache.own_plan)(answer, mine.offer, layout, world)
        written = write_share(
            self.storage, self.planned, mine.offer, mine.sources,
            durable=self.options.durable, known=mine.known, planned=planned, own=own,
        )  # fmt: skip
        if self.leading is not None:
            # Rank 0 makes a new plan's manifest template while the others still write.
            self.leading.cached.lazy.get()
        return wireout.encode_written(written) if self.coord.world_size > 1 else written

    def _reduce_commit(self, sent: list[bytes | RankWritten]) -> None:
        assert self.leading is not None  # rank 0 planned this save
        cached, previous = self.leading.cached, self.leading.previous
        written = [
            wireout.decode_written(w, r) if isinstance(w, bytes) else w for r, w in enumerate(sent)
        ]
        durable, split = self.options.durable, cached.split
        publish(
            self.storage,
            cached.plan,
            cached.template,
            written,
            previous,
            durable=durable,
            split=split,
        )

    def _abandon(self) -> bool:
        """Clean up after a failed write or commit; True when it committed after all."""
        save_id = None if self.planned is None else self.planned.save_id
        if save_id is None and self.leading is not None:
            save_id = self.leading.cached.plan.save_id
        leader = self.coord.rank == 0
        return save_id is not None and abandon(self.storage, save_id, self.planned, leader)


def _describe_mine(description: Description, *, multi: bool) -> _Mine:
    offer, crcs, known = description.offer, None, cast(KnownCrcs, {})
    if multi:
        offer, crcs, known = plain_checksums(description)
    key = structure_key(offer) if description.key is None else description.key
    return _Mine(description.sources, offer, crcs, known, key)


def run_save(
    coord: Coordinator | LocalCoordinator,
    storage: Storage,
    prepare: Callable[[], Description],
    options: SaveOptions,
    cache: PlanCache,
) -> None:
    """The collective part of a save, shared by ``save`` and the async writer thread."""
    save = _Round(coord, storage, prepare, options, cache)
    answer = save.plan()
    try:
        save.write_and_commit(answer)
    except BaseException:
        cache.failed()
        raise
    assert save.mine is not None  # described in the plan exchange
    leading = None if save.leading is None else save.leading.cached
    cache.committed(save.mine.key, leading, coord.world_size)


def save(
    state: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    process_group: dist.ProcessGroup | None = None,
    overwrite: bool = False,
    durable: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    allow_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Save ``state`` to ``path``, collectively over the ranks of ``process_group``.

    Every rank calls it with its own local state (modules, optimizers, tensors, DTensors,
    Python values, Stateful objects). The manifest is committed last, atomically: the
    checkpoint is complete or not there at all.

    Args:
        state: A dict of what to save; keys may differ between ranks.
        path: A local directory, or a URL (``s3://bucket/run/step-100``, ``memory://x``).
        process_group: The ranks saving together; None: the default group, or this process.
        overwrite: Replace a checkpoint committed at ``path`` (it stays loadable until
            the new one commits).
        durable: fsync data and manifest before returning; False for scratch checkpoints.
        timeout: Seconds each collective step waits for the other ranks.
        allow_pickle: Store values JSON cannot hold by pickling them.
        storage_options: Options for an fsspec URL's filesystem; dckpt's own under "dckpt".

    Returns:
        None, once the checkpoint is committed (on every rank).

    Raises:
        ArgumentError: An argument is invalid (``ArgumentTypeError``: of the wrong type).
        UnsupportedStateError: A value cannot be saved; the message names its key.
        CheckpointExistsError: ``path`` holds a checkpoint and ``overwrite`` is False,
            or another job committed there during this save.
        RankFailureError: The save failed on some rank (``CheckpointTimeoutError``: a
            rank did not arrive within ``timeout``); the previous checkpoint stays intact.
        StorageError: Writing to or committing in the storage failed.

    Example:
        ```python
        dckpt.save({"model": model, "optimizer": optim, "step": step}, "ckpt/step-1000")
        ```
    """
    request = SaveRequest(
        state, path, process_group, overwrite, durable, timeout, allow_pickle, storage_options
    )
    _save_now(request)


def _save_now(request: SaveRequest) -> None:
    drain()  # one save at a time per process; surfaces an unobserved async failure
    coord = request.coordinator("sync")
    storage = request.storage()
    cache = cache_for("sync", request.process_group)
    # Checksums while describing: a one-rank save plans without them.
    multi = coord.world_size > 1
    prepare = functools.partial(
        request.describe, coord.rank, checksums=multi, memo=skeletons_for(cache) if multi else None
    )
    with paused_gc():
        run_save(coord, storage, prepare, request.options, cache)
