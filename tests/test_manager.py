"""CheckpointManager: committed steps only, retention, cleanup of crashed saves, async, ranks."""

from __future__ import annotations

import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import dckpt
from dckpt import _async, _faults
from dckpt._manager import (
    CheckpointManager,
    retained_steps,
    scan_root,
    step_name,
)
from tests._dist import RankPool
from tests._probes import FailingState


def state_for(step: int) -> dict[str, Any]:
    return {"model": {"w": torch.full((4, 3), float(step))}, "step": step}


def empty_state() -> dict[str, Any]:
    return {"model": {"w": torch.zeros(4, 3)}, "step": -1}


def dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def make_leftover(root: Path, name: str, save_id: str = "deadbeef") -> Path:
    """What a save killed mid-write leaves: data files, no manifest."""
    d = root / name / "data" / save_id
    d.mkdir(parents=True)
    (d / "r0-0.bin").write_bytes(b"\0" * 64)
    return root / name


def test_empty_root(tmp_path: Path) -> None:
    for root in (tmp_path / "missing", tmp_path):
        m = CheckpointManager(root)
        assert m.steps() == []
        assert m.latest_step() is None
        state = empty_state()
        assert m.load(state) is None
        assert state["step"] == -1 and not state["model"]["w"].any()
        m.wait()  # nothing in flight: a no-op


def test_retention_keep_last_and_every(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=2, keep_every=2)
    for step in range(1, 6):
        m.save(step, state_for(step))
    assert m.steps() == [2, 4, 5]
    assert m.latest_step() == 5
    assert dirs(tmp_path) == [step_name(2), step_name(4), step_name(5)]
    state = empty_state()
    assert m.load(state) == 5
    assert state["step"] == 5 and torch.equal(state["model"]["w"], torch.full((4, 3), 5.0))


def test_retained_steps_policy() -> None:
    assert retained_steps([], keep_last=1, keep_every=None) == set()
    assert retained_steps([1, 2, 3], keep_last=None, keep_every=None) == {1, 2, 3}
    assert retained_steps([1, 2, 3], keep_last=5, keep_every=None) == {1, 2, 3}
    assert retained_steps([1, 2, 3], keep_last=0, keep_every=None) == {3}  # newest always
    assert retained_steps([10, 20, 25, 30], keep_last=1, keep_every=20) == {20, 30}
    with pytest.raises(ValueError):
        CheckpointManager("/tmp/x", keep_last=-1)
    with pytest.raises(ValueError):
        CheckpointManager("/tmp/x", keep_every=0)


def test_load_specific_step_and_plain_names(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=None)
    m.save(1, state_for(1))
    m.save(2, state_for(2))
    dckpt.save(state_for(30), tmp_path / "step-30")  # unpadded names are read too
    assert m.steps() == [1, 2, 30]
    state = empty_state()
    assert m.load(state, step=2) == 2
    assert state["step"] == 2
    assert m.load(state, step=30) == 30 and state["step"] == 30
    with pytest.raises(dckpt.CheckpointNotFoundError):
        m.load(state, step=3)
    with pytest.raises(ValueError):
        m.save(-1, state_for(0))


def test_crash_leftovers_ignored_then_cleaned(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=5)
    m.save(5, state_for(5))
    make_leftover(tmp_path, "step-7")
    orphan = make_leftover(tmp_path, step_name(5), "0rphan") / "data" / "0rphan"
    assert m.steps() == [5] and m.latest_step() == 5
    statuses = {e.name: e.status for e in scan_root(tmp_path)}
    assert statuses == {"step-7": "incomplete", step_name(5): "committed"}
    state = empty_state()
    with pytest.raises(dckpt.CheckpointNotFoundError, match="incomplete"):
        m.load(state, step=7)
    assert m.load(state) == 5  # the latest *committed* step

    # A save that fails inside a Stateful's state_dict() commits nothing.
    with pytest.raises(RuntimeError, match="boom"):
        m.save(6, {"model": {"w": torch.ones(2)}, "broken": FailingState(RuntimeError("boom"))})
    assert m.steps() == [5]
    with pytest.raises(dckpt.CheckpointNotFoundError):
        m.load(state, step=6)

    m.save(8, state_for(8))
    assert dirs(tmp_path) == [step_name(5), step_name(8)]  # step-7 leftover removed
    assert not orphan.exists()  # unreferenced data in a committed step removed
    assert m.load(state, step=5) == 5 and state["step"] == 5  # its own data untouched


def test_leftover_newer_than_saved_step_is_kept(tmp_path: Path) -> None:
    """Only leftovers older than the step being saved are removed."""
    m = CheckpointManager(tmp_path)
    make_leftover(tmp_path, step_name(9))
    m.save(3, state_for(3))
    assert (tmp_path / step_name(9)).exists()
    assert m.steps() == [3]


def test_corrupt_manifest_neither_listed_nor_deleted(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=1)
    m.save(1, state_for(1))
    bad = tmp_path / step_name(1) / "manifest.json"
    bad.write_text("{not json")
    assert m.steps() == []
    assert [e.status for e in scan_root(tmp_path)] == ["corrupt"]
    m.save(2, state_for(2))
    assert m.steps() == [2]
    assert bad.exists()  # kept for inspection


def test_failed_save_keeps_older_steps(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=2)
    m.save(1, state_for(1))
    m.save(2, state_for(2))
    with pytest.raises(dckpt.UnsupportedStateError):
        m.save(3, {"model": {"w": torch.ones(2)}, "bad": object()})
    assert m.steps() == [1, 2]
    state = empty_state()
    assert m.load(state, step=1) == 1 and state["step"] == 1


def test_resave_same_step_overwrites(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path)
    m.save(4, state_for(4))
    m.save(4, state_for(40))
    state = empty_state()
    assert m.load(state) == 4 and state["step"] == 40
    data = tmp_path / step_name(4) / "data"
    assert len(list(data.iterdir())) == 1  # the replaced save's data is gone


def test_retention_deletes_manifest_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If deleting a step's data fails, the step is already no longer committed."""
    m = CheckpointManager(tmp_path, keep_last=1)
    m.save(1, state_for(1))
    storage = m._storage
    monkeypatch.setattr(
        storage, "delete_prefix", lambda prefix: (_ for _ in ()).throw(OSError("disk gone"))
    )
    with pytest.warns(RuntimeWarning, match="disk gone"):
        m.save(2, state_for(2))
    assert m.steps() == [2]
    assert (tmp_path / step_name(1) / "data").exists()
    assert not (tmp_path / step_name(1) / "manifest.json").exists()


def test_url_root(tmp_path: Path) -> None:
    """Listing and deleting go through the storage layer, so URL roots work too."""
    pytest.importorskip("fsspec")
    root = f"memory://dckpt-tests/{tmp_path.name}"
    m = CheckpointManager(root, keep_last=1)
    m.save(1, state_for(1))
    m.save(2, state_for(2))
    assert m.steps() == [2]
    assert {e.name for e in scan_root(root)} == {step_name(2)}
    state = empty_state()
    assert m.load(state) == 2 and state["step"] == 2


def test_durable_and_allow_pickle_reach_save_and_load(tmp_path: Path) -> None:
    """The manager passes ``durable`` and ``allow_pickle`` to every save and load."""
    state = {"w": torch.ones(3), "ratio": Fraction(1, 3)}
    with pytest.raises(dckpt.UnsupportedStateError, match="allow_pickle"):
        CheckpointManager(tmp_path / "plain").save(1, state)
    fsyncs = []
    for durable in (True, False):
        m = CheckpointManager(tmp_path / str(durable), durable=durable, allow_pickle=True)
        _faults.record(True)
        try:
            m.save(1, state)
        finally:
            fsyncs.append(_faults.record(False).count("storage.fsync"))
        back = {"w": torch.zeros(3), "ratio": None}
        assert m.load(back) == 1 and back["ratio"] == Fraction(1, 3)
        with pytest.raises(dckpt.UnsafeCheckpointError, match="allow_pickle"):
            CheckpointManager(tmp_path / str(durable)).load(back)
    assert fsyncs[0] > 0 and fsyncs[1] == 0


# -------------------------------------------------------------------------- async saves


class _DeferredHandle:
    """Commits only when ``result()`` is called: a save that stays in flight on demand."""

    def __init__(self, state: dict[str, Any], path: str, options: dict[str, Any]) -> None:
        self.args = (state, path, options)
        make_leftover(Path(path).parent, Path(path).name, "inflight")  # writing has begun
        self.done = False

    def result(self) -> None:
        state, path, options = self.args
        import shutil

        shutil.rmtree(os.path.join(path, "data", "inflight"))
        dckpt.save(state, path, **options)
        self.done = True


def test_async_retention_waits_for_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handles: list[_DeferredHandle] = []

    def fake_async_save(state: dict[str, Any], path: str, **options: Any) -> _DeferredHandle:
        snapshot = {"model": {"w": state["model"]["w"].clone()}, "step": state["step"]}
        handles.append(_DeferredHandle(snapshot, path, options))
        return handles[-1]

    monkeypatch.setattr(_async, "async_save", fake_async_save)
    m = CheckpointManager(tmp_path, keep_last=1, async_save=True)
    m.save(1, state_for(1))
    assert m.steps() == [] and (tmp_path / step_name(1)).exists()
    m.save(2, state_for(2))  # finishes step 1 first; step 2 is now in flight
    assert handles[0].done and not handles[1].done
    assert m.steps() == [1]
    assert (tmp_path / step_name(2) / "data" / "inflight").exists()  # never cleaned
    m.wait()  # commits step 2, then retention drops step 1
    assert m.steps() == [2]
    assert dirs(tmp_path) == [step_name(2)]
    state = empty_state()
    m.save(3, state_for(3))
    assert m.load(state) == 3  # load waits for the in-flight save


def test_async_failure_surfaces_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Failing:
        def result(self) -> None:
            raise dckpt.StorageError("write failed")

    monkeypatch.setattr(_async, "async_save", lambda *a, **k: Failing())
    m = CheckpointManager(tmp_path, async_save=True)
    m.save(1, state_for(1))
    with pytest.raises(dckpt.StorageError, match="write failed"):
        m.wait()
    m.wait()  # the failure is reported once; the manager is usable again
    assert m.steps() == []


def test_real_async_save(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path, keep_last=2, async_save=True)
    for step in range(1, 5):
        m.save(step, state_for(step))
    m.wait()
    assert m.steps() == [3, 4]
    state = empty_state()
    assert m.load(state) == 4 and state["step"] == 4


def test_async_manager_load_reserves_staging_memory(tmp_path: Path) -> None:
    _async._saver.pool.release()
    m = CheckpointManager(tmp_path, async_save=True)
    state = {"w": torch.ones(300), "step": 0}
    assert m.load(state) is None  # nothing yet: the staging memory is still reserved
    dckpt.wait()
    reserved = {cid: b.data_ptr() for cid, b in _async._saver.pool._buffers.items()}
    assert [cid[0] for cid in reserved] == ["w"]
    m.save(1, state)
    assert {cid: b.data_ptr() for cid, b in _async._saver.pool._buffers.items()} == reserved
    m.wait()
    assert CheckpointManager(tmp_path).load({"w": torch.zeros(300)}, strict=False) == 1


# -------------------------------------------------------------------------- two ranks


def _w_manager_roundtrip(root: str) -> tuple[list[int], int | None, float, int]:
    rank = dist.get_rank()
    m = CheckpointManager(root, keep_last=2)
    for step in (10, 20, 30):
        m.save(step, {"w": torch.full((8,), float(step)), "rank_w": torch.full((2,), rank + step)})
    dist.barrier()
    state = {"w": torch.zeros(8), "rank_w": torch.zeros(2, dtype=torch.int64)}
    got = m.load(state)
    assert torch.equal(state["rank_w"], torch.full((2,), rank + 30))
    old = {"w": torch.zeros(8)}
    m.load(old, step=20, strict=False)
    return m.steps(), got, float(state["w"][0]), int(old["w"][0])


def test_two_rank_manager(rank_pool: Callable[[int], RankPool], tmp_path: Path) -> None:
    results = rank_pool(2).run(_w_manager_roundtrip, str(tmp_path))
    assert results == [([20, 30], 30, 30.0, 20)] * 2
    assert dirs(tmp_path) == [step_name(20), step_name(30)]


def test_async_manager_load_succeeds_when_reserving_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    CheckpointManager(tmp_path).save(1, {"w": torch.ones(300)})
    _async._saver.pool.capacity = 100  # as if an earlier async_save set staging_bytes=100
    try:
        state = {"w": torch.zeros(300)}
        with caplog.at_level("WARNING", logger="dckpt"):
            assert CheckpointManager(tmp_path, async_save=True).load(state) == 1
        assert torch.equal(state["w"], torch.ones(300))  # the load itself stands
        assert "could not reserve staging memory" in caplog.text and "limit of 100" in caplog.text
    finally:
        _async._saver.pool.capacity = None
