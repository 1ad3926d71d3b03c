"""Format version 2: layout entries and binary tables, pinned byte for byte, and the saves
that write them loading back under other world sizes and meshes."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import dckpt
from dckpt import _save
from dckpt._dtensor import PlacementKind, PlacementSpec, local_boxes, local_shape
from dckpt._errors import UnsupportedStateError
from dckpt._format import manifest_from_bytes
from dckpt._layout import (
    LayoutOffer,
    LayoutReport,
    MeshReport,
    overlapping_shards,
    writer_coordinate,
)
from dckpt._manifest_build import entries_digest, merge_layouts
from dckpt._manifest_text import manifest_to_bytes
from dckpt._reader import CheckpointReader
from dckpt._reshard import Box
from tests._dist import RankPool

Pools = Callable[[int], RankPool]
GOLDEN = Path(__file__).parent / "golden" / "v2"


# ----------------------------------------------------------------------------- layout math


@st.composite
def layouts(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...], tuple[PlacementSpec, ...]]:
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=3)))
    mesh = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    placements = []
    for _ in mesh:
        kind: PlacementKind = draw(st.sampled_from(["replicate", "shard", "strided_shard"]))
        dim = draw(st.integers(0, len(shape) - 1))
        factor = draw(st.integers(1, 3)) if kind == "strided_shard" else 1
        placements.append(PlacementSpec(kind, -1 if kind == "replicate" else dim, factor))
    return shape, mesh, tuple(placements)


def _normal(
    mesh: tuple[int, ...], pl: tuple[PlacementSpec, ...], c: tuple[int, ...]
) -> tuple[int, ...]:
    return tuple(0 if p.kind == "replicate" else x for p, x in zip(pl, c, strict=True))


@settings(max_examples=300, deadline=None)
@given(layouts(), st.data())
def test_overlapping_shards_are_exactly_those_a_brute_force_finds(layout, data) -> None:  # type: ignore[no-untyped-def]
    shape, mesh, pl = layout
    lo = [data.draw(st.integers(0, n)) for n in shape]
    want = Box(
        tuple(lo), tuple(data.draw(st.integers(0, n - o)) for o, n in zip(lo, shape, strict=True))
    )
    brute: dict[tuple[int, ...], set[Box]] = {}
    for c in itertools.product(*[range(n) for n in mesh]):
        hit = {b for b, _ in local_boxes(shape, mesh, c, pl) if b.intersect(want) is not None}
        if hit:
            brute[_normal(mesh, pl, c)] = hit
    found = {
        _normal(mesh, pl, c): {b for b in pieces if b.intersect(want) is not None}
        for c, pieces in overlapping_shards(shape, mesh, pl, want)
    }
    assert {c: p for c, p in found.items() if p} == brute
    for c, pieces in overlapping_shards(shape, mesh, pl, want):  # in local_boxes' order
        assert list(pieces) == [b for b, _ in local_boxes(shape, mesh, c, pl)]


@settings(max_examples=200, deadline=None)
@given(layouts(), st.text(min_size=1, max_size=6))
def test_every_shard_has_exactly_one_writer_among_its_replicas(layout, key: str) -> None:  # type: ignore[no-untyped-def]
    _, mesh, pl = layout
    writers: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for c in itertools.product(*[range(n) for n in mesh]):
        w = writer_coordinate(key, mesh, pl, c)
        assert _normal(mesh, pl, w) == _normal(mesh, pl, c)  # a replica of the same shard
        if w == c:
            writers.setdefault(_normal(mesh, pl, c), []).append(c)
    shards = {_normal(mesh, pl, c) for c in itertools.product(*[range(n) for n in mesh])}
    assert set(writers) == shards and all(len(w) == 1 for w in writers.values())


# ----------------------------------------------------------------------------- golden v2


def golden_full() -> dict[str, torch.Tensor]:
    return {
        "w": torch.arange(18, dtype=torch.float32).reshape(6, 3),
        "r": torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16),
        "u": torch.arange(3, dtype=torch.int64),
    }


def _w_save_golden(path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    full = golden_full()
    state = {
        "w": distribute_tensor(full["w"], mesh, [Shard(0)]),
        "r": distribute_tensor(full["r"], mesh, [Replicate()]),
        "u": distribute_tensor(full["u"], mesh, [Shard(0)]),  # uneven: 2 rows and 1
        "step": torch.tensor(7),
        "meta": {"epoch": 3},
    }
    saved = (_save.new_save_id, _save._clock, _save._library_version)
    _save.new_save_id = lambda: "0golden2"
    _save._clock = lambda: 1700000000.0
    _save._library_version = lambda: "dckpt golden"
    try:
        dckpt.save(state, path)
    finally:
        _save.new_save_id, _save._clock, _save._library_version = saved


def _files(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".dckpt")
    )


def test_two_rank_save_matches_golden_bytes(rank_pool: Pools, tmp_path: Path) -> None:
    rank_pool(2).run(_w_save_golden, str(tmp_path / "ck"))
    assert _files(tmp_path / "ck") == _files(GOLDEN)
    for rel in _files(GOLDEN):
        assert (tmp_path / "ck" / rel).read_bytes() == (GOLDEN / rel).read_bytes(), rel


def test_golden_v2_is_version_2_with_layout_entries_and_round_trips() -> None:
    raw = (GOLDEN / "manifest.json").read_bytes()
    m = manifest_from_bytes(raw, source="golden")
    assert m.version == 2 and manifest_to_bytes(m) == raw
    assert all(m.tensors[k].layout is not None and not m.tensors[k].chunks for k in "wru")
    assert m.tensors["step"].layout is None and len(m.tensors["step"].chunks) == 1
    assert [(t.rank, t.name) for t in m.tables] == [
        (0, "data/0golden2/r0.tab"),
        (1, "data/0golden2/r1.tab"),
    ]
    assert [(x.shape, x.ranks) for x in m.meshes] == [((2,), (0, 1))]


def test_golden_v2_loads_in_one_plain_process_and_verifies(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN, tmp_path / "ck")
    full = golden_full()
    got: dict[str, Any] = {k: torch.zeros_like(v) for k, v in full.items()}
    got |= {"step": torch.tensor(0), "meta": {"epoch": 0}}
    assert dckpt.load(got, tmp_path / "ck") == dckpt.LoadResult()
    for k, v in full.items():
        assert torch.equal(got[k], v), k
    assert got["meta"] == {"epoch": 3} and int(got["step"]) == 7
    reader = CheckpointReader.open(tmp_path / "ck")
    assert reader.verify() == []
    assert torch.equal(reader.read_tensor("w"), full["w"])
    assert {i.key: i.chunks for i in reader.infos() if i.kind == "tensor"} == {
        "r": 1, "step": 1, "u": 2, "w": 2,
    }  # fmt: skip


# ----------------------------------------------------------------------------- resharding


def _strided(full: torch.Tensor, mesh: object, placements: list[object]) -> torch.Tensor:
    """A DTensor with any placements (``_StridedShard`` included), built from the pieces
    the engine's math says this rank holds, which torch checks against its own."""
    from torch.distributed.tensor import DTensor

    from dckpt._dtensor import placement_specs

    coord = tuple(mesh.get_coordinate())  # type: ignore[attr-defined]
    specs = placement_specs(placements)
    pieces = local_boxes(tuple(full.shape), tuple(mesh.shape), coord, specs)  # type: ignore[attr-defined]
    whole = Box((0,) * full.ndim, tuple(full.shape))
    if pieces:  # the pieces of these layouts are cut along dim 0 only
        local = torch.cat([full[b.relative_to(whole)] for b, _ in pieces])
    else:
        local = full.new_empty(local_shape(tuple(full.shape), tuple(mesh.shape), coord, specs))  # type: ignore[attr-defined]
    return DTensor.from_local(local, mesh, placements, shape=full.shape, stride=full.stride())  # type: ignore[arg-type]


def _full(shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return torch.arange(n, dtype=torch.float32).reshape(shape)


def _w_save_4(path: str, asynchronous: bool = False) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    fsdp = init_device_mesh("cpu", (4,))
    tp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    state = {
        "fsdp": _strided(_full((9, 5)), fsdp, [Shard(0)]),
        "tp_row": _strided(_full((6, 8)), tp, [Shard(0), Shard(1)]),
        "tp_col": _strided(_full((8, 6)), tp, [_StridedShard(0, split_factor=2), Shard(0)]),
        "norm": _strided(_full((7,)), tp, [Shard(0), Replicate()]),
        "step": torch.tensor(3),
        # A scalar every rank holds (one replica writes it) and a tensor with no element.
        "scalar": distribute_tensor(torch.tensor(2.5), tp, [Replicate(), Replicate()]),
        "empty": distribute_tensor(torch.zeros(0, 3), fsdp, [Shard(0)]),
    }
    if not asynchronous:
        dckpt.save(state, path)
        return
    # The staged copy of each local tensor is cut into its pieces after the call returns,
    # on the save thread: what the save writes is still the state at the call.
    handle = dckpt.async_save(state, path)
    for t in state.values():
        (t.to_local() if hasattr(t, "to_local") else t).fill_(-7.0)  # type: ignore[operator]
    handle.result()


SHAPES = {"fsdp": (9, 5), "tp_row": (6, 8), "tp_col": (8, 6), "norm": (7,)}


def _w_load_2(path: str) -> bool:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    state: dict[str, object] = {
        k: _strided(torch.zeros(s), mesh, [Shard(len(s) - 1)]) for k, s in SHAPES.items()
    }
    state |= {"step": torch.tensor(0), "scalar": torch.tensor(0.0), "empty": torch.ones(0, 3)}
    dckpt.load(state, path)
    same = [torch.equal(state[k].full_tensor(), _full(s)) for k, s in SHAPES.items()]  # type: ignore[attr-defined]
    return all(same) and int(state["step"]) == 3 and float(state["scalar"]) == 2.5  # type: ignore[call-overload,arg-type]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["save", "async_save"])
def test_fsdp_and_tp_saves_on_4_ranks_load_on_2_and_in_one_process(
    rank_pool: Pools, tmp_path: Path, asynchronous: bool
) -> None:
    path = str(tmp_path / "ck")
    rank_pool(4).run(_w_save_4, path, asynchronous)
    m = json.loads((tmp_path / "ck" / "manifest.json").read_bytes())
    assert m["version"] == 2 and len(m["tables"]) == 4
    layouts = [*SHAPES, "scalar", "empty"]
    assert all("layout" in m["tensors"][k] and "chunks" not in m["tensors"][k] for k in layouts)
    assert m["tensors"]["tp_col"]["layout"]["placements"] == ["strided_shard(0,2)", "shard(0)"]
    assert rank_pool(2).run(_w_load_2, path) == [True, True]
    plain: dict[str, Any] = {k: torch.zeros(s) for k, s in SHAPES.items()}
    plain |= {"step": torch.tensor(0), "scalar": torch.tensor(0.0), "empty": torch.ones(0, 3)}
    assert dckpt.load(plain, path) == dckpt.LoadResult()
    for k, s in SHAPES.items():
        assert torch.equal(plain[k], _full(s)), k
    assert CheckpointReader.open(path).verify() == []


def test_a_load_reads_only_the_tables_of_the_writers_it_needs(
    rank_pool: Pools, tmp_path: Path
) -> None:
    path = tmp_path / "ck"
    rank_pool(4).run(_w_save_4, str(path))
    # Rows 0:2 of "fsdp" are rank 0's shard alone: rank 1-3's tables may be gone.
    for r in (1, 2, 3):
        next(path.rglob(f"r{r}.tab")).unlink()
    reader = CheckpointReader.open(path)
    entry = reader.manifest.tensors["fsdp"]
    chunks = reader.tables.chunks_for("fsdp", entry, Box((0, 0), (2, 5)))
    assert [(c.offsets, c.sizes) for c in chunks] == [((0, 0), (3, 5))]
    with pytest.raises(dckpt.CorruptCheckpointError, match="r1.tab is missing"):
        reader.tables.chunks_for("fsdp", entry, Box((3, 0), (1, 5)))
    assert any("r2.tab is missing" in p for p in reader.verify())


# ----------------------------------------------------------------------------- rank 0's merge


def _report(
    rank: int, position: int, entries: tuple[LayoutOffer, ...], digest_of: tuple[LayoutOffer, ...]
) -> LayoutReport:
    mesh = MeshReport(b"mesh", (2,), position, entries_digest(digest_of))
    name = f"data/x/r{rank}-s0.bin"
    return LayoutReport(rank, (mesh,), entries, ((name, 64),), (f"data/x/r{rank}.tab", 76, 1))


W = LayoutOffer("w", ("w",), "float32", (4,), 0, (PlacementSpec("shard", 0),))


def test_merge_lists_each_entry_once_and_rebuilds_the_mesh_from_positions() -> None:
    part = merge_layouts([_report(0, 1, (), (W,)), _report(1, 0, (W,), (W,))], 2, set())
    assert part is not None
    assert [(m.shape, m.ranks) for m in part.meshes] == [((2,), (1, 0))]
    assert [k for k, _ in part.entries] == ["w"] and [t.rank for t in part.tables] == [0, 1]


def test_ranks_that_describe_a_dtensor_differently_fail_the_merge() -> None:
    other = dataclasses.replace(W, shape=(5,))
    with pytest.raises(UnsupportedStateError, match="rank 1 holds other DTensors"):
        merge_layouts([_report(0, 0, (W,), (W,)), _report(1, 1, (), (other,))], 2, set())


def test_a_mesh_with_ranks_outside_the_save_fails_the_merge() -> None:
    with pytest.raises(UnsupportedStateError, match="1 of the 2 ranks"):
        merge_layouts([_report(0, 0, (W,), (W,))], 1, set())


def test_a_key_that_is_a_dtensor_and_a_plain_tensor_fails_the_merge() -> None:
    reports = [_report(0, 0, (W,), (W,)), _report(1, 1, (), (W,))]
    with pytest.raises(UnsupportedStateError, match="'w' is a DTensor on some ranks"):
        merge_layouts(reports, 2, {"w"})


def _w_async_save_and_load(path: str) -> bool:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = _full((5, 3))
    dckpt.async_save({"t": distribute_tensor(full, mesh, [Shard(0)])}, path).result()
    back = {"t": distribute_tensor(torch.zeros(5, 3), mesh, [Shard(1)])}
    dckpt.load(back, path)
    return torch.equal(back["t"].full_tensor(), full)


def test_async_save_writes_layout_entries_that_load(rank_pool: Pools, tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    assert rank_pool(2).run(_w_async_save_and_load, path) == [True, True]
    m = manifest_from_bytes((tmp_path / "ck" / "manifest.json").read_bytes(), source="ck")
    assert m.version == 2 and m.tensors["t"].layout is not None


def _w_save_on_submeshes(path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    tp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))["tp"]
    dckpt.save({"t": _strided(_full((6, 4)), tp, [Shard(0)])}, path)


def test_a_dtensor_on_submeshes_replicated_over_another_dim_is_stored_as_chunks(
    rank_pool: Pools, tmp_path: Path
) -> None:
    """Two TP submeshes hold the same key: no single layout describes that, chunks do."""
    path = str(tmp_path / "ck")
    rank_pool(4).run(_w_save_on_submeshes, path)
    m = manifest_from_bytes((tmp_path / "ck" / "manifest.json").read_bytes(), source="ck")
    assert m.version == 1 and len(m.tensors["t"].chunks) == 2
    got = {"t": torch.zeros(6, 4)}
    dckpt.load(got, path)
    assert torch.equal(got["t"], _full((6, 4)))
