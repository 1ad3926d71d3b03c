"""Boxes a DTensor rank holds: pure index math, checked against torch's own sharding."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed._local_tensor import LocalTensor, LocalTensorMode
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import Placement, _StridedShard
from torch.testing._internal.distributed.fake_pg import FakeStore

from dckpt._describe import describe
from dckpt._dtensor import (
    PlacementKind,
    PlacementSpec,
    dtensor_chunks,
    local_boxes,
    local_shape,
    placement_specs,
)
from dckpt._errors import UnsupportedStateError
from dckpt._reshard import Box

S = PlacementSpec


def rows_of(boxes: list[tuple[Box, tuple[slice, ...]]]) -> list[tuple[int, int, int]]:
    """(global start, size, local start) along dim 0, for 1-d checks."""
    return [(b.offsets[0], b.sizes[0], s[0].start) for b, s in boxes]


def test_shard_uneven() -> None:
    five = [rows_of(local_boxes((5,), (2,), (c,), [S("shard", 0)])) for c in range(2)]
    assert five == [[(0, 3, 0)], [(3, 2, 0)]]
    one = [local_boxes((1, 4), (3,), (c,), [S("shard", 0)]) for c in range(3)]
    assert one[0] == [(Box((0, 0), (1, 4)), (slice(0, 1), slice(0, 4)))]
    assert one[1] == one[2] == []
    # torch.chunk leaves the last rank empty for 6 rows on 4 ranks, not 2-2-1-1.
    assert [local_shape((6,), (4,), (c,), [S("shard", 0)]) for c in range(4)] == [
        (2,),
        (2,),
        (2,),
        (0,),
    ]


def test_strided_shard_docstring_example() -> None:
    """torch's _StridedShard docstring: 8 rows, mesh 2x2, (_S(0, 2), S(0))."""
    specs = [S("strided_shard", 0, 2), S("shard", 0)]
    got = {
        c: rows_of(local_boxes((8, 8), (2, 2), c, specs))
        for c in itertools.product(range(2), repeat=2)
    }
    assert got == {
        (0, 0): [(0, 2, 0)],
        (0, 1): [(4, 2, 0)],
        (1, 0): [(2, 2, 0)],
        (1, 1): [(6, 2, 0)],
    }


def test_strided_shard_non_contiguous() -> None:
    """torch's _to_replicate_tensor example: 9 rows, _S(0, 2) on 4 ranks -> [0,1,5] etc."""
    specs = [S("strided_shard", 0, 2)]
    got = [rows_of(local_boxes((9,), (4,), (c,), specs)) for c in range(4)]
    assert got == [
        [(0, 2, 0), (5, 1, 2)],
        [(2, 2, 0), (6, 1, 2)],
        [(4, 1, 0), (7, 1, 1)],
        [(8, 1, 0)],
    ]


def test_scalar_and_errors() -> None:
    assert local_boxes((), (2,), (1,), [S("replicate")]) == [(Box((), ()), ())]
    assert local_boxes((0, 3), (2,), (0,), [S("replicate")]) == []
    with pytest.raises(ValueError, match="Partial placement: reduce it"):
        local_boxes((4,), (2,), (0,), [S("partial")])
    with pytest.raises(ValueError, match="shards dim 1"):
        local_boxes((4,), (2,), (0,), [S("shard", 1)])
    with pytest.raises(ValueError, match="one entry per mesh dim"):
        local_boxes((4,), (2, 2), (0,), [S("shard", 0)])
    with pytest.raises(ValueError, match="outside mesh dim"):
        local_boxes((4,), (2,), (2,), [S("shard", 0)])
    assert local_boxes((4, 6), (2,), (1,), [S("shard", -1)])[0][0] == Box((0, 3), (4, 3))


def test_placement_specs() -> None:
    got = placement_specs([_StridedShard(1, split_factor=4), Shard(0), Replicate(), Partial()])
    assert got == (S("strided_shard", 1, 4), S("shard", 0), S("replicate"), S("partial"))
    with pytest.raises(UnsupportedStateError, match="not supported"):
        placement_specs([object()])


# --- property tests -------------------------------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> tuple:
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
    mesh = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    specs = []
    for _ in mesh:
        kinds: list[PlacementKind] = ["shard", "strided_shard", "replicate"]
        kind = draw(st.sampled_from(kinds))
        dim = draw(st.integers(0, ndim - 1))
        sf = draw(st.integers(1, 3)) if kind == "strided_shard" else 1
        specs.append(S(kind, dim if kind != "replicate" else -1, sf))
    return shape, mesh, specs


def torch_placements(specs: Sequence[PlacementSpec]) -> list[Placement]:
    out: list[Placement] = []
    for s in specs:
        if s.kind == "shard":
            out.append(Shard(s.dim))
        elif s.kind == "strided_shard":
            out.append(_StridedShard(s.dim, split_factor=s.split_factor))
        else:
            out.append(Replicate())
    return out


def torch_local(
    full: torch.Tensor,
    mesh: tuple[int, ...],
    coord: tuple[int, ...],
    specs: Sequence[PlacementSpec],
) -> torch.Tensor:
    """What distribute_tensor(src_data_rank=None) computes, via torch's own splitters."""
    local = full
    for p, n, c in zip(torch_placements(specs), mesh, coord, strict=True):
        if isinstance(p, Shard | _StridedShard):
            local = p._split_tensor(local, n, with_padding=False, contiguous=True)[0][c]
    return local


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_layouts_match_torch_and_cover(layout: tuple) -> None:
    shape, mesh, specs = layout
    full = torch.arange(math.prod(shape)).reshape(shape)
    held: dict[tuple[int, ...], list[Box]] = {}
    hits = np.zeros(shape, dtype=np.int64)
    for coord in itertools.product(*(range(n) for n in mesh)):
        boxes = local_boxes(shape, mesh, coord, specs)
        local = torch_local(full, mesh, coord, specs)
        assert tuple(local.shape) == local_shape(shape, mesh, coord, specs)
        seen = torch.zeros(local.shape, dtype=torch.int64)
        for box, slices in boxes:
            region = tuple(slice(o, o + n) for o, n in zip(box.offsets, box.sizes, strict=True))
            assert torch.equal(local[slices], full[region])
            hits[region] += 1
            seen[slices] += 1
        assert bool((seen == 1).all())  # the boxes tile the local tensor exactly
        held[coord] = [b for b, _ in boxes]
    replicas = math.prod(n for n, s in zip(mesh, specs, strict=True) if s.kind == "replicate")
    assert bool((hits == replicas).all())
    for a, b in itertools.combinations(held, 2):
        if all(x == y or s.kind == "replicate" for x, y, s in zip(a, b, specs, strict=True)):
            assert held[a] == held[b]


# --- real DTensors on a fake process group ---------------------------------------------


@contextlib.contextmanager
def fake_rank(rank: int, world: int) -> Iterator[None]:
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


REAL_CASES = [
    ((5, 3), (2,), [Shard(0)]),
    ((5, 3), (3,), [Shard(1)]),
    ((1, 4), (3,), [Shard(0)]),
    ((4, 6), (2, 2), [Shard(0), Shard(1)]),
    ((7, 5), (2, 3), [Shard(1), Shard(0)]),
    ((6, 4), (2, 3), [Replicate(), Shard(0)]),
    ((5, 4), (2, 2), [Shard(0), Shard(0)]),
    ((8, 8), (2, 2), [_StridedShard(0, split_factor=2), Shard(0)]),
    ((9, 2), (2, 2), [_StridedShard(0, split_factor=2), Shard(0)]),
    ((11, 3), (2, 3), [_StridedShard(0, split_factor=3), Shard(0)]),
    ((6, 10), (3, 2), [_StridedShard(1, split_factor=2), Shard(1)]),
    ((), (2,), [Replicate()]),
]


@pytest.mark.parametrize(("shape", "mesh_shape", "placements"), REAL_CASES)
def test_real_dtensor_chunks(
    shape: tuple[int, ...], mesh_shape: tuple[int, ...], placements: list[Placement]
) -> None:
    world = math.prod(mesh_shape)
    full = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    hits = torch.zeros(shape, dtype=torch.int64)
    for rank in range(world):
        with fake_rank(rank, world):
            mesh = init_device_mesh("cpu", mesh_shape)
            dt = distribute_tensor(full, mesh, placements, src_data_rank=None)
            for box, view in dtensor_chunks(dt):
                region = box.relative_to(Box((0,) * len(shape), shape))
                assert torch.equal(view, full[region])
                assert (
                    view.untyped_storage().data_ptr() == dt.to_local().untyped_storage().data_ptr()
                )
                hits[region] += 1
    replicas = math.prod(
        n for n, p in zip(mesh_shape, placements, strict=True) if isinstance(p, Replicate)
    )
    assert bool((hits == replicas).all())


@pytest.mark.parametrize(("shape", "mesh_shape", "placements"), REAL_CASES)
def test_boxes_reassemble_through_torch_full_tensor(
    shape: tuple[int, ...], mesh_shape: tuple[int, ...], placements: list[Placement]
) -> None:
    """Local tensors built from our boxes must gather back to the full tensor in torch.

    This checks the index math against torch's redistribute path, which is independent of
    the splitting code distribute_tensor uses.
    """
    world = math.prod(mesh_shape)
    full = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    specs = placement_specs(placements)
    with fake_rank(0, world), LocalTensorMode(world):
        mesh = init_device_mesh("cpu", mesh_shape)
        locals_: dict[int, torch.Tensor] = {}
        for rank in range(world):
            coord = tuple(int(c) for c in np.unravel_index(rank, mesh_shape))
            local = torch.full(local_shape(shape, mesh_shape, coord, specs), -1.0)
            for box, slices in local_boxes(shape, mesh_shape, coord, specs):
                local[slices] = full[box.relative_to(Box((0,) * len(shape), shape))]
            locals_[rank] = local
        dt = DTensor.from_local(
            LocalTensor(locals_), mesh, placements, shape=full.shape, stride=full.stride()
        )
        gathered = dt.full_tensor()
        assert isinstance(gathered, LocalTensor)
        for rank in range(world):
            assert torch.equal(gathered._local_tensors[rank], full)


def test_rank_outside_mesh_holds_nothing() -> None:
    with fake_rank(2, 3):
        mesh = DeviceMesh("cpu", torch.tensor([0, 1]))
        dt = DTensor.from_local(
            torch.zeros(0, 3), mesh, [Shard(0)], shape=torch.Size((4, 3)), stride=(3, 1)
        )
        assert dtensor_chunks(dt) == []


def test_unsupported_dtensors() -> None:
    with fake_rank(0, 3):
        mesh = init_device_mesh("cpu", (3,))
        partial = DTensor.from_local(torch.zeros(2, 3), mesh, [Partial()])
        with pytest.raises(UnsupportedStateError, match="Partial placement"):
            dtensor_chunks(partial)
        wrong = DTensor.from_local(
            torch.zeros(1, 3), mesh, [Shard(0)], shape=torch.Size((4, 3)), stride=(3, 1)
        )
        with pytest.raises(UnsupportedStateError, match=r"\(2, 3\).*\(1, 3\)"):
            dtensor_chunks(wrong)
        # An empty local tensor where the placements say rows: a save refuses it too (it
        # has nothing to copy, but its shape is still checked when the offers are built).
        empty = DTensor.from_local(
            torch.zeros(0, 3), mesh, [Shard(0)], shape=torch.Size((4, 3)), stride=(3, 1)
        )
        with pytest.raises(UnsupportedStateError, match=r"\(2, 3\).*\(0, 3\)"):
            describe({"w": empty}, 0, allow_pickle=False, layouts=True)


def test_unhashable_custom_placement_is_rejected_clearly() -> None:
    # Layouts are memoized by placements; one that cannot be hashed still gets the clear
    # error, not a TypeError from the cache.
    class Odd:
        __hash__ = None  # type: ignore[assignment]

    with fake_rank(0, 2):
        mesh = init_device_mesh("cpu", (2,))
        real = DTensor.from_local(torch.zeros(2, 3), mesh, [Shard(0)])
        stand_in = SimpleNamespace(
            device_mesh=mesh, placements=(Odd(),), shape=real.shape, to_local=real.to_local
        )
        with pytest.raises(UnsupportedStateError, match="Odd.*not supported"):
            dtensor_chunks(stand_in)


def fsdp_tp_layout(
    rows: int, dp: int, tp: int
) -> tuple[tuple, dict[tuple[int, int], tuple[int, ...]]]:
    """Placements and per-coordinate local shapes FSDP2 gives a ColwiseParallel weight."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    shapes: dict[tuple[int, int], tuple[int, ...]] = {}
    placements: tuple = ()
    for rank in range(dp * tp):
        with fake_rank(rank, dp * tp):
            mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
            model = torch.nn.Linear(3, rows, bias=False)
            parallelize_module(model, mesh["tp"], ColwiseParallel())
            fully_shard(model, mesh=mesh["dp"])
            weight = model.weight
            assert isinstance(weight, DTensor)
            placements = tuple(weight.placements)
            # Several fake ranks in one process share torch's cached spmd mesh, so take the
            # coordinate from our own mesh rather than weight.device_mesh.
            coord = mesh.get_coordinate()
            assert coord is not None
            shapes[(coord[0], coord[1])] = tuple(weight.to_local().shape)
    return placements, shapes


@pytest.mark.parametrize(("rows", "dp", "tp"), [(8, 2, 2), (12, 3, 2), (12, 2, 3)])
def test_fsdp2_over_tp_even(rows: int, dp: int, tp: int) -> None:
    placements, shapes = fsdp_tp_layout(rows, dp, tp)
    assert placements == (_StridedShard(0, split_factor=tp), Shard(0))
    specs = placement_specs(placements)
    for coord, shape in shapes.items():
        assert local_shape((rows, 3), (dp, tp), coord, specs) == shape
        # FSDP2 chunks each TP shard over dp: TP rank t's chunk, then its dp-th piece.
        per = rows // (dp * tp)
        start = coord[1] * (rows // tp) + coord[0] * per
        assert local_boxes((rows, 3), (dp, tp), coord, specs) == [
            (Box((start, 0), (per, 3)), (slice(0, per), slice(0, 3)))
        ]


def test_fsdp2_over_tp_uneven_disagrees_with_its_placements() -> None:
    """torch 2.13: FSDP2 over TP with 7 rows on dp=3, tp=2 labels its weight
    (_S(0, 2), S(0)) but holds TP-then-DP chunks, which differ from what those placements
    mean at dp=2. dtensor_chunks must refuse there rather than save wrong rows."""
    placements, shapes = fsdp_tp_layout(7, 3, 2)
    specs = placement_specs(placements)
    predicted = {c: local_shape((7, 3), (3, 2), c, specs) for c in shapes}
    assert shapes[(2, 0)] == (0, 3) and shapes[(2, 1)] == (1, 3)
    assert predicted[(2, 0)] == (1, 3) and predicted[(2, 1)] == (0, 3)
    assert all(predicted[c] == shapes[c] for c in shapes if c[0] < 2)
