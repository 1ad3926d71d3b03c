"""async_save: snapshot semantics, failure reporting, reuse of buffers and plans."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dckpt
from dckpt import _async
from tests._dist import RankPool
from tests._probes import counting_plans

Pools = Callable[[int], RankPool]


def test_mutating_after_return_does_not_change_the_checkpoint(tmp_path: Path) -> None:
    state = {"w": torch.ones(1000), "step": 1, "nested": {"b": torch.arange(10)}}
    handle = dckpt.async_save(state, tmp_path / "ck")
    state["w"].mul_(5)
    state["nested"]["b"].zero_()  # type: ignore[index]
    state["step"] = 99
    handle.result()
    assert handle.done()
    out = {"w": torch.zeros(1000), "step": 0, "nested": {"b": torch.zeros(10, dtype=torch.int64)}}
    dckpt.load(out, tmp_path / "ck")
    assert torch.equal(out["w"], torch.ones(1000))
    assert torch.equal(out["nested"]["b"], torch.arange(10))  # type: ignore[index]
    assert out["step"] == 1


def test_staging_buffers_are_reused_across_saves(tmp_path: Path) -> None:
    state = {"w": torch.randn(256, 256), "b": torch.randn(256)}
    dckpt.async_save(state, tmp_path / "a").result()
    first = {cid: buf.data_ptr() for cid, buf in _async._saver.pool._buffers.items()}
    state["w"].add_(1)
    dckpt.async_save(state, tmp_path / "b").result()
    second = {cid: buf.data_ptr() for cid, buf in _async._saver.pool._buffers.items()}
    assert first == second and len(first) == 2
    out = {"w": torch.zeros(256, 256), "b": torch.zeros(256)}
    dckpt.load(out, tmp_path / "b")
    assert torch.equal(out["w"], state["w"])


def test_a_background_failure_surfaces_with_its_type_from_result_and_next_call(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    handle = dckpt.async_save({"w": torch.ones(4)}, blocker / "ck")
    with pytest.raises(dckpt.StorageError, match="file"):
        handle.result()
    # nobody saw this one: the next call raises it
    dckpt.async_save({"w": torch.ones(4)}, blocker / "ck2")
    with pytest.raises(dckpt.StorageError):
        dckpt.async_save({"w": torch.ones(4)}, tmp_path / "ok")
    dckpt.async_save({"w": torch.ones(4)}, blocker / "ck3")
    with pytest.raises(dckpt.StorageError):
        dckpt.wait()
    dckpt.wait()  # reported once, then clear


def test_staging_limit_is_enforced(tmp_path: Path) -> None:
    with pytest.raises(dckpt.CheckpointError, match="staging"):
        dckpt.async_save({"w": torch.ones(1000)}, tmp_path / "ck", staging_bytes=100)
    _async._saver.pool.capacity = None
    dckpt.wait()


def _pool_ptrs() -> dict[tuple[str, object], int]:
    return {cid: buf.data_ptr() for cid, buf in _async._saver.pool._buffers.items()}


def test_prepare_reserves_the_buffers_the_first_save_uses(tmp_path: Path) -> None:
    _async._saver.pool.release()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
    optim = torch.optim.Adam(model.parameters())
    state = {"model": model, "optim": optim}

    dckpt.prepare_async_save(state)  # before any step: the optimizer is left alone
    dckpt.wait()
    assert not optim.state and all(k[0].startswith("model.") for k in _pool_ptrs())
    assert len(_pool_ptrs()) == 4

    model(torch.randn(4, 32)).sum().backward()
    optim.step()
    dckpt.prepare_async_save(state)
    dckpt.wait()
    reserved = _pool_ptrs()
    assert len(reserved) == 4 + 2 * 4 + 4  # params, exp_avg/exp_avg_sq, step counts
    assert all(not b.any() for b in _async._saver.pool._buffers.values())  # touched, zeroed

    expected = {k: v.clone() for k, v in model.state_dict().items()}
    handle = dckpt.async_save(state, tmp_path / "ck")
    assert _pool_ptrs() == reserved  # the first save allocated nothing
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    handle.result()
    fresh = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
    dckpt.load({"model": fresh}, tmp_path / "ck", strict=False)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())


def test_prepare_checks_the_staging_limit_at_once() -> None:
    with pytest.raises(dckpt.CheckpointError, match="staging"):
        dckpt.prepare_async_save({"w": torch.ones(1000)}, staging_bytes=100)
    _async._saver.pool.capacity = None
    dckpt.wait()


def _w_back_to_back(root: str) -> list[bool]:
    rank = dist.get_rank()
    with counting_plans() as calls:
        w = torch.zeros(64, 64)
        for i in range(10):
            w.fill_(float(i))
            handle = dckpt.async_save(
                {"w": w, "r": torch.full((8,), float(rank)), "i": i}, f"{root}/s{i}"
            )
            w.fill_(-1.0)  # the save holds the value at the call
        handle.result()
    ok = []
    for i in range(10):
        state = {"w": torch.zeros(64, 64), "r": torch.zeros(8), "i": -1}
        dckpt.load(state, f"{root}/s{i}")
        ok.append(
            torch.equal(state["w"], torch.full((64, 64), float(i)))
            and state["i"] == i
            and torch.equal(state["r"], torch.full((8,), float(rank)))
        )
    if rank == 0:
        assert len(calls) == 1, f"planned {len(calls)} times; repeated saves must reuse the plan"
    return ok


def _w_prepared_fsdp(root: str) -> tuple[bool, bool, bool]:
    from tests.test_save_load import build, full_state, train

    model, optim = build(fsdp=True)
    train(model, optim, 1)
    state = {"model": model, "optim": optim}
    _async._saver.pool.release()
    dckpt.prepare_async_save(state)
    dckpt.wait()
    reserved = _pool_ptrs()
    expected = full_state(model, optim)
    handle = dckpt.async_save(state, root)
    allocated_nothing = _pool_ptrs() == reserved and len(reserved) > 0
    train(model, optim, 1)  # the checkpoint keeps the values at the call
    handle.result()
    model2, optim2 = build(fsdp=True)
    dckpt.load({"model": model2, "optim": optim2}, root)
    got = full_state(model2, optim2)
    same = sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    moved = not torch.equal(
        full_state(model, optim)["model.net3.weight"], expected["model.net3.weight"]
    )
    return allocated_nothing, same, moved


def test_prepared_fsdp2_first_save_uses_the_reserved_shards(
    rank_pool: Pools, tmp_path: Path
) -> None:
    assert rank_pool(2).run(_w_prepared_fsdp, str(tmp_path / "ck")) == [(True, True, True)] * 2


def test_ten_back_to_back_async_saves_on_two_ranks_commit_and_load(
    rank_pool: Pools, tmp_path: Path
) -> None:
    results = rank_pool(2).run(_w_back_to_back, str(tmp_path), timeout=120)
    assert results == [[True] * 10, [True] * 10]


def test_exit_without_wait_leaves_a_committed_checkpoint_or_none(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import torch, dckpt
        dckpt.async_save({{"w": torch.full((1 << 20,), 3.0)}}, {str(tmp_path / "ck")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    if (tmp_path / "ck" / "manifest.json").exists():
        state = {"w": torch.zeros(1 << 20)}
        dckpt.load(state, tmp_path / "ck")
        assert torch.equal(state["w"], torch.full((1 << 20,), 3.0))
    else:
        with pytest.raises(dckpt.CheckpointNotFoundError):
            dckpt.load({"w": torch.zeros(1 << 20)}, tmp_path / "ck")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sources_stage_through_pinned_memory(tmp_path: Path) -> None:
    w = torch.randn(1024, 1024, device="cuda")
    expected = w.cpu()
    _async._saver.pool.release()
    dckpt.prepare_async_save({"w": w})
    dckpt.wait()
    reserved = _pool_ptrs()
    assert len(reserved) == 1 and all(b.is_pinned() for b in _async._saver.pool._buffers.values())
    handle = dckpt.async_save({"w": w}, tmp_path / "ck")
    w.zero_()
    handle.result()
    assert _pool_ptrs() == reserved
    out = {"w": torch.zeros(1024, 1024, device="cuda")}
    dckpt.load(out, tmp_path / "ck")
    assert torch.equal(out["w"].cpu(), expected)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_sources_on_two_devices_snapshot_queued_work(tmp_path: Path) -> None:
    # Values still being computed on each device's stream when async_save is called: the
    # side stream of each device must wait for them, and the call for both side streams.
    base = {f"d{i}": torch.randn(2048, 2048, device=f"cuda:{i}") for i in range(2)}
    expected = {k: (v @ v).cpu() for k, v in base.items()}
    state = {k: v @ v for k, v in base.items()}  # queued, not yet finished
    handle = dckpt.async_save(state, tmp_path / "ck")
    for v in state.values():
        v.zero_()
    handle.result()
    out = {k: torch.zeros(2048, 2048) for k in base}
    dckpt.load(out, tmp_path / "ck")
    for k in base:
        torch.testing.assert_close(out[k], expected[k])
