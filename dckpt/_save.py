"""``save``: plan -> write -> commit, collectively over the ranks of a process group.

Planning sends rank 0 what each rank holds; when a rank's structure is the same as at
its previous save, it sends only a digest plus the few things that change between
saves (checksums of plain tensors, non-tensor values), and rank 0 reuses the plan it
cached. That makes the per-save coordination one small exchange instead of a gather of
every chunk.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dckpt._args import check_save
from dckpt._bytes import block_crcs, dtype_name, host_bytes
from dckpt._commit import abandon, commit, commit_uncertain
from dckpt._coord import DEFAULT_TIMEOUT, coordinator_for
from dckpt._dtensor import dtensor_chunks, is_dtensor
from dckpt._errors import (
    CheckpointError,
    CheckpointExistsError,
    UnsupportedStateError,
)
from dckpt._faults import fault_point
from dckpt._format import (
    DEFAULT_BLOCK_BYTES,
    DTYPE_ITEMSIZE,
    MANIFEST_NAME,
)
from dckpt._gc import gc_paused, paused_gc
from dckpt._plan import (
    ChunkOffer,
    FileResult,
    ManifestTemplate,
    RankOffer,
    RankPlan,
    SavePlan,
    TensorOffer,
    ValueOffer,
    manifest_template,
    plan_save,
    renamed,
    render_manifest,
    structure_key,
    with_save_id,
)
from dckpt._reshard import Box
from dckpt._state import Resolved, resolve
from dckpt._values import encode_value
from dckpt._version import __version__
from dckpt._write import KnownCrcs, SourceMap, write_rank
from dckpt.storage._base import FileLayout, Storage, open_storage

_log = logging.getLogger("dckpt")
_clock = time.time  # replaced by the golden-format tests for byte-identical output


def _library_version() -> str:

    return f"dckpt {__version__}"


def new_save_id() -> str:
    """Sortable by time, unique across concurrent jobs."""
    return f"{time.time_ns():x}{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Staged:
    """One rank's state, flattened: what it offers and the tensors each chunk comes from."""

    offer: RankOffer
    sources: SourceMap


def stage(state: Mapping[str, Any], rank: int, *, allow_pickle: bool) -> Staged:
    """Resolve Stateful objects now and describe every chunk (no checksums yet)."""
    resolved = resolve(state)
    tensors, sources = _describe(resolved)
    values = []
    for v in resolved.values:
        data = encode_value(v.value, v.key, allow_pickle=allow_pickle)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        values.append(ValueOffer(v.key, v.path, data, text))
    return Staged(RankOffer(rank, tuple(tensors), tuple(values)), sources)


def staging_sources(state: Mapping[str, Any]) -> dict[tuple[str, Box], torch.Tensor]:
    """The chunks a save of ``state`` would copy, without side effects on the state:
    optimizers that have no state yet are left out rather than stepped into having one."""
    return _describe(resolve(state, fresh_optimizers=False))[1]


def _describe(
    resolved: Resolved,
) -> tuple[list[TensorOffer], dict[tuple[str, Box], torch.Tensor]]:
    tensors: list[TensorOffer] = []
    sources: dict[tuple[str, Box], torch.Tensor] = {}
    for leaf in resolved.tensors:
        t = leaf.tensor
        name = dtype_name(t.dtype)
        if name not in DTYPE_ITEMSIZE:
            raise UnsupportedStateError(f"key {leaf.key!r}: dtype {t.dtype} cannot be saved")
        problem = _unsavable(t)
        if problem:
            raise UnsupportedStateError(f"key {leaf.key!r}: {problem}")
        shape = tuple(t.shape)
        if is_dtensor(t):
            pieces = dtensor_chunks(t)
            for box, view in pieces:
                sources[(leaf.key, box)] = view
            chunks = tuple(ChunkOffer(box) for box, _ in pieces)
            tensors.append(TensorOffer(leaf.key, leaf.path, name, shape, True, chunks))
            continue
        box = Box((0,) * len(shape), shape)
        if t.numel():
            sources[(leaf.key, box)] = t
            tensors.append(TensorOffer(leaf.key, leaf.path, name, shape, False, (ChunkOffer(box),)))
        else:
            tensors.append(TensorOffer(leaf.key, leaf.path, name, shape, False, ()))
    return tensors, sources


def _unsavable(t: torch.Tensor) -> str:
    """Why ``t`` cannot be stored as a dense array of bytes, or "" when it can."""
    if t.is_meta:
        return (
            "a meta tensor has no data to save; materialize it first "
            "(e.g. module.to_empty(device=...) and initialize it)"
        )
    if t.is_quantized:
        return "a quantized tensor cannot be saved; dequantize it (t.dequantize()) first"
    if t.layout is not torch.strided:
        return f"a {t.layout} tensor cannot be saved; convert it with t.to_dense() first"
    return ""


def checksum_plain(staged: Staged) -> tuple[RankOffer, KnownCrcs]:
    """Checksum plain tensors up front: ranks holding equal bytes share one stored copy."""
    known: dict[tuple[str, Box], tuple[tuple[int, ...], np.ndarray]] = {}
    tensors = []
    for t in staged.offer.tensors:
        if t.sharded or not t.chunks:
            tensors.append(t)
            continue
        box = t.chunks[0].box
        data = host_bytes(staged.sources[(t.key, box)])
        crc = block_crcs(data, DEFAULT_BLOCK_BYTES)
        known[(t.key, box)] = (crc, data)
        tensors.append(TensorOffer(t.key, t.path, t.dtype, t.shape, False, (ChunkOffer(box, crc),)))
    return RankOffer(staged.offer.rank, tuple(tensors), staged.offer.values), known


# ----------------------------------------------------------------------------- plan cache


@dataclass(frozen=True, slots=True)
class _Brief:
    """A rank's plan message when its structure is unchanged since its last save."""

    rank: int
    key: bytes
    crcs: tuple[tuple[int, ...] | None, ...]  # per tensor offer, in order
    values: tuple[ValueOffer, ...]


_RESEND = "resend"


@dataclass(frozen=True, slots=True)
class _Reuse:
    """Rank 0's answer when a rank already holds this plan: only the new save id travels."""

    serial: int
    save_id: str


@dataclass
class _PlanCache:
    """The last few structures saved on one group (a training job may save a few kinds of
    state in turn): rank 0 keeps their offers, plans and manifest templates; every rank
    keeps the structures it has committed and the plans it was sent."""

    offers: OrderedDict[tuple[int, bytes], RankOffer] = field(default_factory=OrderedDict)
    plans: OrderedDict[
        tuple[tuple[bytes, ...], frozenset[str], FileLayout], tuple[int, SavePlan]
    ] = field(default_factory=OrderedDict)
    serial: int = 0
    templates: dict[int, ManifestTemplate] = field(default_factory=dict)  # by plan serial
    sent: dict[int, set[int]] = field(default_factory=dict)  # rank -> plan serials it holds
    my_keys: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    my_plans: OrderedDict[int, RankPlan] = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _remember(d: OrderedDict[Any, Any], key: Any, value: Any, limit: int) -> None:
    d[key] = value
    d.move_to_end(key)
    while len(d) > limit:
        d.popitem(last=False)


_caches: dict[str, _PlanCache] = {}
_caches_lock = threading.Lock()
_MAX_PLANS = 4


def _cache_for(namespace: str, group: Any) -> _PlanCache:
    name = f"{namespace}/{getattr(group, 'group_name', 'default')}"
    with _caches_lock:
        return _caches.setdefault(name, _PlanCache())


def _crcs(offer: RankOffer) -> tuple[tuple[int, ...] | None, ...]:
    return tuple(None if t.sharded or not t.chunks else t.chunks[0].crc for t in offer.tensors)


def _divergent(
    bases: list[RankOffer], crcs: list[tuple[tuple[int, ...] | None, ...]]
) -> frozenset[str]:
    """Plain-tensor keys whose holders disagree this time (a plain tensor is one chunk)."""
    seen: dict[str, tuple[int, ...]] = {}
    out: set[str] = set()
    for base, cs in zip(bases, crcs, strict=True):
        for t, c in zip(base.tensors, cs, strict=True):
            if c is not None and seen.setdefault(t.key, c) != c:
                out.add(t.key)
    return frozenset(out)


def _with_crcs(base: RankOffer, crcs: tuple[tuple[int, ...] | None, ...]) -> RankOffer:
    tensors = tuple(
        t
        if c is None
        else TensorOffer(t.key, t.path, t.dtype, t.shape, False, (ChunkOffer(t.chunks[0].box, c),))
        for t, c in zip(base.tensors, crcs, strict=True)
    )
    return RankOffer(base.rank, tensors, base.values)


def _plan_from(
    cache: _PlanCache, messages: list[RankOffer | _Brief], layout: FileLayout
) -> tuple[int, SavePlan] | None:
    """The save plan, reusing a cached one when every rank's structure and the replica
    pattern are unchanged; None when a brief refers to an offer rank 0 no longer has."""
    bases: list[RankOffer] = []
    crcs: list[tuple[tuple[int, ...] | None, ...]] = []
    values: list[RankOffer] = []
    keys: list[bytes] = []
    for m in messages:
        if isinstance(m, _Brief):
            base = cache.offers.get((m.rank, m.key))
            if base is None:
                return None
            bases.append(base)
            crcs.append(m.crcs)
            keys.append(m.key)
            values.append(RankOffer(m.rank, (), m.values))
        else:
            keys.append(structure_key(m))
            _remember(cache.offers, (m.rank, keys[-1]), m, _MAX_PLANS * len(messages))
            bases.append(m)
            crcs.append(_crcs(m))
            values.append(m)
    cache_key = (tuple(keys), _divergent(bases, crcs), layout)
    cached = cache.plans.get(cache_key)
    if cached is not None:
        cache.plans.move_to_end(cache_key)
        return cached[0], with_save_id(cached[1], new_save_id(), values)
    offers = [
        _with_crcs(b, c) if isinstance(m, _Brief) else b
        for b, c, m in zip(bases, crcs, messages, strict=True)
    ]
    offers = [RankOffer(o.rank, o.tensors, v.values) for o, v in zip(offers, values, strict=True)]
    plan = plan_save(offers, new_save_id(), layout=layout)
    cache.serial += 1
    cache.plans[cache_key] = (cache.serial, plan)
    cache.templates[cache.serial] = manifest_template(plan)
    while len(cache.plans) > _MAX_PLANS:
        serial, _ = cache.plans.popitem(last=False)[1]
        cache.templates.pop(serial, None)
    return cache.serial, plan


# ----------------------------------------------------------------------------- the save


@dataclass
class _Leader:
    """What only rank 0 keeps between the plan and the commit."""

    plan: SavePlan | None = None
    serial: int = 0
    template: ManifestTemplate | None = None
    previous: bytes | None = None


@dataclass(frozen=True)
class SaveOptions:
    overwrite: bool = False
    durable: bool = True


def run_save(
    coord: Any,
    storage: Storage,
    prepare: Callable[[], Staged],
    options: SaveOptions,
    cache: _PlanCache,
) -> None:
    """The collective part of a save, shared by ``save`` and the async writer thread."""
    multi = coord.world_size > 1
    local: dict[str, Any] = {}
    leader = _Leader()

    def offer(full: bool) -> RankOffer | _Brief:
        if "staged" not in local:
            staged = prepare()
            offer, known = checksum_plain(staged) if multi else (staged.offer, {})
            local.update(staged=staged, offer=offer, known=known, key=structure_key(offer))
        offer = local["offer"]
        if not full and multi and local["key"] in cache.my_keys:
            return _Brief(offer.rank, local["key"], _crcs(offer), offer.values)
        return offer

    def reduce_plan(
        messages: list[RankOffer | _Brief],
    ) -> list[tuple[int, RankPlan] | _Reuse] | list[str]:
        with cache.lock:
            found = _plan_from(cache, messages, storage.file_layout)
        if found is None:
            return [_RESEND] * len(messages)
        serial, plan = found
        leader.previous = storage.read_file(MANIFEST_NAME)
        if leader.previous is not None and not options.overwrite:
            raise CheckpointExistsError(
                f"{storage.location} already holds a committed checkpoint; pass overwrite=True "
                "to replace it (the old one stays loadable until the new one commits), or save "
                "to a new path"
            )
        leader.plan, leader.serial = plan, serial
        leader.template = cache.templates[serial]
        return [
            _Reuse(serial, plan.save_id) if serial in cache.sent.get(r.rank, ()) else (serial, r)
            for r in plan.ranks
        ]

    answer = coord.exchange("plan", gc_paused(offer, False), gc_paused(reduce_plan), scatter=True)
    if answer == _RESEND:
        answer = coord.exchange(
            "plan-full", gc_paused(offer, True), gc_paused(reduce_plan), scatter=True
        )
    if isinstance(answer, tuple):
        _remember(cache.my_plans, answer[0], answer[1], _MAX_PLANS)

    def my_plan() -> RankPlan:
        """This rank's plan; a rank whose cached plan is not the one rank 0 meant fails."""
        if isinstance(answer, _Reuse):
            mine = cache.my_plans.get(answer.serial)
            if mine is None:
                raise CheckpointError(
                    "internal error: this rank's cached save plan is out of step with rank 0's; "
                    "the save was abandoned and the next one will plan afresh"
                )
            cache.my_plans.move_to_end(answer.serial)  # same recency order as rank 0's
            return renamed(mine, answer.save_id)
        assert isinstance(answer, tuple)
        return answer[1]

    try:
        _write_and_commit(
            coord, storage, my_plan, local["staged"].sources, local["known"], leader, options
        )
    except BaseException:
        if coord.rank == 0:
            with cache.lock:
                cache.sent.clear()  # plan afresh: some rank may not hold what we think
        raise
    if coord.rank == 0:
        with cache.lock:
            live = {serial for serial, _ in cache.plans.values()}
            for r in range(coord.world_size):
                held = cache.sent.setdefault(r, set())
                held.add(leader.serial)
                held &= live  # ranks keep as many plans as rank 0 does
    _remember(cache.my_keys, local["key"], None, _MAX_PLANS)


def _write_and_commit(
    coord: Any,
    storage: Storage,
    my_plan: Callable[[], RankPlan],
    sources: SourceMap,
    known: KnownCrcs,
    leader: _Leader,
    options: SaveOptions,
) -> None:
    planned: list[RankPlan] = []

    def local_write() -> list[FileResult]:
        planned.append(my_plan())
        rank_plan = planned[0]
        fault_point("save.write.before")
        results = write_rank(
            storage,
            rank_plan,
            sources,
            durable=options.durable,
            block_bytes=DEFAULT_BLOCK_BYTES,
            known_crcs=known,
        )
        fault_point("save.write.after")
        return results

    def reduce_commit(results: list[list[FileResult]]) -> None:
        assert leader.plan is not None and leader.template is not None
        manifest = render_manifest(
            leader.template,
            leader.plan,
            results,
            created=_clock(),
            block_bytes=DEFAULT_BLOCK_BYTES,
            library=_library_version(),
        )
        files = [f for rank_files in results for f in rank_files]
        commit(
            storage,
            manifest,
            leader.previous,
            durable=options.durable,
            save_id=leader.plan.save_id,
            files=[f.name for f in files],
        )
        fault_point("save.commit.after")

    try:
        coord.exchange("write", local_write, gc_paused(reduce_commit))
    except BaseException as exc:
        if commit_uncertain(exc):
            raise  # the manifest may land later: deleting its files could break it
        save_id = planned[0].save_id if planned else None
        if save_id is None and coord.rank == 0 and leader.plan is not None:
            save_id = leader.plan.save_id
        if save_id is not None and abandon(storage, save_id, planned, coord.rank == 0):
            # The commit happened although this rank lost contact before hearing of it
            # (rank 0 left right after committing, say): the save succeeded.
            _log.warning(
                "lost contact with the other ranks after checkpoint %s was committed; "
                "the save succeeded",
                storage.location,
            )
            return
        raise


def save(
    state: Mapping[str, Any],
    path: Any,
    *,
    process_group: Any = None,
    overwrite: bool = False,
    durable: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    allow_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Save ``state`` to ``path``; collective over ``process_group`` (or one process)."""
    from dckpt._async import drain

    check_save(
        state=state,
        path=path,
        process_group=process_group,
        timeout=timeout,
        storage_options=storage_options,
        allow_pickle=allow_pickle,
        overwrite=overwrite,
        durable=durable,
    )
    drain()  # one save at a time per process; surfaces an unobserved async failure
    coord = coordinator_for(process_group, timeout=timeout)
    storage = open_storage(path, storage_options)
    with paused_gc():
        run_save(
            coord,
            storage,
            lambda: stage(state, coord.rank, allow_pickle=allow_pickle),
            SaveOptions(overwrite=overwrite, durable=durable),
            _cache_for("sync", process_group),
        )
