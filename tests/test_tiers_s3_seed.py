"""Tiered checkpoints end to end: the durable tier on the real S3 server, and the seed workflow.

4 gloo ranks form 2 simulated nodes (``node_of = rank // 2``), each node with its own local
directory. Every restart runs in fresh processes (``run_fresh``), as after a real job
restart: nothing survives in memory, only what the tiers hold.

- Node loss with S3 as the durable tier: steps 1..7 with ``persist_every=3``; node 1's local
  directory wiped -> step 7 comes back bit-exact from the replicas node 0 holds (S3 has
  only 3 and 6); both wiped -> step 6 from S3.
- A persisted file larger than the piece the persist copies at a time reaches S3 intact
  (the S3 writer sends later, from the buffers it was given).
- The seed workflow (train, save, rebuild model and optimizer, load, train on) runs on the
  tiered manager with an FSDP2 model and Adam: the resumed run matches the uninterrupted one
  bit for bit, even when the restart lands on a node whose local directory is empty.
"""

from __future__ import annotations

import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import dckpt
from dckpt.storage._fsspec import FsspecStorage
from tests._dist import Outcome, run_fresh
from tests._s3 import S3Server
from tests._tiers import Heard

WORLD = 4
RANKS_PER_NODE = 2
NODES = WORLD // RANKS_PER_NODE
MiB = 1 << 20
# Small parts so that each rank's few MiB still go through multipart uploads.
FAST = {"part_size": 5 * MiB, "multipart_threshold": 5 * MiB, "retry_timeout": 30}
TIMEOUT = 180.0


def node_of(rank: int) -> int:
    """Two ranks per simulated node; module level so that it pickles."""
    return rank // RANKS_PER_NODE


def node_dir(base: str, node: int) -> str:
    return f"{base}/node{node}"


def values(step: int, rank: int) -> dict[str, Any]:
    """What rank ``rank`` saves at ``step``: different on every rank (so each rank writes its
    own files) and random bits (so a load that mixes steps or ranks cannot match)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {
        "model": {
            "w": torch.randn(MiB // 4, generator=g),  # 1 MiB
            "b": torch.randint(-(2**31), 2**31 - 1, (1024,), dtype=torch.int32, generator=g),
        },
        "step": step,
    }


def blank() -> dict[str, Any]:
    return {
        "model": {"w": torch.zeros(MiB // 4), "b": torch.zeros(1024, dtype=torch.int32)},
        "step": -1,
    }


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["step"] == b["step"] and all(
        torch.equal(a["model"][k], b["model"][k]) for k in ("w", "b")
    )


def manager(root: str, base: str, **kw: Any) -> dckpt.CheckpointManager:
    """The tiered manager of this rank: its node's local directory, replicas on the other node."""
    return dckpt.CheckpointManager(
        root,
        local_dir=node_dir(base, node_of(dist.get_rank())),
        node_of=node_of,
        replicas=1,
        keep_local=2,
        timeout=60.0,
        **kw,
    )


def values_of(outcomes: list[Outcome]) -> list[Any]:
    failed = [o for o in outcomes if not o.ok]
    assert not failed, "\n".join(
        f"--- rank {o.rank} (exit {o.exitcode}, timed out {o.timed_out}) ---\n{o.error_text}"
        for o in failed
    )
    return [o.value for o in outcomes]


@pytest.fixture
def s3(s3_server: S3Server) -> Iterator[tuple[str, dict[str, Any]]]:
    """A fresh prefix on the session's moto server and the options that reach it."""
    url = s3_server.url(f"tiers-{uuid.uuid4().hex}")
    yield url, {**s3_server.options, "dckpt": FAST}
    FsspecStorage(url, s3_server.options).delete_prefix("")


# ----------------------------------------------------------------------------- node loss


def _w_save_seven(url: str, options: dict[str, Any], base: str) -> dict[str, list[int]]:
    rank = dist.get_rank()
    mgr = manager(url, base, storage_options=options, persist_every=3, async_save=True)
    for step in range(1, 8):
        mgr.save(step, values(step, rank))
    mgr.wait()  # the last local save, and the persist of step 6, are complete
    return {"local": mgr.steps(tier="local"), "durable": mgr.steps(tier="durable")}


def _w_restart_and_load(url: str, options: dict[str, Any], base: str) -> tuple[int | None, bool]:
    """A restarted job: fresh processes, a fresh manager, one load."""
    rank = dist.get_rank()
    mgr = manager(url, base, storage_options=options, persist_every=3, async_save=True)
    state = blank()
    step = mgr.load(state)
    ok = step is not None and same(state, values(step, rank))
    mgr.wait()
    return step, ok


def test_lost_node_recovers_from_replicas_and_lost_job_from_s3(
    s3: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    url, options = s3
    base = str(tmp_path / "local")
    listed = values_of(run_fresh(WORLD, _w_save_seven, url, options, base, timeout=TIMEOUT))
    assert listed == [{"local": [6, 7], "durable": [3, 6]}] * WORLD, listed
    # Only every third step reached S3, as an ordinary checkpoint the plain manager reads.
    assert dckpt.CheckpointManager(url, storage_options=options).steps() == [3, 6]

    # Node 1 is lost: its local directory is gone, its ranks restart on an empty one.
    shutil.rmtree(node_dir(base, 1))
    got = values_of(run_fresh(WORLD, _w_restart_and_load, url, options, base, timeout=TIMEOUT))
    # Step 7 exists only in the local tier (S3 has 3 and 6): node 1's shards came back from
    # the replicas on node 0, bit for bit, on every rank.
    assert got == [(7, True)] * WORLD, got

    # The whole job is lost: no local copy anywhere, so the newest durable step is loaded.
    for node in range(NODES):
        shutil.rmtree(node_dir(base, node), ignore_errors=True)
    got = values_of(run_fresh(WORLD, _w_restart_and_load, url, options, base, timeout=TIMEOUT))
    assert got == [(6, True)] * WORLD, got


def _w_save_four(url: str, options: dict[str, Any], base: str) -> list[int]:
    rank = dist.get_rank()
    mgr = manager(url, base, storage_options=options, persist_every=3, async_save=True)
    for step in range(1, 5):
        mgr.save(step, values(step, rank))
    mgr.wait()
    return mgr.steps(tier="durable")


def _w_restart_store_down(url: str, options: dict[str, Any], base: str) -> dict[str, Any]:
    """A restart while the durable tier's store does not answer (refused connections)."""
    heard = Heard()
    mgr = manager(url, base, storage_options=options, persist_every=3, async_save=True)
    state = blank()
    try:
        step = mgr.load(state)
    except dckpt.RankFailureError as exc:
        return {"error": {r: type(e).__name__ for r, e in exc.failures.items()}}
    ok = step is not None and same(state, values(step, dist.get_rank()))
    return {"step": step, "exact": ok, "said": heard.lines}


def test_an_unreachable_durable_tier_does_not_undo_a_local_recovery(
    s3: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The store that holds the durable tier is down when the job restarts after losing a
    node: the local step still loads from the replicas (rank 0 says it could not compare
    it with the durable tier); with no local step left, the store's error is raised on
    every rank, within the store's retry budget."""
    url, options = s3
    base = str(tmp_path / "local")
    assert (
        values_of(run_fresh(WORLD, _w_save_four, url, options, base, timeout=TIMEOUT))
        == [[3]] * WORLD
    )
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    down = {**options, "endpoint_url": dead, "dckpt": {**FAST, "retry_timeout": 2}}
    shutil.rmtree(node_dir(base, 1))
    got = values_of(run_fresh(WORLD, _w_restart_store_down, url, down, base, timeout=TIMEOUT))
    assert [(g.get("step"), g.get("exact")) for g in got] == [(4, True)] * WORLD, got
    said = " ".join(got[0]["said"])
    assert "loaded local step 4 without comparing it with the durable tier" in said, said
    for node in range(NODES):
        shutil.rmtree(node_dir(base, node), ignore_errors=True)
    got = values_of(run_fresh(WORLD, _w_restart_store_down, url, down, base, timeout=TIMEOUT))
    assert [g.get("error") for g in got] == [{0: "StorageError"}] * WORLD, got  # rank 0 lists


def _piece_bytes() -> int:
    """The size of the pieces the tiers copy files in; a persisted file larger than it is
    copied piece by piece (the default, should the constant move, is its current value)."""
    from dckpt.tiers import _transfer

    return int(getattr(_transfer, "PIECE", 16 * MiB))


def big_values(step: int, rank: int, nbytes: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(7000 + 10 * step + rank)
    return {"big": torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g), "step": step}


def _w_persist_big_then_load_plain(url: str, options: dict[str, Any], base: str) -> bool:
    """Each rank's file spans several copy pieces; the persisted step must load from S3 with
    the plain manager, bit for bit."""
    rank = dist.get_rank()
    nbytes = 2 * _piece_bytes() + 4099  # three pieces, the last one partial
    mgr = manager(url, base, storage_options=options, persist_every=1, async_save=True)
    mgr.save(1, big_values(1, rank, nbytes))
    mgr.wait()
    dest: dict[str, Any] = {"big": torch.zeros(nbytes, dtype=torch.uint8), "step": -1}
    plain = dckpt.CheckpointManager(url, storage_options=options, timeout=60.0)
    assert plain.load(dest) == 1
    return bool(torch.equal(dest["big"], big_values(1, rank, nbytes)["big"]))


def test_persisted_files_larger_than_a_copy_piece_load_from_s3(
    s3: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The S3 writer sends later, straight from the buffers it was given (the ``Writer``
    contract: they stay unchanged until ``close``), so a persist must not reuse one buffer
    for the pieces of a file."""
    url, options = s3
    base = str(tmp_path / "local")
    got = values_of(
        run_fresh(2, _w_persist_big_then_load_plain, url, options, base, timeout=TIMEOUT)
    )
    assert got == [True, True]


def layout_values(rank: int) -> dict[str, Any]:
    """12 MiB per rank in four tensors: three 5 MiB parts' worth, so the S3 layout splits
    each rank's share over three files where a local directory takes one."""
    return {f"t{i}": torch.full((3 * MiB // 4,), float(10 * rank + i)) for i in range(4)}


def _w_tiered_and_plain_save(url: str, plain_url: str, options: dict[str, Any], base: str) -> None:
    mgr = manager(url, base, storage_options=options, persist_every=1)
    mgr.save(1, layout_values(dist.get_rank()))
    mgr.wait()
    plain = dckpt.CheckpointManager(plain_url, storage_options=options, timeout=60.0)
    plain.save(1, layout_values(dist.get_rank()))


def _data_files(storage: dckpt.storage.Storage, step: int) -> list[str]:
    return sorted(n.rsplit("/", 1)[-1] for n in storage.list(f"step-{step:08d}/data"))


def test_a_persisted_step_has_the_layout_of_a_plain_save_to_s3(
    s3: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The tier saves plan their files with the durable storage's layout, so the step a
    persist copies to S3 is split as a plain save to S3 splits it (part-sized objects
    that load in parallel); the local tier holds the same, smaller files."""
    url, options = s3
    plain_url, base = url + "-plain", str(tmp_path / "local")
    try:
        values_of(
            run_fresh(2, _w_tiered_and_plain_save, url, plain_url, options, base, timeout=TIMEOUT)
        )
        persisted = _data_files(FsspecStorage(url, options), 1)
        plain = _data_files(FsspecStorage(plain_url, options), 1)
    finally:
        FsspecStorage(plain_url, options).delete_prefix("")
    assert persisted == plain == [f"r{r}-{i}.bin" for r in range(2) for i in range(3)], persisted
    assert _data_files(dckpt.storage.LocalStorage(node_dir(base, 0)), 1) == persisted


# ----------------------------------------------------------------------------- seed workflow


class Model(nn.Module):
    """The seed example's model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net1 = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.net2 = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.net3 = nn.Linear(32, 64)
        self.net4 = nn.Sequential(nn.ReLU(), nn.Linear(64, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net4(self.net3(self.net2(self.net1(x))))


def train(model: nn.Module, optim: torch.optim.Optimizer, steps: int) -> torch.Tensor:
    torch.manual_seed(0)
    loss = torch.zeros(())
    for _ in range(steps):
        loss = model(torch.rand(8, 8)).sum()
        loss.backward()
        optim.step()
        optim.zero_grad()
    return loss.detach()


def init_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = Model()
    for layer in (model.net1, model.net2, model.net3, model.net4):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def shards(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's local shards of every parameter and Adam moment, cloned."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        out[name] = p.to_local().detach().clone() if isinstance(p, DTensor) else p.detach().clone()
        for k, v in optim.state[p].items():
            local = v.to_local() if isinstance(v, DTensor) else v
            out[f"{name}.{k}"] = local.detach().clone()
    return out


def _w_seed_train_and_save(root: str, base: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model, optim = init_model()
    mgr = manager(root, base, persist_every=100, async_save=True)
    train(model, optim, steps=2)
    mgr.save(2, {"model": model, "optimizer": optim})
    # Training goes on while the save completes in the background: the step must hold the
    # state as it was when save returned.
    uninterrupted = train(model, optim, steps=2)
    mgr.wait()
    return uninterrupted, shards(model, optim)


def _w_seed_rebuild_and_resume(
    root: str, base: str
) -> tuple[int | None, torch.Tensor, dict[str, torch.Tensor]]:
    model, optim = init_model()  # rebuilt from scratch: not the trained values
    mgr = manager(root, base, persist_every=100, async_save=True)
    step = mgr.load({"model": model, "optimizer": optim})
    resumed = train(model, optim, steps=2)
    mgr.wait()
    return step, resumed, shards(model, optim)


def test_seed_workflow_resumes_bit_exact_on_the_tiered_manager(tmp_path: Path) -> None:
    root, base = str(tmp_path / "durable"), str(tmp_path / "local")
    before = values_of(run_fresh(WORLD, _w_seed_train_and_save, root, base, timeout=TIMEOUT))
    # The restart lands node 1 on a fresh host: its local directory is empty, so its
    # shards of step 2 come from node 0's replicas (the durable tier never got step 2).
    shutil.rmtree(node_dir(base, 1))
    after = values_of(run_fresh(WORLD, _w_seed_rebuild_and_resume, root, base, timeout=TIMEOUT))
    for rank, ((loss, want), (step, resumed, got)) in enumerate(zip(before, after, strict=True)):
        assert step == 2, (rank, step)
        assert torch.equal(loss, resumed), (rank, loss.item(), resumed.item())
        assert want.keys() == got.keys()
        bad = [k for k in want if not torch.equal(want[k], got[k])]
        assert not bad, (rank, bad)
    # Step 2 never reached the durable tier (persist_every=100): it came from the local tier.
    assert dckpt.CheckpointManager(root).steps() == []
