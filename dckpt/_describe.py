"""Describing one rank's state for a save: what it offers the planner, and where each
chunk's bytes come from.

Nothing is copied here (that is :meth:`dckpt._staging.StagingPool.stage`, for async
saves); the only pass over tensor bytes is :func:`checksum_plain`, on multi-rank saves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from crc32c import crc32c

from dckpt._bytes import block_crcs, dtype_name, gathered_host_bytes
from dckpt._dtensor import dtensor_chunks, dtensor_layout, dtensor_type, local_tensor
from dckpt._errors import UnsupportedStateError
from dckpt._format import DEFAULT_BLOCK_BYTES, DTYPE_ITEMSIZE, PathPart
from dckpt._layout import LayoutOffer, MeshOffer, ravel
from dckpt._plan import (
    ChunkOffer,
    Crcs,
    RankOffer,
    TensorOffer,
    ValueOffer,
    structure_key,
    with_checksums,
)
from dckpt._reshard import Box
from dckpt._staging import ChunkId
from dckpt._state import Resolved, TensorLeaf, resolve
from dckpt._values import encode_value
from dckpt._write import KnownCrcs, SourceMap


@dataclass(frozen=True)
class Description:
    """One rank's state, flattened: what it offers and the tensors each chunk comes from.
    Described with checksums, ``known`` holds the checksums and host bytes of its plain
    tensors and ``crcs`` the checksums per offered tensor (the offer's chunks carry
    none: :func:`checksum_plain` puts them in); ``key``: the offer's structure key, when
    the description made it."""

    offer: RankOffer
    sources: SourceMap
    known: KnownCrcs | None = None
    crcs: Crcs | None = None
    key: bytes | None = None


def describe(
    state: Mapping[str, Any],
    rank: int,
    *,
    allow_pickle: bool,
    layouts: bool = False,
    checksums: bool = False,
    memo: Skeletons | None = None,
) -> Description:
    """Resolve Stateful objects now and describe every chunk; with ``layouts``, DTensors a
    layout entry can describe are offered as such (format 2) and their shards left to
    this rank to plan, instead of as chunks for rank 0 to plan. With ``checksums``, plain
    tensors are checksummed in the same pass (their bytes copied or viewed as of now);
    ``memo``: the offers of the last structure described, to reuse."""
    captured = capture(state, rank, allow_pickle=allow_pickle)
    return describe_captured(
        captured, captured.sources, layouts=layouts, checksums=checksums, memo=memo
    )


@dataclass(frozen=True)
class Captured:
    """One rank's state as an async save's call takes it, before it is described: its
    tensors (each checked savable, with its dtype's name), what a snapshot copies (a
    plain tensor, or a DTensor's whole local tensor) and its values, encoded at the call
    since they may change after it. The offers are built later, on the save thread, by
    :func:`describe_captured`: training is blocked for the copy, not for that."""

    rank: int
    tensors: tuple[TensorLeaf, ...]
    names: tuple[str, ...]
    #: per tensor, the box its source is keyed by in ``sources`` (None: nothing to copy)
    boxes: tuple[Box | None, ...]
    sources: dict[ChunkId, torch.Tensor]
    values: tuple[ValueOffer, ...]
    #: every tensor plain and holding elements: one offer and one source per tensor
    uniform: bool = False


def capture(
    state: Mapping[str, Any], rank: int, *, allow_pickle: bool, fresh_optimizers: bool = True
) -> Captured:
    """Resolve ``state`` and take what a save needs at its call (see :class:`Captured`)."""
    resolved = resolve(state, fresh_optimizers=fresh_optimizers)
    names, boxes, sources, uniform = _sources(resolved)
    values = []
    for v in resolved.values:
        data = encode_value(v.value, v.key, allow_pickle=allow_pickle)
        values.append(ValueOffer(v.key, v.path, data, value_text(data)))
    return Captured(rank, tuple(resolved.tensors), names, boxes, sources, tuple(values), uniform)


def describe_captured(
    captured: Captured,
    sources: Mapping[ChunkId, torch.Tensor],
    *,
    layouts: bool = False,
    checksums: bool = False,
    memo: Skeletons | None = None,
) -> Description:
    """The description of ``captured`` whose chunks come from ``sources``: its own
    sources, or their staged copies (then the offers are built after the call). With
    ``checksums``, see :func:`describe`; ``memo`` serves a state of plain tensors only."""
    memo = memo if checksums and captured.uniform else None
    if memo is not None:
        hit = memo.get(captured)
        if hit is not None:  # every tensor plain: one offer, one source each, in order
            known: dict[ChunkId, tuple[tuple[int, ...], np.ndarray]] = {}
            wheres = list(captured.sources)  # in the tensors' order
            held = (
                sources.values()
                if sources is captured.sources
                else map(sources.__getitem__, wheres)
            )
            crcs = _checksummed(wheres, list(held), known)
            offer = RankOffer(captured.rank, hit[0], captured.values, (), ())
            return Description(offer, sources, known, tuple(crcs), hit[1])
    found = _Layouts()
    tensors, chunks = _tensor_offers(captured, sources, found if layouts else None)
    offer = RankOffer(
        captured.rank, tuple(tensors), captured.values, tuple(found.offers), tuple(found.meshes)
    )
    description = Description(offer, chunks)
    if not checksums:
        return description
    _, column, held_bytes = plain_checksums(description)
    key = None
    if memo is not None:
        key = structure_key(offer)
        memo.put(captured, offer.tensors, key)
    return Description(offer, chunks, held_bytes, column, key)


class Skeletons:
    """The offers and structure key of the last state of plain tensors a stream of saves
    described: a repeat save with the same keys, paths, dtypes and shapes reuses them,
    and only checksums its tensors (at 20k small tensors, building the offers and their
    key cost more than that). One per plan cache; saves in a stream do not overlap."""

    def __init__(self) -> None:
        self._last: tuple[tuple[object, ...], tuple[TensorOffer, ...], bytes] | None = None

    @staticmethod
    def _signature(c: Captured) -> tuple[object, ...]:
        # Boxes are shared per shape across captures (_BOXES): they compare by identity.
        leaves = c.tensors
        return (tuple(map(_LEAF_KEY, leaves)), tuple(map(_LEAF_PATH, leaves)), c.names, c.boxes)

    def get(self, c: Captured) -> tuple[tuple[TensorOffer, ...], bytes] | None:
        last = self._last
        if last is None or last[0] != self._signature(c):
            return None
        return last[1], last[2]

    def put(self, c: Captured, tensors: tuple[TensorOffer, ...], key: bytes) -> None:
        self._last = (self._signature(c), tensors, key)


_LEAF_KEY, _LEAF_PATH = operator.attrgetter("key"), operator.attrgetter("path")
_memos: weakref.WeakKeyDictionary[object, Skeletons] = weakref.WeakKeyDictionary()


def skeletons_for(owner: object) -> Skeletons:
    """The memo of a stream of saves (``owner``: its plan cache), made on first use."""
    memo = _memos.get(owner)
    if memo is None:
        memo = _memos[owner] = Skeletons()
    return memo


class _Layouts:
    """The layout offers of one rank, and the meshes they name (each listed once)."""

    def __init__(self) -> None:
        self.offers: list[LayoutOffer] = []
        self.meshes: list[MeshOffer] = []
        self._index: dict[bytes, int] = {}
        # A mesh's ident digests the text of its ranks: at thousands of ranks, once a mesh.
        # Keyed by the ranks tuple's id (``_dtensor`` keeps one per mesh), the tuple kept.
        self._idents: dict[int, tuple[tuple[int, ...], bytes]] = {}

    def add(self, key: str, path: tuple[PathPart, ...], dtype: str, t: Any) -> bool:
        """Offer DTensor ``t`` as a layout entry; False when its placements have no layout
        form (the caller offers its chunks instead)."""
        spec = dtensor_layout(t)
        if spec is None:
            return False
        mesh_shape, ranks, coordinate, placements = spec
        if coordinate is None:
            return True  # a mesh this rank is not in: it holds and offers nothing
        known = self._idents.get(id(ranks))
        if known is not None and known[0] is ranks:
            ident = known[1]
        else:
            ident = hashlib.blake2b(repr((mesh_shape, ranks)).encode(), digest_size=16).digest()
            self._idents[id(ranks)] = (ranks, ident)
        index = self._index.get(ident)
        if index is None:
            index = self._index[ident] = len(self.meshes)
            self.meshes.append(MeshOffer(ident, mesh_shape, ravel(coordinate, mesh_shape)))
        self.offers.append(LayoutOffer(key, path, dtype, tuple(t.shape), index, placements))
        return True


def value_text(data: Any) -> str:
    """The canonical JSON text of an encoded value: what ranks compare to find replicas."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def staging_sources(state: Mapping[str, Any]) -> dict[ChunkId, torch.Tensor]:
    """What a save of ``state`` would copy, without side effects on the state:
    optimizers that have no state yet are left out rather than stepped into having one."""
    return _sources(resolve(state, fresh_optimizers=False))[2]


_NAMES: dict[torch.dtype, str] = {}  # the storable dtypes met so far, by name
# Shapes repeat, within a state and from save to save: one whole-tensor Box per shape.
_BOXES: dict[tuple[int, ...], Box] = {}
_BOXES_MAX = 1 << 16


def _sources(
    resolved: Resolved,
) -> tuple[tuple[str, ...], tuple[Box | None, ...], dict[ChunkId, torch.Tensor], bool]:
    """The dtype names of ``resolved``'s tensors, each checked savable, and what a
    snapshot copies, with the box each is keyed by: plain tensors, and DTensors' local
    tensors whole (one buffer each); and whether all are plain tensors with elements."""
    plain = 0
    names: list[str] = []
    held: list[Box | None] = []
    sources: dict[ChunkId, torch.Tensor] = {}
    boxes = _BOXES
    if len(boxes) > _BOXES_MAX:
        boxes.clear()
    dtensor, strided = dtensor_type(), torch.strided
    for leaf in resolved.tensors:
        t = leaf.tensor
        names.append(_NAMES.get(t.dtype) or _storable(leaf.key, t.dtype))
        if t.layout is not strided or t.is_meta or t.is_quantized:
            raise UnsupportedStateError(f"key {leaf.key!r}: {_unsavable(t)}")
        # None: a DTensor on a mesh this rank is not in. An empty local tensor is kept (its
        # shape is checked against the placements when the offers are built).
        source = local_tensor(t) if isinstance(t, dtensor) else t
        if source is None or not (source.numel() or source is not t):
            held.append(None)
            continue
        box = boxes.get(source.shape)  # a torch.Size finds its tuple
        if box is None:
            shape = tuple(source.shape)
            box = boxes.setdefault(shape, Box((0,) * len(shape), shape))
        sources[(leaf.key, box)] = source
        held.append(box)
        plain += source is t
    return tuple(names), tuple(held), sources, plain == len(held)


def _tensor_offers(
    captured: Captured,
    staged: Mapping[ChunkId, torch.Tensor],
    layouts: _Layouts | None = None,
) -> tuple[list[TensorOffer], dict[ChunkId, torch.Tensor]]:
    """The offers of ``captured``'s tensors (plain tensors' chunks without checksums) and
    the source of each chunk, from ``staged`` (keyed as ``captured.sources``)."""
    tensors: list[TensorOffer] = []
    sources: dict[ChunkId, torch.Tensor] = {}
    dtensor = dtensor_type()
    for leaf, name, box in zip(captured.tensors, captured.names, captured.boxes, strict=True):
        t = leaf.tensor
        if isinstance(t, dtensor):  # its global shape and placements do not change
            pieces = [] if box is None else dtensor_chunks(t, staged[(leaf.key, box)])
            for piece, view in pieces:
                sources[(leaf.key, piece)] = view
            if layouts is not None and layouts.add(leaf.key, leaf.path, name, t):
                continue
            chunks = tuple(ChunkOffer(piece) for piece, _ in pieces)
            tensors.append(TensorOffer(leaf.key, leaf.path, name, tuple(t.shape), True, chunks))
            continue
        if box is None:  # a plain tensor with no elements
            tensors.append(TensorOffer(leaf.key, leaf.path, name, tuple(t.shape), False, ()))
            continue
        where = (leaf.key, box)
        sources[where] = staged[where]
        # its shape as the call found it (the whole tensor: offsets are zeros)
        tensors.append(TensorOffer(leaf.key, leaf.path, name, box.sizes, False, (ChunkOffer(box),)))
    return tensors, sources


def _checksummed(
    wheres: list[ChunkId],
    tensors: Sequence[torch.Tensor],
    known: dict[ChunkId, tuple[tuple[int, ...], np.ndarray]],
) -> list[tuple[int, ...]]:
    """The checksums of plain ``tensors`` (chunks ``wheres``), their host bytes and
    checksums put in ``known``; small tensors' bytes are copied together."""
    crcs = []
    for where, data in zip(wheres, gathered_host_bytes(tensors), strict=True):
        crc = _crcs(data)
        known[where] = (crc, data)
        crcs.append(crc)
    return crcs


def _storable(key: str, dtype: torch.dtype) -> str:
    name = dtype_name(dtype)
    if name not in DTYPE_ITEMSIZE:
        raise UnsupportedStateError(f"key {key!r}: dtype {dtype} cannot be saved")
    _NAMES[dtype] = name
    return name


def _crcs(data: np.ndarray) -> tuple[int, ...]:
    if data.nbytes <= DEFAULT_BLOCK_BYTES:  # numpy arrays are buffers; older stubs say not
        return (crc32c(data),)  # type: ignore[arg-type]
    return block_crcs(data, DEFAULT_BLOCK_BYTES)


def _unsavable(t: torch.Tensor) -> str:
    """Why ``t`` cannot be stored as a dense array of bytes, or "" when it can."""
    if t.is_meta:
        return (
            "a meta tensor has no data to save; materialize it first "
            "(e.g. module.to_empty(device=...) and initialize it)"
        )
    if t.is_quantized:
        return "a quantized tensor cannot be saved; dequantize it (t.dequantize()) first"
    if t.layout is not torch.strided:
        return f"a {t.layout} tensor cannot be saved; convert it with t.to_dense() first"
    return ""


def checksum_plain(description: Description) -> tuple[RankOffer, KnownCrcs]:
    """The offer with its plain tensors' checksums, and their host bytes: ranks holding
    equal bytes share one stored copy."""
    offer, crcs, known = plain_checksums(description)
    return dataclasses.replace(offer, tensors=with_checksums(offer.tensors, crcs)), known


def plain_checksums(description: Description) -> tuple[RankOffer, Crcs, KnownCrcs]:
    """The offer (its chunks without checksums), the checksums of its plain tensors per
    offered tensor, and their host bytes; computed here unless described with them."""
    if description.known is not None and description.crcs is not None:
        return description.offer, description.crcs, description.known
    known: dict[ChunkId, tuple[tuple[int, ...], np.ndarray]] = {}
    offered = description.offer.tensors
    wheres = [(t.key, t.chunks[0].box) for t in offered if not t.sharded and t.chunks]
    found = iter(_checksummed(wheres, [description.sources[w] for w in wheres], known))
    crcs = tuple(None if t.sharded or not t.chunks else next(found) for t in offered)
    return description.offer, crcs, known
