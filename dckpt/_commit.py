"""The commit: publish a save's manifest, or clean up after a save that did not commit.

Both run under the storage's commit lock, so they are serialized with each other and
with other jobs' commits on the same path: a failed rank that deletes its files cannot
race a commit that publishes them, and a commit finds its own files still there before
it publishes a manifest that names them. Once a manifest is committed, nothing it
references is deleted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
from collections.abc import Sequence

from dckpt._errors import CheckpointExistsError, RankFailureError, StorageError
from dckpt._faults import fault_point
from dckpt._format import DATA_DIR, MANIFEST_NAME, data_dir
from dckpt._plan import RankPlan
from dckpt._tidy import remove_stale_data
from dckpt.storage import Storage

_log = logging.getLogger("dckpt")


class CommitUncertainError(StorageError):
    """Publishing the manifest timed out: it may or may not land later."""


def commit_uncertain(exc: BaseException) -> bool:
    """Whether ``exc`` (on this rank or, in a ``RankFailureError``, any rank) says the
    manifest may still be published: then no data file of the save may be deleted."""
    if isinstance(exc, CommitUncertainError):
        return True
    failures = exc.failures.values() if isinstance(exc, RankFailureError) else ()
    return any(isinstance(f, CommitUncertainError) for f in failures)


def abandon(storage: Storage, save_id: str, planned: RankPlan | None, leader: bool) -> bool:
    """Clean up after a failed save unless its manifest was committed after all.

    ``planned`` is this rank's plan (None when it never learned it): its files are
    deleted, and the leader deletes the save's whole data directory. Returns True when
    the committed manifest is this save's: then nothing is deleted, because every file it
    references must stay. Deciding and deleting happen under the
    commit lock, and a commit checks its files under that lock, so a rank cannot delete
    what a concurrent commit is publishing.
    """
    try:
        with storage.commit_lock():
            if _save_id_of(_read_manifest(storage)) == save_id:
                return True
            fault_point("save.abandon.delete")
            for f in planned.files if planned is not None else ():
                with contextlib.suppress(Exception):
                    storage.delete(f.name)
            if leader:
                with contextlib.suppress(Exception):
                    storage.delete_prefix(data_dir(save_id))
    except Exception:
        # Cannot even tell whether it committed: keep every file (a leftover is tidied by
        # the next commit; a deleted committed file is lost data).
        _log.warning("could not clean up after a failed save to %s", storage.location)
    return False


def _read_manifest(storage: Storage) -> bytes | None:
    return storage.read_file(MANIFEST_NAME)


def commit(
    storage: Storage,
    manifest: bytes,
    previous: bytes | None,
    *,
    durable: bool,
    save_id: str | None = None,
    files: Sequence[str] = (),
) -> None:
    """Publish the manifest unless another job committed since we planned, then tidy up.

    ``files`` are the data files the manifest references under ``data/<save_id>``; they
    are checked for under the commit lock, because a failed rank deletes its files under
    that lock too and a newer save's tidying may have removed a slower save's directory.
    """
    with storage.commit_lock():
        current = _read_manifest(storage)
        if current != previous:
            raise CheckpointExistsError(
                f"another save committed to {storage.location} while this one was running; "
                "this save was discarded and the other checkpoint kept. Give concurrent jobs "
                "different paths."
            )
        if files and save_id is not None:
            _check_files(storage, save_id, files, durable=durable)
        fault_point("save.commit.before")
        try:
            storage.commit(MANIFEST_NAME, manifest, durable=durable)
        except StorageError as exc:
            if exc.errno == errno.ETIMEDOUT:
                raise CommitUncertainError(
                    f"{exc}; the new manifest may still be published later, so this save's "
                    "data files were kept. Load the path to see which checkpoint it holds.",
                    errno=exc.errno,
                ) from exc
            raise
        fault_point("save.commit.published")
        if save_id is not None:
            try:
                remove_stale_data(storage, save_id)
            except Exception as exc:  # the commit stands; leftovers go at the next one
                _log.warning("tidying %s after its commit failed: %s", storage.location, exc)
    old = _save_id_of(previous)
    if old is not None and old != _save_id_of(manifest):
        with contextlib.suppress(Exception):
            storage.delete_prefix(data_dir(old))


def _check_files(storage: Storage, save_id: str, files: Sequence[str], *, durable: bool) -> None:
    """Under the commit lock: every data file is there (and, durably, its name synced)."""
    present = set(storage.list(data_dir(save_id)))
    missing = sorted(set(files) - present)
    if missing:
        raise StorageError(
            f"{len(missing)} data file(s) of this save vanished before its commit "
            f"(first: {storage.location}/{missing[0]}); the save was discarded and "
            "the previous checkpoint kept. Another process may be cleaning up this "
            "path: give concurrent jobs different paths."
        )
    if durable:  # the names of the data files, before the name that points at them
        storage.sync_dir(data_dir(save_id))
        storage.sync_dir(DATA_DIR)


def _save_id_of(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    with contextlib.suppress(Exception):
        sid = json.loads(raw)["save_id"]
        if isinstance(sid, str) and sid.isalnum():
            return sid
    return None
