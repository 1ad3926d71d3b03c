"""How a failure travels between ranks, and the error every rank then raises.

An exception is sent as itself when it pickles and always as text; the leader publishes
a :class:`Record` of every rank's failure and of the ranks that never arrived, and each
rank turns that record into one :class:`RankFailureError` (or its timeout subclass) that
keeps its own original exception.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

from dckpt._errors import CheckpointTimeoutError, RankFailureError, RemoteError

# Remote tracebacks attached as notes to the raised error; more would drown the message.
_MAX_TRACEBACK_NOTES = 3


@dataclass(frozen=True)
class Failure:
    """An exception as it travels: the object if it pickles, and text that always does."""

    type_name: str
    message: str
    traceback_text: str
    pickled: bytes | None

    @classmethod
    def of(cls, exc: BaseException, context: str = "") -> Failure:
        try:
            pickled: bytes | None = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            pickled = None
        message = f"{context}: {exc}" if context else str(exc)
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(type(exc).__name__, message, text, pickled)

    def describe(self) -> str:
        return f"{self.type_name}: {self.message}"

    def to_exception(self) -> BaseException:
        if self.pickled is not None:
            try:
                exc = pickle.loads(self.pickled)
            except Exception:
                pass
            else:
                if isinstance(exc, BaseException):
                    return exc
        return RemoteError(self.type_name, self.message, self.traceback_text)


@dataclass(frozen=True)
class Record:
    """What the leader publishes instead of a result when the exchange failed."""

    phase: str
    failures: dict[int, Failure]
    missing: tuple[int, ...]
    timeout: float


def _ranks_text(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def failure_message(
    phase: str, described: dict[int, str], missing: tuple[int, ...], timeout: float
) -> str:
    parts = []
    if missing:
        parts.append(
            f"{_ranks_text(missing)} did not reach {phase!r} within {timeout:.1f} s "
            "(dead, hung, or not calling save/load)"
        )
    if len(described) == 1 and not missing:
        ((rank, text),) = described.items()
        parts.append(f"{phase!r} failed on rank {rank}: {text}")
    elif described:
        lines = [f"{phase!r} failed on {_ranks_text(sorted(described))}:"]
        lines += [f"  rank {r}: {described[r]}" for r in sorted(described)]
        parts.append("\n".join(lines))
    return "\n".join(parts)


def failure_error(record: Record, local_exc: BaseException | None, rank: int) -> RankFailureError:
    """Build the error every rank raises; the local exception stays the original object."""
    failures = {r: f.to_exception() for r, f in record.failures.items()}
    described = {r: f.describe() for r, f in record.failures.items()}
    if local_exc is not None:
        failures[rank] = local_exc
        described.setdefault(rank, Failure.of(local_exc).describe())
    message = failure_message(record.phase, described, record.missing, record.timeout)
    failures = dict(sorted(failures.items()))
    err: RankFailureError
    if record.missing:
        err = CheckpointTimeoutError(message, record.missing, failures)
    else:
        err = RankFailureError(message, failures)
    remote = [r for r in sorted(record.failures) if r != rank]
    if hasattr(err, "add_note"):  # Python 3.11+
        for r in remote[:_MAX_TRACEBACK_NOTES]:
            err.add_note(
                f"--- traceback on rank {r} ---\n{record.failures[r].traceback_text.rstrip()}"
            )
    return err
