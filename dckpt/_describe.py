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
    """One rank's state, flattened: what it offers and the tensors each chunk comes from."""

    offer: RankOffer
    sources: SourceMap


def describe(
    state: Mapping[str, Any], rank: int, *, allow_pickle: bool, layouts: bool = False
) -> Description:
    """Resolve Stateful objects now and describe every chunk (no checksums yet); with
    ``layouts``, DTensors a layout entry can describe are offered as such (format 2) and
    their shards left to this rank to plan, instead of as chunks for rank 0 to plan."""
    resolved = resolve(state)
    found = _Layouts()
    tensors, sources = _tensor_offers(resolved, found if layouts else None)
    values = []
    for v in resolved.values:
        data = encode_value(v.value, v.key, allow_pickle=allow_pickle)
        values.append(ValueOffer(v.key, v.path, data, value_text(data)))
    offer = RankOffer(rank, tuple(tensors), tuple(values), tuple(found.offers), tuple(found.meshes))
    return Description(offer, sources)


class _Layouts:
    """The layout offers of one rank, and the meshes they name (each listed once)."""

    def __init__(self) -> None:
        self.offers: list[LayoutOffer] = []
        self.meshes: list[MeshOffer] = []
        self._index: dict[bytes, int] = {}

    def add(self, key: str, path: tuple[PathPart, ...], dtype: str, t: Any) -> bool:
        """Offer DTensor ``t`` as a layout entry; False when its placements have no layout
        form (the caller offers its chunks instead)."""
        spec = dtensor_layout(t)
        if spec is None:
            return False
        mesh_shape, ranks, coordinate, placements = spec
        if coordinate is None:
            return True  # a mesh this rank is not in: it holds and offers nothing
        ident = hashlib.blake2b(repr((mesh_shape, ranks)).encode(), digest_size=16).digest()
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


def _tensor_offers(
    resolved: Resolved, layouts: _Layouts | None = None
) -> tuple[list[TensorOffer], dict[tuple[str, Box], torch.Tensor]]:
    tensors: list[TensorOffer] = []
    sources: dict[tuple[str, Box], torch.Tensor] = {}
    for leaf in resolved.tensors:
        t = leaf.tensor
        name = dtype_name(t.dtype)
        if name not in DTYPE_ITEMSIZE:
            raise UnsupportedStateError(f"key {leaf.key!r}: dtype {t.dtype} cannot be saved")
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
        box = Box((0,) * len(shape), shape)
        if t.numel():
            sources[(leaf.key, box)] = t
            tensors.append(TensorOffer(leaf.key, leaf.path, name, shape, False, (ChunkOffer(box),)))
        else:
            tensors.append(TensorOffer(leaf.key, leaf.path, name, shape, False, ()))
    return tensors, sources


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
    """Checksum plain tensors up front: ranks holding equal bytes share one stored copy."""
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
