"""Reading torch DCP checkpoints: exact loads with resharding, and refusing unsafe input."""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

import dckpt
from dckpt._api import open_checkpoint
from dckpt.interop._dcp import DcpReader
from dckpt.interop._dcp_meta import parse_metadata
from tests._dist import RankPool

LR = 0.01


def _build() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def _shard(model: nn.Sequential) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(x: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(x, DTensor):
        return x.full_tensor()
    if isinstance(x, dict):
        return {k: _full(v) for k, v in x.items()}
    if isinstance(x, torch.Tensor):
        return x.clone()
    return x


def _snapshot(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    osd: dict[str, Any] = dict(get_optimizer_state_dict(model, optim))
    return {
        "model": _full(dict(get_model_state_dict(model))),
        "state": _full(dict(osd["state"])),
        "lr": [g["lr"] for g in osd["param_groups"]],
    }


def _w_save_fsdp(path: str) -> dict[str, Any]:
    model = _shard(_build())
    optim = torch.optim.Adam(model.parameters(), lr=LR)
    torch.manual_seed(1 + dist.get_rank())
    model(torch.randn(4, 5)).sum().backward()
    optim.step()
    dcp.save({"model": model, "optimizer": _Optim(model, optim)}, checkpoint_id=path)
    return _snapshot(model, optim)


class _Optim:
    """DCP's usual way to save an optimizer: a Stateful around the torch helpers."""

    def __init__(self, model: nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return dict(get_optimizer_state_dict(self.model, self.optim))

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        raise AssertionError("not used")


def _w_load_fsdp(path: str) -> dict[str, Any]:
    torch.manual_seed(7)
    model = _shard(nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)))
    optim = torch.optim.Adam(model.parameters(), lr=0.5)
    result = dckpt.load({"model": model, "optimizer": optim}, path)
    assert result == dckpt.LoadResult(), result
    return _snapshot(model, optim)


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["lr"] == want["lr"] == [LR]
    assert got["model"].keys() == want["model"].keys()
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert got["state"].keys() == want["state"].keys()
    for fqn, st in want["state"].items():
        assert st.keys() == got["state"][fqn].keys()
        for k, v in st.items():
            assert torch.equal(got["state"][fqn][k], v), (fqn, k)


@pytest.fixture(scope="module")
def fsdp_ckpt(
    rank_pool: Callable[[int], RankPool], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[str, Any]]:
    path = str(tmp_path_factory.mktemp("dcp") / "fsdp2")
    snaps = rank_pool(2).run(_w_save_fsdp, path)
    return path, snaps[0]


def test_fsdp2_dcp_loads_into_a_plain_model(fsdp_ckpt: tuple[str, dict[str, Any]]) -> None:
    path, want = fsdp_ckpt
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    optim = torch.optim.Adam(model.parameters(), lr=0.5)
    assert dckpt.load({"model": model, "optimizer": optim}, path) == dckpt.LoadResult()
    _assert_same(_snapshot(model, optim), want)


def test_fsdp2_dcp_reshards_onto_three_ranks(
    fsdp_ckpt: tuple[str, dict[str, Any]], rank_pool: Callable[[int], RankPool]
) -> None:
    path, want = fsdp_ckpt
    for got in rank_pool(3).run(_w_load_fsdp, path):
        _assert_same(got, want)


def test_reader_and_verify(fsdp_ckpt: tuple[str, dict[str, Any]]) -> None:
    path, want = fsdp_ckpt
    reader = open_checkpoint(path)
    assert isinstance(reader, DcpReader)
    assert (reader.format, reader.world_size) == ("dcp", 2)
    assert torch.equal(reader.read_tensor("model.0.weight"), want["model"]["0.weight"])
    assert reader.read_value("optimizer.param_groups.0.lr") == LR
    info = {i.key: i for i in reader.infos()}["model.0.weight"]
    assert (info.dtype, info.shape, info.chunks) == ("float32", (7, 5), 2)
    seen: list[int] = []
    assert reader.verify(seen.append) == []
    assert sum(seen) == sum(os.path.getsize(os.path.join(path, f)) for f in _data_files(path))


def _data_files(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".distcp"))


def _save_single(state: dict[str, Any], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=path)


class Opaque:
    """Not something ``torch.load(weights_only=True)`` will build."""

    def __init__(self, n: int) -> None:
        self.n = n


def test_plain_tensors_and_values_load(tmp_path: Path) -> None:
    saved: dict[str, Any] = {
        "w": torch.arange(12.0).reshape(3, 4),
        "cfg": {"steps": 5, "name": "run", "ids": torch.tensor([1, 2], dtype=torch.int32)},
        "tags": ["a", "b"],
        "groups": [{"lr": 0.1, "names": ["x"]}, {"lr": 0.2, "names": []}],
    }
    _save_single(saved, tmp_path / "c")
    state: dict[str, Any] = {
        "w": torch.zeros(3, 4),
        "cfg": {"steps": 0, "name": "", "ids": torch.zeros(2, dtype=torch.int32)},
        "tags": [],
        "groups": [],
    }
    assert dckpt.load(state, tmp_path / "c") == dckpt.LoadResult()
    assert torch.equal(state["w"], saved["w"])
    assert torch.equal(state["cfg"]["ids"], saved["cfg"]["ids"])
    assert (state["cfg"]["steps"], state["cfg"]["name"]) == (5, "run")
    assert state["tags"] == ["a", "b"]
    assert state["groups"] == saved["groups"]


def test_values_needing_pickle_are_refused_unless_allowed(tmp_path: Path) -> None:
    _save_single({"t": torch.ones(2), "obj": Opaque(3)}, tmp_path / "c")
    state: dict[str, Any] = {"t": torch.zeros(2), "obj": None}
    with pytest.raises(dckpt.UnsafeCheckpointError, match="'obj'.*allow_pickle"):
        dckpt.load(state, tmp_path / "c")
    dckpt.load(state, tmp_path / "c", allow_pickle=True)
    assert isinstance(state["obj"], Opaque) and state["obj"].n == 3


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _small(tmp_path: Path) -> Path:
    path = tmp_path / "c"
    _save_single({"a": torch.arange(6.0), "b": torch.ones(2, 3), "n": 4}, path)
    return path


def _rewrite_metadata(path: Path, edit: Callable[[Any], None]) -> None:
    meta = path / ".metadata"
    md = pickle.loads(meta.read_bytes())
    edit(md)
    meta.write_bytes(pickle.dumps(md))


def test_malicious_metadata_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _small(tmp_path)
    (path / ".metadata").write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(dckpt.UnsafeCheckpointError, match=r"posix\.system|os\.system"):
        dckpt.load({"a": torch.zeros(6)}, path)
    with pytest.raises(dckpt.UnsafeCheckpointError):
        open_checkpoint(path)
    # Hidden deep inside otherwise genuine metadata.
    path2 = _small(tmp_path / "2")
    _rewrite_metadata(path2, lambda md: setattr(md, "planner_data", {"x": _Evil(str(marker))}))
    with pytest.raises(dckpt.UnsafeCheckpointError):
        dckpt.load({"a": torch.zeros(6)}, path2)
    assert not marker.exists()


def test_garbled_metadata_is_corrupt(tmp_path: Path) -> None:
    path = _small(tmp_path)
    raw = (path / ".metadata").read_bytes()
    for bad in (raw[: len(raw) // 2], b"not a pickle", pickle.dumps({"a": 1})):
        with pytest.raises(dckpt.CorruptCheckpointError):
            parse_metadata(bad, source="x")
    (path / ".metadata").write_bytes(raw[:-7])
    with pytest.raises(dckpt.CorruptCheckpointError):
        dckpt.load({"a": torch.zeros(6)}, path)

    def oversize(md: Any) -> None:
        md.state_dict_metadata["b"].chunks[0].sizes = torch.Size([2, 4])

    path2 = _small(tmp_path / "2")
    _rewrite_metadata(path2, oversize)
    with pytest.raises(dckpt.CorruptCheckpointError, match="has chunk"):
        dckpt.load({"a": torch.zeros(6)}, path2)
    path3 = _small(tmp_path / "3")
    for f in _data_files(str(path3)):
        (path3 / f).unlink()
    with pytest.raises(dckpt.CorruptCheckpointError, match="missing"):
        dckpt.load({"a": torch.zeros(6)}, path3)


def test_metadata_cannot_alter_classes_for_later_loads(tmp_path: Path) -> None:
    # GLOBAL <class>; BUILD (None, {"zzz": 1}): with a plain unpickler this is setattr on the class.
    for module, name in [
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("pathlib", "PosixPath"),
        ("torch", "Size"),
    ]:
        data = b"\x80\x04c" + f"{module}\n{name}\n".encode() + b"N}U\x03zzzK\x01s\x86b."
        with pytest.raises(dckpt.CorruptCheckpointError):
            parse_metadata(data, source="x")
    from torch.distributed.checkpoint.metadata import Metadata

    assert not hasattr(Metadata, "zzz") and not hasattr(Path, "zzz")
    path = _small(tmp_path)
    assert dckpt.load({"a": torch.zeros(6)}, path, strict=False).missing_keys == ()


@pytest.mark.parametrize("name", ["../outside.distcp", "/etc/passwd", "a/../../b"])
def test_escaping_storage_paths_are_refused(tmp_path: Path, name: str) -> None:
    path = _small(tmp_path)

    def escape(md: Any) -> None:
        for info in md.storage_data.values():
            info.relative_path = name

    _rewrite_metadata(path, escape)
    with pytest.raises(dckpt.UnsafeCheckpointError, match="outside|relative"):
        dckpt.load({"a": torch.zeros(6)}, path)


def test_stream_transforms_are_refused(tmp_path: Path) -> None:
    path = _small(tmp_path)

    def transform(md: Any) -> None:
        for info in md.storage_data.values():
            info.transform_descriptors = ["zstd"]

    _rewrite_metadata(path, transform)
    with pytest.raises(dckpt.CheckpointError, match="transforms"):
        dckpt.load({"a": torch.zeros(6)}, path)


def test_corrupt_chunks_raise_checkpoint_errors(tmp_path: Path) -> None:
    path = _small(tmp_path)
    (data,) = _data_files(str(path))
    raw = bytearray((path / data).read_bytes())
    pos = raw.find(torch.arange(6.0).numpy().tobytes())
    assert pos > 0
    raw[pos + 5] ^= 0xFF  # tensor bytes: only the zip CRC notices
    (path / data).write_bytes(bytes(raw))
    with pytest.raises(dckpt.CorruptCheckpointError, match="CRC"):
        dckpt.load({"a": torch.zeros(6)}, path)
    assert any("CRC" in p for p in DcpReader.open(path).verify())
    (path / data).write_bytes(b"\0" * len(raw))  # every archive header gone
    with pytest.raises(dckpt.CorruptCheckpointError):
        dckpt.load({"a": torch.zeros(6)}, path)
    (path / data).write_bytes(bytes(raw[:100]))
    with pytest.raises(dckpt.CorruptCheckpointError, match="truncated"):
        dckpt.load({"a": torch.zeros(6)}, path)


def test_strict_and_non_strict_mismatches(tmp_path: Path) -> None:
    path = _small(tmp_path)
    state: dict[str, Any] = {"a": torch.zeros(6), "extra": torch.zeros(1), "b": torch.zeros(3)}
    with pytest.raises(dckpt.StateMismatchError, match="'extra'") as err:
        dckpt.load(state, path)
    assert "float32[2, 3], requested float32[3]" in str(err.value)
    assert torch.equal(state["a"], torch.zeros(6))  # nothing loaded
    result = dckpt.load(state, path, strict=False)
    assert result == dckpt.LoadResult(("extra",), ("n",), ("b",))
    assert torch.equal(state["a"], torch.arange(6.0))
