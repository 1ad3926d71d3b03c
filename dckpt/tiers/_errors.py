"""The errors only the tiers raise; each is a :class:`dckpt.StorageError`."""

from __future__ import annotations

from dckpt._errors import StorageError


class LocalTierError(StorageError):
    """The node-local tier cannot take a save: too little space, or a write failed there.

    Raised by construction when a node cannot write its ``local_dir``. For lack of room
    (the room check at the first saves, or a full disk: ``is_disk_full`` is then True) it
    reports a step the local tier dropped on every rank: a step due for persistence was
    saved straight to the durable tier instead (the message says whether), so the durable
    tier never stops; the manager stays usable and every save tries the local tier again.
    Raised once on every rank, by that ``save`` (sync mode) or the next ``save``, ``wait``
    or ``load`` (async mode; the next save is started first). The message names the step,
    the full nodes, their ``local_dir`` and the bytes. Free space in (or enlarge)
    ``local_dir``, lower ``keep_local``, or save without ``local_dir``.

    Example:
        ```python
        try:
            manager.save(step, state)
        except dckpt.LocalTierError as exc:
            if not exc.is_disk_full:
                raise
            log.warning("local tier full, training on: %s", exc)
        ```
    """


class TransferError(StorageError):
    """Sending or receiving a data file between ranks failed (a peer died, the network
    failed, or a received file failed its checksum); the message names the peer rank.

    A tier save that meets it commits nothing (the previous local step stays intact);
    other ranks see it in a ``RankFailureError``'s ``failures``.

    Example:
        ```python
        try:
            manager.save(step, state)
        except dckpt.RankFailureError as exc:
            lost = [r for r, e in exc.failures.items() if isinstance(e, dckpt.TransferError)]
        ```
    """


class PersistError(StorageError):
    """Copying a committed local step to the durable tier failed.

    The local tier keeps saving; the step named in the message is not in the durable
    tier (the durable steps before it are intact). ``__cause__`` holds the original error.
    Raised once on every rank, by the next ``save`` (after starting it), ``wait`` or
    ``load``.

    Example:
        ```python
        try:
            manager.wait()
        except dckpt.PersistError as exc:
            print("not in the durable tier:", exc, exc.__cause__)
        ```
    """
