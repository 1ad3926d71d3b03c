"""Storage backends: the small interface a checkpoint needs from a disk or an object store.

The engine reads and writes checkpoints only through :class:`Storage`, and finds the
storage for a path with :func:`open_storage`: local paths and ``file://`` URLs open a
:class:`LocalStorage`, other URLs go to fsspec (``s3://``, ``gs://``, ``memory://``...).

New backends plug in without touching dckpt: implement :class:`Storage` (its docstring
states the contract) and either call :func:`register_backend` in every process, or declare
the factory in the ``dckpt.storage`` entry point group of your package::

    [project.entry-points."dckpt.storage"]
    myfs = "my_package.storage:MyStorage"

This package imports nothing from the rest of dckpt but its errors and fault points, so
every layer above may use it.
"""

from __future__ import annotations

from dckpt.storage._base import MAX_READ_BYTES, FileLayout, RangeReader, Storage, Writer
from dckpt.storage._local import LocalStorage
from dckpt.storage._registry import (
    ENTRY_POINT_GROUP,
    StorageFactory,
    open_storage,
    register_backend,
    unregister_backend,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "MAX_READ_BYTES",
    "FileLayout",
    "LocalStorage",
    "RangeReader",
    "Storage",
    "StorageFactory",
    "Writer",
    "open_storage",
    "register_backend",
    "unregister_backend",
]
