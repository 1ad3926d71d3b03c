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
import hashlib
import itertools
import json
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import astuple
from typing import Any

from dckpt._coordframes import Shared
from dckpt._dtensor import PlacementSpec
from dckpt._errors import CheckpointError
from dckpt._format import DTYPE_ITEMSIZE
from dckpt._layout import LayoutOffer, MeshOffer
from dckpt._plan import (
    ChunkOffer,
    RankOffer,
    TensorOffer,
    ValueOffer,
)
from dckpt._plancache import Brief, Message
from dckpt._reshard import Box

_SWAP = sys.byteorder != "little"  # the wire is little-endian

OFFER, BRIEF, PLAN, REUSE, RESEND, RESULTS, WRITTEN = "O", "B", "P", "U", "S", "R", "W"


class WireError(CheckpointError):
    """A coordination message that does not decode (a bug, or mixed dckpt versions)."""


def digest(blob: bytes) -> bytes:
    """The content address of a message: equal messages, equal digests."""
    return hashlib.blake2b(blob, digest_size=16).digest()


# ---------------------------------------------------------------------------- primitives


def ints(values: Iterable[int]) -> bytes:
    a = array("q", values)
    if _SWAP:
        a.byteswap()
    return a.tobytes()


def unints(raw: object) -> list[int]:
    if type(raw) is not bytes or len(raw) % 8:
        raise ValueError("an integer column is not a whole number of 8-byte words")
    a = array("q")
    a.frombytes(raw)
    if _SWAP:
        a.byteswap()
    return a.tolist()


def strs(raw: object, n: int | None = None) -> list[str]:
    if type(raw) is not list or any(type(s) is not str for s in raw):
        raise ValueError("a string column is not a list of strings")
    if n is not None and len(raw) != n:
        raise ValueError(f"a string column has {len(raw)} entries, expected {n}")
    return raw


def _path(raw: object) -> tuple[str | int, ...]:
    if type(raw) is not list or any(type(p) not in (str, int) for p in raw):
        raise ValueError("a key path is not a list of strings and integers")
    return tuple(raw)


def _paths(raw: object) -> list[tuple[str | int, ...]]:
    if type(raw) is not list or any(type(p) is not list for p in raw):
        raise ValueError("the key paths are not lists")
    if not set(map(type, itertools.chain.from_iterable(raw))) <= {str, int}:
        raise ValueError("a key path holds something other than strings and integers")
    return [tuple(p) for p in raw]


def _shape(raw: object) -> tuple[int, ...]:
    if type(raw) is not list or any(type(n) is not int or n < 0 for n in raw):
        raise ValueError("a shape is not a list of sizes")
    return tuple(raw)


_MAGIC = b"dckw1"
_COUNT = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")
MAX_SECTIONS = 1 << 16


def dump(tag: str, header: list[Any], *columns: bytes) -> bytes:
    """One message: ``header`` as JSON, then the integer columns."""
    head = json.dumps([tag, header], separators=(",", ":"), allow_nan=False).encode()
    sections = (head, *columns)
    lengths = b"".join(_LENGTH.pack(len(x)) for x in sections)
    return b"".join((_MAGIC, _COUNT.pack(len(sections)), lengths, *sections))


def load(blob: bytes, rank: int, what: str) -> tuple[str, list[Any], list[bytes]]:
    """(tag, header, columns) of a message; the columns are not yet checked."""
    try:
        if blob[: len(_MAGIC)] != _MAGIC:
            raise ValueError("not a dckpt coordination message")
        pos = len(_MAGIC)
        (count,) = _COUNT.unpack_from(blob, pos)
        pos += _COUNT.size
        if not 1 <= count <= MAX_SECTIONS or pos + count * _LENGTH.size > len(blob):
            raise ValueError(f"{count} sections")
        lengths = [_LENGTH.unpack_from(blob, pos + i * _LENGTH.size)[0] for i in range(count)]
        pos += count * _LENGTH.size
        if pos + sum(lengths) != len(blob):
            raise ValueError("the section lengths do not add up to the message's")
        sections = []
        for n in lengths:
            sections.append(blob[pos : pos + n])
            pos += n
        tag, header = json.loads(sections[0])
        if type(tag) is not str or type(header) is not list:
            raise ValueError("the header is not [tag, [...]]")
    except (ValueError, TypeError, struct.error, RecursionError) as exc:
        raise malformed(rank, what, exc) from None
    return tag, header, sections[1:]


def malformed(rank: int, what: str, exc: BaseException) -> WireError:
    return WireError(
        f"the {what} message from rank {rank} is malformed ({type(exc).__name__}: {exc}); "
        "every rank must run the same dckpt version. Retry the save; if it persists, "
        "report it as a bug"
    )


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
    paths = [t.path for t in offer.tensors]
    return [keys, paths, list(dtypes)], [ints(meta), ints(dims), ints(boxes)]


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
        out.append(ValueOffer(item[0], _path(item[1]), item[2], text))
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
        out.append(LayoutOffer(key, _path(path), dtype, _shape(shape), mesh, _placements(specs)))
    return tuple(out)


def _layouts_in(raw: object, positions: list[int]) -> dict[str, Any]:
    if type(raw) is not list or len(raw) != 2 or any(type(x) is not list for x in raw):
        raise ValueError("the layout columns are not [layouts, meshes]")
    layouts, meshes = raw
    if len(meshes) != len(positions):
        raise ValueError("the meshes and this rank's positions in them differ in number")
    out = entries_in(layouts, len(meshes))
    mesh_offers = tuple(
        MeshOffer(bytes.fromhex(ident), _shape(shape), pos)
        for (ident, shape), pos in zip(meshes, positions, strict=True)
    )
    return {"layouts": out, "meshes": mesh_offers}


def _placements(raw: object) -> tuple[PlacementSpec, ...]:
    if type(raw) is not list or any(type(p) is not list for p in raw):
        raise ValueError("placements are not a list")
    return tuple(PlacementSpec(*p) for p in raw)


def check_fields(obj: object, known: tuple[str, ...]) -> None:
    """HOOK: a field added to a dataclass that travels must be added to its codec here."""
    if obj is None:
        return
    extra = [f.name for f in dataclasses.fields(obj) if f.name not in known]  # type: ignore[arg-type]
    if extra:
        raise TypeError(
            f"internal error: dckpt._wire does not encode {type(obj).__name__}.{extra[0]}"
        )


_OFFER_FIELDS = ("rank", "tensors", "values", "layouts", "meshes")


def encode_offer(offer: RankOffer, key: bytes) -> tuple[bytes, bytes]:
    """A rank's full offer with its structure key, as (what peers holding the same state
    send alike, this rank's own part: its positions in its meshes)."""
    check_fields(offer, _OFFER_FIELDS)
    header, columns = _offer_columns(offer)
    crcs = _crcs_out(c.crc for t in offer.tensors for c in t.chunks)
    header += [key.hex(), _values_out(offer.values), _layouts_out(offer)]
    return dump(OFFER, header, *columns, crcs), ints(m.position for m in offer.meshes)


def decode_offer(common: bytes, own: bytes, rank: int) -> tuple[RankOffer, bytes]:
    """(the offer as ``rank``'s, its structure key)."""
    return _offer_in(*load(common, rank, "offer"), own, rank)


def _offer_in(
    tag: str, header: list[Any], columns: list[bytes], own: bytes, rank: int
) -> tuple[RankOffer, bytes]:
    try:
        if tag != OFFER or len(header) != 6 or len(columns) != 4 or type(header[3]) is not str:
            raise ValueError("not an offer")
        tensors = _tensors_in(header[:3], columns)
        extra = _layouts_in(header[5], unints(own))
        offer = RankOffer(rank, tensors, _values_in(header[4]), **extra)
        key = bytes.fromhex(header[3])
    except (ValueError, TypeError, IndexError, KeyError, RecursionError) as exc:
        raise malformed(rank, "offer", exc) from None
    return offer, key


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
    """An offer's tensor columns, checked for length and range: keys, paths, dtypes, then
    per tensor its dtype index, ndim, sharded flag and chunk count, then dims, boxes, crcs."""
    keys, paths, dtypes = strs(head[0]), _paths(head[1]), strs(head[2])
    if any(name not in DTYPE_ITEMSIZE for name in dtypes):
        raise ValueError(f"unknown dtype among {dtypes}")
    meta, dims, boxes, crcs = (unints(c) for c in columns)
    n = len(keys)
    if len(paths) != n or len(meta) != 4 * n:
        raise ValueError("the tensor columns differ in length")
    dts, nds, flags, counts = meta[0::4], meta[1::4], meta[2::4], meta[3::4]
    if n and (min(dts) < 0 or max(dts) >= len(dtypes) or min(nds) < 0 or min(counts) < 0):
        raise ValueError("a dtype index or count is out of range")
    if not set(flags) <= {0, 1}:
        raise ValueError("a sharded flag is neither 0 nor 1")
    return keys, paths, dtypes, dts, nds, flags, counts, dims, boxes, crcs


def _tensors_in(head: list[Any], columns: list[bytes]) -> tuple[TensorOffer, ...]:
    keys, paths, dtypes, dts, nds, flags, counts, dims, boxes, crcs = _columns_in(head, columns)
    out = []
    d = b = c = 0
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # shapes and boxes repeat: share
    boxed: dict[tuple[int, ...], Box] = {}
    for key, path, dt, nd, sharded, nchunks in zip(
        keys, paths, dts, nds, flags, counts, strict=True
    ):
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


def encode_message(message: Message, key: bytes) -> tuple[bytes, bytes]:
    """A rank's plan message as (common, own): its full offer (with ``key``), or a brief."""
    if isinstance(message, Brief):
        return encode_brief(message), b""
    return encode_offer(message, key)


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
            out.append((_with_positions(seen[0], value.own, rank), seen[1]))
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
