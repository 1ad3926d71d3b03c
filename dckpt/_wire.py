"""Compact encodings of what save coordination sends: offers, briefs, answers, results.

Nothing here pickles an object graph (nor uses ``marshal``, whose loader allocates what
a corrupted length asks for). A message is a small container: a magic, a tag, the
section lengths, then a JSON header (strings, small numbers, nested lists) and integer
columns as little-endian ``array('q')`` bytes (shapes, boxes, checksums). The rank is
never inside a message (the receiver knows whose it is) and the encoding is canonical,
so ranks holding the same state send byte-identical messages, and all but one of them
send a reference instead (see ``dckpt._coord``).

Decoding checks every length, type and count and raises :class:`WireError` (a
:class:`CheckpointError`) naming the rank whose message is malformed; its memory is
bounded by the message's size. A message that decodes is as trusted as its sender:
these are the job's own processes, never a checkpoint's files.

A field added to a dataclass that travels (``RankOffer``, ``RankPlan``, ``FilePlan``,
``FileResult``) needs a line here: encoding names any field it does not know.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Iterable, Sequence
from dataclasses import astuple
from typing import Any

from dckpt._coordframes import Shared
from dckpt._dtensor import PlacementSpec
from dckpt._format import DTYPE_ITEMSIZE
from dckpt._layout import LayoutOffer, MeshOffer
from dckpt._manifest_text import path_text
from dckpt._plan import (
    ChunkOffer,
    Crcs,
    RankOffer,
    TensorOffer,
    ValueOffer,
)
from dckpt._plancache import Brief, Held, Message
from dckpt._reshard import Box
from dckpt._wirebase import BRIEF as BRIEF
from dckpt._wirebase import OFFER as OFFER
from dckpt._wirebase import PLAN as PLAN
from dckpt._wirebase import RESEND as RESEND
from dckpt._wirebase import RESULTS as RESULTS
from dckpt._wirebase import REUSE as REUSE
from dckpt._wirebase import WRITTEN as WRITTEN
from dckpt._wirebase import WireError as WireError
from dckpt._wirebase import check_fields as check_fields
from dckpt._wirebase import digest as digest
from dckpt._wirebase import dump as dump
from dckpt._wirebase import ints as ints
from dckpt._wirebase import load as load
from dckpt._wirebase import malformed as malformed
from dckpt._wirebase import path_in, paths_in, shape_in
from dckpt._wirebase import strs as strs
from dckpt._wirebase import unints as unints

# ---------------------------------------------------------------------------- offers


def _offer_columns(offer: RankOffer) -> tuple[list[Any], list[bytes]]:
    dtypes: dict[str, int] = {}
    meta: list[int] = []  # per tensor: dtype index, ndim, sharded, chunk count
    dims: list[int] = []
    boxes: list[int] = []  # per chunk: offsets then sizes
    for t in offer.tensors:
        meta += (dtypes.setdefault(t.dtype, len(dtypes)), len(t.shape), t.sharded, len(t.chunks))
        dims += t.shape
        for c in t.chunks:
            boxes += c.box.offsets
            boxes += c.box.sizes
    keys = [t.key for t in offer.tensors]
    # The paths travel in a column of their own: rank 0 parses them only for the tensors
    # it plans, and at 20k tensors parsing them is most of an offer's decoding.
    # One JSON line each (JSON text has no raw newline), so a few can be parsed alone.
    # (path_text: json.dumps's output for a path, at a fraction of its cost per call)
    paths = "\n".join(map(path_text, map(_PATH, offer.tensors))).encode()
    return [keys, None, list(dtypes)], [ints(meta), ints(dims), ints(boxes), paths]


_PATH = operator.attrgetter("path")


def _crcs_out(crcs: Iterable[tuple[int, ...] | None]) -> bytes:
    flat: list[int] = []
    for crc in crcs:
        if crc is None:
            flat.append(-1)
        else:
            flat.append(len(crc))
            flat += crc
    return ints(flat)


def _values_out(values: Sequence[ValueOffer]) -> list[Any]:
    return [[v.key, v.path, v.data] for v in values]


def _values_in(raw: object) -> tuple[ValueOffer, ...]:
    if type(raw) is not list:
        raise ValueError("the values are not a list")
    out = []
    for item in raw:
        if type(item) is not list or len(item) != 3 or type(item[0]) is not str:
            raise ValueError("a value is not [key, path, data]")
        text = json.dumps(item[2], sort_keys=True, separators=(",", ":"))  # as _describe
        out.append(ValueOffer(item[0], path_in(item[1]), item[2], text))
    return tuple(out)


def _layouts_out(offer: RankOffer) -> list[Any]:
    return [entries_out(offer.layouts), [[m.ident.hex(), m.shape] for m in offer.meshes]]


def entries_out(entries: Iterable[LayoutOffer]) -> list[Any]:
    """Layout entries (``LayoutOffer``) as JSON lists."""
    return [
        [x.key, x.path, x.dtype, x.shape, x.mesh, [astuple(p) for p in x.placements]]
        for x in entries
    ]


def entries_in(raw: object, meshes: int) -> tuple[LayoutOffer, ...]:
    """Inverse of :func:`entries_out`; every entry's mesh is one of ``meshes``."""
    if type(raw) is not list or any(type(x) is not list or len(x) != 6 for x in raw):
        raise ValueError("the layout entries are not a list of 6-lists")
    out = []
    for key, path, dtype, shape, mesh, specs in raw:
        if type(key) is not str or type(mesh) is not int or not 0 <= mesh < meshes:
            raise ValueError("a layout names a mesh the offer lacks")
        if dtype not in DTYPE_ITEMSIZE:
            raise ValueError(f"a layout has an unknown dtype {dtype!r}")
        out.append(
            LayoutOffer(key, path_in(path), dtype, shape_in(shape), mesh, _placements(specs))
        )
    return tuple(out)


def _layouts_in(raw: object, positions: list[int]) -> dict[str, Any]:
    if type(raw) is not list or len(raw) != 2 or any(type(x) is not list for x in raw):
        raise ValueError("the layout columns are not [layouts, meshes]")
    layouts, meshes = raw
    if len(meshes) != len(positions):
        raise ValueError("the meshes and this rank's positions in them differ in number")
    out = entries_in(layouts, len(meshes))
    mesh_offers = tuple(
        MeshOffer(bytes.fromhex(ident), shape_in(shape), pos)
        for (ident, shape), pos in zip(meshes, positions, strict=True)
    )
    return {"layouts": out, "meshes": mesh_offers}


def _placements(raw: object) -> tuple[PlacementSpec, ...]:
    if type(raw) is not list or any(type(p) is not list for p in raw):
        raise ValueError("placements are not a list")
    return tuple(PlacementSpec(*p) for p in raw)


_OFFER_FIELDS = ("rank", "tensors", "values", "layouts", "meshes")


def encode_offer(offer: RankOffer, key: bytes, crcs: Crcs | None = None) -> tuple[bytes, bytes]:
    """A rank's full offer with its structure key, as (what peers holding the same state
    send alike, this rank's own part: its positions in its meshes); ``crcs``: its plain
    tensors' checksums, when its chunks do not carry them."""
    check_fields(offer, _OFFER_FIELDS)
    header, columns = _offer_columns(offer)
    if crcs is None:
        chunk_crcs = (c.crc for t in offer.tensors for c in t.chunks)
    else:  # a plain tensor is one chunk
        chunk_crcs = (
            c.crc if p is None else p
            for t, p in zip(offer.tensors, crcs, strict=True)
            for c in t.chunks
        )
    crcs_column = _crcs_out(chunk_crcs)
    header += [key.hex(), _values_out(offer.values), _layouts_out(offer)]
    return dump(OFFER, header, *columns[:3], crcs_column, columns[3]), ints(
        m.position for m in offer.meshes
    )


def decode_offer(common: bytes, own: bytes, rank: int) -> tuple[RankOffer, bytes]:
    """(the offer as ``rank``'s, its structure key)."""
    held, key = _offer_in(*load(common, rank, "offer"), own, rank)
    return held.full(), key


def _offer_in(
    tag: str, header: list[Any], columns: list[bytes], own: bytes, rank: int
) -> tuple[Held, bytes]:
    try:
        if tag != OFFER or len(header) != 6 or len(columns) != 5 or type(header[3]) is not str:
            raise ValueError("not an offer")
        tensors = OfferColumns(header[:3], columns, rank)
        extra = _layouts_in(header[5], unints(own))
        offer = RankOffer(rank, (), _values_in(header[4]), **extra)
        key = bytes.fromhex(header[3])
    except (ValueError, TypeError, IndexError, KeyError, RecursionError) as exc:
        raise malformed(rank, "offer", exc) from None
    return Held(offer, tensors), key


def _with_positions(base: RankOffer, own: bytes, rank: int) -> RankOffer:
    """A peer's offer from an equal one: only the rank and its mesh positions differ."""
    try:
        positions = unints(own)
        if len(positions) != len(base.meshes):
            raise ValueError("the meshes and this rank's positions in them differ in number")
    except ValueError as exc:
        raise malformed(rank, "offer", exc) from None
    meshes = tuple(
        MeshOffer(m.ident, m.shape, p) for m, p in zip(base.meshes, positions, strict=True)
    )
    return dataclasses.replace(base, rank=rank, meshes=meshes)


def _columns_in(head: list[Any], columns: list[bytes]) -> tuple[list[Any], ...]:
    """An offer's tensor columns, checked for length and range: keys, dtypes, then per
    tensor its dtype index, ndim, sharded flag and chunk count, then dims, boxes, crcs
    (the paths' column is parsed when tensors are made)."""
    keys, dtypes = strs(head[0]), strs(head[2])
    if head[1] is not None:
        raise ValueError("the paths are not in their column")
    if any(name not in DTYPE_ITEMSIZE for name in dtypes):
        raise ValueError(f"unknown dtype among {dtypes}")
    meta, dims, boxes, crcs = (unints(c) for c in columns[:4])
    n = len(keys)
    if len(meta) != 4 * n:
        raise ValueError("the tensor columns differ in length")
    dts, nds, flags, counts = meta[0::4], meta[1::4], meta[2::4], meta[3::4]
    if n and (min(dts) < 0 or max(dts) >= len(dtypes) or min(nds) < 0 or min(counts) < 0):
        raise ValueError("a dtype index or count is out of range")
    if not set(flags) <= {0, 1}:
        raise ValueError("a sharded flag is neither 0 nor 1")
    return keys, dtypes, dts, nds, flags, counts, dims, boxes, crcs


class OfferColumns:
    """An offer's tensors as checked integer columns; rank 0 makes objects only of the
    tensors it plans (those another rank holds too, see ``dckpt._owned``)."""

    def __init__(self, head: list[Any], columns: list[bytes], rank: int) -> None:
        self._columns = _columns_in(head, columns)
        self._paths = columns[4]
        self.keys: list[str] = self._columns[0]
        self._rank = rank
        self._last: tuple[tuple[int, ...] | None, tuple[TensorOffer, ...]] | None = None
        _check_counts(self._columns)  # now, so a malformed offer fails at decoding

    def select(self, indices: tuple[int, ...] | None) -> tuple[TensorOffer, ...]:
        """The tensors at ``indices`` (increasing; None: all), the last answer kept."""
        if indices == ():
            return ()
        if self._last is not None and self._last[0] == indices:
            return self._last[1]
        try:
            lines = self._paths.split(b"\n") if self._paths else []
            if len(lines) != len(self.keys):
                raise ValueError("the paths' column does not match the keys")
            paths: Sequence[tuple[str | int, ...]] | dict[int, tuple[str | int, ...]]
            if indices is None:
                paths = paths_in(json.loads(b"[" + b",".join(lines) + b"]"))
            else:
                parsed = paths_in([json.loads(lines[i]) for i in indices])
                paths = dict(zip(indices, parsed, strict=True))
            wanted = None if indices is None else set(indices)
            tensors = _tensors_in(self._columns, wanted, paths)
        except (ValueError, TypeError, IndexError, KeyError, RecursionError) as exc:
            raise malformed(self._rank, "offer", exc) from None
        self._last = (indices, tensors)
        return tensors


def _tensors_in(
    columns: tuple[list[Any], ...],
    wanted: set[int] | None,
    paths: Sequence[tuple[str | int, ...]] | dict[int, tuple[str | int, ...]],
) -> tuple[TensorOffer, ...]:
    """The tensors at ``wanted`` (None: all; ``paths`` may then be empty); all counted."""
    keys, dtypes, dts, nds, flags, counts, dims, boxes, crcs = columns
    out = []
    d = b = c = 0
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # shapes and boxes repeat: share
    boxed: dict[tuple[int, ...], Box] = {}
    for i, (key, dt, nd, sharded, nchunks) in enumerate(
        zip(keys, dts, nds, flags, counts, strict=True)
    ):
        if wanted is not None and i not in wanted:  # skip it, checking the counts
            d, b, c = d + nd, b + 2 * nd * nchunks, _skip(crcs, c, nchunks, key)
            continue
        path = paths[i]
        shape = tuple(dims[d : d + nd])
        shape = shapes.setdefault(shape, shape)
        d += nd
        if nchunks == 1 and crcs[c] == 1:  # a plain tensor's one block: small tensors
            flat = tuple(boxes[b : b + 2 * nd])
            b += 2 * nd
            only = boxed.get(flat) or boxed.setdefault(flat, Box(flat[:nd], flat[nd:]))
            chunk = ChunkOffer(only, (crcs[c + 1],))
            c += 2
            out.append(TensorOffer(key, path, dtypes[dt], shape, bool(sharded), (chunk,)))
            continue
        chunks = []
        for _ in range(nchunks):
            flat = tuple(boxes[b : b + 2 * nd])
            b += 2 * nd
            box = boxed.get(flat)
            if box is None:
                box = boxed[flat] = Box(flat[:nd], flat[nd:])
            count = crcs[c]
            if count == -1:
                chunks.append(ChunkOffer(box))
                c += 1
                continue
            if count < 0:
                raise ValueError(f"tensor {key!r} has a negative checksum count")
            chunks.append(ChunkOffer(box, tuple(crcs[c + 1 : c + 1 + count])))
            c += 1 + count
        out.append(TensorOffer(key, path, dtypes[dt], shape, bool(sharded), tuple(chunks)))
    if d != len(dims) or b != len(boxes) or c != len(crcs):
        raise ValueError("the tensor columns do not add up")
    return tuple(out)


def _check_counts(columns: tuple[list[Any], ...]) -> None:
    """Raises ValueError unless the dims, boxes and checksums add up to the tensors'
    counts; one checksum per chunk (the common case) is checked without a loop."""
    nds, counts, dims, boxes, crcs = columns[3], columns[5], columns[6], columns[7], columns[8]
    chunks = sum(counts)
    if sum(nds) != len(dims) or 2 * sum(map(operator.mul, nds, counts)) != len(boxes):
        raise ValueError("the tensor columns do not add up")
    heads = crcs[0::2]
    if len(crcs) != 2 * chunks or heads.count(1) != len(heads):
        _tensors_in(columns, set(), [])  # counts vary: walk them


def _skip(crcs: list[int], c: int, nchunks: int, key: str) -> int:
    """Where the checksums after a tensor's ``nchunks`` chunks start, from ``c``."""
    for _ in range(nchunks):
        count = crcs[c]
        if count < -1:
            raise ValueError(f"tensor {key!r} has a negative checksum count")
        c += 1 + max(count, 0)
    return c


# ---------------------------------------------------------------------------- briefs


def encode_brief(brief: Brief) -> bytes:
    """A brief (``rank`` left out)."""
    return dump(BRIEF, [brief.key.hex(), _values_out(brief.values)], _crcs_out(brief.crcs))


def _brief_in(header: list[Any], columns: list[bytes], rank: int) -> Brief:
    if len(header) != 2 or len(columns) != 1 or type(header[0]) is not str:
        raise ValueError("not a brief")
    flat = unints(columns[0])
    counts = flat[0::2]
    if len(flat) % 2 == 0 and counts.count(1) == len(counts):  # one block each: small tensors
        return Brief(rank, bytes.fromhex(header[0]), tuple(zip(flat[1::2])), _values_in(header[1]))
    crcs: list[tuple[int, ...] | None] = []
    c = 0
    while c < len(flat):
        count = flat[c]
        if count < -1 or c + 1 + max(count, 0) > len(flat):
            raise ValueError("a checksum count is out of range")
        crcs.append(None if count == -1 else tuple(flat[c + 1 : c + 1 + count]))
        c += 1 + max(count, 0)
    return Brief(rank, bytes.fromhex(header[0]), tuple(crcs), _values_in(header[1]))


def encode_message(
    message: RankOffer | Brief, key: bytes, crcs: Crcs | None = None
) -> tuple[bytes, bytes]:
    """A rank's plan message as (common, own): its full offer (with ``key`` and ``crcs``,
    see :func:`encode_offer`), or a brief."""
    if isinstance(message, Brief):
        return encode_brief(message), b""
    return encode_offer(message, key, crcs)


def decode_messages(values: Sequence[Shared]) -> list[tuple[Message, bytes]]:
    """Every rank's plan message (value ``r`` is rank ``r``'s) with its structure key.

    Equal messages reach rank 0 with one ``common`` object (``dckpt._coord`` resolves
    references to it): each is decoded once, and ranks holding the same state share the
    decoded tuples, which is what lets the planner group them (:mod:`dckpt._plangroups`).
    """
    memo: dict[int, tuple[Message, bytes]] = {}
    out: list[tuple[Message, bytes]] = []
    for rank, value in enumerate(values):
        seen = memo.get(id(value.common))
        if seen is None:
            seen = memo[id(value.common)] = _decode_message(value, rank)
            out.append(seen)
        elif isinstance(seen[0], Brief):
            out.append((dataclasses.replace(seen[0], rank=rank), seen[1]))
        else:
            assert isinstance(seen[0], Held)  # decoded messages are briefs or held offers
            offer = _with_positions(seen[0].offer, value.own, rank)
            out.append((Held(offer, seen[0].tensors), seen[1]))
    return out


def _decode_message(value: Shared, rank: int) -> tuple[Message, bytes]:
    tag, header, columns = load(value.common, rank, "plan")
    if tag == OFFER:
        return _offer_in(tag, header, columns, value.own, rank)
    try:
        if tag != BRIEF:
            raise ValueError(f"a {tag!r} message where a plan message belongs")
        brief = _brief_in(header, columns, rank)
    except (ValueError, TypeError, IndexError, RecursionError) as exc:
        raise malformed(rank, "plan", exc) from None
    return brief, brief.key
