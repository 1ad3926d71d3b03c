"""The plan cache: a save whose structure rank 0 has planned before reuses that plan.

Planning sends rank 0 what each rank holds. When a rank's structure is the same as at
one of its last saves, it sends only a :class:`Brief` (a digest plus what changes between
saves: checksums of plain tensors, non-tensor values) and rank 0 reuses the plan it
cached; a rank that already holds that plan is sent a :class:`Reuse` note (the new save
id) instead of its plan. That makes the per-save coordination one small exchange instead
of a gather of every chunk.

The protocol, per save::

    every rank   message()             -> rank 0   plan() -> answers()  -> every rank
    every rank   received(answer), rank_plan(answer)
    every rank   committed(...) after the commit, or failed() when the write or commit failed

A brief that names an offer rank 0 no longer has makes :meth:`PlanCache.plan` return
None; rank 0 then answers :data:`RESEND` and every rank sends its full offer.

Messages and answers travel encoded (``dckpt._wire``, ``dckpt._wireout``), and ranks
with equal messages send one copy between them; rank 0 decodes each distinct message
once, so here and in the planner such ranks share their tuples and are looked at once.
On more than one rank, a full offer reaches rank 0 as a :class:`Held` whose tensors are
made only for the keys another rank holds too: the others each rank plans itself
(:mod:`dckpt._owned`), and a plan's answer tells the rank which of its tensors those are.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter, OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch.distributed as dist

from dckpt._errors import CheckpointError, UnsupportedStateError
from dckpt._owned import OwnPlan, OwnRanges, Split, check_ranges, indices_of, plan_own, split
from dckpt._plan import (
    Crcs,
    ManifestTemplate,
    RankOffer,
    RankPlan,
    SavePlan,
    TensorOffer,
    ValueOffer,
    manifest_template,
    plan_save,
    renamed,
    structure_key,
    with_checksums,
    with_save_id,
)
from dckpt.storage import FileLayout

MAX_PLANS = 4  # structures remembered per group: a job may save a few kinds of state in turn
RESEND = "resend"  # rank 0's answer to every rank when a brief names an offer it lost

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Brief:
    """A rank's plan message when its structure is unchanged since its last save."""

    rank: int
    key: bytes
    crcs: Crcs
    values: tuple[ValueOffer, ...]


@dataclass(frozen=True, slots=True)
class Reuse:
    """Rank 0's answer when a rank already holds this plan: only the new save id travels."""

    serial: int
    save_id: str


class TensorSource(Protocol):
    """A full offer's tensors as rank 0 keeps them: their keys, and objects on demand."""

    @property
    def keys(self) -> Sequence[str]:
        """Every tensor's key, in offer order."""

    def select(self, indices: tuple[int, ...] | None) -> tuple[TensorOffer, ...]:
        """The tensors at ``indices`` (increasing; None: all)."""


class _Tensors:
    """A :class:`RankOffer`'s own tuple as a source (one-process saves, direct callers)."""

    def __init__(self, tensors: tuple[TensorOffer, ...]) -> None:
        self.tensors = tensors
        self.keys = [t.key for t in tensors]

    def select(self, indices: tuple[int, ...] | None) -> tuple[TensorOffer, ...]:
        return self.tensors if indices is None else tuple(self.tensors[i] for i in indices)


@dataclass(frozen=True, slots=True)
class Held:
    """A full offer as it reaches rank 0 over the wire: everything but its tensors, which
    are materialized only for the keys rank 0 plans (:mod:`dckpt._owned`)."""

    offer: RankOffer  # with no tensors
    tensors: TensorSource

    def full(self) -> RankOffer:
        return dataclasses.replace(self.offer, tensors=self.tensors.select(None))


Message = RankOffer | Held | Brief  # what a rank sends rank 0
#: What rank 0 sends a rank: (serial, its plan, its own tensors) or a reuse note.
Answer = tuple[int, RankPlan, OwnRanges] | Reuse


class LazyTemplate:
    """A plan's manifest template, made the first time a save asks for it (rank 0 asks
    while the other ranks write, instead of while they wait for the plan)."""

    def __init__(self, plan: SavePlan) -> None:
        self._plan: SavePlan | None = plan
        self._template: ManifestTemplate | None = None
        self._lock = threading.Lock()

    def get(self) -> ManifestTemplate:
        with self._lock:
            if self._template is None:
                assert self._plan is not None
                self._template = manifest_template(self._plan)
                self._plan = None  # renamed copies of the plan live on in the saves
            return self._template


@dataclass(frozen=True, slots=True)
class CachedPlan:
    """A save plan with its cache serial, manifest template and which tensors each rank
    writes alone (none depends on the save id, so a reused plan renamed keeps them)."""

    serial: int
    plan: SavePlan
    lazy: LazyTemplate
    split: Split

    @property
    def template(self) -> ManifestTemplate:
        return self.lazy.get()


_PlanKey = tuple[tuple[bytes, ...], frozenset[str], FileLayout]


class PlanCache:
    """The last few structures saved on one group. Rank 0 keeps their offers, plans and
    manifest templates and which plans each rank holds; every rank keeps the structures
    it has committed and the plans it was sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # rank 0's side: plan() and answers() vs. bookkeeping
        self._offers: OrderedDict[tuple[int, bytes], Held] = OrderedDict()
        self._plans: OrderedDict[_PlanKey, CachedPlan] = OrderedDict()
        self._serial = 0
        self._sent: dict[int, set[int]] = {}  # rank -> serials of the plans it holds
        self._splits: OrderedDict[tuple[bytes, ...], tuple[Split, list[tuple[int, ...] | None]]]
        self._splits = OrderedDict()  # by every rank's structure key: what each writes alone
        self._my_keys: OrderedDict[bytes, None] = OrderedDict()
        self._my_plans: OrderedDict[int, tuple[RankPlan, OwnRanges]] = OrderedDict()
        self._my_own: OrderedDict[int, OwnPlan | None] = OrderedDict()

    # -- every rank -------------------------------------------------------------------
    def message(
        self, offer: RankOffer, key: bytes, *, brief: bool, crcs: Crcs | None = None
    ) -> RankOffer | Brief:
        """What this rank sends to plan a save: a brief when allowed and this structure
        (``key``) was committed before, else the full offer (``crcs``, the plain tensors'
        checksums when the offer's chunks do not carry them, go beside it)."""
        if brief and key in self._my_keys:
            return Brief(offer.rank, key, crcs_of(offer) if crcs is None else crcs, offer.values)
        return offer

    def received(self, answer: Answer) -> None:
        """Keep a plan rank 0 sent, for later saves of the same structure."""
        if isinstance(answer, tuple):
            _remember(self._my_plans, answer[0], (answer[1], answer[2]), MAX_PLANS)
            self._my_own.pop(answer[0], None)

    def rank_plan(self, answer: Answer) -> RankPlan:
        """This rank's plan; a rank whose cached plan is not the one rank 0 meant fails."""
        if isinstance(answer, Reuse):
            mine = self._my_plans.get(answer.serial)
            if mine is None:
                raise CheckpointError(
                    "internal error: this rank's cached save plan is out of step with rank 0's; "
                    "the save was abandoned and the next one will plan afresh"
                )
            self._my_plans.move_to_end(answer.serial)  # same recency order as rank 0's
            return renamed(mine[0], answer.save_id)
        return answer[1]

    def own_plan(
        self, answer: Answer, offer: RankOffer, layout: FileLayout, world_size: int
    ) -> OwnPlan | None:
        """The layout of the tensors this rank writes alone (made once per plan)."""
        serial = answer.serial if isinstance(answer, Reuse) else answer[0]
        save_id = answer.save_id if isinstance(answer, Reuse) else answer[1].save_id
        if serial in self._my_own:
            own = self._my_own[serial]
            return None if own is None else own.renamed(save_id)
        ranges = self._my_plans[serial][1] if isinstance(answer, Reuse) else answer[2]
        try:
            check_ranges(ranges, len(offer.tensors))
        except ValueError as exc:
            raise CheckpointError(
                f"internal error: rank 0's plan names tensors this rank does not hold ({exc}); "
                "every rank must run the same dckpt version"
            ) from None
        own = plan_own(offer, ranges, save_id, layout, world_size)
        _remember(self._my_own, serial, own, MAX_PLANS)
        return own

    def committed(self, key: bytes, leading: CachedPlan | None, world_size: int) -> None:
        """After a commit: this rank's structure ``key`` is known to rank 0, and rank 0
        (``leading`` given) notes that every rank now holds that plan."""
        if leading is not None:
            with self._lock:
                live = {p.serial for p in self._plans.values()}
                for r in range(world_size):
                    held = self._sent.setdefault(r, set())
                    held.add(leading.serial)
                    held &= live  # ranks keep as many plans as rank 0 does
        _remember(self._my_keys, key, None, MAX_PLANS)

    def failed(self) -> None:
        """After a failed write or commit: some rank may not hold what rank 0 thinks, so
        every rank is sent its full plan next time."""
        with self._lock:
            self._sent.clear()

    # -- rank 0 -------------------------------------------------------------------------
    def plan(
        self,
        messages: Sequence[Message],
        layout: FileLayout,
        save_id: str,
        keys: Sequence[bytes] | None = None,
    ) -> CachedPlan | None:
        """The save plan, reusing a cached one when every rank's structure and the replica
        pattern are unchanged; None when a brief refers to an offer no longer kept.

        ``keys``: each message's structure key as its sender computed it (else computed
        here, per full offer). Ranks whose messages share their tuples (decoded once, see
        ``dckpt._wire``) are looked at once. On more than one rank, the tensors a rank
        holds alone are left to it (:mod:`dckpt._owned`): the plan covers the others."""
        with self._lock:
            expanded = self._expand(messages, keys)
            if expanded is None:
                return None
            helds, sent, keys, values = expanded
            parts, shared = self._split(helds, keys)
            bases, crcs = _planned(helds, sent, shared)
            cache_key = (tuple(keys), _divergent(bases, crcs), layout)
            cached = self._plans.get(cache_key)
            if cached is not None:
                self._plans.move_to_end(cache_key)
                plan = with_save_id(cached.plan, save_id, values)
                _no_clash(plan, parts)
                return CachedPlan(cached.serial, plan, cached.lazy, parts)
            memo: dict[tuple[int, int], tuple[TensorOffer, ...]] = {}
            offers = [
                _with_crcs(b, c, v.values, memo) if isinstance(m, Brief) else b
                for b, c, m, v in zip(bases, crcs, messages, values, strict=True)
            ]
            plan = plan_save(offers, save_id, layout=layout)
            _no_clash(plan, parts)
            self._serial += 1
            fresh = CachedPlan(self._serial, plan, LazyTemplate(plan), parts)
            self._plans[cache_key] = fresh
            while len(self._plans) > MAX_PLANS:
                self._plans.popitem(last=False)
            return fresh

    def answers(self, cached: CachedPlan) -> list[Answer]:
        """Per rank: a reuse note for a rank holding this plan, else its plan."""
        with self._lock:
            return [
                Reuse(cached.serial, cached.plan.save_id)
                if cached.serial in self._sent.get(r.rank, ())
                else (cached.serial, r, cached.split.own[r.rank])
                for r in cached.plan.ranks
            ]

    def _expand(
        self, messages: Sequence[Message], sent_keys: Sequence[bytes] | None
    ) -> tuple[list[Held], list[Crcs | None], list[bytes], list[RankOffer]] | None:
        """Per rank: its full offer (from the cache for a brief), this save's checksums
        (a brief's; None: the offer's own), its structure key and this save's values;
        None when a brief's offer is gone."""
        helds: list[Held] = []
        crcs: list[Crcs | None] = []
        keys: list[bytes] = []
        values: list[RankOffer] = []
        local: dict[int, _Tensors] = {}  # equal tuples, one source: the planner groups them
        for i, m in enumerate(messages):
            if isinstance(m, Brief):
                base = self._offers.get((m.rank, m.key))
                if base is None:
                    return None
                helds.append(base)
                crcs.append(m.crcs)
                keys.append(m.key)
                values.append(RankOffer(m.rank, (), m.values))
                continue
            if isinstance(m, RankOffer):
                source = local.get(id(m.tensors)) or local.setdefault(
                    id(m.tensors), _Tensors(m.tensors)
                )
                key = structure_key(m) if sent_keys is None else sent_keys[i]
                m = Held(dataclasses.replace(m, tensors=()), source)
            else:
                key = structure_key(m.full()) if sent_keys is None else sent_keys[i]
            keys.append(key)
            _remember(self._offers, (m.offer.rank, key), m, MAX_PLANS * len(messages))
            helds.append(m)
            crcs.append(None)
            values.append(m.offer)
        return helds, crcs, keys, values

    def _split(
        self, helds: list[Held], keys: list[bytes]
    ) -> tuple[Split, list[tuple[int, ...] | None]]:
        """Which tensors each rank holds alone, and per rank the indices of the others
        (None: all of them); a one-rank save plans everything itself."""
        memo = self._splits.get(tuple(keys))
        if memo is not None:
            self._splits.move_to_end(tuple(keys))
            return memo
        index: dict[int, int] = {}
        sources = [index.setdefault(id(h.tensors), len(index)) for h in helds]
        distinct = {i: h.tensors for i, h in zip(sources, helds, strict=True)}
        key_lists = [distinct[i].keys for i in range(len(distinct))]
        if len(helds) == 1:
            parts = Split(((),), ((),), Counter(key_lists[0]))
        else:
            parts = split(key_lists, sources)
        shared = [
            _others(own, len(h.tensors.keys)) for own, h in zip(parts.own, helds, strict=True)
        ]
        _remember(self._splits, tuple(keys), (parts, shared), MAX_PLANS)
        return parts, shared


def _others(own: OwnRanges, count: int) -> tuple[int, ...] | None:
    """The indices not in ``own``; None when that is all of them."""
    if not own:
        return None
    mine = set(indices_of(own))
    return tuple(i for i in range(count) if i not in mine)


def _planned(
    helds: list[Held], sent: list[Crcs | None], shared: list[tuple[int, ...] | None]
) -> tuple[list[RankOffer], list[Crcs]]:
    """Per rank: its offer with the tensors rank 0 plans, and their checksums this save."""
    bases: list[RankOffer] = []
    crcs: list[Crcs] = []
    crcs_memo: dict[int, Crcs] = {}
    for held, cs, which in zip(helds, sent, shared, strict=True):
        tensors = held.tensors.select(which)
        o = held.offer  # built directly (dataclasses.replace costs at 16k ranks): every field
        bases.append(RankOffer(o.rank, tensors, o.values, o.layouts, o.meshes))
        if cs is None:
            known = crcs_memo.get(id(tensors))
            if known is None:
                known = crcs_memo[id(tensors)] = crcs_of(bases[-1])
            crcs.append(known)
        else:
            crcs.append(cs if which is None else tuple(cs[i] for i in which))
    return bases, crcs


def _no_clash(plan: SavePlan, parts: Split) -> None:
    clash = [k for k in plan.values if k in parts.keys]
    if clash:
        raise UnsupportedStateError(
            f"key {sorted(clash)[0]!r} is a tensor on some ranks and a value on others"
        )


def crcs_of(offer: RankOffer) -> Crcs:
    """The checksums of an offer's plain tensors, as a brief carries them."""
    return tuple(None if t.sharded or not t.chunks else t.chunks[0].crc for t in offer.tensors)


def _divergent(bases: list[RankOffer], crcs: list[Crcs]) -> frozenset[str]:
    """Plain-tensor keys whose holders disagree this time (a plain tensor is one chunk);
    each distinct (structure, checksums) pair is looked at once."""
    seen: dict[str, tuple[int, ...]] = {}
    out: set[str] = set()
    pairs = {(id(b.tensors), id(cs)): (b.tensors, cs) for b, cs in zip(bases, crcs, strict=True)}
    for tensors, cs in pairs.values():
        for t, c in zip(tensors, cs, strict=True):
            if c is not None and seen.setdefault(t.key, c) != c:
                out.add(t.key)
    return frozenset(out)


def _with_crcs(
    base: RankOffer,
    crcs: Crcs,
    values: tuple[ValueOffer, ...],
    memo: dict[tuple[int, int], tuple[TensorOffer, ...]],
) -> RankOffer:
    """``base`` with this save's checksums and values; ranks with equal structure and
    checksums get one shared ``tensors`` tuple (``memo``), so the planner groups them."""
    tensors = memo.get((id(base.tensors), id(crcs)))
    if tensors is None:
        tensors = memo[(id(base.tensors), id(crcs))] = with_checksums(base.tensors, crcs)
    return dataclasses.replace(base, tensors=tensors, values=values)


def _remember(d: OrderedDict[K, V], key: K, value: V, limit: int) -> None:
    d[key] = value
    d.move_to_end(key)
    while len(d) > limit:
        d.popitem(last=False)


_caches: dict[str, PlanCache] = {}
_caches_lock = threading.Lock()


def cache_for(namespace: str, group: dist.ProcessGroup | None) -> PlanCache:
    """The plan cache of saves in ``namespace`` ("sync", "async") on ``group``."""
    name = f"{namespace}/{getattr(group, 'group_name', 'default')}"
    with _caches_lock:
        return _caches.setdefault(name, PlanCache())
