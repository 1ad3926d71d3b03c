"""What each rank offers the save planner: its tensors (plain ones with their checksums,
DTensors as chunks or layouts) and its values. Plain frozen data, compared across ranks
and cached by the plan cache under the offer's structure key."""

from __future__ import annotations

from dataclasses import dataclass

from dckpt._format import PathPart
from dckpt._layout import LayoutOffer, MeshOffer
from dckpt._reshard import Box
from dckpt._values import JSON


@dataclass(frozen=True, slots=True)
class ChunkOffer:
    box: Box
    crc: tuple[int, ...] | None = None  # known up front for plain tensors, to detect divergence


@dataclass(frozen=True, slots=True)
class TensorOffer:
    key: str
    path: tuple[PathPart, ...]
    dtype: str
    shape: tuple[int, ...]
    sharded: bool  # a DTensor: chunks are identical across holders by construction
    chunks: tuple[ChunkOffer, ...]


#: Per tensor offer, in order: a plain tensor's checksums, or None (sharded or empty).
Crcs = tuple[tuple[int, ...] | None, ...]


def with_checksums(tensors: tuple[TensorOffer, ...], crcs: Crcs) -> tuple[TensorOffer, ...]:
    """``tensors`` with each plain tensor's one chunk carrying its checksums from ``crcs``."""
    return tuple(
        t
        if c is None
        else TensorOffer(t.key, t.path, t.dtype, t.shape, False, (ChunkOffer(t.chunks[0].box, c),))
        for t, c in zip(tensors, crcs, strict=True)
    )


@dataclass(frozen=True, slots=True)
class ValueOffer:
    key: str
    path: tuple[PathPart, ...]
    data: JSON
    text: str  # canonical JSON of ``data``, compared across ranks


@dataclass(frozen=True, slots=True)
class RankOffer:
    rank: int
    tensors: tuple[TensorOffer, ...]
    values: tuple[ValueOffer, ...]
    # Layout tensors never reach rank 0's planner: each rank plans and writes its own
    # shards and reports them after writing (``LayoutReport``).
    layouts: tuple[LayoutOffer, ...] = ()
    meshes: tuple[MeshOffer, ...] = ()
