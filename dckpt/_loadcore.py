"""The collective load, whatever the checkpoint's format.

A format plugs in through :class:`Reader`: it reads and checks its own index (dckpt's
``manifest.json``, DCP's ``.metadata``), matches the leaves of a resolved state to what
it saved, reports a strict mismatch in its own words, checks that its files back the
planned reads, and does the reads. Everything around that is the same for every format
and lives here, once: the two coordinator phases, the cross-rank comparison of the
index bytes, the strict check, and putting values back and finishing Stateful objects
once the tensors are in.

Which format a path holds is decided once, above this module: ``dckpt._formats`` keeps
the registry of formats and their sniffs, and ``dckpt._api`` opens the format's reader
and hands it to :func:`run_load`.
"""

from __future__ import annotations

import bisect
import difflib
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch

from dckpt._coord import Coordinator, LocalCoordinator
from dckpt._errors import CorruptCheckpointError, StateMismatchError
from dckpt._format import PathPart
from dckpt._gc import paused_gc
from dckpt._state import Grower, Resolved, resolve

__all__ = [
    "FormatReader",
    "KeyInfo",
    "KeyReader",
    "LoadOptions",
    "LoadResult",
    "Matching",
    "Reader",
    "apply_loaded",
    "mismatch_message",
    "read_threads",
    "require_same",
    "run_load",
]


@dataclass(frozen=True)
class LoadResult:
    """What a load did not do; empty tuples mean the state matched the checkpoint exactly.

    ``dckpt.load`` returns it on every rank, describing that rank's state. With
    ``strict=True`` (the default) ``missing_keys`` and ``mismatched_keys`` are always
    empty, since either raises ``StateMismatchError`` instead.

    Attributes:
        missing_keys (`tuple[str, ...]`):
            Keys the state asked for that the checkpoint does not hold; their
            destinations were left untouched.
        unexpected_keys (`tuple[str, ...]`):
            Keys the checkpoint holds that the state did not ask for.
        mismatched_keys (`tuple[str, ...]`):
            Keys present in both with a different shape, dtype or kind (tensor against
            value), or saved per rank by another number of ranks; left untouched.

    Example:

    ```python
    import dckpt

    result = dckpt.load({"model": model}, "ckpt/step-1000", strict=False)
    if result.missing_keys:
        print("not in the checkpoint:", ", ".join(result.missing_keys))
    ```
    """

    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    mismatched_keys: tuple[str, ...] = ()


@dataclass
class Matching:
    """What planning a load found, in any format; each format's plan extends it with its reads.

    ``values`` are (setter, decoded value) pairs put back once the tensors are in;
    ``problems`` are the lines a strict load reports; ``unexpected`` holds the saved
    keys nothing asked for, sorted."""

    values: list[tuple[Callable[[object], None], object]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One saved key as a reader lists it (see :meth:`KeyReader.infos`).

    ``kind`` is ``"tensor"`` or ``"value"``; ``dtype`` (a torch dtype name without
    ``torch.``), ``shape`` and ``nbytes`` describe tensors; ``chunks`` counts the pieces a
    tensor was saved in; ``per_rank`` marks keys every rank saved its own copy of."""

    key: str
    path: tuple[PathPart, ...]
    kind: str
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    nbytes: int = 0
    chunks: int = 0
    per_rank: bool = False


P = TypeVar("P", bound=Matching)


class Reader(Protocol[P]):
    """What a checkpoint format provides to the collective load, on each rank.

    An instance is opened on one checkpoint, its index already read and validated (so
    opening raises, inside the first collective phase, for a damaged index). ``P`` is the
    format's plan: a :class:`Matching` plus whatever its reads need."""

    @property
    def location(self) -> str:
        """Where the checkpoint is, for messages."""
        ...

    @property
    def index_name(self) -> str:
        """What the index is called in a message, plural: ``"manifests"``."""
        ...

    @property
    def index_digest(self) -> int:
        """CRC-32C of the index bytes as read; ranks compare them to catch a replacement."""
        ...

    def grower(self, rank: int, world_size: int, *, allow_pickle: bool) -> Grower | None:
        """What ``resolve`` may grow the destination's containers from, if anything."""
        ...

    def plan(self, resolved: Resolved, rank: int, world_size: int, *, allow_pickle: bool) -> P:
        """Match the state's leaves to saved entries; collect mismatches, never raise for one."""
        ...

    def mismatch_message(self, plan: P) -> str:
        """The ``StateMismatchError`` text for a strict load whose plan found problems."""
        ...

    def check_files(self, plan: P) -> None:
        """Raise ``CorruptCheckpointError`` if the files cannot back the planned reads."""
        ...

    def read(self, plan: P, *, memory_budget: int, threads: int) -> None:
        """Fill the planned destination tensors."""
        ...


class KeyReader(Protocol):
    """Random access to a checkpoint, one key at a time (tools, conversion, ``dckpt diff``)."""

    @property
    def format(self) -> str: ...

    @property
    def location(self) -> str: ...

    @property
    def world_size(self) -> int: ...

    def infos(self) -> list[KeyInfo]: ...

    def keys(self) -> list[str]: ...

    def read_tensor(self, key: str, *, rank: int = 0) -> torch.Tensor: ...

    def read_value(self, key: str, *, rank: int = 0, allow_pickle: bool = False) -> Any: ...

    def verify(self, progress: Callable[[int], None] | None = None) -> list[str]: ...

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]: ...


class FormatReader(Reader[Any], KeyReader, Protocol):
    """What a format's ``open`` returns: a reader that loads and reads by key."""


@dataclass(frozen=True)
class _Prepared(Generic[P]):
    """One rank's state between the plan and the read phases."""

    reader: Reader[P]
    resolved: Resolved
    plan: P
    result: LoadResult


@dataclass(frozen=True)
class LoadOptions:
    """What ``dckpt.load`` was asked for, beyond the state and the checkpoint."""

    strict: bool
    allow_pickle: bool
    memory_budget: int


def run_load(
    open_reader: Callable[[], Reader[P]],
    state: Mapping[str, Any],
    coord: Coordinator | LocalCoordinator,
    phase: str,
    options: LoadOptions,
) -> LoadResult:
    """Load into ``state`` in place: collective over ``coord``'s ranks.

    ``open_reader`` runs inside the first phase, so a missing or damaged checkpoint
    fails on every rank alike."""
    prepared: list[_Prepared[P]] = []  # this rank's, once its plan phase has run

    def local_prepare() -> int:
        prepared.append(_prepare(open_reader(), state, coord, options))
        return prepared[0].reader.index_digest

    def same_index(digests: list[int]) -> None:
        reader = prepared[0].reader
        require_same(digests, reader.index_name, reader.location)

    with paused_gc():
        coord.exchange(f"{phase}-plan", local_prepare, same_index)
    done = prepared[0]
    coord.exchange(f"{phase}-read", lambda: _read(done, options.memory_budget))
    return done.result


def _prepare(
    reader: Reader[P],
    state: Mapping[str, Any],
    coord: Coordinator | LocalCoordinator,
    options: LoadOptions,
) -> _Prepared[P]:
    rank, world_size, allow_pickle = coord.rank, coord.world_size, options.allow_pickle
    saved = reader.grower(rank, world_size, allow_pickle=allow_pickle)
    resolved = resolve(state, strict=options.strict, saved=saved)
    plan = reader.plan(resolved, rank, world_size, allow_pickle=allow_pickle)
    if options.strict and (plan.missing or plan.problems):
        raise StateMismatchError(reader.mismatch_message(plan))
    reader.check_files(plan)
    result = LoadResult(
        tuple(sorted(plan.missing)), tuple(plan.unexpected), tuple(sorted(plan.mismatched))
    )
    return _Prepared(reader, resolved, plan, result)


def _read(done: _Prepared[P], memory_budget: int) -> None:
    done.reader.read(done.plan, memory_budget=memory_budget, threads=read_threads())
    apply_loaded(done.plan.values, done.resolved)


def apply_loaded(values: list[tuple[Callable[[object], None], object]], resolved: Resolved) -> None:
    """Once the tensors are in: put the non-tensor values back, then let every Stateful
    object (modules and optimizers through torch's helpers) take its state dict."""
    for setter, value in values:
        setter(value)
    for finish in resolved.finish:
        finish()


def require_same(digests: list[int], what: str, location: str) -> None:
    """Rank 0's check that every rank read the same bytes of the checkpoint's index."""
    if len(set(digests)) > 1:
        raise CorruptCheckpointError(
            f"ranks read different {what} at {location}: the checkpoint was replaced during "
            "the load; load again"
        )


def read_threads() -> int:
    """Threads one rank reads a load's data with."""
    return max(2, min(8, (os.cpu_count() or 2) * 2))


def mismatch_message(location: str, plan: Matching, unmatched: Collection[str] = ()) -> str:
    """A strict load's report; ``unmatched``: saved keys nothing asked for, the candidates
    named for a misspelt key."""
    lines = [f"the state does not match the checkpoint at {location}:"]
    if plan.missing:
        suggest = _suggester(unmatched)
        shown = ", ".join(repr(k) + suggest(k) for k in sorted(plan.missing)[:20])
        more = f" (and {len(plan.missing) - 20} more)" if len(plan.missing) > 20 else ""
        lines.append(f"  missing from the checkpoint: {shown}{more}")
    lines.extend(f"  {p}" for p in plan.problems[:20])
    if len(plan.problems) > 20:
        lines.append(f"  ... and {len(plan.problems) - 20} more")
    lines.append("Pass strict=False to load what matches and get the rest in the result.")
    return "\n".join(lines)


_NEAR = 256  # saved keys compared per misspelt key, each side of where it would sort


def _suggester(unmatched: Collection[str]) -> Callable[[str], str]:
    """``key -> " (did you mean 'x'?)"`` naming the closest unmatched saved keys, or "".

    difflib costs tens of microseconds a candidate, too slow for every key of a big
    checkpoint: compare only the keys that sort next to the misspelt one, forwards (a
    typo late in the key) and backwards (a typo early in it)."""
    keys = sorted(unmatched)
    rev = sorted(k[::-1] for k in keys) if len(keys) > 4 * _NEAR else []

    def suggest(key: str) -> str:
        if rev:
            pool = {*_around(keys, key)} | {k[::-1] for k in _around(rev, key[::-1])}
            near = sorted(pool)
        else:
            near = keys
        close = difflib.get_close_matches(key, near, n=3, cutoff=0.6)
        return f" (did you mean {' or '.join(repr(k) for k in close)}?)" if close else ""

    return suggest


def _around(keys: list[str], key: str) -> list[str]:
    i = bisect.bisect_left(keys, key)
    return keys[max(0, i - _NEAR) : i + _NEAR]
