"""Describing one rank's state for a save: what it offers the planner, and where each
chunk's bytes come from.

Nothing is copied here (that is :meth:`dckpt._staging.StagingPool.stage`, for async
saves); the only pass over tensor bytes is :func:`checksum_plain`, on multi-rank saves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from crc32c import crc32c

from dckpt._bytes import NUMPY_DTYPES, block_crcs, dtype_name, host_bytes
from dckpt._dtensor import dtensor_chunks, dtensor_layout, dtensor_type, local_tensor
from dckpt._errors import UnsupportedStateError
from dckpt._format import DEFAULT_BLOCK_BYTES, DTYPE_ITEMSIZE, PathPart
from dckpt._layout import LayoutOffer, MeshOffer, ravel
from dckpt._plan import ChunkOffer, RankOffer, TensorOffer, ValueOffer
from dckpt._reshard import Box
from dckpt._staging import ChunkId
from dckpt._state import Resolved, TensorLeaf, resolve
from dckpt._values import encode_value
from dckpt._write import KnownCrcs, SourceMap


@dataclass(frozen=True)
class Description:
    """One rank's state, flattened: what it offers and the tensors each chunk comes from;
    ``known``: the checksums and host bytes of its plain tensors, when described with
    them (then in ``offer`` too), else None."""

    offer: RankOffer
    sources: SourceMap
    known: KnownCrcs | None = None


def describe(
    state: Mapping[str, Any],
    rank: int,
    *,
    allow_pickle: bool,
    layouts: bool = False,
    checksums: bool = False,
) -> Description:
    """Resolve Stateful objects now and describe every chunk; with ``layouts``, DTensors a
    layout entry can describe are offered as such (format 2) and their shards left to
    this rank to plan, instead of as chunks for rank 0 to plan. With ``checksums``, plain
    tensors are checksummed in the same pass (what :func:`checksum_plain` adds), which
    only a save that writes from the described tensors themselves may ask for."""
    captured = capture(state, rank, allow_pickle=allow_pickle)
    return describe_captured(captured, captured.sources, layouts=layouts, checksums=checksums)


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


def capture(
    state: Mapping[str, Any], rank: int, *, allow_pickle: bool, fresh_optimizers: bool = True
) -> Captured:
    """Resolve ``state`` and take what a save needs at its call (see :class:`Captured`)."""
    resolved = resolve(state, fresh_optimizers=fresh_optimizers)
    names, boxes, sources = _sources(resolved)
    values = []
    for v in resolved.values:
        data = encode_value(v.value, v.key, allow_pickle=allow_pickle)
        values.append(ValueOffer(v.key, v.path, data, value_text(data)))
    return Captured(rank, tuple(resolved.tensors), names, boxes, sources, tuple(values))


def describe_captured(
    captured: Captured,
    sources: Mapping[ChunkId, torch.Tensor],
    *,
    layouts: bool = False,
    checksums: bool = False,
) -> Description:
    """The description of ``captured`` whose chunks come from ``sources``: its own
    sources, or their staged copies (then the offers are built after the call)."""
    found = _Layouts()
    known: dict[ChunkId, tuple[tuple[int, ...], np.ndarray]] | None = {} if checksums else None
    tensors, chunks = _tensor_offers(captured, sources, found if layouts else None, known)
    offer = RankOffer(
        captured.rank, tuple(tensors), captured.values, tuple(found.offers), tuple(found.meshes)
    )
    return Description(offer, chunks, known)


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


def _sources(
    resolved: Resolved,
) -> tuple[tuple[str, ...], tuple[Box | None, ...], dict[ChunkId, torch.Tensor]]:
    """The dtype names of ``resolved``'s tensors, each checked savable, and what a
    snapshot copies, with the box each is keyed by: plain tensors, and DTensors' local
    tensors whole (one buffer each)."""
    names: list[str] = []
    held: list[Box | None] = []
    sources: dict[ChunkId, torch.Tensor] = {}
    boxes: dict[tuple[int, ...], Box] = {}  # shapes repeat: one Box each
    dtensor = dtensor_type()
    for leaf in resolved.tensors:
        t = leaf.tensor
        names.append(_NAMES.get(t.dtype) or _storable(leaf.key, t.dtype))
        problem = _unsavable(t)
        if problem:
            raise UnsupportedStateError(f"key {leaf.key!r}: {problem}")
        # None: a DTensor on a mesh this rank is not in. An empty local tensor is kept (its
        # shape is checked against the placements when the offers are built).
        source = local_tensor(t) if isinstance(t, dtensor) else t
        if source is None or not (source.numel() or source is not t):
            held.append(None)
            continue
        shape = tuple(source.shape)
        box = boxes.get(shape) or boxes.setdefault(shape, Box((0,) * len(shape), shape))
        sources[(leaf.key, box)] = source
        held.append(box)
    return tuple(names), tuple(held), sources


def _tensor_offers(
    captured: Captured,
    staged: Mapping[ChunkId, torch.Tensor],
    layouts: _Layouts | None = None,
    known: dict[ChunkId, tuple[tuple[int, ...], np.ndarray]] | None = None,
) -> tuple[list[TensorOffer], dict[ChunkId, torch.Tensor]]:
    """The offers of ``captured``'s tensors and the source of each chunk, from ``staged``
    (keyed as ``captured.sources``); plain tensors are checksummed into ``known`` when
    given. A save of many small tensors spends most of its describe here, per tensor:
    hence the boxes kept from the capture."""
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
        shape = box.sizes  # the shape the call found (whole tensor: offsets are zeros)
        where = (leaf.key, box)
        t = sources[where] = staged[where]
        if known is None:
            chunk = ChunkOffer(box)
        else:
            data = _host(t)
            crc = _crcs(data)
            known[where] = (crc, data)
            chunk = ChunkOffer(box, crc)
        tensors.append(TensorOffer(leaf.key, leaf.path, name, shape, False, (chunk,)))
    return tensors, sources


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


def _host(t: torch.Tensor) -> np.ndarray:
    """``host_bytes(t)``, as the tensor's own numpy view where it can be (a third of the
    cost, per small tensor); the writer takes any C-contiguous array."""
    if t.is_cpu and t.dtype in NUMPY_DTYPES and t.is_contiguous():
        try:
            return (t.detach() if t.requires_grad else t).numpy()
        except RuntimeError:  # a conjugate or negative view: host_bytes resolves it
            pass
    return host_bytes(t)


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
    """Checksum plain tensors up front: ranks holding equal bytes share one stored copy.
    A description made with checksums has them already."""
    if description.known is not None:
        return description.offer, description.known
    known: dict[tuple[str, Box], tuple[tuple[int, ...], np.ndarray]] = {}
    tensors = []
    for t in description.offer.tensors:
        if t.sharded or not t.chunks:
            tensors.append(t)
            continue
        box = t.chunks[0].box
        data = host_bytes(description.sources[(t.key, box)])
        crc = block_crcs(data, DEFAULT_BLOCK_BYTES)
        known[(t.key, box)] = (crc, data)
        tensors.append(TensorOffer(t.key, t.path, t.dtype, t.shape, False, (ChunkOffer(box, crc),)))
    offer = dataclasses.replace(description.offer, tensors=tuple(tensors))
    return offer, known
