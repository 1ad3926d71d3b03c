"""The on-disk format, pinned byte for byte, and the manifest parser under hostile input."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dckpt
from dckpt import _save
from dckpt._errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from dckpt._format import (
    ChunkRecord,
    FileRecord,
    Manifest,
    TensorEntry,
    ValueEntry,
    manifest_from_bytes,
)
from dckpt._manifest_text import manifest_to_bytes, manifest_to_json

GOLDEN = Path(__file__).parent / "golden" / "v1"


def golden_state() -> dict[str, object]:
    return {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "h": torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "step": torch.tensor(7, dtype=torch.int64),
        "meta": {
            "epoch": 3,
            "name": "golden",
            "pair": (1, 2.5),
            "raw": b"\x00\x01\xff",
            "lr": float("inf"),
            "groups": [{"lr": 0.1, "params": ["w"]}],
        },
    }


def save_golden(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_save, "new_save_id", lambda: "0golden")
    monkeypatch.setattr(_save, "_clock", lambda: 1700000000.0)
    monkeypatch.setattr(_save, "_library_version", lambda: "dckpt golden")
    dckpt.save(golden_state(), path)


def test_save_matches_golden_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_golden(tmp_path / "ck", monkeypatch)
    produced = sorted(
        str(p.relative_to(tmp_path / "ck"))
        for p in (tmp_path / "ck").rglob("*")
        if p.is_file() and p.name != ".dckpt.lock"
    )
    expected = sorted(str(p.relative_to(GOLDEN)) for p in GOLDEN.rglob("*") if p.is_file())
    assert produced == expected
    for rel in expected:
        assert (tmp_path / "ck" / rel).read_bytes() == (GOLDEN / rel).read_bytes(), rel


def test_golden_checkpoint_loads(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN, tmp_path / "ck")
    want = golden_state()
    got: dict[str, object] = {
        "w": torch.zeros(2, 3),
        "h": torch.zeros(3, dtype=torch.bfloat16),
        "mask": torch.zeros(3, dtype=torch.bool),
        "step": torch.tensor(0),
        "meta": {"epoch": 0, "name": "", "pair": None, "raw": None, "lr": 0.0, "groups": []},
    }
    result = dckpt.load(got, tmp_path / "ck")
    assert result == dckpt.LoadResult()
    for k in ("w", "h", "mask", "step"):
        assert torch.equal(got[k], want[k]), k  # type: ignore[arg-type]
    assert got["meta"] == want["meta"]


def test_manifest_round_trips_canonically() -> None:
    raw = (GOLDEN / "manifest.json").read_bytes()
    m = manifest_from_bytes(raw, source="golden")
    assert manifest_to_bytes(m) == raw
    assert m.world_size == 1
    assert m.tensors["w"].shape == (2, 3)


def _golden_json() -> dict[str, object]:
    data: dict[str, object] = json.loads((GOLDEN / "manifest.json").read_bytes())
    return data


def _chunk(data: dict[str, object], key: str = "w") -> dict[str, object]:
    return data["tensors"][key]["chunks"][0]  # type: ignore[index,no-any-return]


ESCAPES = [
    "../outside.bin",
    "/etc/passwd",
    "data/../../x",
    "data//x",
    "./data/x",
    "manifest.json",
    "a\\b",
]


@pytest.mark.parametrize("name", ESCAPES)
def test_path_escape_is_refused_before_any_open(name: str, tmp_path: Path) -> None:
    data = _golden_json()
    data["files"][0]["name"] = name  # type: ignore[index]
    for key in data["tensors"]:  # type: ignore[union-attr]
        _chunk(data, key)["file"] = name
    shutil.copytree(GOLDEN, tmp_path / "ck")
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UnsafeCheckpointError, match="refusing"):
        dckpt.load({"w": torch.zeros(2, 3)}, tmp_path / "ck")


def test_symlinked_data_file_is_refused(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN, tmp_path / "ck")
    secret = tmp_path / "secret.bin"
    data_file = next((tmp_path / "ck" / "data").rglob("*.bin"))
    secret.write_bytes(data_file.read_bytes())
    data_file.unlink()
    os.symlink(secret, data_file)
    with pytest.raises(UnsafeCheckpointError, match="symbolic link"):
        dckpt.load({"w": torch.zeros(2, 3)}, tmp_path / "ck")


def test_symlinked_data_directory_is_refused(tmp_path: Path) -> None:
    shutil.copytree(GOLDEN, tmp_path / "ck")
    outside = tmp_path / "outside"
    shutil.move(tmp_path / "ck" / "data", outside)
    os.symlink(outside, tmp_path / "ck" / "data")
    with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint"):
        dckpt.load({"w": torch.zeros(2, 3)}, tmp_path / "ck")


MUTATIONS = {
    "bad format": lambda d: d.update(format="other"),
    "future version": lambda d: d.update(version=99),
    "bad dtype": lambda d: d["tensors"]["w"].update(dtype="float99"),
    "chunk past shape": lambda d: _chunk(d).update(offsets=[1, 0]),
    "nbytes lies": lambda d: _chunk(d).update(nbytes=4),
    "past end of file": lambda d: _chunk(d).update(offset=10**9),
    "huge claimed tensor": lambda d: d["tensors"]["w"].update(shape=[10**12, 3]),
    "crc count": lambda d: _chunk(d).update(crc32c=[]),
    "unlisted file": lambda d: _chunk(d).update(file="data/0golden/r9-0.bin"),
    "negative offset": lambda d: _chunk(d).update(offset=-64),
    "path does not spell key": lambda d: d["tensors"]["w"].update(path=["x"]),
    "bool as int": lambda d: d.update(world_size=True),
    "missing field": lambda d: d.pop("files"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_invalid_manifest_is_a_clear_error(name: str) -> None:
    data = _golden_json()
    MUTATIONS[name](data)
    with pytest.raises(CorruptCheckpointError, match="golden"):
        manifest_from_bytes(json.dumps(data).encode(), source="golden")


def test_nan_literal_is_rejected() -> None:
    raw = (
        (GOLDEN / "manifest.json").read_bytes().replace(b'"created":1700000000.0', b'"created":NaN')
    )
    with pytest.raises(CorruptCheckpointError, match="JSON"):
        manifest_from_bytes(raw, source="golden")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_fuzzed_manifest_bytes_only_raise_checkpoint_errors(data: st.DataObject) -> None:
    raw = bytearray((GOLDEN / "manifest.json").read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if op == "flip":
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "delete":
            del raw[i]
        else:
            raw.insert(i, data.draw(st.integers(0, 255)))
    with contextlib.suppress(CheckpointError):
        manifest_from_bytes(bytes(raw), source="fuzz")


names = st.text(min_size=1, max_size=8)  # any unicode: keys are escaped to ASCII


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    files = (FileRecord("data/x/r0-0.bin", 1 << 20), FileRecord("data/x/r1-0.bin", 64))
    tensors = {}
    for key in draw(st.lists(names, max_size=6, unique=True)):
        per_rank = draw(st.booleans())
        ndim = draw(st.integers(0, 3))
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
        chunk = ChunkRecord(
            (0,) * ndim,
            shape,
            files[draw(st.integers(0, 1))].name,
            64 * draw(st.integers(0, 9)),
            4 * math.prod(shape),
            tuple(draw(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=3))),
            draw(st.integers(0, 3)) if per_rank else None,
        )
        path = (key, *draw(st.lists(st.integers(0, 9) | names, max_size=2)))
        tensors[key] = TensorEntry(path, "float32", shape, (chunk,), per_rank)
    values = {
        k: ValueEntry((k,), value=draw(st.none() | st.integers() | names | st.lists(st.integers())))
        for k in draw(st.lists(names, max_size=3, unique=True))
        if k not in tensors
    }
    return Manifest("abc", 4, draw(st.floats(0, 2e9)), files, tensors, values)


@given(manifests())
def test_fast_manifest_encoder_matches_reference_json(m: Manifest) -> None:
    reference = json.dumps(
        manifest_to_json(m), sort_keys=True, separators=(",", ":"), allow_nan=False
    )
    assert manifest_to_bytes(m) == reference.encode("ascii") + b"\n"
