"""Layout entries (format version 2): a DTensor stored as its placements, not its chunks.

A DTensor whose placements are ``Shard``, ``_StridedShard`` and ``Replicate`` is fully
described by its global shape, its mesh and its placements: the box(es) each mesh
coordinate holds follow torch's chunking rule (:mod:`dckpt._dtensor`), and which replica
writes each distinct shard follows a fixed rule (:func:`writer_coordinate`). Everything
here is arithmetic on those few numbers, so neither the writer of the manifest nor a
reader ever lists the W shards of a tensor: a reader asks which shards overlap the box it
wants (:func:`overlapping_shards`) and gets only those.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import crc32c

from dckpt._dtensor import PlacementSpec, _apply, _chunk_range, _held_runs
from dckpt._reshard import Box

PathPart = str | int

__all__ = [
    "Layout",
    "LayoutOffer",
    "LayoutReport",
    "MeshOffer",
    "MeshRecord",
    "MeshReport",
    "check_layout",
    "is_writer",
    "key_id",
    "overlapping_shards",
    "parse_placement",
    "placement_text",
    "shard_pieces",
    "writer_coordinate",
]

MAX_MESH_DIMS = 16
MAX_SPLIT_FACTOR = 1 << 16
MAX_PIECES = 1 << 16  # boxes one shard may consist of (strided shards cut several)


@dataclass(frozen=True, slots=True)
class MeshOffer:
    """A device mesh as one of its members describes it (format version 2)."""

    ident: bytes  # digest of its shape and global ranks: equal on every member
    shape: tuple[int, ...]
    position: int  # this rank's row-major coordinate in it


@dataclass(frozen=True, slots=True)
class LayoutOffer:
    """A DTensor stored as a layout entry: its writers plan and report it themselves."""

    key: str
    path: tuple[PathPart, ...]
    dtype: str
    shape: tuple[int, ...]
    mesh: int  # index into the offer's ``meshes``
    placements: tuple[PlacementSpec, ...]


@dataclass(frozen=True, slots=True)
class MeshReport:
    """A mesh as one member reports it after writing, with a digest of the layout
    entries it holds on it, which rank 0 compares across the members."""

    ident: bytes
    shape: tuple[int, ...]
    position: int
    entries: bytes


@dataclass(frozen=True, slots=True)
class LayoutReport:
    """What a rank tells rank 0 about its layout tensors once it wrote them: O(1) besides
    the entries it is the designated reporter of (the writer of each one's first shard)."""

    rank: int
    meshes: tuple[MeshReport, ...]
    entries: tuple[LayoutOffer, ...]  # ``mesh`` indexes ``meshes``
    files: tuple[tuple[str, int], ...]  # (name, size) of its shard files
    table: tuple[str, int, int] | None  # (name, size, crc32c), None when it wrote no shard


_PLACEMENT = re.compile(
    r"replicate|shard\((0|[1-9][0-9]{0,2})\)|strided_shard\((0|[1-9][0-9]{0,2}),([1-9][0-9]{0,5})\)"
)


@dataclass(frozen=True, slots=True)
class MeshRecord:
    """A device mesh: its shape and the save ranks at each coordinate, row-major."""

    shape: tuple[int, ...]
    ranks: tuple[int, ...]
    position: dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.position.update({r: i for i, r in enumerate(self.ranks)})

    def coordinate(self, rank: int) -> tuple[int, ...] | None:
        """The mesh coordinate of ``rank``, or None when it is not in the mesh."""
        flat = self.position.get(rank)
        return None if flat is None else unravel(flat, self.shape)

    def rank_at(self, coordinate: Sequence[int]) -> int:
        return self.ranks[ravel(coordinate, self.shape)]


@dataclass(frozen=True, slots=True)
class Layout:
    """A layout entry's ``layout`` field: an index into the manifest's meshes, and one
    placement per mesh dim."""

    mesh: int
    placements: tuple[PlacementSpec, ...]


def placement_text(p: PlacementSpec) -> str:
    if p.kind == "replicate":
        return "replicate"
    if p.kind == "shard":
        return f"shard({p.dim})"
    if p.kind == "strided_shard":
        return f"strided_shard({p.dim},{p.split_factor})"
    raise ValueError(f"placement {p.kind!r} has no layout form")


def parse_placement(text: object) -> PlacementSpec:
    """The placement a layout entry names; ValueError for anything else."""
    m = _PLACEMENT.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"placement {text!r} is not replicate, shard(d) or strided_shard(d,f)")
    if text == "replicate":
        return PlacementSpec("replicate")
    if m.group(1) is not None:
        return PlacementSpec("shard", int(m.group(1)))
    return PlacementSpec("strided_shard", int(m.group(2)), int(m.group(3)))


def key_id(key: str) -> int:
    """The 64-bit id a table row names its tensor by: BLAKE2b-64 of the UTF-8 key, little
    endian. A writer knows it without knowing the other ranks' keys."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def ravel(coordinate: Sequence[int], shape: Sequence[int]) -> int:
    flat = 0
    for c, n in zip(coordinate, shape, strict=True):
        flat = flat * n + c
    return flat


def unravel(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    out = []
    for n in reversed(shape):
        flat, c = divmod(flat, n)
        out.append(c)
    return tuple(reversed(out))


def check_layout(
    shape: tuple[int, ...], mesh: MeshRecord, placements: tuple[PlacementSpec, ...]
) -> None:
    """ValueError unless the placements fit the mesh and the tensor (O(mesh dims))."""
    if len(placements) != len(mesh.shape):
        raise ValueError(f"{len(placements)} placements for a {len(mesh.shape)}-d mesh")
    pieces = 1
    for p in placements:
        if p.kind == "replicate":
            continue
        if not 0 <= p.dim < len(shape):
            raise ValueError(f"{placement_text(p)} shards a dim a {len(shape)}-d tensor lacks")
        if not 1 <= p.split_factor <= MAX_SPLIT_FACTOR:
            raise ValueError(f"split factor {p.split_factor} is out of range")
        pieces *= p.split_factor
    if pieces > MAX_PIECES:
        raise ValueError(f"the placements cut one shard into up to {pieces} boxes, too many")


def writer_coordinate(
    key: str, mesh_shape: tuple[int, ...], placements: tuple[PlacementSpec, ...],
    coordinate: tuple[int, ...],
) -> tuple[int, ...]:  # fmt: skip
    """The coordinate of the replica that writes the shard held at ``coordinate``.

    Replicas differ only along ``Replicate`` mesh dims. Number the shards row-major over
    the other mesh dims (``s``) and the replicas row-major over the replicated ones; the
    writer is replica ``(s + crc32c(key)) mod (number of replicas)``, which spreads the
    shards of one tensor, and the tensors of a fully replicated state, over the replicas.
    """
    rep = [i for i, p in enumerate(placements) if p.kind == "replicate"]
    if not rep:
        return coordinate
    sharding = [i for i, p in enumerate(placements) if p.kind != "replicate"]
    s = ravel([coordinate[i] for i in sharding], [mesh_shape[i] for i in sharding])
    rep_shape = [mesh_shape[i] for i in rep]
    j = (s + crc32c.crc32c(key.encode("utf-8"))) % math.prod(rep_shape)
    out = list(coordinate)
    for i, c in zip(rep, unravel(j, rep_shape), strict=True):
        out[i] = c
    return tuple(out)


def is_writer(
    key: str, mesh_shape: tuple[int, ...], placements: tuple[PlacementSpec, ...],
    coordinate: tuple[int, ...],
) -> bool:  # fmt: skip
    return writer_coordinate(key, mesh_shape, placements, coordinate) == coordinate


@functools.lru_cache(maxsize=65536)
def shard_pieces(
    shape: tuple[int, ...],
    mesh_shape: tuple[int, ...],
    coordinate: tuple[int, ...],
    placements: tuple[PlacementSpec, ...],
) -> tuple[Box, ...]:
    """The boxes the shard at ``coordinate`` consists of, in piece order (the order of
    ``_dtensor.local_boxes``); empty when it holds no element."""
    runs = _held_runs(shape, mesh_shape, coordinate, placements)
    return _pieces(runs)


def _pieces(runs: list[list[tuple[int, int]]]) -> tuple[Box, ...]:
    if any(not r for r in runs):
        return ()
    return tuple(
        Box(tuple(a for a, _ in combo), tuple(b - a for a, b in combo))
        for combo in itertools.product(*runs)
    )


_Runs = list[tuple[int, int]]


def overlapping_shards(
    shape: tuple[int, ...],
    mesh_shape: tuple[int, ...],
    placements: tuple[PlacementSpec, ...],
    want: Box,
) -> list[tuple[tuple[int, ...], tuple[Box, ...]]]:
    """(coordinate of one replica, pieces) of every shard holding an element of ``want``,
    found dim by dim without listing the other shards: the cost grows with the answer."""
    per_dim: list[list[tuple[tuple[tuple[int, int], ...], _Runs]]] = []
    for d, n in enumerate(shape):
        levels = [(i, p) for i, p in enumerate(placements) if p.kind != "replicate" and p.dim == d]
        lo, hi = want.offsets[d], want.offsets[d] + want.sizes[d]
        found: list[tuple[tuple[tuple[int, int], ...], _Runs]] = []
        _descend(levels, mesh_shape, [(0, n)] if n else [], lo, hi, (), found)
        if not found:
            return []
        per_dim.append(found)
    out = []
    for combo in itertools.product(*per_dim):
        coordinate = [0] * len(mesh_shape)
        for assigned, _ in combo:
            for i, c in assigned:
                coordinate[i] = c
        out.append((tuple(coordinate), _pieces([runs for _, runs in combo])))
    return out


def _descend(
    levels: list[tuple[int, PlacementSpec]],
    mesh_shape: tuple[int, ...],
    runs: _Runs,
    lo: int,
    hi: int,
    assigned: tuple[tuple[int, int], ...],
    found: list[tuple[tuple[tuple[int, int], ...], _Runs]],
) -> None:
    """Follow the mesh dims that cut one tensor dim, keeping only coordinates whose runs
    still meet ``[lo, hi)``."""
    if not any(a < hi and lo < b for a, b in runs):
        return
    if not levels:
        found.append((assigned, runs))
        return
    (i, spec), rest = levels[0], levels[1:]
    for c in _coords_meeting(runs, spec, mesh_shape[i], lo, hi):
        sub = _apply(runs, spec, mesh_shape[i], c)
        _descend(rest, mesh_shape, sub, lo, hi, (*assigned, (i, c)), found)


def _coords_meeting(runs: _Runs, spec: PlacementSpec, n: int, lo: int, hi: int) -> list[int]:
    """Mesh coordinates along one dim whose chunk of ``runs`` may meet ``[lo, hi)``."""
    length = sum(b - a for a, b in runs)
    local: list[tuple[int, int]] = []  # positions in the run list that lie in [lo, hi)
    pos = 0
    for a, b in runs:
        x, y = max(a, lo), min(b, hi)
        if x < y:
            local.append((pos + x - a, pos + y - a))
        pos += b - a
    pieces = [(0, length)] if spec.kind == "shard" else [
        _chunk_range(length, spec.split_factor, j) for j in range(spec.split_factor)
    ]  # fmt: skip
    coords: set[int] = set()
    for p0, p1 in pieces:
        size = -(-(p1 - p0) // n) if p1 > p0 else 0
        if not size:
            continue
        for x, y in local:
            x, y = max(x, p0), min(y, p1)
            if x < y:
                coords.update(range((x - p0) // size, min(n - 1, (y - 1 - p0) // size) + 1))
    return sorted(coords)
