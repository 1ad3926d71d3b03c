"""Pausing Python's cyclic garbage collector around allocation-heavy planning.

Planning a checkpoint of 100k small tensors allocates several objects per tensor; each
allocation burst triggers full collections that scan every object of the training
process (the model, the optimizer, the data pipeline), which measured here as about
40% of a small-tensor save. Nothing dckpt allocates is cyclic garbage, so collection can
wait until the call returns. Reference counting still frees memory as usual. An async
save's background thread pauses it only for its planning and commit steps (measured:
8 ranks x 20k tensors, repeated async saves 4.2 -> 3.0 s), never for a whole write, as
training runs meanwhile and the collector is process-wide.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector for the block; re-entrant and thread-safe."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()


def gc_paused(fn: Callable[..., T], *args: Any) -> Callable[..., T]:
    """``fn`` (with ``args`` bound) run under :func:`paused_gc`: for the allocation-heavy
    steps of a save running on a background thread, where pausing the collector for the
    whole save would also pause it for training during every long write."""

    def run(*more: Any) -> T:
        with paused_gc():
            return fn(*args, *more)

    return run
