"""One tier save: plan, write locally, replicate to the peers, commit, publish.

Four exchanges through the coordinator (rank 0 leads), with the file transfer between
the second and the third::

    tiers-plan       every rank's offer -> rank 0 plans the files (and, at the first
                     save, checks every node's space) -> each rank its files and transfers
    (write)          each rank writes its files into its node's step directory
    tiers-written    the writers' checksums -> rank 0 renders the manifest -> every rank
    tiers-commit     each rank sends its files to its replica holders over the gloo group
                     and checks what it receives against the manifest before renaming it
                     into place -> every rank holds its files and replicas -> rank 0
                     decides the commit
    tiers-published  each node's leader writes the manifest, then applies retention

A failure anywhere before the decision raises on every rank (the transfer runs inside the
commit exchange, so a rank that fails it reports at once), and the step stays invisible
(no node has its manifest); the previous steps are untouched.

Lack of room is not a failure of the job but of the local tier: the room check (until a
save passes it), a full disk while writing, receiving or publishing. Each rank reports it
in the exchange of its phase instead of raising, rank 0 names every full node with its
bytes, and every rank raises :class:`LocalFull` at the same point, so that the caller can
save the step to the durable tier instead, collectively.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.distributed as dist

from dckpt._coord import Coordinator, LocalCoordinator
from dckpt._describe import Description, checksum_plain
from dckpt._errors import CheckpointError
from dckpt._faults import fault_point
from dckpt._format import DEFAULT_BLOCK_BYTES, manifest_from_bytes
from dckpt._plan import FileResult, RankOffer, RankPlan, SavePlan, manifest_template, plan_save
from dckpt._plan import render_manifest as render
from dckpt._reshard import Box
from dckpt._save import new_save_id, write_planned
from dckpt._version import __version__
from dckpt._write import KnownCrcs
from dckpt.storage import FileLayout, Storage
from dckpt.tiers._errors import LocalTierError, TransferError
from dckpt.tiers._localtier import LocalTier, StreamCheck, chunk_index, needs_text, promote
from dckpt.tiers._nodes import NodeMap
from dckpt.tiers._transfer import Recv, Send, is_space_error, transfer

log = logging.getLogger("dckpt")


@dataclass(frozen=True)
class SaveContext:
    """What every tier save of one manager shares."""

    local: LocalTier
    nodes: NodeMap
    group: dist.ProcessGroup | None
    keep_local: int
    timeout: float
    # The durable tier's file layout, which the tier saves plan with: a persisted step is
    # then laid out as a plain save there (an object store: many part-sized objects).
    layout: Callable[[], FileLayout]


@dataclass(frozen=True)
class Committed:
    """A step this rank saved and the job committed: what a persist of it needs."""

    step: int
    save_id: str
    manifest: bytes
    mine: tuple[tuple[str, int], ...]  # (name, size) of the files this rank wrote


class LocalFull(CheckpointError):
    """A tier save found no room in some node's local tier; every rank raises it at the
    same point, and the message names each full node, its directory and the bytes."""


@dataclass(frozen=True)
class _Full:
    """One rank's report that its node's local tier had no room."""

    rank: int
    root: str
    problem: str
    free: int


@dataclass(frozen=True)
class _Order:
    """Rank 0's answer to one rank: its files, and what it sends and receives."""

    plan: RankPlan
    sends: tuple[Send, ...]
    recvs: tuple[Recv, ...]


@dataclass(frozen=True)
class _Offer:
    offer: RankOffer
    room: tuple[int, str] | None  # a node leader's (free + used bytes, local_dir), to check


@dataclass(frozen=True)
class _Arrived:
    """One rank at the commit: whether its persist in flight ended, and its room."""

    persisted: bool
    full: _Full | None


class _Round:
    """One tier save on this rank: the exchanges, and what their callbacks learn."""

    def __init__(
        self,
        ctx: SaveContext,
        coord: Coordinator | LocalCoordinator,
        step: int,
        prepare: Callable[[], Description],
        check_space: bool,
    ) -> None:
        self.ctx = ctx
        self.coord = coord
        self.step = step
        self.prepare = prepare
        self.check_space = check_space
        self.storage: Storage = ctx.local.step_storage(step)
        self.described: Description | None = None
        self.known: KnownCrcs = {}
        self.leading: SavePlan | None = None  # rank 0, once planned
        self.offers: list[RankOffer] = []  # rank 0
        self.stored: list[str] = []  # written or received here: removed if the save fails

    # -- plan ---------------------------------------------------------------------------

    def offer(self) -> _Offer:
        described = self.described = self.prepare()
        multi = self.coord.world_size > 1
        own, self.known = checksum_plain(described) if multi else (described.offer, {})
        room = None
        if self.check_space and self.ctx.nodes.is_leader(self.coord.rank):
            local = self.ctx.local
            room = (local.free_bytes() + local.used_bytes(), local.root)
        return _Offer(own, room)

    def reduce_plan(self, msgs: list[_Offer]) -> Sequence[_Order | str]:
        self.offers = [m.offer for m in msgs]
        plan = plan_save(self.offers, new_save_id(), layout=self.ctx.layout())
        if self.check_space:
            problem = _room_problem(self.ctx, self.step, plan, [m.room for m in msgs])
            if problem is not None:
                return [problem] * len(msgs)
        self.leading = plan
        return _orders(self.ctx.nodes, plan)

    # -- write, render ------------------------------------------------------------------

    def write(self, order: _Order) -> list[FileResult] | _Full:
        assert self.described is not None  # described in the plan exchange
        self.stored += [f.name for f in order.plan.files]
        try:
            fault_point("tiers.local.write")
            return write_planned(
                self.storage, order.plan, self.described.sources, durable=False, known=self.known
            )
        except (CheckpointError, OSError) as exc:
            if is_space_error(exc):
                return self._full(exc)
            raise LocalTierError(
                f"writing step {self.step} to the local tier {self.ctx.local.root} failed: {exc}",
                errno=getattr(exc, "errno", None),
            ) from exc

    def _full(self, exc: BaseException) -> _Full:
        try:
            free = shutil.disk_usage(self.ctx.local.root).free
        except OSError:
            free = 0
        return _Full(self.coord.rank, self.ctx.local.root, str(exc), free)

    def render(self, results: list[list[FileResult] | _Full]) -> tuple[bytes, bytes] | str:
        plan = self.leading
        assert plan is not None  # rank 0 planned this save
        fulls = [r for r in results if isinstance(r, _Full)]
        if fulls:
            return self.explain(fulls)
        manifest = render(
            manifest_template(plan),
            plan,
            [r for r in results if not isinstance(r, _Full)],
            created=time.time(),
            block_bytes=DEFAULT_BLOCK_BYTES,
            library=f"dckpt {__version__}",
        )
        return manifest, needs_text(_needs(plan, self.offers), plan.world_size)

    def explain(self, fulls: Sequence[_Full]) -> str:
        """Rank 0: every full node, its directory, and the bytes this step needs there."""
        nodes, plan = self.ctx.nodes, self.leading
        parts: dict[int, str] = {}
        for f in fulls:
            node = nodes.nodes[f.rank]
            need = "" if plan is None else f"{_node_bytes(nodes, plan, node)} bytes, "
            parts.setdefault(
                node,
                f"node {node} (ranks {', '.join(map(str, nodes.ranks_of(node)))}), "
                f"local_dir {f.root}: this step needs {need}{f.free} bytes were free "
                f"({f.problem})",
            )
        return f"step {self.step} does not fit in the local tier: " + "; ".join(parts.values())

    # -- replicate, commit --------------------------------------------------------------

    def arrive(
        self, order: _Order, manifest: bytes, tag: int, persisted: Callable[[], bool]
    ) -> _Arrived:
        """Replicate (inside the commit exchange, so a failure reaches every rank at once)."""
        return _Arrived(persisted(), self.replicate(order, manifest, tag))

    def replicate(self, order: _Order, manifest_raw: bytes, tag: int) -> _Full | None:
        manifest = manifest_from_bytes(manifest_raw, source=f"step {self.step}")
        index = chunk_index(manifest)
        landed = transfer(
            self.ctx.group,
            self.storage,
            order.sends,
            order.recvs,
            timeout=self.ctx.timeout,
            tag=tag,
            check=lambda name: StreamCheck(manifest, name, index),
        )
        self.stored += landed.staged.values()
        if landed.bad:
            src, problem = landed.bad[min(landed.bad)]
            raise TransferError(f"the replica received from rank {src}: {problem}")
        for name, tmp in landed.staged.items():
            self.stored.append(name)
            promote(self.storage, tmp, name)
        return self._full(landed.full[0]) if landed.full else None

    def decide(self, arrived: list[_Arrived]) -> bool | str:
        """Rank 0: every rank holds its files and its replicas; the step commits here.
        Returns whether every rank's persist in flight has ended (or why not committed)."""
        fault_point("tiers.commit.decide")
        fulls = [a.full for a in arrived if a.full is not None]
        if fulls:
            return self.explain(fulls)
        return all(a.persisted for a in arrived)

    def published(self, reports: list[_Full | None]) -> str | None:
        fulls = [r for r in reports if r is not None]
        return self.explain(fulls) if fulls else None


def run_tier_save(
    ctx: SaveContext,
    coord: Coordinator | LocalCoordinator,
    step: int,
    prepare: Callable[[], Description],
    *,
    check_space: bool,
    busy: Callable[[], set[int]],
    ready: Callable[[], bool],
    tag: int,
) -> tuple[Committed, bool]:
    """The collective tier save of ``step`` (see the module doc).

    ``busy``: local steps retention must keep (a persist reads them); ``ready``: whether
    this rank's persist in flight has finished. Returns the committed step and whether
    every rank's persist has finished (so that each may collect its outcome now).

    Raises:
        LocalFull: On every rank, when some node's local tier has no room for the step.
    """
    save = _Round(ctx, coord, step, prepare, check_space)
    order: _Order | str = coord.exchange("tiers-plan", save.offer, save.reduce_plan, scatter=True)
    if isinstance(order, str):
        raise LocalFull(order)
    try:
        results = functools.partial(save.write, order)
        written = coord.exchange("tiers-written", results, save.render)
        if isinstance(written, str):
            raise LocalFull(written)
        manifest, needs = written
        arrive = functools.partial(save.arrive, order, manifest, tag, ready)
        decided = coord.exchange("tiers-commit", arrive, save.decide)
        if isinstance(decided, str):
            raise LocalFull(decided)
    except BaseException:
        for name in save.stored:
            with contextlib.suppress(Exception):
                save.storage.delete(name)
        raise
    save_id = order.plan.save_id
    publish = functools.partial(_publish, ctx, save, manifest, needs, save_id, busy)
    problem = coord.exchange("tiers-published", publish, save.published)
    if problem is not None:  # the nodes that published hold a committed step: it stays
        raise LocalFull(problem)
    mine = tuple((f.name, f.size) for f in order.plan.files)
    return Committed(step, save_id, manifest, mine), decided


def _publish(
    ctx: SaveContext,
    save: _Round,
    manifest: bytes,
    needs: bytes,
    save_id: str,
    busy: Callable[[], set[int]],
) -> _Full | None:
    """A node's leader writes the manifest, then applies the node's retention."""
    if not ctx.nodes.is_leader(save.coord.rank):
        return None
    fault_point("tiers.manifest.write")
    try:
        ctx.local.publish(save.step, manifest, needs, save_id)
    except (CheckpointError, OSError) as exc:
        if not is_space_error(exc):
            raise
        return save._full(exc)
    try:
        ctx.local.retain(saved=save.step, keep=ctx.keep_local, busy=busy())
    except Exception as exc:  # the step is committed; leftovers go at the next save
        log.warning("retention in the local tier %s failed: %s", ctx.local.root, exc)
    return None


def _orders(nodes: NodeMap, plan: SavePlan) -> list[_Order]:
    """Each rank's files, and the transfers that put them on their replica holders."""
    sends: list[list[Send]] = [[] for _ in plan.ranks]
    recvs: list[list[Recv]] = [[] for _ in plan.ranks]
    for rp in plan.ranks:
        for holder in nodes.holders(rp.rank):
            for f in rp.files:
                sends[rp.rank].append(Send(f.name, f.size, holder))
                recvs[holder].append(Recv(f.name, f.size, rp.rank))
    return [_Order(rp, tuple(sends[r]), tuple(recvs[r])) for r, rp in enumerate(plan.ranks)]


def _needs(plan: SavePlan, offers: Sequence[RankOffer]) -> dict[int, set[str]]:
    """The data files each rank's load of this step reads (same world size and sharding)."""
    where: dict[tuple[str, Box, int | None], str] = {}
    for rp in plan.ranks:
        for fp in rp.files:
            for item in fp.items:
                where[(item.key, item.box, rp.rank if item.per_rank else None)] = fp.name
    needs: dict[int, set[str]] = {}
    for offer in offers:
        got = needs[offer.rank] = set()
        for t in offer.tensors:
            per_rank = plan.tensors[t.key].per_rank
            for c in t.chunks:
                name = where.get((t.key, c.box, offer.rank if per_rank else None))
                if name is not None:
                    got.add(name)
    return needs


def _node_bytes(nodes: NodeMap, plan: SavePlan, node: int) -> int:
    """The bytes of one step on ``node``: its ranks' files and the replicas it holds."""
    held = set(nodes.ranks_of(node))
    held |= {s for r in nodes.ranks_of(node) for s in nodes.sources(r)}
    return sum(plan.ranks[r].nbytes for r in held)


def _room_problem(
    ctx: SaveContext, step: int, plan: SavePlan, rooms: Sequence[tuple[int, str] | None]
) -> str | None:
    """Rank 0, until a save passes it: can every node hold ``keep_local`` committed steps
    of its share, and the one being written beside them? Why not, with the numbers."""
    nodes = ctx.nodes
    for node in range(nodes.count):
        step_bytes = _node_bytes(nodes, plan, node)
        need = (ctx.keep_local + 1) * step_bytes
        room = rooms[nodes.leader(node)]
        if room is not None and need > room[0]:
            return (
                f"step {step} does not fit in the local tier: local_dir {room[1]} of node "
                f"{node} (ranks {', '.join(map(str, nodes.ranks_of(node)))}) can hold "
                f"{room[0]} bytes (free + used now), but keep_local={ctx.keep_local} steps "
                f"plus the one being saved, {step_bytes} bytes each (its ranks' shards and "
                f"the replicas it holds), need {need}: give local_dir more space, lower "
                "keep_local or replicas, or save without local_dir"
            )
    return None
