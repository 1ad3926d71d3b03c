"""The entry points that take a checkpoint's path: :func:`load` and :func:`open_checkpoint`.

They sit above the engine and ``dckpt.interop``: each opens the storage once, asks the
format registry (``dckpt._formats``) which format it holds, and hands that format's
reader to the collective load core (``dckpt._loadcore.run_load``) or to the caller.
Torch DCP's format is registered here, from interop, so the engine never imports it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from dckpt._args import check_bool, check_collective, check_int
from dckpt._coord import DEFAULT_TIMEOUT, coordinator_for
from dckpt._formats import DCKPT_FORMAT, CheckpointFormat, format_of, register_format
from dckpt._loadcore import FormatReader, LoadOptions, LoadResult, run_load
from dckpt._read import DEFAULT_MEMORY_BUDGET
from dckpt.interop._dcp import DCP_FORMAT
from dckpt.storage import Storage, open_storage

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["LoadResult", "load", "open_checkpoint"]

register_format(DCP_FORMAT)  # sniffed after dckpt's: a manifest.json makes a dckpt checkpoint


def load(
    state: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    process_group: ProcessGroup | None = None,
    strict: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    allow_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> LoadResult:
    """Load a dckpt or torch DCP checkpoint into ``state``, in place, on every rank.

    Collective: every rank of ``process_group`` calls it with its own ``state`` (keys may
    differ between ranks); with no process group it works in one plain process. Each
    rank reads only the bytes that overlap what its tensors and DTensor shards hold, so a
    checkpoint saved under one world size or sharding loads under any other. Modules and
    optimizers take their state through torch's state-dict helpers; other Stateful objects
    through ``load_state_dict``; plain values are put back into their dicts and lists.
    Every byte read is checked against its CRC-32C (dckpt checkpoints). If the load
    fails, the state may be partly loaded: load again, or rebuild it.

    Args:
        state (`Mapping[str, Any]`):
            What to load into: a dict of tensors, DTensors, modules, optimizers, Stateful
            objects and plain values, as given to ``save``.
        path (`str` or `os.PathLike`):
            The checkpoint: a local directory, or a ``file://`` or fsspec URL (``s3://``).
        process_group (`torch.distributed.ProcessGroup`, *optional*):
            The ranks that load together; None means the default group when
            ``torch.distributed`` is initialised, else this process alone.
        strict (`bool`, *optional*, defaults to `True`):
            Raise when a requested key is absent from the checkpoint or differs in shape,
            dtype or kind; with `False`, load what matches and report the rest.
        timeout (`float`, *optional*, defaults to 600.0):
            Seconds to wait for the slowest rank before naming the missing ones.
        allow_pickle (`bool`, *optional*, defaults to `False`):
            Unpickle values that were saved pickled; only for checkpoints you trust.
        storage_options (`dict`, *optional*):
            Options for the storage backend (endpoint, credentials, ...); dckpt's own
            knobs go under the ``"dckpt"`` key.
        memory_budget (`int`, *optional*, defaults to 1 GiB):
            Bytes of read buffers (and, for DCP, decoded archives) one rank may hold at once.

    Returns:
        `LoadResult`: this rank's missing, unexpected and mismatched keys; all empty when
        the state matched the checkpoint exactly.

    Raises:
        ArgumentError: an argument has a bad value (also a `ValueError`); nothing was read.
        ArgumentTypeError: an argument has a bad type (also a `TypeError`).
        CheckpointNotFoundError: nothing, or an uncommitted save, is at ``path``.
        StateMismatchError: with ``strict=True``, the state does not match; the message
            names every such key (and the closest saved keys for an absent one).
        CorruptCheckpointError: the checkpoint is damaged (a bad manifest, a missing or
            truncated file, a failed checksum) or was replaced during the load.
        UnsafeCheckpointError: a value needs unpickling and ``allow_pickle`` is False, or
            the checkpoint reaches outside its directory.
        StorageError: the storage failed (I/O error, an object store that stopped
            answering).
        RankFailureError: another rank failed; its exception is in ``.failures``.
        CheckpointTimeoutError: a rank did not arrive within ``timeout``; it is named.

    Example:

    ```python
    import dckpt

    state = {"model": model, "optimizer": optim, "step": 0}
    dckpt.load(state, "ckpt/step-1000")  # in place, on every rank
    print(state["step"])
    ```
    """
    check_collective(
        state=state,
        path=path,
        process_group=process_group,
        timeout=timeout,
        storage_options=storage_options,
        allow_pickle=allow_pickle,
    )
    check_bool("strict", strict)
    check_int("memory_budget", memory_budget, minimum=1)
    coord = coordinator_for(process_group, timeout=timeout)
    fmt, open_reader = _detect(path, storage_options)
    options = LoadOptions(strict=strict, allow_pickle=allow_pickle, memory_budget=memory_budget)
    return run_load(open_reader, state, coord, fmt.phase, options)


def _detect(
    path: str | os.PathLike[str], storage_options: dict[str, Any] | None
) -> tuple[CheckpointFormat, Callable[[], FormatReader]]:
    """The format at ``path`` and how to open its reader, with the storage opened once.

    Opening is left to the load's first collective phase, and so is a failure to open
    the storage: every rank then reports it alike, as dckpt's format (the fallback)."""
    try:
        storage = open_storage(path, storage_options)
    except Exception as exc:
        failure = exc

        def fail() -> FormatReader:
            raise failure

        return DCKPT_FORMAT, fail
    fmt = format_of(storage)
    return fmt, functools.partial(fmt.open, storage)


def open_checkpoint(
    path: str | os.PathLike[str] | Storage, storage_options: dict[str, Any] | None = None
) -> FormatReader:
    """Open a dckpt or torch DCP checkpoint for reading one key at a time.

    Unlike :func:`load`, which fills a state in place and is collective, a reader works
    in one process and materialises one whole tensor at a time, so tools stream a
    checkpoint with memory near its largest tensor. Opening reads and validates the
    index (``manifest.json`` or DCP's ``.metadata``); data files are read only when a key
    is.

    Args:
        path (`str`, `os.PathLike` or `Storage`):
            The checkpoint: a local directory, or a ``file://`` or fsspec URL.
        storage_options (`dict`, *optional*):
            Options for the storage backend (endpoint, credentials, ...).

    Returns:
        `FormatReader`: a ``CheckpointReader`` (``reader.format == "dckpt"``) or a
        ``DcpReader`` (``"dcp"``), with ``location``, ``world_size``, ``infos()``,
        ``keys()``, ``read_tensor(key)``, ``read_value(key)``, ``iter_tensors()`` and
        ``verify()``.

    Raises:
        CheckpointNotFoundError: nothing, or an uncommitted save, is at ``path``.
        CorruptCheckpointError: the index is damaged or inconsistent.
        UnsafeCheckpointError: the index reaches outside the checkpoint or, for DCP, asks
            for classes its metadata never holds.
        StorageError: the storage failed.

    Example:

    ```python
    from dckpt._api import open_checkpoint

    reader = open_checkpoint("ckpt/step-1000")
    for key, tensor in reader.iter_tensors():
        print(key, tuple(tensor.shape))
    assert not reader.verify()
    ```
    """
    storage = open_storage(path, storage_options)
    return format_of(storage).open(storage)
