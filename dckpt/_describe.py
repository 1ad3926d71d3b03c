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

from dckpt._bytes import block_crcs, dtype_name, host_bytes
from dckpt._dtensor import dtensor_chunks, dtensor_layout, is_dtensor
from dckpt._errors import UnsupportedStateError
from dckpt._format import DEFAULT_BLOCK_BYTES, DTYPE_ITEMSIZE, PathPart
from dckpt._layout import LayoutOffer, MeshOffer, ravel
from dckpt._plan import ChunkOffer, RankOffer, TensorOffer, ValueOffer
from dckpt._reshard import Box
from dckpt._state import Resolved, resolve
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
    resolved = resolve(state)
    found = _Layouts()
    known: dict[tuple[str, Box], tuple[tuple[int, ...], np.ndarray]] | None = (
        {} if checksums else None
    )
    tensors, sources = _tensor_offers(resolved, found if layouts else None, known)
    values = []
    for v in resolved.values:
        data = encode_value(v.value, v.key, allow_pickle=allow_pickle)
        values.append(ValueOffer(v.key, v.path, data, value_text(data)))
    offer = RankOffer(rank, tuple(tensors), tuple(values), tuple(found.offers), tuple(found.meshes))
    return Description(offer, sources, known)


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


def staging_sources(state: Mapping[str, Any]) -> dict[tuple[str, Box], torch.Tensor]:
    """The chunks a save of ``state`` would copy, without side effects on the state:
    optimizers that have no state yet are left out rather than stepped into having one."""
    return _tensor_offers(resolve(state, fresh_optimizers=False))[1]


_NAMES: dict[torch.dtype, str] = {}  # the storable dtypes met so far, by name


def _tensor_offers(
    resolved: Resolved,
    layouts: _Layouts | None = None,
    known: dict[tuple[str, Box], tuple[tuple[int, ...], np.ndarray]] | None = None,
) -> tuple[list[TensorOffer], dict[tuple[str, Box], torch.Tensor]]:
    """The offers and sources of ``resolved``'s tensors; plain tensors are checksummed
    into ``known`` when given. A save of many small tensors spends most of its describe
    here, per tensor: hence the caches of dtype names and boxes (shapes repeat)."""
    tensors: list[TensorOffer] = []
    sources: dict[tuple[str, Box], torch.Tensor] = {}
    boxes: dict[tuple[int, ...], Box] = {}
    for leaf in resolved.tensors:
        t = leaf.tensor
        name = _NAMES.get(t.dtype) or _storable(leaf.key, t.dtype)
        problem = _unsavable(t)
        if problem:
            raise UnsupportedStateError(f"key {leaf.key!r}: {problem}")
        shape = tuple(t.shape)
        if is_dtensor(t):
            pieces = dtensor_chunks(t)
            for box, view in pieces:
                sources[(leaf.key, box)] = view
            if layouts is not None and layouts.add(leaf.key, leaf.path, name, t):
                continue
            chunks = tuple(ChunkOffer(box) for box, _ in pieces)
            tensors.append(TensorOffer(leaf.key, leaf.path, name, shape, True, chunks))
            continue
        if not t.numel():
            tensors.append(TensorOffer(leaf.key, leaf.path, name, shape, False, ()))
            continue
        box = boxes.get(shape) or boxes.setdefault(shape, Box((0,) * len(shape), shape))
        where = (leaf.key, box)
        sources[where] = t
        chunk = ChunkOffer(box) if known is None else _checksummed(t, where, known)
        tensors.append(TensorOffer(leaf.key, leaf.path, name, shape, False, (chunk,)))
    return tensors, sources


def _storable(key: str, dtype: torch.dtype) -> str:
    name = dtype_name(dtype)
    if name not in DTYPE_ITEMSIZE:
        raise UnsupportedStateError(f"key {key!r}: dtype {dtype} cannot be saved")
    _NAMES[dtype] = name
    return name


def _checksummed(
    t: torch.Tensor,
    where: tuple[str, Box],
    known: dict[tuple[str, Box], tuple[tuple[int, ...], np.ndarray]],
) -> ChunkOffer:
    data = _host(t)
    if data.nbytes <= DEFAULT_BLOCK_BYTES:  # numpy arrays are buffers; older stubs say not
        crc: tuple[int, ...] = (crc32c(data),)  # type: ignore[arg-type]
    else:
        crc = block_crcs(data, DEFAULT_BLOCK_BYTES)
    known[where] = (crc, data)
    return ChunkOffer(where[1], crc)


_NUMPY = frozenset(
    {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16,
     torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128}
)  # fmt: skip


def _host(t: torch.Tensor) -> np.ndarray:
    """``host_bytes(t)``, as the tensor's own numpy view where it can be (a third of the
    cost, per small tensor); the writer takes any C-contiguous array."""
    if t.is_cpu and t.dtype in _NUMPY and t.is_contiguous():
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
