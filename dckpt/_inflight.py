"""The async save in flight in this process, and its handle.

At most one save runs at a time per process: ``save`` and ``async_save`` both
:func:`drain` the one in flight before they start, and a failure nobody has seen yet
(no ``result()`` call observed it) is raised there rather than lost. It lives apart
from :mod:`dckpt._async` so that the synchronous save can wait for it without
importing the async machinery.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from dckpt._errors import CheckpointError, CheckpointTimeoutError


class AsyncSaveHandle:
    """The future of one :func:`dckpt.async_save`: where it writes, and its outcome.

    Returned by ``async_save`` once the state is snapshotted; the write and the commit
    run in the background. Every rank gets its own handle for the same collective save.

    Attributes:
        path: The checkpoint's location (a local path or URL).

    Example:
        ```python
        handle = dckpt.async_save(state, "ckpt/step-200")
        train_more()
        handle.result()  # raises the save's error if it failed
        ```
    """

    def __init__(self, future: Future[None], path: str) -> None:
        self._future = future
        self.path = path
        self._observed = False  # its outcome reached someone through result()

    def done(self) -> bool:
        """Whether the save has finished, committed or failed; never blocks.

        Returns:
            True once the save has ended (``result()`` then returns or raises at once).

        Example:
            ```python
            if handle.done():
                handle.result()
            ```
        """
        return self._future.done()

    def result(self, timeout: float | None = None) -> None:
        """Wait for the save to commit, and raise its error if it failed.

        Args:
            timeout: Seconds to wait; ``None`` waits as long as the save runs. A wait
                that times out leaves the save running.

        Returns:
            None, once the checkpoint is committed: loading ``path`` then reads it.

        Raises:
            CheckpointTimeoutError: The save did not finish within ``timeout`` seconds.
            CheckpointError: The save failed (the original error, e.g. a
                ``RankFailureError`` naming the ranks that failed); the previous
                checkpoint at ``path``, if any, stays intact.

        Example:
            ```python
            handle = dckpt.async_save(state, "ckpt/step-200")
            handle.result(timeout=600)
            ```
        """
        try:
            self._future.result(timeout)
        except CheckpointError:
            raise  # the save's own error (a CheckpointTimeoutError is a TimeoutError too)
        except FutureTimeout:
            raise CheckpointTimeoutError(
                f"async save to {self.path} did not finish within {timeout} s"
            ) from None
        finally:
            if self._future.done():
                self._observed = True

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"<AsyncSaveHandle {self.path} {state}>"


_current: AsyncSaveHandle | None = None


def track(handle: AsyncSaveHandle) -> None:
    """Make ``handle`` the save in flight (the previous one was drained)."""
    global _current
    _current = handle


def current() -> AsyncSaveHandle | None:
    """The save in flight, or None."""
    return _current


def drain() -> None:
    """Wait for the save in flight; raise its error if nobody has seen it yet."""
    global _current
    handle = _current
    if handle is None:
        return
    try:
        handle._future.result()
    except BaseException:
        if claim(handle):
            _current = None
            raise
    _current = None


def join(handle: AsyncSaveHandle) -> None:
    """Wait for ``handle``'s save and raise its error, without marking it seen."""
    handle._future.result()


def claim(handle: AsyncSaveHandle) -> bool:
    """Mark ``handle``'s outcome as seen; True when nobody had seen it before."""
    if handle._observed:
        return False
    handle._observed = True
    return True


def _forget_after_fork() -> None:
    # A forked child has none of its parent's threads, so the parent's save in flight can
    # never finish there: the child must not wait for it.
    global _current
    _current = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
