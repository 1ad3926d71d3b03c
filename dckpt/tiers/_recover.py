"""Recovery: agree on the newest step whose every needed file survives, fetch, load.

Exchanges through the coordinator (rank 0 decides), file bytes over the tiers' group::

    tiers-inventory  each node's leader lists its local tier (manifests, files, sizes)
                     -> rank 0: the local steps whose manifest survives, saved by this
                     world size, and whose every data file some node holds, newest first
                     (none older than the durable tier's latest, if its listing is done)
    tiers-verify     for the newest such step, only when asked to verify: the ranks of
                     each node check its copies against the manifest's checksums (a
                     damaged copy counts as missing) -> rank 0: who sends which file to
                     whom, or the next candidate
    tiers-fetched    the transfers; each received file is checked as it arrives and
                     stored only if it passes -> rank 0: a damaged copy is planned around
                     (tiers-verify again, from another holder), else the step is restored;
                     rank 0 then compares it with the durable tier's latest step (unless
                     the caller compares after loading it: ``compare=False``)
    tiers-durable    when no local step is restored: the durable tier's pick
    tiers-newer      (:func:`newer_durable`, after a local step loaded with
                     ``compare=False``) rank 0: the durable tier's latest step, if newer

The durable tier is listed on a thread the caller starts before the inventory, so the
listing (an object store's round trips, and in a fresh process the import and set-up of
its client: about 0.8 s of CPU for ``s3://`` on the benchmark's machine) overlaps the
local work; with ``compare=False`` it overlaps the load as well, and a durable step
found newer is loaded afterwards (rare: the local tier holds every step a persist
copied, while it keeps them). Without verification the copies a node already holds are not read here: the load that follows checks every
byte it reads, and if it fails its checksums the caller recovers again, verifying.
A step that cannot be recovered is skipped with its reason, which rank 0 logs when the
load falls back to an older step or to the durable tier.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from dckpt._coord import Coordinator, LocalCoordinator
from dckpt._errors import CheckpointError
from dckpt._format import MANIFEST_NAME, Manifest, manifest_from_bytes
from dckpt.tiers._localtier import (
    NEEDS_NAME,
    StepHolding,
    check_file,
    chunk_index,
    needs_of,
    promote,
    stored_sizes,
    transfer_checked,
)
from dckpt.tiers._transfer import Recv, Send
from dckpt.tiers._tsave import SaveContext

log = logging.getLogger("dckpt")

_TAG = 1 << 24  # recovery transfers: apart from the saves' tags


@dataclass(frozen=True)
class Candidate:
    step: int
    manifest: bytes
    needs: bytes | None


@dataclass(frozen=True)
class Decision:
    """Rank 0's pick: the local steps to try, newest first, and why others cannot be."""

    candidates: tuple[Candidate, ...]
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class _Fetch:
    sends: tuple[Send, ...]
    recvs: tuple[Recv, ...]


def _inventory(ctx: SaveContext, rank: int) -> dict[int, StepHolding] | None:
    return ctx.local.holdings() if ctx.nodes.is_leader(rank) else None


def decide(
    inventories: Sequence[dict[int, StepHolding] | None],
    ctx: SaveContext,
    world_size: int,
    want: int | None,
    durable: int | None,
) -> Decision:
    """Rank 0: the local candidates, newest first; none older than ``durable`` (the
    durable tier's pick, when already known)."""
    nodes = ctx.nodes
    by_node = {nodes.nodes[r]: inv for r, inv in enumerate(inventories) if inv is not None}
    steps = sorted({s for inv in by_node.values() for s in inv}, reverse=True)
    if want is not None:
        steps = [s for s in steps if s == want]
    out: list[Candidate] = []
    reasons: list[str] = []
    for step in steps:
        if durable is not None and step < durable:
            break
        held = [inv[step] for inv in by_node.values() if step in inv]
        raw = next((h.manifest for h in held if h.manifest is not None), None)
        why = _unrecoverable(step, raw, held, world_size)
        if why:
            reasons.append(why)
            continue
        assert raw is not None
        needs = next((h.needs for h in held if h.needs is not None), None)
        out.append(Candidate(step, raw, needs))
    return Decision(tuple(out), tuple(reasons))


def _unrecoverable(
    step: int, raw: bytes | None, held: list[StepHolding], world_size: int
) -> str | None:
    if raw is None:
        return f"step {step}: no node holds its manifest (its save never committed)"
    try:
        manifest = manifest_from_bytes(raw, source=f"local step {step}")
    except CheckpointError as exc:
        return f"step {step}: its manifest is damaged ({exc})"
    if manifest.world_size != world_size:
        return (
            f"step {step}: saved by {manifest.world_size} ranks, and the job now has "
            f"{world_size} (the local tier restores the same world size only)"
        )
    for name, size in stored_sizes(manifest).items():  # data files and tables
        if not any(h.files.get(name) == size for h in held):
            return f"step {step}: its data file {name} is held by no surviving node"
    return None


def _verify(ctx: SaveContext, rank: int, cand: Candidate) -> set[str]:
    """The copies of ``cand``'s files on this node that fail their checksums (this rank's
    share of the node's files)."""
    manifest = manifest_from_bytes(cand.manifest, source=f"local step {cand.step}")
    storage = ctx.local.step_storage(cand.step)
    mates = ctx.nodes.ranks_of(ctx.nodes.nodes[rank])
    index = chunk_index(manifest, storage)
    sizes = stored_sizes(manifest)
    present = sorted(n for n in storage.list("data") if n in sizes)
    bad = set()
    for name in present[mates.index(rank) :: len(mates)]:
        try:
            problem = check_file(storage, manifest, name, index=index)
        except CheckpointError as exc:
            problem = str(exc)
        if problem is not None:
            log.warning("local tier %s, step %d: %s", ctx.local.root, cand.step, problem)
            bad.add(name)
    return bad


def plan_fetch(
    ctx: SaveContext,
    cand: Candidate,
    holdings: dict[int, StepHolding],
    bad: Sequence[set[str]],
    world_size: int,
) -> list[_Fetch] | str:
    """Rank 0: who sends which file to whom so each node holds what its ranks read; or
    why the step cannot be recovered after all.

    The bytes are spread over the ranks, since each rank moves its files on one thread:
    the files a node lacks go, largest first, to the rank of that node with the fewest
    bytes to receive so far, each from the holding rank with the fewest to send. A table
    and the shard files it indexes are one unit: one receiver (it checks them against the
    table it just received) and, where it holds them all, one sender, so that senders and
    receivers pair up instead of queueing behind each other. Ties spare rank 0, which
    lists the durable tier meanwhile."""
    nodes = ctx.nodes
    manifest = manifest_from_bytes(cand.manifest, source=f"local step {cand.step}")
    damaged = set().union(*bad) if bad else set()
    bad_by_node = {n: set().union(*(bad[r] for r in nodes.ranks_of(n))) for n in range(nodes.count)}
    sizes = stored_sizes(manifest)
    # A copy of the wrong size is damaged: never a source (nor a copy to keep).
    valid = {
        n: {f for f, size in h.files.items() if f not in bad_by_node[n] and sizes.get(f) == size}
        for n, h in holdings.items()
    }
    lacks: dict[int, set[str]] = {}
    for rank in range(world_size):
        node = nodes.nodes[rank]
        need = needs_of(cand.needs, rank) or set(sizes)
        lacks.setdefault(node, set()).update(need - valid.get(node, set()))
    holders: dict[str, list[int]] = {}
    for name in sorted(set().union(*lacks.values())):
        holders[name] = [r for n in sorted(valid) if name in valid[n] for r in nodes.ranks_of(n)]
        if not holders[name]:
            why = "damaged" if name in damaged else "missing"
            return f"step {cand.step}: its data file {name} is {why} on every node"
    table_of = {f: t.name for t in manifest.tables for f in t.files}
    sends: list[list[Send]] = [[] for _ in range(world_size)]
    recvs: list[list[Recv]] = [[] for _ in range(world_size)]
    sending, receiving = [0] * world_size, [0] * world_size
    for node, names in sorted(lacks.items()):
        units: dict[str, list[str]] = {}  # a table fetched with its shard files: one unit
        for name in sorted(names):
            table = table_of.get(name)
            units.setdefault(table if table in names else name, []).append(name)
        ordered = sorted(units.values(), key=lambda u: (-sum(sizes[f] for f in u), u[0]))
        for unit in ordered:
            dst = _least(nodes.ranks_of(node), receiving)
            src = -1
            for name in unit:
                if src not in holders[name]:
                    src = _least(holders[name], sending)
                sends[src].append(Send(name, sizes[name], dst))
                recvs[dst].append(Recv(name, sizes[name], src))
                sending[src] += sizes[name]
                receiving[dst] += sizes[name]
    return [_Fetch(tuple(s), tuple(r)) for s, r in zip(sends, recvs, strict=True)]


def _least(ranks: Sequence[int], load: list[int]) -> int:
    """The rank of ``ranks`` with the fewest bytes so far; of equals, rank 0 last."""
    return min(ranks, key=lambda r: (load[r], r == 0, r))


@dataclass(frozen=True)
class _Fetched:
    """One rank after its fetch: the received copies that failed their checksums (name
    -> sending rank, why), and why its node could not hold the files (no room), if so."""

    bad: dict[str, tuple[int, str]]
    full: str | None


def _fetch(ctx: SaveContext, rank: int, cand: Candidate, order: _Fetch) -> _Fetched:
    """Receive this rank's share of the missing files, each checked on the way in and
    renamed into place only if it passes; report the damaged copies and a lack of room."""
    manifest = manifest_from_bytes(cand.manifest, source=f"local step {cand.step}")
    storage = ctx.local.step_storage(cand.step)
    index = chunk_index(manifest, storage)  # tables: held, or fetched first and checked
    landed = transfer_checked(
        ctx.group, storage, index, order.sends, order.recvs, timeout=ctx.timeout, tag=_TAG
    )
    for name, tmp in landed.staged.items():
        promote(storage, tmp, name)
    for name, (src, problem) in sorted(landed.bad.items()):
        log.warning(
            "step %d: the copy of %s fetched from rank %d: %s", cand.step, name, src, problem
        )
    full = None
    if landed.full:
        full = (
            f"step {cand.step}: the local tier {ctx.local.root} of rank {rank} has no room "
            f"for the files fetched for it ({landed.full[0]})"
        )
    return _Fetched(landed.bad, full)


def _restored(ctx: SaveContext, rank: int, cand: Candidate) -> None:
    """Every node holds what its ranks read: a leader without the manifest writes it."""
    storage = ctx.local.step_storage(cand.step)
    if ctx.nodes.is_leader(rank) and storage.read_file(MANIFEST_NAME) is None:
        # Its own files are in; a later recovery checks every file again anyway.
        storage.commit(NEEDS_NAME, cand.needs or b"{}", durable=False)
        storage.commit(MANIFEST_NAME, cand.manifest, durable=False)


_Outcome = str | tuple[str, int | None]


class _Rounds:
    """Rank 0's side of fetching one candidate: the copies known to be damaged, by the
    rank that reported them (a verify, or a receiver whose check failed)."""

    def __init__(self, ctx: SaveContext, cand: Candidate, holdings: dict[int, StepHolding]):
        self.ctx, self.cand, self.holdings = ctx, cand, holdings
        self.known: list[set[str]] = [set() for _ in ctx.nodes.nodes]

    def route(self, bad: list[set[str]]) -> list[_Fetch | str]:
        for r, names in enumerate(bad):
            self.known[r] |= names
        plan = plan_fetch(self.ctx, self.cand, self.holdings, self.known, len(self.known))
        return [plan] * len(self.known) if isinstance(plan, str) else list(plan)

    def fetched(self, reports: list[_Fetched], durable: Callable[[], int | None]) -> _Outcome:
        """``"retry"`` when a fetched copy was damaged (planned again around it), a
        reason the step cannot be restored, or ``("done", the durable tier's pick)``."""
        full = next((f.full for f in reports if f.full is not None), None)
        if full is not None:
            return full
        damaged = [(src, name) for f in reports for name, (src, _) in f.bad.items()]
        if damaged:
            for src, name in damaged:
                self.known[src].add(name)
            return "retry"
        return ("done", durable())


def _restore(
    ctx: SaveContext,
    coord: Coordinator | LocalCoordinator,
    cand: Candidate,
    holdings: dict[int, StepHolding],
    durable: Callable[[], int | None],
    verify: bool,
) -> _Outcome:
    """Collective: fetch what each node lacks of ``cand`` (first checking every copy
    present, with ``verify``); ``("done", durable pick)``, or why the step cannot be."""
    rank = coord.rank
    rounds = _Rounds(ctx, cand, holdings)
    check = functools.partial(_verify, ctx, rank, cand) if verify else set
    while True:
        order = coord.exchange("tiers-verify", check, rounds.route, scatter=True)
        if isinstance(order, str):
            return order
        fetch = functools.partial(_fetch, ctx, rank, cand, order)
        outcome: _Outcome = coord.exchange(
            "tiers-fetched", fetch, functools.partial(rounds.fetched, durable=durable)
        )
        if outcome != "retry":
            return outcome
        check = set  # the copies checked so far are known: plan around the damaged ones


def recover(
    ctx: SaveContext,
    coord: Coordinator | LocalCoordinator,
    durable_steps: Future[list[int]],
    want: int | None,
    *,
    verify: bool,
    compare: bool = True,
) -> tuple[str, int | None, Manifest | None, bytes | None]:
    """Collective: ``("local", step, manifest, raw)`` once the step's files are in this
    node's local tier, else ``("durable", step or None, None, None)``.

    Rank 0 compares the local step with the durable tier's only once the fetch is done,
    so that listing the durable tier (``durable_steps``, started early by the caller)
    overlaps the local work; with ``compare=False`` (or a ``want``ed step, which needs no
    comparison) not at all: a caller that loads the local step then asks
    :func:`newer_durable`. Without ``verify`` the copies a node holds are not read
    here (the load checks every byte it reads; the caller verifies and recovers again if
    that load fails its checksums); fetched files are always checked as they arrive."""
    rank = coord.rank
    holdings: dict[int, dict[int, StepHolding]] = {}

    def durable() -> int | None:  # rank 0
        steps = durable_steps.result()
        if want is None:
            return steps[-1] if steps else None
        return want if want in steps else None

    def after_fetch() -> int | None:  # rank 0: what a restored local step is compared with
        return durable() if compare and want is None else None

    def pick(invs: list[dict[int, StepHolding] | None]) -> Decision:
        for r, inv in enumerate(invs):
            if inv is not None:
                holdings[ctx.nodes.nodes[r]] = inv
        # Only a listing already done, and done well: a failed one matters only if no
        # local step can be restored (then "tiers-durable" raises it).
        listed = durable_steps.done() and durable_steps.exception() is None
        known = durable() if listed else None
        return decide(invs, ctx, coord.world_size, want, known)

    decision = coord.exchange("tiers-inventory", lambda: _inventory(ctx, rank), pick)
    reasons = list(decision.reasons)
    for cand in decision.candidates:
        step_holdings = {n: h[cand.step] for n, h in holdings.items() if cand.step in h}
        outcome = _restore(ctx, coord, cand, step_holdings, after_fetch, verify)
        if isinstance(outcome, str):
            reasons.append(outcome)
            continue
        newest = outcome[1]
        if want is None and newest is not None and newest > cand.step:
            return _durable(rank, reasons, newest)  # older local steps are older still
        _restored(ctx, rank, cand)
        _explain(rank, reasons, f"step {cand.step} from the local tier")
        raw = cand.manifest
        return "local", cand.step, manifest_from_bytes(raw, source=ctx.local.root), raw
    newest = coord.exchange("tiers-durable", lambda: None, lambda _: durable())
    return _durable(rank, reasons, newest)


def newer_durable(
    coord: Coordinator | LocalCoordinator, durable_steps: Future[list[int]], step: int
) -> int | None:
    """Collective, once local step ``step`` has loaded after ``recover(compare=False)``:
    the durable tier's latest step if it is newer (rank 0 waits for the listing here, up
    to the coordinator's timeout), else None; None too, with a warning, when the listing
    failed or did not finish in time (an unreachable store must not undo a recovery that
    needed none of it)."""

    def newer(_: list[None]) -> int | None:
        # Bounded by the timeout, inside the followers' wait for rank 0: a frozen store
        # must not fail, on them alone, a load that has succeeded.
        try:
            steps = durable_steps.result(timeout=coord.timeout)
        except Exception as exc:  # the store is down: the local step stands, said loudly
            why = (
                f"it did not answer within {coord.timeout:g} s"
                if isinstance(exc, TimeoutError)
                else f"listing it failed: {type(exc).__name__}: {exc}"
            )
            log.warning(
                "tiers: loaded local step %d without comparing it with the durable tier (%s); "
                "a newer durable step, if any, was not loaded",
                step,
                why,
            )
            return None
        return steps[-1] if steps and steps[-1] > step else None

    found: int | None = coord.exchange("tiers-newer", lambda: None, newer)
    if found is not None and coord.rank == 0:
        log.warning(
            "tiers: the durable tier holds step %d, newer than the local step %d just "
            "loaded; loading step %d from the durable tier",
            found,
            step,
            found,
        )
    return found


def _durable(
    rank: int, reasons: list[str], step: int | None
) -> tuple[str, int | None, Manifest | None, bytes | None]:
    _explain(rank, reasons, "nothing" if step is None else f"step {step} from the durable tier")
    return "durable", step, None, None


def _explain(rank: int, reasons: list[str], loading: str) -> None:
    if rank == 0 and reasons:
        log.warning(
            "tiers: loading %s; newer local steps cannot be recovered: %s",
            loading,
            "; ".join(reasons),
        )
