"""The exceptions dckpt raises.

Every error derives from :class:`CheckpointError`; some also derive from the builtin
that matches, so ``except FileNotFoundError`` keeps working::

    CheckpointError(Exception)
    ├── CheckpointNotFoundError(FileNotFoundError)   no committed checkpoint at the path
    ├── CheckpointExistsError(FileExistsError)       a committed checkpoint is in the way
    ├── CorruptCheckpointError                       checksum, truncation, bad manifest
    │   └── UnsafeCheckpointError                    a path escapes the checkpoint, pickle refused
    ├── StateMismatchError(KeyError)                 requested keys absent, shape/dtype differ
    ├── UnsupportedStateError(TypeError)             a value dckpt cannot store as asked
    ├── StorageError(OSError)                        the disk or object store failed
    ├── ArgumentError(ValueError)                    a bad argument value: names it, says why
    │   └── ArgumentTypeError(TypeError)             an argument of the wrong type
    └── RankFailureError                             one or more ranks failed; keeps each error
        └── CheckpointTimeoutError(TimeoutError)     ranks did not arrive in time
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Mapping


class CheckpointError(Exception):
    """Base of every error raised by dckpt."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint at the path (missing, or a save that never committed)."""

    def __init__(self, message: str) -> None:
        CheckpointError.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint already exists where a save was asked to write."""

    def __init__(self, message: str) -> None:
        CheckpointError.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CorruptCheckpointError(CheckpointError):
    """The checkpoint's bytes are not what its manifest promises."""


class UnsafeCheckpointError(CorruptCheckpointError):
    """The checkpoint asks for something dckpt refuses to do (escape its directory, unpickle)."""


class StateMismatchError(CheckpointError, KeyError):
    """The state asked for does not match what the checkpoint holds."""

    def __str__(self) -> str:
        # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""


class UnsupportedStateError(CheckpointError, TypeError):
    """A value in the state cannot be stored the way it was asked."""


class StorageError(CheckpointError, OSError):
    """Reading or writing the underlying storage failed."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        CheckpointError.__init__(self, message)
        self.errno = errno

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def is_disk_full(self) -> bool:
        return self.errno in (_errno.ENOSPC, _errno.EDQUOT)

    def __reduce__(self) -> tuple[object, ...]:
        # Errors travel between ranks pickled; keep errno (an OSError slot, not in __dict__).
        return (_rebuild_storage_error, (type(self), str(self), self.errno))


class ArgumentError(CheckpointError, ValueError):
    """An argument to a dckpt call is invalid; the message names it and what is expected."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument to a dckpt call has the wrong type."""


class RankFailureError(CheckpointError):
    """A collective save or load failed on one or more ranks.

    ``failures`` maps each failing rank to the exception it raised there (or a
    :class:`RemoteError` standing in for one that could not be sent across).
    """

    def __init__(self, message: str, failures: Mapping[int, BaseException] | None = None) -> None:
        super().__init__(message)
        self.failures: dict[int, BaseException] = dict(failures or {})

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.failures))


class CheckpointTimeoutError(RankFailureError, TimeoutError):
    """Some ranks did not reach a collective step within the timeout."""

    def __init__(
        self,
        message: str,
        missing_ranks: tuple[int, ...] = (),
        failures: Mapping[int, BaseException] | None = None,
    ) -> None:
        RankFailureError.__init__(self, message, failures)
        self.missing_ranks = missing_ranks

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.missing_ranks, self.failures))


class RemoteError(CheckpointError):
    """Stands in for another rank's exception that could not be transported as itself."""

    def __init__(self, type_name: str, message: str, traceback_text: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.remote_message = message
        self.traceback_text = traceback_text

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.type_name, self.remote_message, self.traceback_text))


def _rebuild_storage_error(
    cls: type[StorageError], message: str, errno: int | None
) -> StorageError:
    return cls(message, errno=errno)
