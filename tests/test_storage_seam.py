"""Storage as a seam: a backend written against the public ``dckpt.storage`` API only,
registered from here (``register_backend``) or found through the ``dckpt.storage`` entry
point group, serves ``dckpt.save`` / ``dckpt.load`` end to end, on one process and two ranks.

:class:`DirStorage` is that backend (tests/test_storage.py runs the shared storage suite
over it too); the tests below check the registry's resolution order, its laziness, its
argument checks, and how it reports a broken backend.
"""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import dckpt
import dckpt.storage
from dckpt.storage import (
    MAX_READ_BYTES,
    FileLayout,
    LocalStorage,
    RangeReader,
    Storage,
    Writer,
    open_storage,
    register_backend,
    unregister_backend,
)
from tests import test_save_load
from tests._dist import RankPool

SCHEME = "dirtest"
#: Every :class:`_FileRanges` read, as (name, offset, nbytes): which reader a load used.
RANGE_READS: list[tuple[str, int, int]] = []
_TRANSIENT = (".partial", ".commit")


@contextlib.contextmanager
def _storage_errors(action: str, url: str) -> Iterator[None]:
    """The contract: the store's failures are StorageErrors naming the file, with errno."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, dckpt.CheckpointError):
            raise
        raise dckpt.StorageError(
            f"{action} {url} failed: {exc.strerror}", errno=exc.errno
        ) from None


class DirStorage(Storage):
    """A checkpoint directory through plain Python file calls: a third-party backend.

    ``dirtest:///abs/path``; ``storage_options={"fast_ranges": True}`` makes it offer a
    low-latency :class:`RangeReader` of its own (one open file per data file).
    """

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        self.root = url.split("://", 1)[1]
        self.location = url
        self.fast_ranges = bool(storage_options.get("fast_ranges"))
        self.file_layout = FileLayout(max_files=2, target_bytes=1 << 20)

    def _path(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/")) if name else self.root

    def _url(self, name: str) -> str:
        return f"{self.location}/{name}"

    def read_file(self, name: str, *, max_bytes: int = MAX_READ_BYTES) -> bytes | None:
        size = self.size(name)
        if size is None:
            return None
        if size > max_bytes:
            raise dckpt.CorruptCheckpointError(
                f"{self._url(name)} is {size} bytes, over the {max_bytes}-byte limit"
            )
        with _storage_errors("reading", self._url(name)), open(self._path(name), "rb") as f:
            return f.read()

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        with _storage_errors("reading", self._url(name)), open(self._path(name), "rb") as f:
            _read_at(f, offset, out, self._url(name))

    def open_ranges(self, name: str) -> RangeReader:
        if not self.fast_ranges:
            return super().open_ranges(name)
        with _storage_errors("opening", self._url(name)):
            return _FileRanges(open(self._path(name), "rb"), name, self._url(name))

    def size(self, name: str) -> int | None:
        with _storage_errors("inspecting", self._url(name)):
            try:
                return os.stat(self._path(name)).st_size
            except FileNotFoundError:
                return None

    def open_writer(self, name: str) -> Writer:
        with _storage_errors("creating", self._url(name)):
            return _DirWriter(self._path(name), self._url(name))

    def commit(self, name: str, data: bytes, *, durable: bool) -> None:
        path, tmp = self._path(name), self._path(name) + ".commit"
        with _storage_errors("committing", self._url(name)):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: readers see the old bytes or the new

    def delete(self, name: str) -> None:
        with _storage_errors("deleting", self._url(name)), contextlib.suppress(FileNotFoundError):
            os.remove(self._path(name))

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        with _storage_errors("deleting", self._url(prefix)):
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)

    def list(self, prefix: str = "") -> list[str]:
        out = []
        for dirpath, _dirs, files in os.walk(self._path(prefix)):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            out += [f if rel == "." else f"{rel}/{f}" for f in files if not f.endswith(_TRANSIENT)]
        return sorted(out)

    def exists(self) -> bool:
        return os.path.isdir(self.root)


def _read_at(f: Any, offset: int, out: memoryview, url: str) -> None:
    view = memoryview(out).cast("B")
    f.seek(offset)
    n = f.readinto(view)
    if n < view.nbytes:
        raise dckpt.CorruptCheckpointError(
            f"{url} is truncated: wanted {view.nbytes} bytes at {offset}, it ends at {offset + n}"
        )


class _FileRanges(RangeReader):
    low_latency = True

    def __init__(self, f: Any, name: str, url: str) -> None:
        self.f, self.name, self.url = f, name, url

    def read_into(self, offset: int, out: memoryview) -> None:
        RANGE_READS.append((self.name, offset, memoryview(out).nbytes))
        with _storage_errors("reading", self.url):
            _read_at(self.f, offset, out, self.url)

    def close(self) -> None:
        self.f.close()


class _DirWriter(Writer):
    """Written under a temporary name, renamed into place by ``close``: invisible till then."""

    def __init__(self, path: str, url: str) -> None:
        self.path, self.tmp, self.url, self.size = path, path + ".partial", url, 0
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.file = open(self.tmp, "wb")  # noqa: SIM115

    def write(self, buffers: Sequence[memoryview]) -> None:
        with _storage_errors("writing", self.url):
            for b in buffers:
                self.size += self.file.write(memoryview(b).cast("B"))

    def close(self, *, durable: bool) -> int:
        with _storage_errors("writing", self.url):
            self.file.flush()
            if durable:
                os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        return self.size

    def abort(self) -> None:
        self.file.close()
        for p in (self.tmp, self.path):
            with contextlib.suppress(OSError):
                os.remove(p)


def dir_url(path: str | os.PathLike[str]) -> str:
    return f"{SCHEME}://{os.path.abspath(path)}"


@pytest.fixture
def dirtest() -> Iterator[str]:
    """``dirtest://`` registered for the test, unregistered after it."""
    register_backend(SCHEME, DirStorage)
    yield SCHEME
    unregister_backend(SCHEME)


# ----------------------------------------------------------------------- resolution


def test_a_registered_scheme_opens_with_its_backend(dirtest: str, tmp_path: Path) -> None:
    st = open_storage(f"DirTest://{tmp_path}/ck", {"fast_ranges": True})  # case-insensitive
    assert isinstance(st, DirStorage) and st.fast_ranges and st.root == f"{tmp_path}/ck"
    assert isinstance(open_storage(tmp_path), LocalStorage)
    unregister_backend(SCHEME)
    with pytest.raises(dckpt.CheckpointError, match="not a storage fsspec knows"):
        open_storage(f"{SCHEME}://{tmp_path}")


def test_file_scheme_can_be_replaced_and_restored(tmp_path: Path) -> None:
    register_backend("file", lambda url, opts: DirStorage(f"{SCHEME}://{url[7:]}", opts))
    try:
        assert isinstance(open_storage(f"file://{tmp_path}"), DirStorage)
        assert isinstance(open_storage(str(tmp_path)), LocalStorage)  # plain paths stay local
    finally:
        unregister_backend("file")
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)


def test_register_backend_checks_its_arguments() -> None:
    for bad in ["", "my://", "1fs", "my fs", "s3:"]:
        with pytest.raises(dckpt.ArgumentError, match="not a URL scheme"):
            register_backend(bad, DirStorage)
    with pytest.raises(dckpt.ArgumentTypeError, match="must be a str"):
        register_backend(b"dirtest", DirStorage)  # type: ignore[arg-type]
    with pytest.raises(dckpt.ArgumentTypeError, match="must be callable"):
        register_backend("dirtest", "DirStorage")  # type: ignore[arg-type]
    unregister_backend("never-registered")  # fine


def test_a_broken_factory_is_a_checkpoint_error_without_secrets(tmp_path: Path) -> None:
    def failing(url: str, options: dict[str, Any]) -> Storage:
        raise ValueError(f"cannot reach {url} with token {options['token']}")

    register_backend("broken", failing)
    register_backend("wrongtype", lambda url, options: {"not": "a storage"})  # type: ignore[arg-type, return-value]
    try:
        with pytest.raises(dckpt.StorageError) as info:
            open_storage("broken://user:pw1234@host/ck", {"token": "TOPSECRET99"})
        msg = str(info.value)
        assert "broken://" in msg and "ValueError" in msg, msg
        assert "TOPSECRET99" not in msg and "pw1234" not in msg, msg
        with pytest.raises(dckpt.CheckpointError, match="returned a dict, not a dckpt.storage"):
            open_storage("wrongtype://x")
    finally:
        unregister_backend("broken")
        unregister_backend("wrongtype")


# ----------------------------------------------------------------------- entry points


def _plugin(tmp_path: Path, target: str) -> Path:
    """An installed distribution (its metadata on sys.path) declaring ``eptest`` -> target."""
    info = tmp_path / "site" / "dckpt_seam_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dckpt-seam-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[dckpt.storage]\neptest = {target}\n")
    return tmp_path / "site"


@pytest.fixture
def fresh_entry_points(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from dckpt.storage import _registry

    monkeypatch.setattr(_registry, "_entry_points", None)  # as in a new process
    yield
    unregister_backend("eptest")


@pytest.mark.usefixtures("fresh_entry_points")
def test_an_entry_point_backend_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(_plugin(tmp_path, "tests.test_storage_seam:DirStorage")))
    st = open_storage(f"eptest://{tmp_path}/ck")
    assert isinstance(st, DirStorage)
    state = {"w": torch.arange(10.0)}
    dckpt.save(state, f"eptest://{tmp_path}/ck")
    out = {"w": torch.zeros(10)}
    dckpt.load(out, f"eptest://{tmp_path}/ck")
    assert torch.equal(out["w"], state["w"])


@pytest.mark.usefixtures("fresh_entry_points")
def test_a_broken_entry_point_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(_plugin(tmp_path, "no_such_module_xyz:Storage")))
    with pytest.raises(dckpt.CheckpointError) as info:
        open_storage("eptest://x")
    msg = str(info.value)
    assert "eptest://" in msg and "no_such_module_xyz:Storage" in msg and "reinstall" in msg


def test_entry_points_are_read_only_for_an_unregistered_scheme() -> None:
    code = (
        "import dckpt, dckpt.storage as s\n"
        "from dckpt.storage import _registry as r\n"
        "assert r._entry_points is None\n"
        "s.open_storage('/tmp/x'); s.open_storage('file:///tmp/x')\n"
        "assert r._entry_points is None\n"
        "s.open_storage('memory://dckpt-lazy/x')\n"
        "assert r._entry_points is not None\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)


# ----------------------------------------------------------------------- end to end


@pytest.mark.parametrize("fast_ranges", [False, True])
def test_save_and_load_through_a_registered_backend(
    dirtest: str, tmp_path: Path, fast_ranges: bool
) -> None:
    """The load path asks the storage for its range reader, whatever its type: a
    low-latency one is read block by block, the default one through batched reads."""
    url, opts = dir_url(tmp_path / "ck"), {"fast_ranges": fast_ranges}
    state: dict[str, Any] = {"big": torch.randn(600_000), "small": [torch.arange(7), 3], "step": 11}
    dckpt.save(state, url, storage_options=opts)
    assert open_storage(url, opts).read_file("manifest.json") is not None
    del RANGE_READS[:]
    out: dict[str, Any] = {
        "big": torch.zeros(600_000),
        "small": [torch.zeros(7, dtype=torch.int64), 0],
    }
    out["step"] = 0
    dckpt.load(out, url, storage_options=opts)
    assert torch.equal(out["big"], state["big"]) and out["step"] == 11
    assert torch.equal(out["small"][0], torch.arange(7)) and out["small"][1] == 3
    if fast_ranges:  # 2.4 MB in blocks: many reads, all through the backend's reader
        assert len(RANGE_READS) > 2 and all(n.startswith("data/") for n, _, _ in RANGE_READS)
    else:
        assert RANGE_READS == []
    with pytest.raises(dckpt.CheckpointExistsError):
        dckpt.save(state, url, storage_options=opts)


def _w_save_fsdp(url: str) -> dict[str, torch.Tensor]:
    register_backend(SCHEME, DirStorage)  # each process registers the backends it uses
    return test_save_load._w_save_fsdp(url)


def test_two_ranks_save_through_a_registered_backend(
    dirtest: str, rank_pool: Any, tmp_path: Path
) -> None:
    """FSDP2 on two ranks saves through the backend; one plain process loads it back."""
    url = dir_url(tmp_path / "ck")
    pool: RankPool = rank_pool(2)
    saved = pool.run(_w_save_fsdp, url)[0]
    names = DirStorage(url, {}).list()
    assert "manifest.json" in names and {n.split("/")[-1][:3] for n in names} >= {"r0-", "r1-"}
    model, optim = test_save_load.build(fsdp=False)
    state = {"model": model, "optim": optim, "step": 0}
    dckpt.load(state, url)
    assert state["step"] == 3
    loaded = test_save_load.full_state(model, optim)
    assert sorted(saved) == sorted(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


# ----------------------------------------------------------------------- structure


def test_storage_modules_import_no_cycle() -> None:
    """Within dckpt.storage imports form a DAG (counting function-local and
    TYPE_CHECKING imports): the S3 writer and the fsspec storage meet only in ObjectOps."""
    pkg = Path(dckpt.storage.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in pkg.glob("*.py"):
        name = "dckpt.storage" + ("" if path.stem == "__init__" else f".{path.stem}")
        deps = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dckpt.storage"):
                deps.add(str(node.module))
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("dckpt.storage"))
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*trail, node]))
        if state.get(node) == 2 or node == "dckpt.storage":  # the package's own re-exports
            return
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            visit(dep, [*trail, node])
        state[node] = 2

    for module in sorted(graph):
        visit(module, [])
