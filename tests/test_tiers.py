"""Tiered checkpoints (issue #13): 4 gloo ranks as 2 simulated nodes x 2 ranks, one local
directory per node, the durable tier on disk. Restarts run in fresh processes."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import dckpt
from dckpt import _faults
from dckpt.tiers import LocalTierError, PersistError
from tests._dist import run_fresh
from tests._tiers import Heard, tiered_manager

TIMEOUT = 20.0
N = 4096


def _state(step: int, rank: int) -> dict[str, Any]:
    return {
        "own": torch.arange(N, dtype=torch.float32) + 1000.0 * rank + step,  # per rank
        "shared": torch.arange(N, dtype=torch.float64) * step,  # equal on every rank
        "step": step,
    }


def _manager(root: str, base: str, **kw: Any) -> dckpt.CheckpointManager:
    options: dict[str, Any] = {"timeout": TIMEOUT, "persist_every": 3, "keep_last": 3, **kw}
    return tiered_manager(root, base, **options)


def w_save(root: str, base: str, last: int) -> dict[str, Any]:
    mgr = _manager(root, base)
    for step in range(1, last + 1):
        mgr.save(step, _state(step, dist.get_rank()))
    mgr.wait()
    return {"local": mgr.steps(tier="local"), "durable": mgr.steps(tier="durable")}


def w_load(root: str, base: str) -> dict[str, Any]:
    rank = dist.get_rank()
    mgr = _manager(root, base)
    dest: dict[str, Any] = {
        "own": torch.zeros(N),
        "shared": torch.zeros(N, dtype=torch.float64),
        "step": -1,
    }
    step = mgr.load(dest)
    assert step is not None
    want = _state(step, rank)
    exact = all(torch.equal(dest[k], want[k]) for k in ("own", "shared"))
    return {"step": step, "exact": exact and dest["step"] == step}


def _saved(tmp_path: Path, ranks: Any) -> tuple[str, str]:
    root, base = str(tmp_path / "durable"), str(tmp_path / "local")
    out = ranks(4).run(w_save, root, base, 7, timeout=120)
    assert out[0] == {"local": [6, 7], "durable": [3, 6]}, out
    return root, base


def _load_fresh(root: str, base: str) -> list[dict[str, Any]]:
    outcomes = run_fresh(4, w_load, root, base, timeout=120)
    assert all(o.ok for o in outcomes), [o.error_text for o in outcomes if not o.ok]
    return [o.value for o in outcomes]


def _files(base: str, node: int, step: int) -> list[Path]:
    return sorted((Path(base) / f"node{node}" / f"step-{step:08d}" / "data").rglob("*.bin"))


def test_lost_node_recovers_from_replicas_then_durable(tmp_path: Path, ranks: Any) -> None:
    root, base = _saved(tmp_path, ranks)
    # Each node holds its own ranks' files and the other node's replicas.
    assert [f.name for f in _files(base, 0, 7)] == [f.name for f in _files(base, 1, 7)]
    assert len(_files(base, 0, 7)) >= 4
    shutil.rmtree(Path(base) / "node1")  # node 1 lost; its ranks restart on a fresh node
    got = _load_fresh(root, base)
    assert got == [{"step": 7, "exact": True}] * 4, got
    assert _files(base, 1, 7), "the fresh node fetched its files from the replicas"
    shutil.rmtree(Path(base) / "node0")
    shutil.rmtree(Path(base) / "node1")  # both holders lost: the durable tier
    got = _load_fresh(root, base)
    assert got == [{"step": 6, "exact": True}] * 4, got


def test_corrupt_copies(tmp_path: Path, ranks: Any) -> None:
    root, base = _saved(tmp_path, ranks)
    # A damaged copy on one node while the other holds a good one: fetched, step 7 loads.
    own0 = next(f for f in _files(base, 0, 7) if f.name.startswith("r0-"))
    _flip(own0)
    assert _load_fresh(root, base) == [{"step": 7, "exact": True}] * 4
    # Node 1 lost and node 0's replica of rank 2 damaged: no good copy, durable step 6.
    shutil.rmtree(Path(base) / "node1")
    _flip(next(f for f in _files(base, 0, 7) if f.name.startswith("r2-")))
    assert _load_fresh(root, base) == [{"step": 6, "exact": True}] * 4


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _own_node(rank: int) -> int:
    return rank


def w_save_three_nodes(root: str, base: str) -> list[int]:
    """One rank per node, 3 nodes, each rank's files held by both other nodes."""
    rank = dist.get_rank()
    mgr = _manager(root, base, local_dir=f"{base}/node{rank}", node_of=_own_node, replicas=2)
    for step in (1, 2):
        mgr.save(step, _state(step, rank))
    mgr.wait()
    return mgr.steps(tier="local")


def w_load_three_nodes(root: str, base: str) -> dict[str, Any]:
    rank = dist.get_rank()
    mgr = _manager(root, base, local_dir=f"{base}/node{rank}", node_of=_own_node, replicas=2)
    dest: dict[str, Any] = {
        "own": torch.zeros(N),
        "shared": torch.zeros(N, dtype=torch.float64),
        "step": -1,
    }
    step = mgr.load(dest)
    want = _state(2, rank)
    return {"step": step, "exact": all(torch.equal(dest[k], want[k]) for k in ("own", "shared"))}


def test_a_damaged_fetched_copy_is_fetched_again_from_another_holder(tmp_path: Path) -> None:
    """Node 2 lost; the first holder of rank 2's files (node 0) has a damaged copy. The
    recovery does not read the copies up front: the receiver's check refuses node 0's
    copy as it arrives, and the file is fetched again from node 1, so step 2 loads."""
    root, base = str(tmp_path / "durable"), str(tmp_path / "local")
    saved = run_fresh(3, w_save_three_nodes, root, base, timeout=120)
    assert [o.value for o in saved] == [[1, 2]] * 3, [o.error_text for o in saved]
    shutil.rmtree(Path(base) / "node2")
    _flip(next(f for f in _files(base, 0, 2) if f.name.startswith("r2-")))
    outcomes = run_fresh(3, w_load_three_nodes, root, base, timeout=120)
    assert all(o.ok for o in outcomes), [o.error_text for o in outcomes if not o.ok]
    assert [o.value for o in outcomes] == [{"step": 2, "exact": True}] * 3
    # The refused copy never replaced anything; node 2 holds a good one now.
    assert "r2-0.bin" in [f.name for f in _files(base, 2, 2)]


def w_persist_damaged(root: str, base: str) -> dict[str, Any]:
    """Rank 1's local copy of step 3 is damaged after the step committed, just before
    the persist reads it."""
    rank = dist.get_rank()
    mgr = _manager(root, base)
    for step in (1, 2):
        mgr.save(step, _state(step, rank))
    mgr.wait()
    flipped: list[Path] = []

    def damage(point: str) -> None:
        if point == "tiers.persist.copy" and not flipped:
            flipped.extend(f for f in _files(base, 0, 3) if f.name.startswith("r1-"))
            for f in flipped:
                _flip(f)

    if rank == 1:
        _faults.arm(damage)
    raised = []
    try:
        mgr.save(3, _state(3, rank))
        mgr.wait()
    except PersistError as exc:
        raised.append(str(exc))
    finally:
        _faults.arm(None)
    mgr.save(4, _state(4, rank))
    mgr.wait()
    return {"raised": raised, "durable": mgr.steps(tier="durable"), "local": mgr.steps("local")}


def test_a_damaged_local_copy_is_never_persisted(tmp_path: Path, ranks: Any) -> None:
    """The persist checks each file's checksums as it copies it: the damaged copy fails
    the persist on every rank (a PersistError naming the file), the durable tier never
    gets step 3, and local saves go on."""
    root, base = str(tmp_path / "durable"), str(tmp_path / "local")
    out = ranks(4).run(w_persist_damaged, root, base, timeout=120)
    for o in out:
        assert len(o["raised"]) == 1, o
        assert "step 3" in o["raised"][0] and "r1-0.bin" in o["raised"][0], o
        assert "damaged" in o["raised"][0], o
        assert o["durable"] == [] and o["local"] == [3, 4], o


def w_save_killed(root: str, base: str) -> int | None:
    rank = dist.get_rank()
    mgr = _manager(root, base, timeout=8.0)
    for step in (1, 2):
        mgr.save(step, _state(step, rank))
    mgr.wait()
    if rank == 3:
        _faults.arm(_faults.injector("tiers.replicate.send", "sigkill"))
    try:
        mgr.save(3, _state(3, rank))
        mgr.wait()
    except dckpt.CheckpointError:
        return mgr.latest_step(tier="local")
    return None


def test_killed_during_replication_keeps_previous_step(tmp_path: Path) -> None:
    root, base = str(tmp_path / "durable"), str(tmp_path / "local")
    outcomes = run_fresh(4, w_save_killed, root, base, timeout=120)
    assert outcomes[3].exitcode == -9
    assert [o.value for o in outcomes[:3]] == [2, 2, 2], [o.error_text for o in outcomes]
    got = _load_fresh(root, base)
    assert got == [{"step": 2, "exact": True}] * 4


def w_persist_fails(root: str, base: str) -> dict[str, Any]:
    rank = dist.get_rank()
    mgr = _manager(root, base)
    if rank == 1:
        _faults.arm(_faults.injector("tiers.persist.copy", "raise"))
    raised = []
    try:
        for step in range(1, 6):
            try:
                mgr.save(step, _state(step, rank))
            except PersistError as exc:
                raised.append(str(exc))
        try:
            mgr.wait()
        except PersistError as exc:
            raised.append(str(exc))
    finally:
        _faults.arm(None)
    mgr.save(6, _state(6, rank))
    mgr.wait()
    return {
        "raised": raised,
        "local": mgr.steps(tier="local"),
        "durable": mgr.steps(tier="durable"),
    }


def test_failing_persist_surfaces_once_and_saves_go_on(tmp_path: Path, ranks: Any) -> None:
    root, base = str(tmp_path / "durable"), str(tmp_path / "local")
    out = ranks(4).run(w_persist_fails, root, base, timeout=120)
    for o in out:
        assert len(o["raised"]) == 1 and "step 3" in o["raised"][0], o
        assert o["local"] == [5, 6] and o["durable"] == [6], o


def test_one_process_roundtrip_and_room_check(tmp_path: Path) -> None:
    root, local = str(tmp_path / "durable"), str(tmp_path / "local")
    mgr = dckpt.CheckpointManager(root, local_dir=local, persist_every=2, keep_local=2)
    for step in (1, 2, 3):
        mgr.save(step, _state(step, 0))
    mgr.wait()  # the persist runs in the background, in sync mode too
    assert mgr.steps(tier="local") == [2, 3] and mgr.steps(tier="durable") == [2]
    assert mgr.steps() == [2, 3] and mgr.latest_step() == 3
    dest: dict[str, Any] = {
        "own": torch.zeros(N),
        "shared": torch.zeros(N, dtype=torch.float64),
        "step": 0,
    }
    assert mgr.load(dest) == 3 and torch.equal(dest["own"], _state(3, 0)["own"])
    full = dckpt.CheckpointManager(
        str(tmp_path / "d2"), local_dir=str(tmp_path / "l2"), keep_local=1 << 50
    )
    # Refused with the numbers; step 1 (persist_every=1: due) goes to the durable tier.
    with pytest.raises(LocalTierError, match="keep_local=1125899906842624") as got:
        full.save(1, _state(1, 0))
    assert got.value.is_disk_full and "saved to the durable tier" in str(got.value)
    assert not full.steps(tier="local") and full.steps(tier="durable") == [1]


def test_retention_applies_per_tier(tmp_path: Path) -> None:
    """keep_local counts the local tier's steps, keep_last the durable tier's persisted
    ones; each tier's files of dropped steps are gone."""
    root, local = tmp_path / "durable", tmp_path / "local"
    mgr = dckpt.CheckpointManager(
        str(root), local_dir=str(local), persist_every=2, keep_local=3, keep_last=2
    )
    for step in range(1, 10):
        mgr.save(step, _state(step, 0))
    mgr.wait()
    assert mgr.steps(tier="local") == [7, 8, 9] and mgr.steps(tier="durable") == [6, 8]
    assert sorted(p.name for p in local.iterdir() if p.name.startswith("step-")) == [
        f"step-{s:08d}" for s in (7, 8, 9)
    ]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == [
        f"step-{s:08d}" for s in (6, 8)
    ]


@pytest.mark.parametrize(
    ("kw", "err"),
    [
        ({"local_dir": "s3://b/x"}, dckpt.ArgumentError),
        ({"local_dir": "x", "replicas": -1}, dckpt.ArgumentError),
        ({"local_dir": "x", "persist_every": 0}, dckpt.ArgumentError),
        ({"local_dir": "x", "keep_local": 0}, dckpt.ArgumentError),
        ({"local_dir": "x", "node_of": 3}, dckpt.ArgumentTypeError),
    ],
)
def test_bad_tier_arguments(tmp_path: Path, kw: dict[str, Any], err: type[Exception]) -> None:
    with pytest.raises(err):
        dckpt.CheckpointManager(str(tmp_path), **kw)
    with pytest.raises(dckpt.ArgumentError, match="tier"):
        dckpt.CheckpointManager(str(tmp_path)).steps(tier="nvme")  # type: ignore[arg-type]


@pytest.mark.parametrize("eager", [True, False])
def test_the_durable_root_opens_off_the_critical_path(tmp_path: Path, eager: bool) -> None:
    """The durable root opens on a thread from construction (eager, rank 0) or at its
    first use (the other ranks): constructing never raises, a root that cannot be opened
    raises at its first use, and a good one is the root's storage."""
    from dckpt.tiers._persist import DurableTier

    def tier(root: str) -> DurableTier:
        kw: dict[str, Any] = dict(durable=False, keep_last=None, keep_every=None, timeout=5.0)
        return DurableTier(root, None, eager=eager, **kw)

    broken = tier("nosuchscheme-dckpt://bucket/run")  # no backend knows the scheme
    with pytest.raises(dckpt.CheckpointError, match="nosuchscheme-dckpt"):
        broken.storage  # noqa: B018 -- the property opens the root
    with pytest.raises(dckpt.CheckpointError):
        broken.cleaner  # noqa: B018 -- the same error, again
    good = tier(str(tmp_path / "durable"))
    assert good.storage.location == str(tmp_path / "durable") and good.cleaner.local
    assert good.storage is good.storage  # opened once


BIG = 48 << 20  # bytes of one rank's tensor in the streaming test


def w_stream(root: str, base: str) -> dict[str, Any]:
    """Sync mode (no staging copy): the save's extra memory is the transfers' own."""
    import resource  # the peak resident memory of this (fresh) process

    from dckpt.tiers import _transfer

    _transfer.PIECE = 1 << 20  # many pieces per file
    rank = dist.get_rank()
    mgr = _manager(root, base, async_save=False, persist_every=100)
    mgr.save(1, {"big": torch.zeros(8)})  # the tiers' group connects at its first use
    big = torch.arange(BIG // 4, dtype=torch.int32).mul_(rank + 1)  # no temporary copy
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    mgr.save(2, {"big": big})
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - before
    return {"grew": grew, "local": mgr.steps(tier="local")}


def test_transfers_stream_in_pieces(tmp_path: Path) -> None:
    """A rank sends its 48 MiB file and receives its peer's, in 1 MiB pieces: its peak
    memory grows by a few pieces (holding both files whole grew it by 96 MiB), the
    replicas arrive whole and checked, and no temporary file is left."""
    root, base = str(tmp_path / "durable"), str(tmp_path / "local")
    outcomes = run_fresh(4, w_stream, root, base, timeout=180)
    assert all(o.ok for o in outcomes), [o.error_text for o in outcomes if not o.ok]
    for o in outcomes:
        assert o.value["local"] == [1, 2], o.value
        assert o.value["grew"] < 10 << 20, o.value  # 4 pieces, and some slack
    for node in (0, 1):
        step = Path(base) / f"node{node}" / "step-00000002"
        files = sorted(p.name for p in step.rglob("*") if p.is_file())
        assert not [f for f in files if ".part-" in f], files
        assert [f for f in files if f.endswith(".bin")] == [f"r{r}-0.bin" for r in range(4)]


def test_construction_refuses_an_unwritable_local_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a directory")
    with pytest.raises(LocalTierError, match="a-file/local cannot be written"):
        dckpt.CheckpointManager(str(tmp_path / "durable"), local_dir=str(blocker / "local"))


# -- format version 2 in the tiers: DTensors as layout entries and tables ------------------


def _v2_state(step: int, model: Any = None) -> dict[str, Any]:
    """An FSDP2 model (its parameters: DTensors sharded over the 4 ranks), an HSDP-like
    DTensor (replicated over the 2 x 2 mesh's first dim: its writers spread over the
    replicas, so a rank may load a shard another node wrote) and a tensor per rank; the
    values depend on the step. ``model``: a model already built (and sharded) to fill."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    rank = dist.get_rank()
    if model is None:
        model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8))
        mesh = init_device_mesh("cpu", (4,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            full = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) * (i + 1) + step
            p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))
    hsdp = init_device_mesh("cpu", (2, 2))
    wide = torch.arange(40 * 6, dtype=torch.float64).reshape(40, 6) - step
    return {
        "model": model,
        "hsdp": distribute_tensor(wide, hsdp, [Replicate(), Shard(0)], src_data_rank=None),
        "own": torch.full((300,), float(1000 * rank + step)),
        "step": step,
    }


def w_v2_save(root: str, base: str) -> dict[str, Any]:
    mgr = _manager(root, base)
    state = _v2_state(1)
    for step in (1, 2, 3, 4):
        mgr.save(step, _v2_state(step, state["model"]))
    mgr.wait()
    return {"local": mgr.steps(tier="local"), "durable": mgr.steps(tier="durable")}


def w_v2_load(root: str, base: str) -> dict[str, Any]:
    mgr = _manager(root, base)
    dest = _v2_state(0)
    for t in (*dest["model"].parameters(), dest["hsdp"]):
        with torch.no_grad():
            t.zero_()
    dest["own"].zero_()
    step = mgr.load(dest)
    assert step is not None
    want = _v2_state(step)  # a second model, holding the values that step saved
    pairs = [
        *zip(dest["model"].parameters(), want["model"].parameters(), strict=True),
        (dest["hsdp"], want["hsdp"]),
    ]
    exact = all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in pairs)
    exact = exact and torch.equal(dest["own"], want["own"]) and dest["step"] == step
    return {"step": step, "exact": exact}


def _v2_load_fresh(root: str, base: str) -> list[dict[str, Any]]:
    outcomes = run_fresh(4, w_v2_load, root, base, timeout=180)
    assert all(o.ok for o in outcomes), [o.error_text for o in outcomes if not o.ok]
    return [o.value for o in outcomes]


def test_tier_saves_write_format_2_recover_and_persist(tmp_path: Path, ranks: Any) -> None:
    """DTensors go to the local tier as layout entries with tables (format version 2, as
    a plain save writes them); a lost node's shard files and tables come back from the
    replicas, bit for bit, each checked against its table as it arrives (a damaged copy
    is refused); the persisted step is a version 2 checkpoint that verifies."""
    import json

    from dckpt._format import manifest_from_bytes
    from dckpt._reader import CheckpointReader
    from dckpt.storage import open_storage
    from dckpt.tiers._localtier import check_file, stored_sizes

    root, base = str(tmp_path / "durable"), str(tmp_path / "local")
    out = ranks(4).run(w_v2_save, root, base, timeout=180)
    assert out == [{"local": [3, 4], "durable": [3]}] * 4, out
    step = Path(base) / "node0" / "step-00000004"
    raw = (step / "manifest.json").read_bytes()
    m = json.loads(raw)
    assert m["version"] == 2 and [t["rank"] for t in m["tables"]] == [0, 1, 2, 3], m["tables"]
    assert "layout" in m["tensors"]["hsdp"] and "chunks" not in m["tensors"]["hsdp"]
    assert (Path(base) / "node1" / "step-00000004" / "manifest.json").read_bytes() == raw
    # Each node holds its ranks' tables and shard files and the replicas of the other's,
    # and every one of them passes its checks (a shard file: against its table's rows).
    manifest = manifest_from_bytes(raw, source="step 4")
    names = sorted(stored_sizes(manifest))
    assert sum(n.endswith(".tab") for n in names) == 4 and any("-s0.bin" in n for n in names)
    held = open_storage(str(step))
    assert [check_file(held, manifest, n) for n in names] == [None] * len(names)
    # Node 1 lost: step 4 (not persisted) comes back from node 0's replicas.
    shutil.rmtree(Path(base) / "node1")
    assert _v2_load_fresh(root, base) == [{"step": 4, "exact": True}] * 4
    fetched = Path(base) / "node1" / "step-00000004"
    assert {"r2.tab", "r3.tab"} <= {p.name for p in fetched.rglob("*.tab")}
    # Node 0's replica of a shard file of rank 2 damaged, node 1 lost again: the copy is
    # refused as it arrives (never stored), and step 4 cannot be recovered: step 3 loads.
    shard = next(n for n in names if n.endswith("/r2-s0.bin"))
    _flip(step / shard)
    assert "fails the checksum" in str(check_file(held, manifest, shard))
    shutil.rmtree(Path(base) / "node1")
    assert _v2_load_fresh(root, base) == [{"step": 3, "exact": True}] * 4
    assert not (fetched / shard).exists()
    durable = Path(root) / "step-00000003"
    assert json.loads((durable / "manifest.json").read_bytes())["version"] == 2
    assert CheckpointReader.open(str(durable)).verify() == []


# -- recovery: how the fetch of a lost node's files is spread over the ranks --------------


def _fetch_plan(base: str, step: int) -> tuple[Any, list[Any]]:
    """Rank 0's fetch plan for ``step`` with node 1's local directory gone (the decision
    alone: nothing moves), and the manifest."""
    from dckpt._format import manifest_from_bytes
    from dckpt.tiers._localtier import LocalTier
    from dckpt.tiers._nodes import NodeMap
    from dckpt.tiers._recover import Candidate, plan_fetch
    from dckpt.tiers._tsave import SaveContext

    local = LocalTier(f"{base}/node0")
    held = local.holdings()[step]
    assert held.manifest is not None
    layout = local.storage.file_layout
    ctx = SaveContext(local, NodeMap((0, 0, 1, 1), 1), None, 2, TIMEOUT, lambda: layout)
    plan = plan_fetch(ctx, Candidate(step, held.manifest, held.needs), {0: held}, [set()] * 4, 4)
    assert not isinstance(plan, str), plan
    return manifest_from_bytes(held.manifest, source="test"), plan


def test_the_fetch_of_a_lost_node_pairs_senders_with_receivers(tmp_path: Path, ranks: Any) -> None:
    """Node 1 lost, format version 2: each table and the shard files it indexes go to one
    receiver (which checks the files against it) from one sender; both ranks of node 1
    receive and both ranks of node 0 send, each sender to one receiver, so the two
    streams run side by side; every file node 1 lacks arrives exactly once."""
    root, base = str(tmp_path / "durable"), str(tmp_path / "local")
    out = ranks(4).run(w_v2_save, root, base, timeout=180)
    step = out[0]["local"][-1]
    manifest, plan = _fetch_plan(base, step)
    received = {r.name: rank for rank in (2, 3) for r in plan[rank].recvs}
    assert sum(len(plan[rank].recvs) for rank in (2, 3)) == len(received)  # once each
    assert not plan[2].sends and not plan[3].sends and not plan[0].recvs and not plan[1].recvs
    # Each send is matched by the receive its destination posts.
    for src in (0, 1):
        for s in plan[src].sends:
            assert (s.name, s.size, src) in {(r.name, r.size, r.src) for r in plan[s.dst].recvs}
    tables = {t.name: t for t in manifest.tables}
    for name in ("r2", "r3"):
        table = next(t for t in tables.values() if t.name.endswith(f"/{name}.tab"))
        unit = {table.name, *table.files}
        assert {received[f] for f in unit} == {received[table.name]}
        assert len({r.src for r in plan[received[table.name]].recvs if r.name in unit}) == 1
    assert {received[t] for t in tables if t in received} == {2, 3}
    units = [{s.dst for s in plan[src].sends if s.name in tables} for src in (0, 1)]
    assert sorted(map(sorted, units)) == [[2], [3]], units


def w_durable_newer(root: str, base: str) -> list[int]:
    """Steps 1-3 through the tiers (3 persisted), then step 4 by another writer of the
    root: a durable step newer than any local one."""
    rank = dist.get_rank()
    mgr = _manager(root, base)
    for step in (1, 2, 3):
        mgr.save(step, _state(step, rank))
    mgr.wait()
    dckpt.CheckpointManager(root, timeout=TIMEOUT).save(4, _state(4, rank))
    return mgr.steps(tier="durable")


def test_a_newer_durable_step_wins_over_the_local_tier(tmp_path: Path, ranks: Any) -> None:
    """The local tier holds steps 2 and 3, the durable tier a newer step 4: a lost node's
    recovery loads step 4 from the durable tier, bit for bit, whether rank 0 compares the
    tiers before the fetch, after it or after loading the local step."""
    root, base = str(tmp_path / "durable"), str(tmp_path / "local")
    assert ranks(4).run(w_durable_newer, root, base, timeout=120) == [[3, 4]] * 4
    shutil.rmtree(Path(base) / "node1")
    assert _load_fresh(root, base) == [{"step": 4, "exact": True}] * 4


def w_load_other_world(root: str, base: str) -> dict[str, Any]:
    """A restart on 2 ranks (one node: ranks 0 and 1 keep node 0's local directory). The
    per-rank tensor saved by 4 ranks cannot be split for 2, so it is left out."""
    records = Heard()
    mgr = _manager(root, base)
    dest: dict[str, Any] = {"shared": torch.zeros(N, dtype=torch.float64), "step": -1}
    step = mgr.load(dest, strict=False)
    assert step is not None
    exact = torch.equal(dest["shared"], _state(step, 0)["shared"]) and dest["step"] == step
    return {"step": step, "exact": exact, "log": records.lines}


def test_another_world_size_falls_back_to_the_durable_tier(tmp_path: Path, ranks: Any) -> None:
    """Saved by 4 ranks; restarted on 2 whose node still holds local steps 6 and 7: the
    local steps are skipped, saying why, and durable step 6 loads on the new world size."""
    root, base = _saved(tmp_path, ranks)
    outcomes = run_fresh(2, w_load_other_world, root, base, timeout=120)
    assert all(o.ok for o in outcomes), [o.error_text for o in outcomes if not o.ok]
    got = [o.value for o in outcomes]
    assert [(g["step"], g["exact"]) for g in got] == [(6, True)] * 2, got
    said = " ".join(got[0]["log"])
    assert "step 7: saved by 4 ranks, and the job now has 2" in said, said
    assert "step 6 from the durable tier" in said, said
    assert "replicas=1, but the job spans 1 node(s): each shard is held on 0 other" in said
    assert (Path(base) / "node0" / "step-00000007" / "manifest.json").exists()  # left alone


def test_a_frozen_durable_listing_keeps_the_loaded_local_step() -> None:
    """Rank 0 waits for the durable tier's listing at most the timeout (the followers wait
    for rank 0 longer than that), then keeps the local step it loaded, saying so."""
    from concurrent.futures import Future

    from dckpt._coord import LocalCoordinator
    from dckpt.tiers._recover import newer_durable

    heard = Heard()
    frozen: Future[list[int]] = Future()  # a listing that never returns
    assert newer_durable(LocalCoordinator(timeout=0.2), frozen, 7) is None
    assert any("local step 7 without comparing" in x and "within 0.2 s" in x for x in heard.lines)
    listed: Future[list[int]] = Future()
    listed.set_result([3, 6, 9])
    assert newer_durable(LocalCoordinator(timeout=0.2), listed, 7) == 9
    logging.getLogger("dckpt").removeHandler(heard)
