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
    """Base of every error raised by dckpt.

    Catch it to handle any dckpt failure in one place; the subclasses say what went wrong,
    and each message names the key, file or rank involved and what to do about it.

    Example:
        ```python
        try:
            dckpt.load(state, path)
        except dckpt.CheckpointError as exc:
            print(f"cannot resume from {path}: {exc}")
        ```
    """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint at the path: it is missing, or its save never committed.

    Raised by [`dckpt.load`][dckpt.load], by
    [`CheckpointManager.load`][dckpt.CheckpointManager.load] for a ``step`` that has not
    committed, and by ``dckpt.convert`` for a missing source. The message says which
    (a directory holding data but no manifest is a save that crashed or is still
    running). Check the path, or load another step; also a ``FileNotFoundError``.

    Example:
        ```python
        try:
            dckpt.load(state, "ckpt/step-1000")
        except dckpt.CheckpointNotFoundError:
            print("no checkpoint yet: starting from scratch")
        ```
    """

    def __init__(self, message: str) -> None:
        CheckpointError.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint already exists where a save or conversion was to write.

    Raised by [`dckpt.save`][dckpt.save] and [`dckpt.async_save`][dckpt.async_save]
    without ``overwrite=True``, and by ``dckpt.convert`` onto an existing destination.
    Pass ``overwrite=True`` (the old checkpoint stays loadable until the new one
    commits) or pick another path; also a ``FileExistsError``.

    Example:
        ```python
        try:
            dckpt.save(state, path)
        except dckpt.CheckpointExistsError:
            dckpt.save(state, path, overwrite=True)
        ```
    """

    def __init__(self, message: str) -> None:
        CheckpointError.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CorruptCheckpointError(CheckpointError):
    """The checkpoint's bytes are not what its manifest promises.

    Raised by a load (or ``dckpt verify``) when a checksum fails, a file is truncated or
    missing, or the manifest does not parse; the message names the file and the key.
    The checkpoint cannot be trusted: load an older one (a
    [`CheckpointManager`][dckpt.CheckpointManager] keeps several), and look for what
    damaged it (a disk, a copy that was cut short).

    Example:
        ```python
        try:
            dckpt.load(state, manager.path_of(step))
        except dckpt.CorruptCheckpointError as exc:
            print(f"step {step} is damaged ({exc}); trying an older one")
        ```
    """


class UnsafeCheckpointError(CorruptCheckpointError):
    """The checkpoint asks for something dckpt refuses to do: escape its directory, unpickle.

    Raised by a load when the manifest names a file outside the checkpoint (a path with
    ``..``, an absolute path, a symbolic link that leads out), or when a value was saved
    pickled and ``allow_pickle=True`` was not passed. For a pickled value from a source
    you trust, load with ``allow_pickle=True``; anything else means the checkpoint was
    tampered with or damaged.

    Example:
        ```python
        try:
            dckpt.load(state, path)
        except dckpt.UnsafeCheckpointError:
            dckpt.load(state, path, allow_pickle=True)  # only for a checkpoint you trust
        ```
    """


class StateMismatchError(CheckpointError, KeyError):
    """The state asked for does not match what the checkpoint holds.

    Raised by a load with ``strict=True`` when keys of ``state`` are absent from the
    checkpoint (the message suggests the closest saved keys) or a shape or dtype
    differs (it shows the saved and the requested one), and by a load under another
    world size of a key whose value differs between the saving ranks. Fix the state to
    match, or load with ``strict=False`` and read the returned
    [`LoadResult`][dckpt.LoadResult]; also a ``KeyError``.

    Example:
        ```python
        try:
            dckpt.load(state, path)
        except dckpt.StateMismatchError:
            result = dckpt.load(state, path, strict=False)
            print("not loaded:", result.missing_keys, result.mismatched_keys)
        ```
    """

    def __str__(self) -> str:
        # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""


class UnsupportedStateError(CheckpointError, TypeError):
    """A value in the state cannot be stored the way it was asked.

    Raised by a save (or a load, for the destination) when a value is neither a tensor
    nor plain data and ``allow_pickle`` is off, when the state refers back to itself or
    nests more than 100 levels, when two entries flatten to the same key, or when an
    optimizer cannot be paired with its module. The message names the key and the way
    out (``allow_pickle=True``, [`OptimizerState`][dckpt.OptimizerState], a rename);
    also a ``TypeError``.

    Example:
        ```python
        try:
            dckpt.save({"model": model, "sampler": sampler}, path)
        except dckpt.UnsupportedStateError:
            dckpt.save({"model": model, "sampler": sampler}, path, allow_pickle=True)
        ```
    """


class StorageError(CheckpointError, OSError):
    """Reading or writing the underlying storage failed.

    Raised for a failed disk operation (permissions, a full disk, an I/O error) or an
    object store request that failed after its retries or stopped answering; the message
    names the file and the operation. A failed save leaves the checkpoint it replaces
    intact, so free space or fix access and save again; also an ``OSError``.

    Attributes:
        errno: The ``errno`` of the operating system's error, or None (object stores).

    Example:
        ```python
        try:
            dckpt.save(state, path)
        except dckpt.StorageError as exc:
            if exc.is_disk_full:
                delete_old_checkpoints()
            raise
        ```
    """

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        CheckpointError.__init__(self, message)
        self.errno = errno

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def is_disk_full(self) -> bool:
        """Whether the device or the quota is full (``ENOSPC``, ``EDQUOT``)."""
        return self.errno in (_errno.ENOSPC, _errno.EDQUOT)

    def __reduce__(self) -> tuple[object, ...]:
        # Errors travel between ranks pickled; keep errno (an OSError slot, not in __dict__).
        return (_rebuild_storage_error, (type(self), str(self), self.errno))


class ArgumentError(CheckpointError, ValueError):
    """An argument to a dckpt call is invalid; the message names it and what is expected.

    Raised before anything is read or written (``timeout=0``, ``keep_last=-1``, an empty
    path). Fix the argument; also a ``ValueError``.

    Example:
        ```python
        try:
            dckpt.CheckpointManager("runs/exp1", keep_last=-1)
        except dckpt.ArgumentError as exc:
            print(exc)  # names keep_last and the values it accepts
        ```
    """


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument to a dckpt call has the wrong type; the message names it.

    Raised before anything is read or written (``overwrite="no"``, a ``step`` given as a
    string, or passed by position to
    [`CheckpointManager.load`][dckpt.CheckpointManager.load]). Pass the type the message
    asks for; also a ``TypeError``.

    Example:
        ```python
        try:
            manager.load(state, 1000)
        except dckpt.ArgumentTypeError:
            manager.load(state, step=1000)
        ```
    """


class RankFailureError(CheckpointError):
    """A collective save or load failed on one or more ranks.

    Raised on every rank alike, so that all of them stop together; the message lists
    each failing rank with its error, and ``failures`` keeps the original exceptions.
    A failed save commits nothing and leaves the checkpoint it replaces intact. Look at
    the failing rank's exception (``failures[rank]``) for the cause. In a single process
    the original exception is raised instead.

    Attributes:
        failures: Each failing rank's exception, by rank (a
            [`RemoteError`][dckpt.RemoteError] stands in for one that could not be sent
            across).

    Example:
        ```python
        try:
            dckpt.save(state, path)
        except dckpt.RankFailureError as exc:
            for rank, error in exc.failures.items():
                print(rank, type(error).__name__, error)
        ```
    """

    def __init__(self, message: str, failures: Mapping[int, BaseException] | None = None) -> None:
        super().__init__(message)
        self.failures: dict[int, BaseException] = dict(failures or {})

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.failures))


class CheckpointTimeoutError(RankFailureError, TimeoutError):
    """Some ranks did not reach a collective step within the timeout.

    Raised on the ranks that arrived, after ``timeout`` seconds, when other ranks died,
    hung or are not calling the same save or load; the message names them. Check those
    ranks' logs; raise ``timeout`` only if they are merely slow (a very large state on
    slow storage). Also a ``TimeoutError``.

    Attributes:
        missing_ranks: The ranks that never arrived.
        failures: As for [`RankFailureError`][dckpt.RankFailureError]: the ranks that
            arrived but failed.

    Example:
        ```python
        try:
            dckpt.load(state, path, timeout=300)
        except dckpt.CheckpointTimeoutError as exc:
            print("ranks", exc.missing_ranks, "never arrived")
        ```
    """

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
    """Stands in for another rank's exception that could not be transported as itself.

    Found in [`RankFailureError.failures`][dckpt.RankFailureError] when the exception
    raised on a rank does not pickle: it keeps that exception's type name, message and
    traceback as text. It is not raised by itself.

    Attributes:
        type_name: The name of the original exception's type.
        remote_message: The original message.
        traceback_text: The traceback on the rank that raised it.

    Example:
        ```python
        for rank, error in exc.failures.items():
            if isinstance(error, dckpt.RemoteError):
                print(f"rank {rank}:", error.traceback_text)
        ```
    """

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
