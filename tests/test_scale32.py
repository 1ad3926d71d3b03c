"""32 real gloo ranks in one fresh group: a save whose ranks hold sharded, replicated,
divergent and per-rank-distinct state, then a repeat (plan cache) and a save of state
that is the same on every rank (peers send references), each loaded back bit-exact, the
first also on a different world size (this one process)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import dckpt
from tests._compare import same, zeroed
from tests._dist import RankPool

WORLD = 32
ROWS = 2 * WORLD  # the sharded tensor: two rows per rank


@pytest.fixture(scope="module")
def pool32() -> Iterator[RankPool]:
    pool = RankPool(WORLD)  # its own group, closed after this module: 32 processes are big
    try:
        yield pool
    finally:
        pool.close()


def _full(step: int) -> torch.Tensor:
    return torch.arange(ROWS * 3, dtype=torch.float32).reshape(ROWS, 3) + step


def _state(rank: int, step: int, *, distinct: bool) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh  # heavy: only in workers
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = init_device_mesh("cpu", (WORLD,))
    local = _full(step)[2 * rank : 2 * rank + 2].clone()
    state: dict[str, Any] = {
        "model": {
            "w": DTensor.from_local(local, mesh, [Shard(0)], run_check=False),
            "bias": DTensor.from_local(torch.arange(5.0) * step, mesh, [Replicate()]),
        },
        "rep": torch.arange(10, dtype=torch.float64) + step,  # plain, equal everywhere
        "step": step,
    }
    if distinct:
        state["rng"] = torch.full((4,), float(rank + step))  # plain, differs: per rank
        state[f"own{rank}"] = torch.full((3,), rank * 1.5 + step)
        state["pos"] = rank
    return state


def _w_save_and_load(path: str, step: int, distinct: bool, overwrite: bool) -> bool:
    rank = dist.get_rank()
    state = _state(rank, step, distinct=distinct)
    dckpt.save(state, path, overwrite=overwrite, timeout=120)
    back = zeroed(state)
    dckpt.load(back, path, timeout=120)
    return same(state, back)


def test_32_ranks_save_and_load_bit_exact(pool32: RankPool, tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    assert pool32.run(_w_save_and_load, path, 1, True, False, timeout=240) == [True] * WORLD
    # one process, a different world size: the sharded tensor whole, the replicated ones
    state: dict[str, Any] = {
        "model": {"w": torch.zeros(ROWS, 3), "bias": torch.zeros(5)},
        "rep": torch.zeros(10, dtype=torch.float64),
    }
    dckpt.load(state, path, strict=False)
    assert torch.equal(state["model"]["w"], _full(1))
    assert torch.equal(state["model"]["bias"], torch.arange(5.0))
    assert torch.equal(state["rep"], torch.arange(10, dtype=torch.float64) + 1)
    # the same structure again: briefs and reuse notes instead of offers and plans
    assert pool32.run(_w_save_and_load, path, 2, True, True, timeout=240) == [True] * WORLD
    # every rank the same state: one offer travels, the others refer to it
    assert pool32.run(_w_save_and_load, path, 3, False, True, timeout=240) == [True] * WORLD
    assert pool32.run(_w_save_and_load, path, 4, False, True, timeout=240) == [True] * WORLD
