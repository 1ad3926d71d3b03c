"""The c10d key-value store under coordination: our own connection, typed access.

Coordination (``dckpt._coord``) talks to the default group's store through a client of
its own per thread, so that its long waits never hold up training's store calls, and
through :class:`KV`, which turns every failure but a requested timeout into
:class:`StoreLost`, so that callers can tell a slow rank from a dead store.
"""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from typing import Any

import torch.distributed as dist


def default_store() -> tuple[dist.Store, dist.TCPStore | None]:
    """The default group's store, and the TCPStore under its PrefixStore wrappers if any."""
    # The only private c10d APIs dckpt uses; both are stable since torch 2.0.
    base = dist.distributed_c10d._get_default_store()
    raw = (
        base
        if isinstance(base, dist.TCPStore)
        else getattr(base, "_underlying_non_prefix_store", None)
    )
    return base, raw if isinstance(raw, dist.TCPStore) else None


# One dedicated client per thread and server, reused across calls: every new connection
# costs reverse-DNS lookups on both ends (c10d names its peers), which can stall for seconds.
_clients = threading.local()


def open_store(prefix: str, timeout: float) -> dist.Store:
    """Open the store for one call, on this thread's own connection to the default store.

    A TCPStore client serialises its operations, so sharing training's connection would let a
    long ``wait`` here (possibly from an async-save thread) stall training's own store calls;
    and ``set_timeout`` on it would change training's timeouts.  Our own client avoids both
    and carries our bound (connecting to a dead server gives up after about 1.7x timeout).
    """
    base, raw = default_store()
    if raw is None:
        # Other stores (FileStore, HashStore, custom): share it; every wait below passes its
        # own timeout and reads only keys known to exist, so its default never applies.
        return dist.PrefixStore(prefix, base)
    cache: dict[tuple[int, str, int], dist.TCPStore] = _clients.__dict__.setdefault("by_addr", {})
    key = (os.getpid(), raw.host, raw.port)  # a forked child must not reuse our socket
    client = cache.get(key)
    if client is None:
        client = dist.TCPStore(
            raw.host,
            raw.port,
            None,
            False,
            timedelta(seconds=timeout),
            wait_for_workers=False,
            use_libuv=getattr(raw, "libuvBackend", True),
        )
        cache[key] = client
    client.set_timeout(timedelta(seconds=timeout))
    return dist.PrefixStore(prefix, client)


def forget_clients() -> None:
    """Drop this thread's connections after a store failure; the next call reconnects."""
    _clients.__dict__.pop("by_addr", None)


class StoreLost(Exception):
    """Internal: a store operation failed other than by a timeout we asked for (the cause)."""


class KV:
    """Typed access to a c10d store; any failure but a requested timeout is ``StoreLost``.

    When the store's server dies (it lives in rank 0's process under ``init_process_group``),
    operations raise ``DistNetworkError`` (a ``RuntimeError``) at once; c10d's stubs also
    type values as ``str`` though bytes are accepted, hence ``Any`` inside.
    """

    def __init__(self, store: Any) -> None:
        self._store = store

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._store, method)(*args)
        except RuntimeError as exc:  # DistNetworkError / DistStoreError derive from it
            raise StoreLost from exc

    def wait(self, keys: list[str], timeout: float) -> bool:
        """Wait up to ``timeout`` s for all keys; False if some are still absent."""
        if not keys:
            return True
        try:
            self._store.wait(keys, timedelta(seconds=timeout))
            return True
        except RuntimeError:
            pass  # timed out, or the store is gone: check() tells which
        return self.check(keys)

    def check(self, keys: list[str]) -> bool:
        return bool(self._call("check", keys))

    def set(self, key: str, value: bytes) -> None:
        self._call("set", key, value)

    def get(self, key: str) -> bytes:
        return bytes(self._call("get", key))

    def set_many(self, keys: list[str], values: list[bytes]) -> None:
        if keys and self._store.has_extended_api():
            self._call("multi_set", keys, values)
            return
        for key, value in zip(keys, values, strict=True):
            self.set(key, value)

    def get_many(self, keys: list[str]) -> list[bytes]:
        if keys and self._store.has_extended_api():
            return [bytes(v) for v in self._call("multi_get", keys)]
        return [self.get(key) for key in keys]

    def add(self, key: str, amount: int) -> int:
        return int(self._call("add", key, amount))

    def delete(self, key: str) -> None:
        self._call("delete_key", key)
