"""Whole-manifest rules of the validator: strict JSON, exact tiling, unshared bytes, values.

A manifest is untrusted input, and ``load``, ``verify`` and every tool read it through
``_format.manifest_from_bytes``, which applies these rules, so they all accept exactly the
same checkpoints. Field-by-field checks live in ``_format``; the rules here look at many
entries at once. Each runs on every manifest read, so each is hash- or sort-based, O(n log n)
in the number of chunks (a manifest may hold hundreds of thousands): no pairwise loops.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dckpt._errors import CorruptCheckpointError, UnsafeCheckpointError
from dckpt._layout import key_id
from dckpt._values import TAG, decode_value

if TYPE_CHECKING:
    from dckpt._format import ChunkRecord, TableRecord, TensorEntry

Span = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes) of one chunk

# Corner counting (below) costs 2**k per chunk for a tensor cut along k dimensions. Writers
# cut along at most one dimension per device-mesh axis; a layout past this many corners is
# refused instead of checked, so a hostile manifest cannot make the check slow.
MAX_CORNERS = 1 << 22


class StrictJSONError(ValueError):
    """JSON that parses but that the format forbids (repeated keys, non-finite numbers)."""


# --------------------------------------------------------------------------- strict JSON


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: a repeated member name is an error, not "the last one wins"."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise StrictJSONError(f"the key {k!r} appears twice in one JSON object")
            seen.add(k)
    return d


def finite_float(text: str) -> float:
    """``parse_float``: ``1e999`` would silently become infinity, which the format forbids."""
    x = float(text)
    if not math.isfinite(x):
        raise StrictJSONError(f"the number {text[:40]} is out of the range of a finite double")
    return x


def reject_constant(name: str) -> None:
    """``parse_constant``: ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON."""
    raise StrictJSONError(f"non-standard JSON constant {name}")


def strict_json(text: str) -> Any:
    """``json.loads`` with every rule above; raises ValueError (StrictJSONError for those)."""
    return json.loads(
        text,
        object_pairs_hook=unique_keys,
        parse_float=finite_float,
        parse_constant=reject_constant,
    )


# --------------------------------------------------------------------------- tiling


def tiling_problem(shape: tuple[int, ...], chunks: Sequence[ChunkRecord]) -> str | None:
    """Why the chunks (in bounds) do not tile ``shape``, as the end of a sentence, or None.

    Each rank's chunks must tile on their own; chunks without a rank form one group.
    """
    if len(chunks) == 1 and chunks[0].sizes == shape:  # the common case: one whole chunk
        return None
    by_rank: dict[int | None, list[Span]] = {}
    for c in chunks:
        by_rank.setdefault(c.rank, []).append((c.offsets, c.sizes))
    for rank, spans in by_rank.items() if by_rank else [(None, [])]:
        problem = _span_problem(shape, spans)
        if problem is not None:
            whose = "" if rank is None else f" of rank {rank}"
            return f"{whose} do not tile the shape {list(shape)} exactly: {problem}"
    return None


def _span_problem(shape: tuple[int, ...], spans: list[Span]) -> str | None:
    """Why ``spans`` (in bounds, sizes >= 0) do not cover ``shape`` exactly once, or None.

    Equal element counts are not enough: two copies of one half hold as many elements as
    both halves. Dimensions no chunk cuts are left out; one cut dimension must be a chain
    of intervals, and a grid (each cut dimension one chain, every combination stored once)
    tiles. Any other layout gets the exact general test, corner counting: the boxes tile
    iff the sum of their indicator functions is the tensor's. The d-dimensional difference
    of both sides (an invertible map) turns each box into its 2**d corners, signed
    ``(-1)**(number of upper bounds)``, so they tile iff their signed corners cancel down
    to the tensor's own.
    """
    total = math.prod(shape)
    if total == 0:
        return None  # every in-bounds chunk of an empty tensor is empty
    full = [s for s in spans if 0 not in s[1]]  # empty chunks hold no element
    covered = sum(math.prod(sizes) for _, sizes in full)
    if covered != total:
        return f"they hold {covered} elements, the shape {list(shape)} holds {total}"
    if len(full) == 1:
        return None  # one in-bounds box as large as the tensor is the tensor
    intervals = [{(o[d], s[d]) for o, s in full} for d in range(len(shape))]
    cut = [d for d, n in enumerate(shape) if intervals[d] != {(0, n)}]
    if len(cut) == 1:
        return _chain_problem(shape[cut[0]], [(o[cut[0]], s[cut[0]]) for o, s in full], cut[0])
    if math.prod(len(intervals[d]) for d in cut) == len(full) == len(set(full)) and all(
        _chain_problem(shape[d], list(intervals[d]), d) is None for d in cut
    ):
        return None
    if len(full) << len(cut) > MAX_CORNERS:
        return (
            f"{len(full)} chunks cut it along {len(cut)} dimensions, more than a reader "
            "checks; no dckpt writer produces such a layout"
        )
    return _corner_problem(shape, full, cut)


def _chain_problem(extent: int, intervals: list[tuple[int, int]], dim: int) -> str | None:
    """Why the (start, size) intervals, sizes > 0, do not partition ``[0, extent)``."""
    intervals.sort()
    end = 0
    for start, size in intervals:
        if start != end:
            what = "overlap" if start < end else "leave a gap"
            return f"chunks {what} along dimension {dim} at index {min(start, end)}"
        end = start + size
    return None if end == extent else f"chunks stop at index {end} of dimension {dim}"


def _corner_problem(shape: tuple[int, ...], full: list[Span], cut: list[int]) -> str | None:
    k = len(cut)
    # itertools.product picks lower/upper bounds like binary digits, upper = 1: a corner's
    # sign is the parity of its upper bounds.
    odd = [bin(m).count("1") % 2 for m in range(1 << k)]
    even = [1 - p for p in odd]
    plus: Counter[tuple[int, ...]] = Counter()
    minus: Counter[tuple[int, ...]] = Counter()
    for offsets, sizes in full:
        corners = list(itertools.product(*[(offsets[d], offsets[d] + sizes[d]) for d in cut]))
        plus.update(itertools.compress(corners, even))
        minus.update(itertools.compress(corners, odd))
    # The tensor's corners go on the other side, so an exact tiling balances.
    corners = list(itertools.product(*[(0, shape[d]) for d in cut]))
    minus.update(itertools.compress(corners, even))
    plus.update(itertools.compress(corners, odd))
    if plus == minus:
        return None
    twice = [s for s, n in Counter(full).items() if n > 1]
    if twice:
        return f"the box {_box_text(twice[0])} is stored more than once"
    return "chunks overlap one another and leave as many elements uncovered"


def _box_text(span: Span) -> str:
    return "[" + ", ".join(f"{o}:{o + s}" for o, s in zip(*span, strict=True)) + "]"


# --------------------------------------------------------------------------- shared bytes


def shared_bytes_problem(chunks_by_key: Mapping[str, Sequence[ChunkRecord]]) -> str | None:
    """Why the chunks' byte ranges overlap, or None.

    Disjoint ranges inside their files (checked per chunk) mean a manifest never describes
    more bytes than its files hold, so no reader allocates more than the files' size.
    """
    # Writers lay chunks out in key order, so in a written manifest each file's chunks come
    # in increasing offsets: one pass proves that; anything else gets sorted.
    last: dict[str, int] = {}
    for chunks in chunks_by_key.values():
        for c in chunks:
            if c.nbytes:
                if c.offset < last.get(c.file, 0):
                    return _sorted_shared_bytes_problem(chunks_by_key)
                last[c.file] = c.offset + c.nbytes
    return None


def _sorted_shared_bytes_problem(chunks_by_key: Mapping[str, Sequence[ChunkRecord]]) -> str | None:
    by_file: dict[str, list[tuple[int, int]]] = {}
    for chunks in chunks_by_key.values():
        for c in chunks:
            if c.nbytes:  # an empty range shares nothing, wherever it points
                by_file.setdefault(c.file, []).append((c.offset, c.offset + c.nbytes))
    for name, spans in by_file.items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            if start < end:
                keys = sorted(
                    {
                        k
                        for k, chunks in chunks_by_key.items()
                        for c in chunks
                        if c.file == name and c.nbytes and c.offset <= start < c.offset + c.nbytes
                    }
                )
                whose = "key" if len(keys) == 1 else "keys"
                names = ", ".join(map(repr, keys))
                return f"several chunks of {whose} {names} claim byte {start} of {name!r}"
    return None


# --------------------------------------------------------------------------- version 2


def layout_files_problem(
    tensors: Mapping[str, TensorEntry], tables: Sequence[TableRecord]
) -> str | None:
    """Why the layout entries and tables conflict, or None: tables own their data files
    (no chunk entry may point into one), and rows name tensors by key id, which must
    therefore be unambiguous. O(entries + chunks)."""
    in_tables = {f for t in tables for f in t.files}
    ids: dict[int, str] = {}
    for key, t in tensors.items():
        if t.layout is not None:
            other = ids.setdefault(key_id(key), key)
            if other != key:
                return f"keys {other!r} and {key!r} have the same key id; rename one"
        elif in_tables:
            for c in t.chunks:
                if c.file in in_tables:
                    return f"key {key!r}: chunk points into {c.file!r}, a table's file"
    return None


# --------------------------------------------------------------------------- values


def check_value(data: Any, key: str) -> None:
    """Decode ``data`` as a load would, raising CorruptCheckpointError if that would fail.

    Pickled objects are the exception: their base64 is checked, but running them is the
    only way to know more, and a validator never does that.
    """
    try:
        decode_value(data, key, allow_pickle=False)
    except UnsafeCheckpointError:  # a pickle: check everything around it
        decode_value(_without_pickles(data, key), key, allow_pickle=False)


def _without_pickles(data: Any, key: str) -> Any:
    if isinstance(data, list):
        return [_without_pickles(v, key) for v in data]
    if not isinstance(data, dict):
        return data
    if data.get(TAG) == "pickle":
        try:
            base64.b64decode(data["b64"], validate=True)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"the value stored at key {key!r} is malformed: bad pickle data ({exc})"
            ) from None
        return None
    return {k: _without_pickles(v, key) for k, v in data.items()}
