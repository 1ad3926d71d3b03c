"""The container every coordination message travels in (see :mod:`dckpt._wire`): a magic,
a tag, the section lengths, a JSON header and little-endian integer columns, with the
checked primitives that encode and decode their parts."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import struct
import sys
from array import array
from collections.abc import Iterable
from typing import Any

from dckpt._errors import CheckpointError

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


def path_in(raw: object) -> tuple[str | int, ...]:
    if type(raw) is not list or any(type(p) not in (str, int) for p in raw):
        raise ValueError("a key path is not a list of strings and integers")
    return tuple(raw)


def paths_in(raw: object) -> list[tuple[str | int, ...]]:
    if type(raw) is not list or any(type(p) is not list for p in raw):
        raise ValueError("the key paths are not lists")
    if not set(map(type, itertools.chain.from_iterable(raw))) <= {str, int}:
        raise ValueError("a key path holds something other than strings and integers")
    return [tuple(p) for p in raw]


def shape_in(raw: object) -> tuple[int, ...]:
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


def check_fields(obj: object, known: tuple[str, ...]) -> None:
    """HOOK: a field added to a dataclass that travels must be added to its codec here."""
    if obj is None:
        return
    extra = [f.name for f in dataclasses.fields(obj) if f.name not in known]  # type: ignore[arg-type]
    if extra:
        raise TypeError(
            f"internal error: dckpt._wire does not encode {type(obj).__name__}.{extra[0]}"
        )
