"""One tier save: plan, write locally, replicate to the peers, commit, publish.

Four exchanges through the coordinator (rank 0 leads), with the file transfer between
the second and the third::

    tiers-plan       every rank's offer -> rank 0 plans the files (and, at the first
                     save, checks every node's space) -> each rank its files and transfers
    (write)          each rank writes its files into its node's step directory
    tiers-written    the writers' checksums and layout reports -> rank 0 renders the
                     manifest -> every rank
    tiers-commit     each rank sends its files to its replica holders over the gloo group
                     and checks what it receives against the manifest before renaming it
                     into place -> every rank holds its files and replicas -> rank 0
                     decides the commit
    tiers-published  each node's leader writes the manifest, then applies retention

The step is written as an ordinary save writes it (:func:`dckpt._save.run_save`), in
format version 2 when it holds DTensors a layout entry describes: those are left out of
rank 0's plan, each rank plans, writes and reports its own shards and table
(:func:`dckpt._save.write_share`), and their transfers follow from the rendered manifest
(its table records: :mod:`._stepfiles`), tables first, so that the receiver checks the
shards against them.

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
import dataclasses
import functools
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.distributed as dist

from dckpt._coord import Coordinator, LocalCoordinator
from dckpt._describe import Description, checksum_plain
from dckpt._errors import CheckpointError
from dckpt._faults import fault_point
from dckpt._format import Manifest, manifest_from_bytes
from dckpt._plan import RankOffer, RankPlan, RankWritten, SavePlan, manifest_template, plan_save
from dckpt._save import new_save_id, rendered, write_share
from dckpt._write import KnownCrcs, plan_layout_files
from dckpt.storage import FileLayout, Storage
from dckpt.tiers._errors import LocalTierError, TransferError
from dckpt.tiers._localtier import LocalTier, chunk_index, needs_text, promote, transfer_checked
from dckpt.tiers._nodes import NodeMap
from dckpt.tiers._stepfiles import layout_needs, layout_transfers, plan_needs, written_files
from dckpt.tiers._transfer import Recv, Send, is_space_error

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
    mine: tuple[tuple[str, int], ...]  # (name, size) of the files this rank wrote, table too


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
    layout: FileLayout  # the durable tier's, which the shard files are planned with too


@dataclass(frozen=True)
class _Offer:
    offer: RankOffer  # without its layout tensors: they are planned where they live
    room: tuple[int, str] | None  # a node leader's (free + used bytes, local_dir), to check
    layout_bytes: int  # the bytes of the layout shards this rank writes (for the room)


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
        self.own: RankOffer | None = None  # with its layout tensors, and checksums
        self.known: KnownCrcs = {}
        self.leading: SavePlan | None = None  # rank 0, once planned
        self.offers: list[RankOffer] = []  # rank 0
        self.sizes: list[int] = []  # rank 0: the bytes each rank writes, once known
        self.parsed: Manifest | None = None  # rank 0: the manifest it rendered
        self.written: RankWritten | None = None
        self.stored: list[str] = []  # written or received here: removed if the save fails
        # Once this rank's arrival at the commit is posted, rank 0 may commit (and a node
        # leader publish) without this rank hearing of it: its files must then stay.
        self.arrived = False

    # -- plan ---------------------------------------------------------------------------

    def offer(self) -> _Offer:
        described = self.described = self.prepare()
        multi = self.coord.world_size > 1
        own, self.known = checksum_plain(described) if multi else (described.offer, {})
        self.own = own
        room = None
        if self.check_space and self.ctx.nodes.is_leader(self.coord.rank):
            local = self.ctx.local
            room = (local.free_bytes() + local.used_bytes(), local.root)
        shards = 0
        if own.layouts:  # the file count matters not: the local layout's will do
            shards = sum(f.size for f in plan_layout_files(own, "-", self.storage.file_layout)[0])
        return _Offer(dataclasses.replace(own, layouts=(), meshes=()), room, shards)

    def reduce_plan(self, msgs: list[_Offer]) -> Sequence[_Order | str]:
        self.offers = [m.offer for m in msgs]
        layout = self.ctx.layout()
        plan = plan_save(self.offers, new_save_id(), layout=layout)
        self.sizes = [r.nbytes + m.layout_bytes for r, m in zip(plan.ranks, msgs, strict=True)]
        if self.check_space:
            problem = _room_problem(self.ctx, self.step, self.sizes, [m.room for m in msgs])
            if problem is not None:
                return [problem] * len(msgs)
        self.leading = plan
        return _orders(self.ctx.nodes, plan, layout)

    # -- write, render ------------------------------------------------------------------

    def write(self, order: _Order) -> RankWritten | _Full:
        assert self.described is not None and self.own is not None  # described at the plan
        self.stored += [f.name for f in order.plan.files]

        def planned(every: RankPlan) -> None:  # the shard files and the table too
            self.stored += [f.name for f in every.files[len(order.plan.files) :]]

        # Shard files laid out as a plain save to the durable tier lays them out, as the
        # planned files are: a persisted step is then such a save (the storage is ours).
        self.storage.file_layout = order.layout
        try:
            fault_point("tiers.local.write")
            self.written = write_share(
                self.storage, order.plan, self.own, self.described.sources,
                durable=False, known=self.known, planned=planned,
            )  # fmt: skip
            return self.written
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

    def render(self, results: list[RankWritten | _Full]) -> tuple[bytes, bytes] | str:
        """Rank 0: the manifest, rendered as an ordinary save's (``_save.publish``), and
        the files each rank's load reads."""
        plan = self.leading
        assert plan is not None  # rank 0 planned this save
        fulls = [r for r in results if isinstance(r, _Full)]
        if fulls:
            return self.explain(fulls)
        written = [r for r in results if not isinstance(r, _Full)]
        manifest, _ = rendered(plan, manifest_template(plan), written)
        needs = plan_needs(plan, self.offers)
        if any(w.layouts is not None for w in written):
            self.parsed = manifest_from_bytes(manifest, source=f"step {self.step}")
            for rank, names in layout_needs(self.parsed).items():
                needs.setdefault(rank, set()).update(names)
        return manifest, needs_text(needs, plan.world_size)

    def explain(self, fulls: Sequence[_Full]) -> str:
        """Rank 0: every full node, its directory, and the bytes this step needs there."""
        nodes = self.ctx.nodes
        parts: dict[int, str] = {}
        for f in fulls:
            node = nodes.nodes[f.rank]
            need = f"{_node_bytes(nodes, self.sizes, node)} bytes, " if self.sizes else ""
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
        arrived = _Arrived(persisted(), self.replicate(order, manifest, tag))
        self.arrived = True
        return arrived

    def replicate(self, order: _Order, manifest_raw: bytes, tag: int) -> _Full | None:
        manifest = self.parsed or manifest_from_bytes(manifest_raw, source=f"step {self.step}")
        sends, recvs = layout_transfers(self.ctx.nodes, manifest, self.coord.rank)
        landed = transfer_checked(
            self.ctx.group,
            self.storage,
            chunk_index(manifest),
            (*order.sends, *sends),
            (*order.recvs, *recvs),
            timeout=self.ctx.timeout,
            tag=tag,
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
        # Past its arrival, the outcome is rank 0's: an uncommitted step's files are
        # removed by the node's retention, a committed one's are still needed.
        for name in () if save.arrived else save.stored:
            with contextlib.suppress(Exception):
                save.storage.delete(name)
        raise
    save_id = order.plan.save_id
    publish = functools.partial(_publish, ctx, save, manifest, needs, save_id, busy)
    problem = coord.exchange("tiers-published", publish, save.published)
    if problem is not None:  # the nodes that published hold a committed step: it stays
        raise LocalFull(problem)
    assert save.written is not None  # written before the commit
    return Committed(step, save_id, manifest, written_files(save.written)), decided


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


def _orders(nodes: NodeMap, plan: SavePlan, layout: FileLayout) -> list[_Order]:
    """Each rank's planned files, and the transfers that put them on their replica
    holders (its layout files follow from the manifest: ``_stepfiles.layout_transfers``)."""
    sends: list[list[Send]] = [[] for _ in plan.ranks]
    recvs: list[list[Recv]] = [[] for _ in plan.ranks]
    for rp in plan.ranks:
        for holder in nodes.holders(rp.rank):
            for f in rp.files:
                sends[rp.rank].append(Send(f.name, f.size, holder))
                recvs[holder].append(Recv(f.name, f.size, rp.rank))
    return [_Order(rp, tuple(sends[r]), tuple(recvs[r]), layout) for r, rp in enumerate(plan.ranks)]


def _node_bytes(nodes: NodeMap, sizes: Sequence[int], node: int) -> int:
    """The bytes of one step on ``node`` (``sizes``: each rank's): its ranks' files and
    the replicas it holds."""
    held = set(nodes.ranks_of(node))
    held |= {s for r in nodes.ranks_of(node) for s in nodes.sources(r)}
    return sum(sizes[r] for r in held)


def _room_problem(
    ctx: SaveContext, step: int, sizes: Sequence[int], rooms: Sequence[tuple[int, str] | None]
) -> str | None:
    """Rank 0, until a save passes it: can every node hold ``keep_local`` committed steps
    of its share, and the one being written beside them? Why not, with the numbers."""
    nodes = ctx.nodes
    for node in range(nodes.count):
        step_bytes = _node_bytes(nodes, sizes, node)
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
