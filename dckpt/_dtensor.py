"""Which global boxes of a DTensor a mesh coordinate holds.

DTensor placements apply left to right over mesh dims, each chunking the index list the
previous ones left for its tensor dim. ``_StridedShard`` (FSDP2 on top of TP) makes that
list non-contiguous, so one rank can hold several disjoint boxes. We simulate the index
lists as runs of global indices rather than trusting offset helpers that report only the
first index.
"""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from dckpt._errors import UnsupportedStateError
from dckpt._reshard import Box

if TYPE_CHECKING:
    import torch

__all__ = [
    "PlacementSpec",
    "dtensor_chunks",
    "dtensor_layout",
    "dtensor_type",
    "local_boxes",
    "local_shape",
    "local_tensor",
    "placement_specs",
]

PlacementKind = Literal["shard", "strided_shard", "replicate", "partial"]

# A dim's held global indices, in local order, as [start, stop) runs.
_Runs = list[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class PlacementSpec:
    """A torch placement reduced to what the index math needs."""

    kind: PlacementKind
    dim: int = -1
    split_factor: int = 1


def placement_specs(placements: Sequence[object]) -> tuple[PlacementSpec, ...]:
    """Convert torch placement objects; raises UnsupportedStateError for unknown kinds."""
    # lazy: torch.distributed.tensor is heavy and only DTensor states need it
    from torch.distributed.tensor.placement_types import (
        Partial,
        Replicate,
        Shard,
        _StridedShard,
    )

    out: list[PlacementSpec] = []
    for p in placements:
        # _StridedShard subclassed Shard in older torch; test it first.
        if isinstance(p, _StridedShard):
            out.append(PlacementSpec("strided_shard", int(p.dim), int(p.split_factor)))
        elif isinstance(p, Shard):
            out.append(PlacementSpec("shard", int(p.dim)))
        elif isinstance(p, Replicate):
            out.append(PlacementSpec("replicate"))
        elif isinstance(p, Partial):
            out.append(PlacementSpec("partial"))
        else:
            raise UnsupportedStateError(
                f"DTensor placement {p!r} ({type(p).__name__}) is not supported; "
                "redistribute to Shard or Replicate placements before saving"
            )
    return tuple(out)


def _take(runs: _Runs, start: int, stop: int) -> _Runs:
    """Local positions ``[start, stop)`` of a run list, as runs of global indices."""
    out: _Runs = []
    pos = 0
    for a, b in runs:
        n = b - a
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            out.append((a + lo - pos, a + hi - pos))
        pos += n
        if pos >= stop:
            break
    return out


def _chunk_range(length: int, num_chunks: int, index: int) -> tuple[int, int]:
    """Positions ``torch.chunk`` gives chunk ``index`` (empty past the last real chunk)."""
    size = -(-length // num_chunks)
    start = min(index * size, length)
    return start, min(start + size, length)


def _apply(runs: _Runs, spec: PlacementSpec, mesh_size: int, coord: int) -> _Runs:
    length = sum(b - a for a, b in runs)
    if spec.kind == "shard":
        return _take(runs, *_chunk_range(length, mesh_size, coord))
    # _StridedShard: chunk into split_factor pieces, chunk each piece over the mesh dim,
    # and keep this coordinate's chunk of every piece, in piece order.
    out: _Runs = []
    for j in range(spec.split_factor):
        p0, p1 = _chunk_range(length, spec.split_factor, j)
        c0, c1 = _chunk_range(p1 - p0, mesh_size, coord)
        out.extend(_take(runs, p0 + c0, p0 + c1))
    return _merge(out)


def _merge(runs: _Runs) -> _Runs:
    out: _Runs = []
    for a, b in runs:
        if a == b:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _held_runs(
    global_shape: tuple[int, ...],
    mesh_shape: tuple[int, ...],
    coordinate: tuple[int, ...],
    placements: Sequence[PlacementSpec],
) -> list[_Runs]:
    ndim = len(global_shape)
    if not len(mesh_shape) == len(coordinate) == len(placements):
        raise ValueError(
            f"mesh shape {mesh_shape}, coordinate {coordinate} and placements "
            f"{tuple(placements)} must have one entry per mesh dim"
        )
    for i, (n, c) in enumerate(zip(mesh_shape, coordinate, strict=True)):
        if n < 1 or not 0 <= c < n:
            raise ValueError(f"coordinate {c} outside mesh dim {i} of size {n}")
    runs: list[_Runs] = [[(0, n)] if n > 0 else [] for n in global_shape]
    for i, spec in enumerate(placements):
        if spec.kind == "replicate":
            continue
        if spec.kind == "partial":
            raise ValueError(
                f"mesh dim {i} has a Partial placement: reduce it "
                "(e.g. redistribute to Replicate) before saving"
            )
        if spec.kind not in ("shard", "strided_shard"):
            raise ValueError(f"unknown placement kind {spec.kind!r}")
        if spec.split_factor < 1:
            raise ValueError(f"split_factor must be >= 1, got {spec.split_factor}")
        dim = spec.dim + ndim if spec.dim < 0 else spec.dim
        if not 0 <= dim < ndim:
            raise ValueError(f"mesh dim {i} shards dim {spec.dim} of a {ndim}-d tensor")
        runs[dim] = _apply(runs[dim], spec, mesh_shape[i], coordinate[i])
    return runs


def local_shape(
    global_shape: tuple[int, ...],
    mesh_shape: tuple[int, ...],
    coordinate: tuple[int, ...],
    placements: Sequence[PlacementSpec],
) -> tuple[int, ...]:
    """The local tensor shape the placements predict at ``coordinate``."""
    runs = _held_runs(global_shape, mesh_shape, coordinate, placements)
    return tuple(sum(b - a for a, b in r) for r in runs)


def local_boxes(
    global_shape: tuple[int, ...],
    mesh_shape: tuple[int, ...],
    coordinate: tuple[int, ...],
    placements: Sequence[PlacementSpec],
) -> list[tuple[Box, tuple[slice, ...]]]:
    """Global boxes held at ``coordinate``, each with the slices picking it from the local tensor.

    Empty when the coordinate holds no element (uneven sharding, or a zero-size dim).
    """
    return _boxes(_held_runs(global_shape, mesh_shape, coordinate, placements))


def _boxes(runs: list[_Runs]) -> list[tuple[Box, tuple[slice, ...]]]:
    per_dim: list[list[tuple[int, int, int]]] = []  # (global start, size, local start)
    for dim_runs in runs:
        placed: list[tuple[int, int, int]] = []
        pos = 0
        for a, b in dim_runs:
            placed.append((a, b - a, pos))
            pos += b - a
        if not placed:
            return []
        per_dim.append(placed)
    out: list[tuple[Box, tuple[slice, ...]]] = []
    for combo in itertools.product(*per_dim):
        box = Box(tuple(a for a, _, _ in combo), tuple(n for _, n, _ in combo))
        out.append((box, tuple(slice(p, p + n) for _, n, p in combo)))
    return out


class _NoDTensor:
    """Stands for the DTensor class in a process that has not imported it: no instances."""


def dtensor_type() -> type:
    """The DTensor class, for ``isinstance`` in loops over many tensors, without importing
    DTensor support (half a second) when nothing in this process could have made one: then
    a class nothing is an instance of."""
    mod = sys.modules.get("torch.distributed.tensor")
    return _NoDTensor if mod is None else mod.DTensor


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (see :func:`dtensor_type`)."""
    return isinstance(t, dtensor_type())


def local_tensor(dt: Any) -> torch.Tensor | None:
    """The local tensor of DTensor ``dt``, or None on a rank outside its mesh. Read as
    the attribute ``to_local`` returns a view of (through an autograd function, about
    0.1 ms per call): an async save reads every DTensor's while training is blocked."""
    if _mesh_facts(dt.device_mesh)[2] is None:
        return None
    local = getattr(dt, "_local_tensor", None)
    return dt.to_local() if local is None else local


def dtensor_chunks(dt: Any, local: torch.Tensor | None = None) -> list[tuple[Box, torch.Tensor]]:
    """(global box, view of the local tensor) pairs this rank holds of DTensor ``dt``;
    with ``local``, views of that tensor instead (a copy of the local tensor)."""
    mesh_shape, _ranks, coord = _mesh_facts(dt.device_mesh)
    if coord is None:
        return []
    placements = tuple(dt.placements)
    global_shape = tuple(int(n) for n in dt.shape)
    layout = _layout if _hashable(placements) else _layout.__wrapped__
    try:
        expected, pieces = layout(global_shape, mesh_shape, coord, placements)
    except ValueError as e:
        raise UnsupportedStateError(
            f"cannot save DTensor with placements {placements} on mesh {mesh_shape}: {e}"
        ) from e
    if local is None:
        local = dt.to_local()
    actual = tuple(int(n) for n in local.shape)
    if actual != expected:
        raise UnsupportedStateError(
            f"DTensor with global shape {global_shape} and placements {placements} "
            f"on mesh {mesh_shape} at coordinate {coord} should hold a local tensor of shape "
            f"{expected} (torch.chunk semantics) but holds {actual}, so its placements do not "
            "say which rows it holds. FSDP2 over tensor parallelism does this when a sharded "
            "dim is not divisible by the product of the mesh dims sharding it: pad that dim "
            "to a multiple of it, or build the DTensor with distribute_tensor / "
            "DTensor.from_local using torch.chunk-sized local tensors"
        )
    return [(box, local[slices]) for box, slices in pieces]


def dtensor_layout(
    dt: Any,
) -> (
    tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...] | None, tuple[PlacementSpec, ...]]
    | None
):
    """(mesh shape, its global ranks row-major, this rank's coordinate or None, placements)
    of DTensor ``dt`` when a layout entry can describe it (placements Shard, _StridedShard
    and Replicate, on a mesh of every rank of the world), else None. Call it after
    :func:`dtensor_chunks`, which checks that the local tensor follows the placements."""
    try:
        specs = placement_specs(tuple(dt.placements))
    except UnsupportedStateError:
        return None
    if any(s.kind not in ("shard", "strided_shard", "replicate") for s in specs):
        return None
    ndim = len(dt.shape)
    specs = tuple(PlacementSpec(s.kind, s.dim % ndim, s.split_factor) if s.dim < 0 and
                  s.kind != "replicate" else s for s in specs)  # fmt: skip
    # lazy: only DTensor states get here, and they imported torch.distributed already
    import torch.distributed as dist

    shape, ranks, coord = _mesh_facts(dt.device_mesh)
    # A mesh smaller than the world (a TP submesh replicated over DP, a pipeline stage) may
    # hold the same key as other meshes: one layout cannot say that; chunks can.
    if not dist.is_initialized() or len(ranks) != dist.get_world_size():
        return None
    return shape, ranks, coord, specs


# DeviceMesh object (by id, with the object kept to check identity) -> its facts. Reading
# them costs about 50 us per DTensor (``mesh.mesh`` remaps a tensor), which an async save
# of a few hundred DTensors pays while training is blocked; a job has a few meshes.
_MESH_FACTS: dict[int, tuple[Any, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...] | None]]]
_MESH_FACTS = {}


def _mesh_facts(
    mesh: Any,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...] | None]:
    """(shape, global ranks row-major, this rank's coordinate or None) of ``mesh``."""
    known = _MESH_FACTS.get(id(mesh))
    if known is not None and known[0] is mesh:
        return known[1]
    ranks = tuple(int(r) for r in mesh.mesh.flatten().tolist())
    coordinate = mesh.get_coordinate()
    coord = None if coordinate is None else tuple(int(c) for c in coordinate)
    facts = (tuple(int(n) for n in mesh.shape), ranks, coord)
    if len(_MESH_FACTS) >= 64:  # meshes made and dropped over and over: start afresh
        _MESH_FACTS.clear()
    _MESH_FACTS[id(mesh)] = (mesh, facts)
    return facts


@functools.lru_cache(maxsize=65536)
def _layout(
    global_shape: tuple[int, ...],
    mesh_shape: tuple[int, ...],
    coordinate: tuple[int, ...],
    placements: tuple[object, ...],
) -> tuple[tuple[int, ...], tuple[tuple[Box, tuple[slice, ...]], ...]]:
    """Expected local shape and held boxes, memoized: every save asks again for the same
    few layouts (a model's parameters and optimizer states), and async saves block on it."""
    runs = _held_runs(global_shape, mesh_shape, coordinate, placement_specs(placements))
    return tuple(sum(b - a for a, b in r) for r in runs), tuple(_boxes(runs))


def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:  # a custom placement type; placement_specs will reject it clearly
        return False
    return True
