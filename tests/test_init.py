"""The public surface: small, sorted, complete, and light to import."""

from __future__ import annotations

import subprocess
import sys

import dckpt


def test_all_is_sorted_and_complete() -> None:
    assert dckpt.__all__ == sorted(dckpt.__all__)
    public = {n for n in vars(dckpt) if not n.startswith("_") and not _is_module(n)}
    assert public <= set(dckpt.__all__) | {"annotations"}
    assert all(hasattr(dckpt, n) for n in dckpt.__all__)


def _is_module(name: str) -> bool:
    return type(getattr(dckpt, name)).__name__ == "module"


def test_every_error_derives_from_checkpoint_error() -> None:
    errors = [getattr(dckpt, n) for n in dckpt.__all__ if n.endswith("Error")]
    assert errors and all(issubclass(e, dckpt.CheckpointError) for e in errors)
    assert issubclass(dckpt.CheckpointError, Exception)
    assert issubclass(dckpt.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(dckpt.StorageError, OSError)


def test_import_does_not_load_optional_backends() -> None:
    code = "import sys, dckpt; print(sorted(m for m in ('fsspec', 's3fs', 'safetensors', 'click') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_errors_survive_the_trip_between_ranks() -> None:
    import errno
    import pickle

    disk = pickle.loads(pickle.dumps(dckpt.StorageError("x ran out", errno=errno.ENOSPC)))
    assert isinstance(disk, dckpt.StorageError) and disk.is_disk_full and str(disk) == "x ran out"
    remote = pickle.loads(pickle.dumps(dckpt.RemoteError("ValueError", "bad", "tb")))
    assert (remote.type_name, remote.remote_message, remote.traceback_text) == (
        "ValueError",
        "bad",
        "tb",
    )
    timeout = pickle.loads(pickle.dumps(dckpt.CheckpointTimeoutError("late", (1,), {1: disk})))
    assert timeout.missing_ranks == (1,) and isinstance(timeout.failures[1], dckpt.StorageError)
    failure = pickle.loads(pickle.dumps(dckpt.RankFailureError("m", {0: ValueError("v")})))
    assert str(failure) == "m" and isinstance(failure.failures[0], ValueError)
    for cls in (
        dckpt.CheckpointNotFoundError,
        dckpt.CheckpointExistsError,
        dckpt.StateMismatchError,
    ):
        again = pickle.loads(pickle.dumps(cls("msg")))
        assert type(again) is cls and str(again) == "msg"
