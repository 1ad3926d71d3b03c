"""The structure key of a rank's offer: what the plan cache knows a structure by."""

from __future__ import annotations

import hashlib
import itertools
import operator
from array import array
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dckpt._plan import RankOffer


def structure_key(offer: RankOffer) -> bytes:
    """A digest of what a rank holds, ignoring contents: equal digests, reusable plan.

    Mesh positions are left out: within one group a rank's position in a mesh follows
    from the mesh's identity, which is in."""
    tensors = offer.tensors
    chunks = [t.chunks for t in tensors]
    boxes = list(map(_CHUNK_BOX, itertools.chain.from_iterable(chunks)))
    shapes = list(map(_SHAPE, tensors))
    keys = list(map(_KEY, tensors))
    # A key names a path, not the other way round ({"a": {"b": t}} and {"a.b": t}), and
    # the manifest records the path: it is part of the structure.
    paths = repr(tuple(map(_PATH, tensors))).encode()
    flat = itertools.chain.from_iterable
    # Columns hashed at C speed: a state of small tensors has tens of thousands.
    h = hashlib.blake2b(digest_size=16)
    for column in (
        "\0".join(keys).encode(),
        "\0".join(map(_DTYPE, tensors)).encode(),
        array("q", [*map(len, keys), *map(len, shapes), *map(len, chunks)]),
        array("q", map(_SHARDED, tensors)),
        array("q", flat(shapes)),
        array("q", flat(map(_OFFSETS, boxes))),
        array("q", flat(map(_SIZES, boxes))),
        paths,
        repr((offer.layouts, [(m.ident, m.shape) for m in offer.meshes])).encode(),
    ):
        h.update(len(column).to_bytes(8, "little"))
        h.update(column)
    return h.digest()


_KEY, _DTYPE, _SHAPE, _PATH = map(operator.attrgetter, ("key", "dtype", "shape", "path"))
_SHARDED, _CHUNK_BOX = operator.attrgetter("sharded"), operator.attrgetter("box")
_OFFSETS, _SIZES = operator.attrgetter("offsets"), operator.attrgetter("sizes")
