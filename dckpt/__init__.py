"""dckpt: distributed checkpointing for PyTorch.

``dckpt.save(state, path)`` and ``dckpt.load(state, path)`` are collective over the
ranks of a process group (or work in one plain process); see ``docs/format.md`` for
what lands on disk.
"""

from __future__ import annotations

from dckpt._api import LoadResult, load
from dckpt._async import AsyncSaveHandle, async_save, prepare_async_save, wait
from dckpt._errors import (
    ArgumentError,
    ArgumentTypeError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointTimeoutError,
    CorruptCheckpointError,
    RankFailureError,
    RemoteError,
    StateMismatchError,
    StorageError,
    UnsafeCheckpointError,
    UnsupportedStateError,
)
from dckpt._manager import CheckpointManager
from dckpt._save import save
from dckpt._stateful import OptimizerState, Stateful
from dckpt._version import __version__
from dckpt.interop._convert import ConvertReport, convert
from dckpt.tiers._errors import LocalTierError, PersistError, TransferError

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "AsyncSaveHandle",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointTimeoutError",
    "ConvertReport",
    "CorruptCheckpointError",
    "LoadResult",
    "LocalTierError",
    "OptimizerState",
    "PersistError",
    "RankFailureError",
    "RemoteError",
    "StateMismatchError",
    "Stateful",
    "StorageError",
    "TransferError",
    "UnsafeCheckpointError",
    "UnsupportedStateError",
    "__version__",
    "async_save",
    "convert",
    "load",
    "prepare_async_save",
    "save",
    "wait",
]
