"""Storage backends: the small interface a checkpoint needs from a disk or an object store.

The engine reads and writes checkpoints only through :class:`Storage`; each backend is
one module here. This package imports nothing from the rest of dckpt but its errors and
fault points, so every layer above may use it.
"""

from __future__ import annotations

from dckpt.storage._base import FileLayout, Storage, Writer, open_storage

__all__ = ["FileLayout", "Storage", "Writer", "open_storage"]
