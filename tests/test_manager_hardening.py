"""CheckpointManager and commit cleanup under rollbacks, killed saves and shared roots.

- A save of a step lower than committed ones is a rollback: the newer steps go once it
  commits, and the step just saved is never deleted by its own retention.
- Killed overwrite saves leave ``data/<id>`` directories; the next commit removes those
  older than itself (``_tidy.remove_stale_data``), nothing else.
- Two managers on one root never delete each other's saves in progress; what a killed
  process left is removed.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import dckpt
from dckpt import _faults
from dckpt._manager import CheckpointManager, scan_root, step_name
from dckpt._tidy import MARKER_NAME, WriterMarker, remove_stale_data, save_id_time_ns
from dckpt.storage import Storage, open_storage
from tests._dist import RankPool, run_fresh

Pools = Callable[[int], RankPool]
SECOND = 10**9


def state_for(step: int, n: int = 6) -> dict[str, Any]:
    return {"w": torch.full((n,), float(step)), "step": step}


def loaded(m: CheckpointManager, step: int | None = None, n: int = 6) -> tuple[int | None, Any]:
    dest: dict[str, Any] = {"w": torch.zeros(n), "step": -1}
    got = m.load(dest, step=step)
    assert torch.equal(dest["w"], torch.full((n,), float(dest["step"])))  # never mixed
    return got, dest["step"]


def dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


def make_id(t_ns: int) -> str:
    return f"{t_ns:x}{secrets.token_hex(4)}"


def manifest_id(storage: Storage) -> str:
    raw = storage.read_file("manifest.json")
    assert raw is not None
    return str(json.loads(raw)["save_id"])


def hold(step_dir: Path) -> WriterMarker:
    """What a live manager saving ``step_dir`` in another process holds."""
    marker = WriterMarker.hold(str(step_dir), timeout=5)
    assert marker is not None
    return marker


def plant(storage: Storage, name: str) -> None:
    """A data file under ``name``, as a killed save leaves one."""
    w = storage.open_writer(name)
    w.write([memoryview(b"\0" * 64)])
    w.close(durable=False)


# ------------------------------------------------------------------------- 5. rollback


def test_rollback_removes_the_abandoned_steps_once_the_new_one_commits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = CheckpointManager(tmp_path, keep_last=2, keep_every=10)
    for step in (10, 12, 13):
        m.save(step, state_for(step))
    assert m.steps() == [10, 12, 13]
    assert loaded(m, step=10) == (10, 10)  # the job rolls back to step 10 ...
    with caplog.at_level(logging.INFO, logger="dckpt"):
        m.save(11, state_for(11))  # ... and trains on from there
    assert m.steps() == [10, 11]
    assert m.latest_step() == 11
    assert dirs(tmp_path) == [step_name(10), step_name(11)]
    assert loaded(m) == (11, 11)  # a resumed job resumes from the new timeline
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("12, 13" in msg and "rolled back" in msg for msg in infos), infos

    # Retention counts from the new timeline: keep_last=2 plus every 10th step.
    m.save(12, state_for(1200))
    m.save(13, state_for(1300))
    assert m.steps() == [10, 12, 13]
    assert loaded(m, step=12) == (12, 1200)


def test_step_just_saved_survives_its_own_retention(tmp_path: Path) -> None:
    """A run restarted from scratch in an old root: its first steps are kept."""
    CheckpointManager(tmp_path, keep_last=None).save(500, state_for(500))
    m = CheckpointManager(tmp_path, keep_last=1)
    m.save(1, state_for(1))
    assert m.steps() == [1] and loaded(m) == (1, 1)


def test_rollback_keeps_a_newer_step_that_a_live_writer_is_rewriting(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=None)
    for step in (1, 2, 3):
        m.save(step, state_for(step))
    other = hold(tmp_path / step_name(3))  # another job's save
    try:
        m.save(1, state_for(100))
        assert m.steps() == [1, 3]  # 2 went; 3 is being written by a live process
    finally:
        other.release()
    m.save(1, state_for(101))
    assert m.steps() == [1] and loaded(m) == (1, 101)


def _w_rollback(root: str) -> tuple[list[int], int | None, int | None, int]:
    rank = dist.get_rank()
    m = CheckpointManager(root, keep_last=2, keep_every=10)
    for step in (10, 12, 13):
        m.save(step, {"w": torch.full((4,), float(step)), "r": torch.full((2,), step + rank)})
    dest = {"w": torch.zeros(4), "r": torch.zeros(2, dtype=torch.int64)}
    assert m.load(dest, step=10) == 10
    m.save(11, {"w": torch.full((4,), 11.0), "r": torch.full((2,), 11 + rank)})
    steps, latest = m.steps(), m.latest_step()  # no barrier: save returned after cleanup
    got = m.load(dest)
    assert torch.equal(dest["r"], torch.full((2,), 11 + rank))
    return steps, latest, got, int(dest["w"][0])


def test_rollback_on_two_ranks(rank_pool: Pools, tmp_path: Path) -> None:
    assert rank_pool(2).run(_w_rollback, str(tmp_path)) == [([10, 11], 11, 11, 11)] * 2
    assert dirs(tmp_path) == [step_name(10), step_name(11)]


# ------------------------------------------------------------------------- 10. stale data


def _storages(tmp_path: Path) -> list[str]:
    return [str(tmp_path / "ck"), f"memory://dckpt-tidy-{uuid.uuid4().hex}/ck"]


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_remove_stale_data_removes_only_older_save_ids(tmp_path: Path, kind: str) -> None:
    pytest.importorskip("fsspec")
    path = _storages(tmp_path)[kind == "memory"]
    dckpt.save(state_for(7), path)
    storage = open_storage(path)
    committed = manifest_id(storage)
    t = save_id_time_ns(committed)
    assert t is not None
    older = [make_id(t - 5 * SECOND), make_id(t - 1)]
    newer = make_id(t + SECOND)  # another job's save, planned later: maybe in progress
    foreign = ["deadbeef", "keepme", older[0].upper(), f"{older[1]}0"]  # not save ids
    for sid in [*older, newer, *foreign]:
        plant(storage, f"data/{sid}/r0-0.bin")
    if kind == "local":  # a save killed between creating its directory and its first file
        empty = make_id(t - 2 * SECOND)
        os.makedirs(os.path.join(path, "data", empty))
        older.append(empty)

    assert remove_stale_data(storage, "not-a-save-id") == []
    removed = remove_stale_data(storage, committed)
    assert sorted(removed) == sorted(f"data/{sid}" for sid in older)
    left = {n.split("/")[1] for n in storage.list("data")}
    assert left == {committed, newer, *foreign}
    if kind == "local":
        assert sorted(os.listdir(os.path.join(path, "data"))) == sorted(left)
    assert remove_stale_data(storage, committed) == []
    dest = state_for(0)
    dckpt.load(dest, path)
    assert dest["step"] == 7 and torch.equal(dest["w"], torch.full((6,), 7.0))


def _w_killed_overwrite(path: str, value: int) -> None:
    _faults.arm(_faults.injector("save.write.after", "sigkill"))
    dckpt.save(state_for(value, n=1 << 18), path, overwrite=True)


def test_killed_overwrite_saves_are_cleaned_by_the_next_commit(tmp_path: Path) -> None:
    """Needs ``_commit.commit`` to call ``remove_stale_data`` after publishing."""
    path = str(tmp_path / "ck")
    dckpt.save(state_for(1, n=1 << 18), path)
    first = manifest_id(open_storage(path))
    for value in (2, 3, 4):
        (outcome,) = run_fresh(1, _w_killed_overwrite, path, value, timeout=120)
        assert outcome.exitcode == -signal.SIGKILL, outcome
    stale = set(os.listdir(tmp_path / "ck" / "data")) - {first}
    assert len(stale) == 3  # every killed save left its data behind
    assert manifest_id(open_storage(path)) == first

    dckpt.save(state_for(5, n=1 << 18), path, overwrite=True)
    assert os.listdir(tmp_path / "ck" / "data") == [manifest_id(open_storage(path))]
    dest = state_for(0, n=1 << 18)
    dckpt.load(dest, path)
    assert dest["step"] == 5 and torch.equal(dest["w"], torch.full((1 << 18,), 5.0))


# ------------------------------------------------------------------------- 11. shared roots

ROUNDS = 6


def _w_interleaved(root: str) -> list[str]:
    """Each rank is its own one-process job with its own manager on the shared root."""
    rank = dist.get_rank()
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    m = CheckpointManager(root, keep_last=2, process_group=singles[rank])
    dist.barrier()
    failures = []
    for r in range(ROUNDS):
        step = 2 * r + rank
        try:
            m.save(step, {f"k{i}": torch.full((1 << 17,), float(step)) for i in range(4)})
        except dckpt.CheckpointError as exc:
            failures.append(f"step {step}: {type(exc).__name__}: {exc}")
    return failures


def test_two_managers_on_one_root_never_break_each_others_saves(
    rank_pool: Pools, tmp_path: Path
) -> None:
    root = tmp_path / "shared"
    assert rank_pool(2).run(_w_interleaved, str(root), timeout=180) == [[], []]
    m = CheckpointManager(root)
    assert m.steps()
    for entry in scan_root(root):
        assert entry.committed, entry  # no save was left half-written
        dest = {f"k{i}": torch.zeros(1 << 17) for i in range(4)}
        assert m.load(dest, step=entry.step) == entry.step
        for v in dest.values():
            assert torch.equal(v, torch.full((1 << 17,), float(entry.step)))
        assert os.listdir(root / entry.name / "data") == [entry.save_id]


def _w_killed_manager_save(root: str) -> None:
    _faults.arm(_faults.injector("save.write.after", "sigkill"))
    CheckpointManager(root).save(2, state_for(2, n=1 << 16))


def test_step_left_by_a_killed_process_is_removed_by_the_next_save(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path)
    m.save(1, state_for(1))
    (outcome,) = run_fresh(1, _w_killed_manager_save, str(tmp_path), timeout=120)
    assert outcome.exitcode == -signal.SIGKILL, outcome
    assert [(e.step, e.status) for e in scan_root(tmp_path)] == [
        (1, "committed"),
        (2, "incomplete"),
    ]
    assert (tmp_path / step_name(2) / MARKER_NAME).exists()  # its lock died with it
    m.save(3, state_for(3))
    assert dirs(tmp_path) == [step_name(1), step_name(3)]


def test_step_a_live_writer_holds_is_not_cleaned(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=None)
    m.save(1, state_for(1))
    busy = tmp_path / step_name(2)
    other = hold(busy)  # another manager is saving step 2
    try:
        plant(open_storage(busy), "data/x/r0-0.bin")
        m.save(3, state_for(3))
        assert (busy / "data" / "x" / "r0-0.bin").exists()
    finally:
        other.release()
    # Its next save overwrites committed step 1: its new data is left alone too.
    other = hold(tmp_path / step_name(1))
    try:
        inflight = tmp_path / step_name(1) / "data" / make_id(time.time_ns())
        plant(open_storage(tmp_path / step_name(1)), f"data/{inflight.name}/r0-0.bin")
        m.save(4, state_for(4))
        assert inflight.exists()
        assert not busy.exists()  # its writer has gone: removed
    finally:
        other.release()
    m.save(5, state_for(5))
    assert not inflight.exists()
    assert m.steps() == [1, 3, 4, 5] and loaded(m, step=1) == (1, 1)


def test_object_store_cleanup_waits_out_the_grace_period() -> None:
    pytest.importorskip("fsspec")
    root = f"memory://dckpt-grace-{uuid.uuid4().hex}/run"
    m = CheckpointManager(root, keep_last=None, timeout=30)
    m.save(1, state_for(1))
    storage = open_storage(root)
    now = time.time_ns()
    old, fresh = make_id(now - 2 * 86400 * SECOND), make_id(now)
    plant(storage, f"{step_name(2)}/data/{fresh}/r0-0.bin")  # maybe another job, writing
    plant(storage, f"{step_name(3)}/data/{old}/r0-0.bin")  # dead for two days
    plant(storage, f"{step_name(4)}/data/x/r0-0.bin")  # cannot be dated: kept
    committed = manifest_id(open_storage(f"{root}/{step_name(1)}"))
    t = save_id_time_ns(committed)
    assert t is not None
    older, newer = make_id(t - SECOND), make_id(now + SECOND)
    for sid in (older, newer, old):
        plant(storage, f"{step_name(1)}/data/{sid}/r0-0.bin")

    # This manager's own failed save, whose data even its own cleanup could not remove.
    def fail(point: str) -> None:
        if point in ("save.write.after", "save.abandon.delete"):
            raise _faults.InjectedFault(point)

    _faults.arm(fail)
    try:
        with pytest.raises(_faults.InjectedFault):
            m.save(5, state_for(5))
    finally:
        _faults.arm(None)
    # That save's cleanup ran first: step 3 and step 1's stale data are gone.
    assert [(e.step, e.status) for e in m.entries()] == [
        (1, "committed"),
        (2, "incomplete"),
        (4, "incomplete"),
        (5, "incomplete"),
    ]
    assert {n.split("/")[2] for n in storage.list(f"{step_name(1)}/data")} == {committed, newer}

    m.save(6, state_for(6))
    assert [e.step for e in m.entries()] == [1, 2, 4, 6]  # its own failed save 5 is dead
    assert loaded(m, step=1) == (1, 1)


def test_a_dcp_checkpoint_in_a_step_directory_is_never_deleted(tmp_path: Path) -> None:
    """A job switching from DCP keeps its old step directories: they are not dckpt
    leftovers, whatever their step number."""
    import torch.distributed.checkpoint as dcp

    root = tmp_path / "root"
    dcp.save({"w": torch.ones(4)}, checkpoint_id=str(root / "step-00000001"))
    before = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    mgr = dckpt.CheckpointManager(root, keep_last=1)
    assert [e.status for e in mgr.entries()] == ["foreign"]
    for step in (2, 3):
        mgr.save(step, {"w": torch.full((4,), float(step))})
    assert mgr.steps() == [3]
    after = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    assert set(before) <= set(after)
