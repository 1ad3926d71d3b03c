"""One behavioural suite for every Storage backend, each opened through ``open_storage``:
the local directory, fsspec memory://, S3 (moto), and ``dirtest://``, a backend registered
from the tests through the public seam (tests/test_storage_seam.py).

What the save and load paths rely on: writers that produce exactly the bytes given, sizes,
ranged reads (also batched, also through the storage's range reader), listing, deletion,
commit that replaces, None for missing files, and truncation reported as corruption rather
than short data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dckpt._errors import CheckpointError, CorruptCheckpointError, StorageError
from dckpt._readahead import ReadAhead
from dckpt.storage import (
    FileLayout,
    LocalStorage,
    Storage,
    open_storage,
    register_backend,
    unregister_backend,
)
from dckpt.storage._body import ViewsBody
from dckpt.storage._fsspec import FsspecStorage, _plan_gets
from tests._s3 import S3Server
from tests.test_storage_seam import SCHEME, DirStorage, dir_url

MiB = 1 << 20
# Small parts so that a few MiB exercise multipart uploads and split GETs (5 MiB: S3's min).
PART = 5 * MiB


@pytest.fixture(params=["local", "memory", "s3", SCHEME])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    kind = request.param
    if kind == "local":
        yield open_storage(tmp_path / "ck")
        return
    if kind == SCHEME:
        register_backend(SCHEME, DirStorage)
        try:
            yield open_storage(dir_url(tmp_path / "ck"))
        finally:
            unregister_backend(SCHEME)
        return
    if kind == "memory":
        st = open_storage(f"memory://dckpt-{uuid.uuid4().hex}/ck", {"dckpt": {"part_size": MiB}})
        yield st
        st.delete_prefix("")
        return
    server: S3Server = request.getfixturevalue("s3_server")
    opts = {
        **server.options,
        "dckpt": {
            "part_size": PART,
            "multipart_threshold": PART,
            "coalesce_gap": 1024,
            "retry_timeout": 10,
        },
    }
    st = open_storage(server.url(uuid.uuid4().hex), opts)
    yield st
    st.delete_prefix("")


def _write(st: Storage, name: str, data: bytes, piece: int = MiB // 3) -> int:
    w = st.open_writer(name)
    view = memoryview(data)
    for i in range(0, len(data), 4 * piece):
        w.write([view[j : j + piece] for j in range(i, min(i + 4 * piece, len(data)), piece)])
    return w.close(durable=True)


def test_write_size_and_ranged_reads(storage: Storage) -> None:
    data = os.urandom(PART * 2 + 12345)  # three parts on S3, the last one short
    assert _write(storage, "data/s1/r0-0.bin", data) == len(data)
    assert storage.size("data/s1/r0-0.bin") == len(data)
    for off, n in [(0, 10), (PART - 3, 7), (len(data) - 5, 5), (1, len(data) - 1), (0, 0)]:
        out = bytearray(n)
        storage.read_into("data/s1/r0-0.bin", off, memoryview(out))
        assert out == data[off : off + n]
    assert storage.read_file("data/s1/r0-0.bin") == data


def test_typed_buffers_and_empty_file(storage: Storage) -> None:
    arr = np.arange(1000, dtype=np.float32).reshape(10, 100)
    w = storage.open_writer("data/s1/typed")
    w.write([memoryview(arr), memoryview(b""), memoryview(arr[3])])
    assert w.close(durable=False) == arr.nbytes + 400
    out = np.empty(100, dtype=np.float32)
    storage.read_into("data/s1/typed", arr.nbytes, memoryview(out))
    assert np.array_equal(out, arr[3])
    assert _write(storage, "data/s1/empty", b"") == 0
    assert storage.size("data/s1/empty") == 0
    assert storage.read_file("data/s1/empty") == b""


def test_read_ranges_batch(storage: Storage) -> None:
    data = os.urandom(3 * MiB)
    _write(storage, "f", data)
    ranges = [(0, 100), (150, 4096), (5000, 5001), (MiB, 2 * MiB + 7), (3 * MiB - 9, 3 * MiB)]
    outs = [bytearray(b - a) for a, b in ranges]
    storage.read_ranges("f", ranges, [memoryview(o) for o in outs])
    assert [bytes(o) for o in outs] == [data[a:b] for a, b in ranges]


def test_missing_and_truncated(storage: Storage) -> None:
    assert storage.read_file("manifest.json") is None
    assert storage.size("nothing/here") is None
    with pytest.raises(StorageError):
        storage.read_into("nothing/here", 0, memoryview(bytearray(4)))
    _write(storage, "short", b"0123456789")
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        storage.read_into("short", 5, memoryview(bytearray(10)))
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        storage.read_into("short", 50, memoryview(bytearray(1)))


def test_range_reader(storage: Storage) -> None:
    """``open_ranges``: many reads of one file through one reader, as a load makes them."""
    data = os.urandom(PART + 4321)
    _write(storage, "data/s1/r0-0.bin", data)
    with storage.open_ranges("data/s1/r0-0.bin") as ranges:
        assert ranges.low_latency is isinstance(storage, LocalStorage)
        for off, n in [(0, 10), (PART - 3, 7), (len(data) - 5, 5), (1, len(data) - 1), (9, 0)]:
            out = bytearray(n)
            ranges.read_into(off, memoryview(out))
            assert out == data[off : off + n]
        spans = [(0, 100), (150, 4096), (PART, PART + 4321)]
        outs = [bytearray(b - a) for a, b in spans]
        ranges.read_ranges(spans, [memoryview(o) for o in outs])
        assert [bytes(o) for o in outs] == [data[a:b] for a, b in spans]
        with pytest.raises(CorruptCheckpointError, match="truncated"):
            ranges.read_into(len(data) - 2, memoryview(bytearray(4)))
    ranges.close()  # again: fine


def test_list_delete_and_prefixes(storage: Storage) -> None:
    for name in ["data/a/r0-0.bin", "data/a/r1-0.bin", "data/b/r0-0.bin", "manifest.json"]:
        _write(storage, name, name.encode())
    assert storage.exists()
    assert storage.list() == [
        "data/a/r0-0.bin",
        "data/a/r1-0.bin",
        "data/b/r0-0.bin",
        "manifest.json",
    ]
    assert storage.list("data/a") == ["data/a/r0-0.bin", "data/a/r1-0.bin"]
    assert storage.list("data/zz") == []
    storage.delete("data/a/r1-0.bin")
    storage.delete("data/a/r1-0.bin")  # missing is fine
    assert storage.list("data") == ["data/a/r0-0.bin", "data/b/r0-0.bin"]
    storage.delete_prefix("data/a")
    storage.delete_prefix("data/never")
    assert storage.list() == ["data/b/r0-0.bin", "manifest.json"]


def test_commit_replaces(storage: Storage) -> None:
    with storage.commit_lock():
        assert storage.read_file("manifest.json") is None
        storage.commit("manifest.json", b'{"v": 1}', durable=True)
    assert storage.read_file("manifest.json") == b'{"v": 1}'
    with storage.commit_lock():
        assert storage.read_file("manifest.json") == b'{"v": 1}'
        storage.commit("manifest.json", b'{"v": 2}', durable=True)
    assert storage.read_file("manifest.json") == b'{"v": 2}'
    assert [n for n in storage.list() if not n.startswith(".")] == ["manifest.json"]  # .lock


def test_aborted_writer_leaves_nothing(storage: Storage) -> None:
    w = storage.open_writer("data/x/partial")
    w.write([memoryview(os.urandom(PART + 10))])  # on S3 one part is already in flight
    w.abort()
    assert storage.size("data/x/partial") is None
    assert storage.list() == []


def test_read_ahead_serves_small_reads(storage: Storage) -> None:
    data = os.urandom(2 * MiB)
    _write(storage, "f", data)
    calls: list[int] = []
    real = storage.read_ranges

    def counting(name: str, ranges: Any, outs: Any) -> None:
        calls.append(len(ranges))
        real(name, ranges, outs)

    storage.read_ranges = counting  # type: ignore[method-assign]
    spans = [(i * 4096, i * 4096 + 1000) for i in range(100)] + [(MiB, 2 * MiB)]
    ahead = ReadAhead(storage, "f", spans, budget=MiB // 2)
    for a, b in spans[:100]:
        out = bytearray(b - a)
        assert ahead.read(a, memoryview(out))
        assert out == data[a:b]
    assert calls == [100]  # one batch for all hundred
    assert not ahead.read(MiB, memoryview(bytearray(MiB)))  # too big: read directly
    assert not ahead.read(MiB - 10, memoryview(bytearray(5)))  # not planned


def test_plan_gets_splits_and_merges() -> None:
    buf = memoryview(bytearray(100))
    gets = _plan_gets([(0, 10, buf[:10]), (12, 20, buf[12:20]), (50, 100, buf[50:])], 30, 4)
    assert [(g.start, g.end) for g in gets] == [(0, 20), (50, 80), (80, 100)]


def test_fsspec_urls_and_options(tmp_path: Path) -> None:
    st = open_storage("memory://user:hunter22@dckpt-opts/ck?x=1", {"dckpt": {"max_concurrency": 2}})
    assert isinstance(st, FsspecStorage)
    assert st.location == "memory://dckpt-opts/ck"
    assert st.options.max_concurrency == 2
    with pytest.raises(CheckpointError, match="unknown"):
        FsspecStorage("memory://x", {"dckpt": {"part_sise": 1}})
    with pytest.raises(CheckpointError, match="positive"):
        FsspecStorage("memory://x", {"dckpt": {"part_size": -1}})
    with pytest.raises(CheckpointError, match="not a storage fsspec knows"):
        open_storage("nosuchproto://x/y")
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)


def test_missing_backend_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    registry = importlib.import_module("fsspec.registry")._registry  # caches imported classes
    monkeypatch.setitem(sys.modules, "s3fs", None)  # import s3fs -> ImportError
    monkeypatch.delitem(registry, "s3", raising=False)
    with pytest.raises(CheckpointError) as info:
        open_storage("s3://bucket/ck")
    assert str(info.value) == "s3:// needs s3fs: pip install 'dckpt[s3]'"


def test_s3_objects_up_to_the_threshold_go_up_as_one_put(s3_server: S3Server) -> None:
    """A multipart object's ETag ends in -<parts>; a single PUT's does not."""
    opts = {**s3_server.options, "dckpt": {"part_size": PART, "multipart_threshold": 2 * PART}}
    st3 = FsspecStorage(s3_server.url(uuid.uuid4().hex), opts)
    try:
        for name, n, parts in [("one", 2 * PART, None), ("three", 2 * PART + 1, 3)]:
            data = os.urandom(n)
            assert _write(st3, name, data) == n
            etag = str(st3.fs.info(st3.ops.path(name))["ETag"]).strip('"')
            assert etag.endswith(f"-{parts}") if parts else "-" not in etag, (name, etag)
            out = bytearray(n)
            st3.read_into(name, 0, memoryview(out))
            assert out == data
        with pytest.raises(CheckpointError, match="at most"):
            FsspecStorage(
                s3_server.url("x"), {**s3_server.options, "dckpt": {"part_size": 6 << 30}}
            )
    finally:
        st3.delete_prefix("")


def test_object_stores_spread_a_rank_over_part_sized_objects() -> None:
    st3 = FsspecStorage(
        "memory://dckpt-layout/ck", {"dckpt": {"max_concurrency": 3, "part_size": 8 * MiB}}
    )
    assert st3.file_layout == FileLayout(max_files=3, target_bytes=8 * MiB)
    assert LocalStorage("/nonexistent").file_layout == FileLayout()


@settings(max_examples=60, deadline=None)
@example(sizes=[7, 0, 13], ops=[(3, -1), (2, 9), (6, 3), (25, 4)])
@given(
    sizes=st.lists(st.integers(0, 50), min_size=0, max_size=8),
    ops=st.lists(st.tuples(st.integers(-5, 400), st.integers(-1, 120)), max_size=12),
)
def test_views_body_reads_like_the_joined_bytes(
    sizes: list[int], ops: list[tuple[int, int]]
) -> None:
    data = os.urandom(sum(sizes))
    views, pos = [], 0
    for n in sizes:
        views.append(memoryview(data)[pos : pos + n])
        pos += n
    body = ViewsBody([v for v in views if v.nbytes])
    assert len(body) == len(data) and body.seekable() and body.readable()
    assert body.read() == data and body.read(5) == b""
    for where, size in ops:
        body.seek(max(0, where))
        at = body.tell()
        if size >= 0 and size % 2:  # odd sizes through readinto, the rest through read
            out = bytearray(size)
            got = bytes(out[: body.readinto(out)])
        else:
            got = body.read(size)
        want = data[at:] if size < 0 else data[at : at + size]
        assert got == want and body.tell() == at + len(want)
    if len(data) >= 3:
        assert body.seek(-3, os.SEEK_END) == len(data) - 3 and body.read() == data[-3:]
    else:
        with pytest.raises(ValueError):
            body.seek(-3, os.SEEK_END)
