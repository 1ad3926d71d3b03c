"""The blobs coordination puts in the store, and reading them back on rank 0.

See ``dckpt._coord`` for the protocol. A blob's first byte says what it holds: bytes as
they are, the first copy of a :class:`Shared` content or a reference to it, or (failures
and values other than bytes) a pickle.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from dataclasses import dataclass
from typing import Any

from dckpt._failures import Failure

OK = "ok"
FAIL = "fail"
# Frame tags: the first byte of every blob in the store.
_PICKLED, _BYTES, _FIRST, _REF = b"P", b"B", b"F", b"R"
_DIGEST = 16
_OWN_LEN = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Shared:
    """An exchange value whose ``common`` part travels once among ranks holding equal
    bytes; ``own`` (small, rank-specific) always travels. ``reduce`` receives them with
    equal ``common`` parts as one object."""

    common: bytes
    own: bytes = b""


def content_digest(blob: bytes) -> bytes:
    return hashlib.blake2b(blob, digest_size=_DIGEST).digest()


def outcome(value: Any, local_exc: BaseException | None) -> tuple[bytes, BaseException | None]:
    """What a follower sends: its value, or its failure (an unpicklable value is one)."""
    if local_exc is None:
        try:
            return encode(OK, value), None
        except Exception as exc:
            local_exc = exc
    return encode(FAIL, Failure.of(local_exc)), local_exc


def sort_outcomes(
    outcomes: dict[int, bytes],
    values: list[Any],
    failures: dict[int, Failure],
    commons: dict[bytes, bytes],
) -> set[bytes]:
    """Decode the followers' outcomes into ``values`` (by rank) or ``failures``; a
    reference becomes the ``Shared`` of the content it names (``commons``: digest ->
    content, rank 0's own included). Returns every digest counted in the store."""
    refs: dict[int, tuple[bytes, bytes]] = {}
    for rank, blob in outcomes.items():
        tag = blob[:1]
        try:
            if tag in (_FIRST, _REF):
                digest = blob[1 : 1 + _DIGEST]
                if len(digest) != _DIGEST:
                    raise ValueError("a shared frame is truncated")
                if tag == _REF:
                    refs[rank] = (digest, blob[1 + _DIGEST :])
                    continue
                (n,) = _OWN_LEN.unpack_from(blob, 1 + _DIGEST)
                start = 1 + _DIGEST + _OWN_LEN.size
                own, common = blob[start : start + n], blob[start + n :]
                values[rank] = Shared(commons.setdefault(digest, common), own)
                continue
            kind, payload = decode(blob)
        except Exception as exc:
            failures[rank] = Failure.of(exc, f"rank {rank}'s outcome did not decode")
            continue
        if kind == OK:
            values[rank] = payload
        else:
            failures[rank] = payload
    for rank, (digest, own) in refs.items():
        shared = commons.get(digest)
        if shared is None:  # its sender failed or is missing: that is reported already
            failures.setdefault(rank, Failure.of(RuntimeError("shared content never arrived")))
        else:
            values[rank] = Shared(shared, own)
    return set(commons) | {d for d, _ in refs.values()}


def claim_key(base: str, digest: bytes) -> str:
    return f"{base}/claim/{digest.hex()}"


def shared_frame(digest: bytes, value: Shared, *, first: bool) -> bytes:
    """The first rank with this content sends it; the others refer to it by digest."""
    if first:
        return _FIRST + digest + _OWN_LEN.pack(len(value.own)) + value.own + value.common
    return _REF + digest + value.own


def encode(kind: str, payload: Any) -> bytes:
    if kind == OK and type(payload) is bytes:
        return _BYTES + payload
    # Failures (exceptions with their tracebacks, see dckpt._failures) and values other
    # than bytes (the load's and the manager's small ones) are pickled; see the module doc.
    return _PICKLED + pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)


def decode(blob: bytes) -> tuple[str, Any]:
    tag = blob[:1]
    if tag == _BYTES:
        return OK, blob[1:]
    if tag != _PICKLED:
        raise ValueError(f"unknown frame tag {tag!r}")
    kind, payload = pickle.loads(blob[1:])
    return str(kind), payload
