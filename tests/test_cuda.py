"""State on a device: saves and loads of CUDA tensors, async snapshots of queued work, the
tiered manager staging device memory.

Each test runs on the CPU everywhere (so its logic is checked by every run of the suite)
and on ``cuda`` where a CUDA device exists; ``python -m pytest -m cuda`` runs the device
cases alone, with the other CUDA tests of the suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import dckpt
from tests._compare import same, zeroed

CUDA = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def _state(device: str) -> dict[str, Any]:
    """Every kind of tensor a save handles differently: large, non-contiguous, bf16, many
    small ones (copied together), bool, 0-d, empty; and a plain value."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(1 << 18, generator=g)
    wide = torch.randn(64, 48, generator=g).to(torch.bfloat16)
    small = {f"s{i:03d}": torch.full((1 + i % 3,), float(i)) for i in range(300)}
    state: dict[str, Any] = {
        "big": big,
        "wide_t": wide.t(),  # non-contiguous
        "small": small,
        "mask": torch.arange(37) % 3 == 0,
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.empty(0, 4),
    }
    state = _to(state, device)
    state["epoch"] = 4
    return state


def _to(tree: Any, device: str) -> Any:
    if isinstance(tree, dict):
        return {k: _to(v, device) for k, v in tree.items()}
    return tree.to(device, copy=True) if isinstance(tree, torch.Tensor) else tree


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["save", "async_save"])
def test_device_state_round_trips_onto_the_device_and_the_cpu(
    tmp_path: Path, device: str, how: str
) -> None:
    state = _state(device)
    expected = _to(state, "cpu")
    if how == "save":
        dckpt.save(state, tmp_path / "ck")
    else:
        handle = dckpt.async_save(state, tmp_path / "ck")
        for v in state["small"].values():
            v.zero_()  # after the call: the snapshot is already taken
        state["big"].zero_()
        handle.result()
    for dest_device in {device, "cpu"}:
        dest = zeroed(_to(expected, dest_device))
        dckpt.load(dest, tmp_path / "ck")
        assert same(_to(dest, "cpu"), expected), dest_device
        assert all(
            t.device.type == dest_device
            for t in (dest["big"], dest["wide_t"], dest["small"]["s000"], dest["scalar"])
        )


@pytest.mark.parametrize("device", DEVICES)
def test_async_save_snapshots_work_still_queued_on_the_stream(tmp_path: Path, device: str) -> None:
    base = torch.randn(512, 512, generator=torch.Generator().manual_seed(5)).to(device)
    expected = (base @ base).cpu()
    state = {"w": base @ base}  # on a GPU: queued, perhaps not finished at the call
    handle = dckpt.async_save(state, tmp_path / "ck")
    state["w"].zero_()
    handle.result()
    out = {"w": torch.zeros(512, 512)}
    dckpt.load(out, tmp_path / "ck")
    torch.testing.assert_close(out["w"], expected)  # a stale or zeroed copy is far off


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
def test_async_save_inside_a_side_stream_waits_for_that_stream(tmp_path: Path, device: str) -> None:
    """Values produced on the caller's current stream (a side stream here) are what the
    snapshot holds: staging waits for the current stream, whichever it is."""
    base = torch.randn(1024, 1024, device=device)
    expected = (base @ base @ base).cpu()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        w = base @ base @ base
        handle = dckpt.async_save({"w": w}, tmp_path / "ck")
        w.zero_()
    handle.result()
    out = {"w": torch.zeros(1024, 1024)}
    dckpt.load(out, tmp_path / "ck")
    torch.testing.assert_close(out["w"], expected)  # a stale or zeroed copy is far off


def _trained(device: str, steps: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    loss = torch.zeros((), device=device)
    for i in range(steps):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(i)).to(device)
        loss = model(x).square().mean()
        loss.backward()
        optim.step()
        optim.zero_grad()
    return model, optim, loss.detach()


def _train_on(model: nn.Module, optim: torch.optim.Optimizer, device: str) -> torch.Tensor:
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(99)).to(device)
    loss = model(x).square().mean()
    loss.backward()
    optim.step()
    optim.zero_grad()
    return loss.detach().cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiered", [False, True])
def test_a_manager_resumes_a_device_model_and_optimizer(
    tmp_path: Path, device: str, tiered: bool
) -> None:
    """Model and Adam on the device, saved by an async manager (with a node-local tier and
    a persisted step when ``tiered``), loaded into fresh ones that train on identically."""
    extra: dict[str, Any] = {}
    if tiered:
        extra = {"local_dir": str(tmp_path / "local"), "persist_every": 2, "keep_local": 2}
    root = str(tmp_path / "root")
    model, optim, _ = _trained(device, 3)
    mgr = dckpt.CheckpointManager(root, async_save=True, **extra)
    for step in (1, 2, 3):
        mgr.save(step, {"model": model, "optimizer": optim, "step": step})
        if step < 3:
            _train_on(model, optim, device)  # the next step's state, saved next
    mgr.wait()
    expected = _train_on(model, optim, device)
    fresh, fresh_optim, _ = _trained(device, 0)
    state = {"model": fresh, "optimizer": fresh_optim, "step": -1}
    assert dckpt.CheckpointManager(root, **extra).load(state) == 3 and state["step"] == 3
    assert next(fresh.parameters()).device.type == device
    resumed = _train_on(fresh, fresh_optim, device)
    if device == "cpu":
        assert torch.equal(resumed, expected)
    else:  # GPU kernels may round differently from run to run
        torch.testing.assert_close(resumed, expected)
    if tiered:  # the persisted step, from the durable tier alone
        plain, plain_optim, _ = _trained(device, 0)
        dckpt.load({"model": plain, "optimizer": plain_optim}, Path(root) / "step-00000002")
        assert all(p.device.type == device for p in plain.parameters())
