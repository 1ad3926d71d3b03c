"""Save and load across ranks and layouts, with real gloo groups, files and failures."""

from __future__ import annotations

import glob
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dckpt
from tests._dist import RankPool, run_fresh
from tests._probes import FailingState, counting_plans

Pools = Callable[[int], RankPool]


# ----------------------------------------------------------------------------- models


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net1 = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.net2 = nn.Sequential(nn.Linear(16, 33), nn.ReLU())  # 33 rows: uneven shards
        self.net3 = nn.Linear(33, 5)


def build(
    fsdp: bool, mesh_shape: tuple[int, ...] | None = None
) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = Net()
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        shape = mesh_shape or (dist.get_world_size(),)
        names = ("replicate", "shard") if len(shape) == 2 else None
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        for layer in (model.net1, model.net2, model.net3):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def train(model: nn.Module, optim: torch.optim.Optimizer, steps: int) -> torch.Tensor:
    torch.manual_seed(1)
    loss = torch.zeros(())
    for _ in range(steps):
        loss = model.net3(model.net2(model.net1(torch.rand(4, 8)))).sum()  # type: ignore[operator]
        loss.backward()
        optim.step()
        optim.zero_grad()
    return loss.detach()


def full_state(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of model + optimizer as full plain tensors, keyed like dckpt."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in get_model_state_dict(model).items():
        out[f"model.{k}"] = v.full_tensor() if isinstance(v, DTensor) else v.clone()
    for fqn, s in get_optimizer_state_dict(model, optim)["state"].items():
        for name, v in s.items():
            out[f"optim.{fqn}.{name}"] = v.full_tensor() if isinstance(v, DTensor) else v.clone()
    return out


# ----------------------------------------------------------------------------- seed round trip


def _w_seed_round_trip(path: str) -> tuple[float, float]:
    model, optim = build(fsdp=True)
    train(model, optim, 2)
    dckpt.save({"model": model, "optimizer": optim}, path)
    uninterrupted = train(model, optim, 2)
    model, optim = build(fsdp=True)
    dckpt.load({"model": model, "optimizer": optim}, path)
    resumed = train(model, optim, 2)
    assert torch.equal(uninterrupted, resumed), (uninterrupted, resumed)
    return uninterrupted.item(), resumed.item()


def test_seed_workflow_resumes_bit_for_bit(rank_pool: Pools, tmp_path: Path) -> None:
    results = rank_pool(2).run(_w_seed_round_trip, str(tmp_path / "ck"))
    assert results[0][0] == results[0][1]


# ----------------------------------------------------------------------------- resharding FSDP2


def _w_save_fsdp(path: str) -> dict[str, torch.Tensor]:
    model, optim = build(fsdp=True)
    train(model, optim, 1)
    dckpt.save({"model": model, "optim": optim, "step": 3}, path)
    full = full_state(model, optim)  # collective: every rank gathers
    return full if dist.get_rank() == 0 else {}


def _w_load_fsdp(path: str, mesh_shape: tuple[int, ...] | None) -> dict[str, torch.Tensor]:
    model, optim = build(fsdp=True, mesh_shape=mesh_shape)
    state = {"model": model, "optim": optim, "step": 0}
    dckpt.load(state, path)
    assert state["step"] == 3
    full = full_state(model, optim)
    return full if dist.get_rank() == 0 else {}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fsdp2_two_ranks_loads_on_three_ranks_and_in_one_plain_process(
    rank_pool: Pools, tmp_path: Path
) -> None:
    path = str(tmp_path / "ck")
    saved = rank_pool(2).run(_w_save_fsdp, path)[0]
    _assert_same(saved, rank_pool(3).run(_w_load_fsdp, path, None)[0])
    _assert_same(saved, rank_pool(4).run(_w_load_fsdp, path, (2, 2))[0])  # HSDP-style 2-D mesh
    model, optim = build(fsdp=False)
    state = {"model": model, "optim": optim, "step": 0}
    assert dckpt.load(state, path) == dckpt.LoadResult()
    _assert_same(saved, full_state(model, optim))


# ----------------------------------------------------------------------------- resharding DTensors


def _make_dtensor(
    full: torch.Tensor, mesh_shape: tuple[int, ...], placements: list[str]
) -> torch.Tensor:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", mesh_shape)
    pl = [Replicate() if p == "R" else Shard(int(p[1:])) for p in placements]
    return distribute_tensor(full, mesh, pl)


def _w_reshard_save(
    path: str, shape: tuple[int, ...], mesh: tuple[int, ...] | None, pl: list[str]
) -> None:
    full = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float32).reshape(shape)
    t = full.clone() if mesh is None else _make_dtensor(full, mesh, pl)
    dckpt.save({"t": t, "plain": full[0].clone() if full.ndim else full.clone()}, path)


def _w_reshard_load(
    path: str, shape: tuple[int, ...], mesh: tuple[int, ...] | None, pl: list[str]
) -> bool:
    from torch.distributed.tensor import DTensor

    full = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float32).reshape(shape)
    t = torch.zeros(shape) if mesh is None else _make_dtensor(torch.zeros(shape), mesh, pl)
    plain = torch.zeros_like(full[0] if full.ndim else full)
    dckpt.load({"t": t, "plain": plain}, path)
    got = t.full_tensor() if isinstance(t, DTensor) else t
    return torch.equal(got, full) and torch.equal(plain, full[0] if full.ndim else full)


layouts = st.sampled_from(
    [
        (1, None, []),
        (2, (2,), ["S0"]),
        (2, (2,), ["S1"]),
        (2, (2,), ["R"]),
        (3, (3,), ["S0"]),
        (3, (3,), ["S1"]),
        (4, (2, 2), ["S0", "S1"]),  # data parallel x tensor parallel
        (4, (2, 2), ["R", "S0"]),
        (4, (2, 2), ["S0", "S0"]),
        (4, (4,), ["S0"]),
    ]
)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    shape=st.lists(st.integers(1, 9), min_size=2, max_size=3).map(tuple),
    src=layouts,
    dst=layouts,
)
def test_any_layout_loads_under_any_other(
    rank_pool: Pools,
    tmp_path_factory: pytest.TempPathFactory,
    shape: tuple[int, ...],
    src: tuple,
    dst: tuple,
) -> None:
    path = str(tmp_path_factory.mktemp("reshard") / "ck")
    _run_layout(rank_pool, _w_reshard_save, src, path, shape)
    assert all(_run_layout(rank_pool, _w_reshard_load, dst, path, shape))


def _run_layout(
    pools: Pools, fn: Callable[..., object], layout: tuple, path: str, shape: tuple[int, ...]
) -> list:
    world, mesh, pl = layout
    if world == 1:
        return [fn(path, shape, None, [])]
    return pools(world).run(fn, path, shape, mesh, pl)


# ----------------------------------------------------------------------------- per-rank values


def _w_per_rank_save(path: str) -> None:
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)
    state = {
        "loader": {"position": 1000 + rank, "epoch": 2},
        "rng": torch.get_rng_state(),
        "shared": torch.ones(3),
    }
    dckpt.save(state, path)


def _w_per_rank_load(path: str) -> tuple[int, int, bool]:
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)
    expected_rng = torch.get_rng_state()
    state = {
        "loader": {"position": -1, "epoch": -1},
        "rng": torch.zeros_like(expected_rng),
        "shared": torch.zeros(3),
    }
    dckpt.load(state, path)
    return (
        state["loader"]["position"],
        state["loader"]["epoch"],
        torch.equal(state["rng"], expected_rng),
    )


def _w_per_rank_load_elsewhere(path: str) -> str:
    with pytest.raises(dckpt.RankFailureError) as info:
        dckpt.load({"loader": {"position": -1}}, path)
    return str(info.value)


def test_per_rank_values_come_back_to_their_rank(rank_pool: Pools, tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    rank_pool(2).run(_w_per_rank_save, path)
    assert rank_pool(2).run(_w_per_rank_load, path) == [(1000, 2, True), (1001, 2, True)]
    messages = rank_pool(3).run(_w_per_rank_load_elsewhere, path)
    assert all("'loader.position'" in m and "2 ranks" in m for m in messages)
    manifest = dckpt._load.read_manifest(dckpt.storage.LocalStorage(path))[0]
    assert manifest.values["loader.epoch"].per_rank is None  # equal everywhere: stored once
    assert manifest.tensors["rng"].per_rank and not manifest.tensors["shared"].per_rank
    assert len(manifest.tensors["shared"].chunks) == 1


# ----------------------------------------------------------------------------- replicated writes


def _w_replicated(path: str) -> None:
    state = {f"w{i}": torch.full((256,), float(i)) for i in range(16)}
    dckpt.save(state, path)


def test_replicated_tensors_are_written_once_spread_over_ranks(
    rank_pool: Pools, tmp_path: Path
) -> None:
    path = str(tmp_path / "ck")
    rank_pool(2).run(_w_replicated, path)
    sizes = {os.path.basename(f)[:2]: os.path.getsize(f) for f in glob.glob(f"{path}/data/*/*.bin")}
    assert set(sizes) == {"r0", "r1"}
    assert sum(sizes.values()) == 16 * 1024  # each tensor once
    state = {f"w{i}": torch.zeros(256) for i in range(16)}
    dckpt.load(state, path)
    assert all(torch.equal(state[f"w{i}"], torch.full((256,), float(i))) for i in range(16))


# ----------------------------------------------------------------------------- strictness


def test_strict_and_non_strict_loads(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    dckpt.save({"a": torch.ones(2), "b": torch.ones(3), "n": 5}, path)
    with pytest.raises(dckpt.StateMismatchError) as info:
        dckpt.load({"a": torch.zeros(2), "b": torch.zeros(4), "c": torch.zeros(1), "n": 0}, path)
    msg = str(info.value)
    assert "'c'" in msg and "'b': saved float32[3], requested float32[4]" in msg
    state = {"a": torch.zeros(2), "b": torch.zeros(4, dtype=torch.float64), "c": torch.zeros(1)}
    result = dckpt.load(state, path, strict=False)
    assert result == dckpt.LoadResult(
        missing_keys=("c",), unexpected_keys=("n",), mismatched_keys=("b",)
    )
    assert torch.equal(state["a"], torch.ones(2)) and not state["b"].any()


def test_module_and_optimizer_keys_line_up_with_torch_helpers(tmp_path: Path) -> None:
    model, optim = build(fsdp=False)
    train(model, optim, 1)
    dckpt.save({"model": model, "optimizer": optim}, tmp_path / "ck")
    manifest = dckpt._load.read_manifest(dckpt.storage.LocalStorage(tmp_path / "ck"))[0]
    assert "model.net1.0.weight" in manifest.tensors
    assert "optimizer.state.net1.0.weight.exp_avg" in manifest.tensors
    assert manifest.values["optimizer.param_groups"].value[0]["params"][0] == "net1.0.weight"


def test_fresh_optimizer_loads_and_trains_identically(tmp_path: Path) -> None:
    model, optim = build(fsdp=False)
    train(model, optim, 2)
    dckpt.save({"model": model, "optimizer": optim}, tmp_path / "ck")
    expected = train(model, optim, 2)
    model2, optim2 = build(fsdp=False)
    assert not optim2.state
    dckpt.load({"model": model2, "optimizer": optim2}, tmp_path / "ck")
    assert torch.equal(train(model2, optim2, 2), expected)


def test_ambiguous_optimizer_points_to_the_explicit_wrapper(tmp_path: Path) -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    optim = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.1)
    with pytest.raises(dckpt.UnsupportedStateError, match="OptimizerState"):
        dckpt.save({"a": a, "b": b, "optim": optim}, tmp_path / "ck")
    with pytest.raises(dckpt.UnsupportedStateError, match="OptimizerState"):
        dckpt.save({"optim": optim}, tmp_path / "ck2")
    assert not (tmp_path / "ck").exists() or not (tmp_path / "ck" / "manifest.json").exists()


# ----------------------------------------------------------------------------- damage


def _damaged(tmp_path: Path, how: str) -> Path:
    path = tmp_path / "ck"
    dckpt.save({"w": torch.arange(300_000, dtype=torch.float32)}, path)  # > 1 checksum block
    (data,) = glob.glob(f"{path}/data/*/*.bin")
    raw = bytearray(Path(data).read_bytes())
    if how == "flip":
        raw[len(raw) // 2] ^= 0x10
        Path(data).write_bytes(raw)
    elif how == "truncate":
        Path(data).write_bytes(raw[:-7])
    elif how == "missing":
        os.unlink(data)
    elif how == "uncommitted":
        os.unlink(path / "manifest.json")
    return path


@pytest.mark.parametrize(
    ("how", "error", "words"),
    [
        ("flip", dckpt.CorruptCheckpointError, "checksum mismatch in key 'w'"),
        ("truncate", dckpt.CorruptCheckpointError, "truncated or replaced"),
        ("missing", dckpt.CorruptCheckpointError, "is missing"),
        ("uncommitted", dckpt.CheckpointNotFoundError, "incomplete checkpoint"),
    ],
)
def test_damage_is_detected(tmp_path: Path, how: str, error: type[Exception], words: str) -> None:
    path = _damaged(tmp_path, how)
    with pytest.raises(error, match=words):
        dckpt.load({"w": torch.zeros(300_000)}, path)


def test_a_chunk_of_many_checksum_blocks_round_trips(tmp_path: Path) -> None:
    big = torch.randn(70 << 18)  # 70 MiB: 70 checksum blocks in one chunk
    dckpt.save({"big": big}, tmp_path / "ck", durable=False)
    out = {"big": torch.empty_like(big)}
    dckpt.load(out, tmp_path / "ck")
    assert torch.equal(out["big"], big)


def test_existing_checkpoint_needs_overwrite_and_survives_until_commit(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    dckpt.save({"w": torch.ones(4)}, path)
    with pytest.raises(dckpt.CheckpointExistsError):
        dckpt.save({"w": torch.zeros(4)}, path)

    with pytest.raises(RuntimeError, match="boom"):
        dckpt.save(
            {"w": torch.zeros(4), "x": FailingState(RuntimeError("boom"))}, path, overwrite=True
        )
    state = {"w": torch.zeros(4)}
    dckpt.load(state, path)
    assert torch.equal(state["w"], torch.ones(4))
    dckpt.save({"w": torch.full((4,), 2.0)}, path, overwrite=True)
    dckpt.load(state, path)
    assert torch.equal(state["w"], torch.full((4,), 2.0))
    assert len(os.listdir(path / "data")) == 1  # the old save's data was removed


# ----------------------------------------------------------------------------- failures across ranks


def _w_fail_on_rank1(path: str) -> str:
    boom = FailingState(ValueError("rank one broke"), rank=1)
    with pytest.raises(dckpt.RankFailureError) as info:
        dckpt.save({"w": torch.ones(4), "b": boom}, path, timeout=20)
    assert isinstance(info.value.failures[1], ValueError)
    return str(info.value)


def test_a_failure_on_one_rank_raises_on_every_rank(rank_pool: Pools, tmp_path: Path) -> None:
    messages = rank_pool(2).run(_w_fail_on_rank1, str(tmp_path / "ck"))
    assert all("rank one broke" in m for m in messages)
    assert not (tmp_path / "ck" / "manifest.json").exists()


def _w_killed_mid_save(old: str, new: str) -> str:
    import dckpt._write as w

    dckpt.save({"w": torch.full((1000,), 1.0)}, old)
    dckpt.save({"w": torch.full((1000,), 1.0)}, new)
    real = w._write_file

    def dying(*args: object, **kwargs: object) -> object:
        if dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    w._write_file = dying  # type: ignore[assignment]
    state = {"w": torch.full((1000,), 2.0), "r": torch.full((1000,), float(dist.get_rank()))}
    try:
        dckpt.save(state, new, overwrite=True, timeout=3)
    except dckpt.CheckpointTimeoutError as exc:
        return str(exc)
    return "no error"


def test_a_rank_killed_mid_save_leaves_old_checkpoints_loadable(tmp_path: Path) -> None:
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    outcomes = run_fresh(2, _w_killed_mid_save, old, new, timeout=60)
    assert outcomes[1].exitcode == -signal.SIGKILL
    assert outcomes[0].ok and "rank 1" in outcomes[0].value, outcomes[0]
    for path in (old, new):  # the interrupted overwrite left the committed one intact
        state = {"w": torch.zeros(1000)}
        dckpt.load(state, path)
        assert torch.equal(state["w"], torch.full((1000,), 1.0))


# ----------------------------------------------------------------------------- DDP, TP, FSDP2+TP


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _parallel_mlp(kind: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model: nn.Module = Mlp()
    world = dist.get_world_size()
    plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
    if kind == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif kind == "tp":
        parallelize_module(model, init_device_mesh("cpu", (world,)), plan)
    elif kind == "fsdp+tp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], plan)
        fully_shard(model, mesh=mesh["dp"])
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def _w_save_parallel(path: str, kind: str) -> None:
    model, optim = _parallel_mlp(kind)
    torch.manual_seed(5)
    model(torch.rand(4, 8)).sum().backward()
    optim.step()
    dckpt.save({"model": model, "optim": optim}, path)


def _reference_mlp() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = Mlp()
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.manual_seed(5)
    model(torch.rand(4, 8)).sum().backward()
    optim.step()
    return model, optim


@pytest.mark.parametrize(("kind", "world"), [("ddp", 2), ("tp", 2), ("fsdp+tp", 4)])
def test_ddp_tp_and_fsdp_tp_models_load_into_one_plain_process(
    rank_pool: Pools, tmp_path: Path, kind: str, world: int
) -> None:
    path = str(tmp_path / "ck")
    rank_pool(world).run(_w_save_parallel, path, kind)
    model, optim = Mlp(), None
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    dckpt.load({"model": model, "optim": optim}, path)
    ref_model, ref_optim = _reference_mlp()
    for (k, a), b in zip(model.state_dict().items(), ref_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    got = optim.state_dict()["state"]
    want = ref_optim.state_dict()["state"]
    for i in want:
        torch.testing.assert_close(got[i]["exp_avg"], want[i]["exp_avg"], rtol=1e-5, atol=1e-6)


def _w_alternating_structures(root: str) -> int:
    """Saves of a few kinds of state in turn reuse their plans (no re-planning)."""
    with counting_plans() as calls:
        kinds = [
            {"a": torch.ones(10), "b": torch.zeros(3)},
            {"c": torch.full((4, 4), float(dist.get_rank()))},
            {"d": torch.arange(7), "step": 1},
        ]
        for i in range(12):
            state = kinds[i % 3]
            dckpt.save(state, f"{root}/s{i}")
            out = {
                k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0
                for k, v in state.items()
            }
            dckpt.load(out, f"{root}/s{i}")
            assert all(
                torch.equal(out[k], v) if isinstance(v, torch.Tensor) else out[k] == v
                for k, v in state.items()
            )
    return len(calls)


def test_alternating_structures_reuse_their_plans(rank_pool: Pools, tmp_path: Path) -> None:
    planned = rank_pool(2).run(_w_alternating_structures, str(tmp_path))
    assert planned[0] == 3  # once per structure, on rank 0
