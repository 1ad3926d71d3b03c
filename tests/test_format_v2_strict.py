"""Each rule readers enforce on version 2 manifests and tables, pinned with a golden
checkpoint that breaks it: the load (or the manifest read) fails with a message naming it."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import pytest
import torch

import dckpt
from dckpt._errors import CorruptCheckpointError
from dckpt._format import manifest_from_bytes
from dckpt._reader import CheckpointReader
from dckpt._table import HEADER, ROW

GOLDEN = Path(__file__).parent / "golden" / "v2"
TAB = "data/0golden2/r{}.tab"


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(GOLDEN, tmp_path / "ck")
    return tmp_path / "ck"


def _load(ck: Path) -> None:
    state = {
        "w": torch.zeros(6, 3),
        "r": torch.zeros(3, dtype=torch.bfloat16),
        "u": torch.zeros(3, dtype=torch.int64),
    }
    dckpt.load(state, ck, strict=False)


def _manifest(ck: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ck / "manifest.json").read_bytes())
    return data


def _write_manifest(ck: Path, data: dict[str, Any]) -> None:
    (ck / "manifest.json").write_text(json.dumps(data))


def _rewrite_table(
    ck: Path,
    rank: int,
    mutate: Callable[[np.ndarray], np.ndarray],
    *,
    fix_trailer: bool = True,
) -> None:
    """Change rank ``rank``'s rows, re-seal the table (unless told not to) and list its
    new size and CRC in the manifest, so that only the rule under test is broken."""
    path = ck / TAB.format(rank)
    data = path.read_bytes()
    magic, version, r, nrows, ncrcs = HEADER.unpack_from(data)
    rows = np.frombuffer(data, ROW, nrows, HEADER.size).copy()
    crcs = data[HEADER.size + nrows * ROW.itemsize : -4]
    rows = mutate(rows)
    body = HEADER.pack(magic, version, r, len(rows), ncrcs) + rows.tobytes() + crcs
    trailer = crc32c.crc32c(body) if fix_trailer else crc32c.crc32c(body) ^ 1
    path.write_bytes(body + struct.pack("<I", trailer))
    m = _manifest(ck)
    table = next(t for t in m["tables"] if t["rank"] == rank)
    table["size"], table["crc32c"] = len(body) + 4, crc32c.crc32c(body)
    _write_manifest(ck, m)


def _fails(ck: Path, match: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=match):
        _load(ck)


def test_golden_copy_loads(tmp_path: Path) -> None:
    _load(_copy(tmp_path))  # the baseline every test below breaks one rule of


def test_a_table_whose_bytes_differ_from_the_manifest_is_refused(tmp_path: Path) -> None:
    ck = _copy(tmp_path)
    raw = bytearray((ck / TAB.format(1)).read_bytes())
    raw[40] ^= 1
    (ck / TAB.format(1)).write_bytes(bytes(raw))
    _fails(ck, "another CRC-32C than the manifest lists")
    assert any("r1.tab" in p for p in CheckpointReader.open(ck).verify())


def test_a_table_with_a_wrong_trailer_is_refused(tmp_path: Path) -> None:
    ck = _copy(tmp_path)
    _rewrite_table(ck, 1, lambda rows: rows, fix_trailer=False)
    _fails(ck, "trailing CRC-32C")


def test_a_missing_row_is_refused(tmp_path: Path) -> None:
    ck = _copy(tmp_path)
    _rewrite_table(ck, 1, lambda rows: rows[:-1])
    _fails(ck, "rows, the layouts give rank 1")


def test_a_repeated_row_is_refused(tmp_path: Path) -> None:
    ck = _copy(tmp_path)
    _rewrite_table(ck, 1, lambda rows: np.concatenate([rows[:1], rows[:-1]]))
    _fails(ck, "not sorted .* or repeat one")


def test_rows_sharing_bytes_are_refused(tmp_path: Path) -> None:
    def overlap(rows: np.ndarray) -> np.ndarray:
        rows["offset"][1] = rows["offset"][0]
        return rows

    ck = _copy(tmp_path)
    _rewrite_table(ck, 1, overlap)
    _fails(ck, "two rows claim byte")


@pytest.mark.parametrize(
    ("field", "delta", "match"),
    [
        ("nbytes", 4, "wrong nbytes"),
        ("crc", 1, "checksum index"),
        ("file", 1, "or file"),
        ("offset", 1 << 20, "past the end of its file"),
        ("piece", 5, "not one it writes"),
        ("key", 1, "not one it writes"),
    ],
)
def test_a_row_that_lies_is_refused(tmp_path: Path, field: str, delta: int, match: str) -> None:
    def lie(rows: np.ndarray) -> np.ndarray:
        rows[field][-1] += delta
        return rows

    ck = _copy(tmp_path)
    _rewrite_table(ck, 1, lie)
    _fails(ck, match)


def test_a_writer_without_a_table_is_refused(tmp_path: Path) -> None:
    ck = _copy(tmp_path)
    m = _manifest(ck)
    m["tables"] = m["tables"][:1]
    _write_manifest(ck, m)
    _fails(ck, "rank 1 writes layout shards but the manifest lists no table")


MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], object], str]] = {
    "mesh rank out of range": (lambda d: d["meshes"][0].update(ranks=[0, 2]), "below world_size"),
    "mesh ranks repeat": (lambda d: d["meshes"][0].update(ranks=[1, 1]), "distinct"),
    "mesh too small": (lambda d: d["meshes"][0].update(ranks=[0]), "lists 1 ranks"),
    "unknown mesh": (lambda d: d["tensors"]["w"]["layout"].update(mesh=1), "layout mesh"),
    "shard past ndim": (
        lambda d: d["tensors"]["w"]["layout"].update(placements=["shard(2)"]),
        "shards a dim",
    ),
    "partial": (lambda d: d["tensors"]["w"]["layout"].update(placements=["partial"]), "placement"),
    "placements per mesh dim": (
        lambda d: d["tensors"]["w"]["layout"].update(placements=["shard(0)", "replicate"]),
        "2 placements for a 1-d mesh",
    ),
    "layout with chunks": (lambda d: d["tensors"]["w"].update(chunks=[]), "has no chunks"),
    "table rank out of range": (lambda d: d["tables"][1].update(rank=2), "table rank"),
    "tables out of order": (lambda d: d["tables"].reverse(), "once each, by rank"),
    "table file unlisted": (
        lambda d: d["tables"][0].update(files=["data/0golden2/r9-s0.bin"]),
        "which files does not list",
    ),
    "table file shared": (
        lambda d: d["tables"][1].update(files=d["tables"][0]["files"]),
        "which a table lists already",
    ),
    "table as data file": (
        lambda d: d["tables"][0].update(name=d["files"][0]["name"]),
        "also listed",
    ),
    "chunk into a table's file": (
        lambda d: d["tables"][0].update(files=[d["files"][0]["name"]]),
        "a table's file",
    ),
    "table name escapes": (lambda d: d["tables"][0].update(name="../r0.tab"), "refusing"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_invalid_v2_manifest_is_a_clear_error(name: str) -> None:
    data = json.loads((GOLDEN / "manifest.json").read_bytes())
    mutate, match = MUTATIONS[name]
    mutate(data)
    with pytest.raises(dckpt.CheckpointError, match=match):
        manifest_from_bytes(json.dumps(data).encode(), source="golden")


def test_a_version_1_manifest_ignores_layout_fields() -> None:
    """Unknown fields are ignored: a v1 reader of this version does not see layouts."""
    data = json.loads((GOLDEN.parent / "v1" / "manifest.json").read_bytes())
    data["tensors"]["w"]["layout"] = {"mesh": 0, "placements": []}
    m = manifest_from_bytes(json.dumps(data).encode(), source="v1")
    assert m.tensors["w"].layout is None and m.tensors["w"].chunks
