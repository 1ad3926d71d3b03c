"""The manifest rules ``load`` and ``verify`` share, each pinned by a mutated golden manifest.

Every rejection here is one a looser parser let through: a checkpoint that ``verify`` called
intact but that could not load, or that made a reader allocate far more than its files hold,
or JSON whose meaning depends on which parser reads it.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import pickle
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import dckpt
from dckpt._api import open_checkpoint
from dckpt._errors import CorruptCheckpointError, UnsafeCheckpointError
from dckpt._format import ChunkRecord, manifest_from_bytes
from dckpt._manifest_checks import tiling_problem
from dckpt.cli._commands import cli

GOLDEN = Path(__file__).parent / "golden" / "v1"
RAW = (GOLDEN / "manifest.json").read_bytes()
DATA = "data/0golden/r0-0.bin"
W_OFFSET = 192  # where the golden data file holds "w" (float32 [2, 3], 24 bytes)


def _golden_copy(tmp_path: Path, manifest: bytes) -> Path:
    ck = tmp_path / "ck"
    shutil.copytree(GOLDEN, ck)
    (ck / "manifest.json").write_bytes(manifest)
    return ck


def _edited(edit: Callable[[dict[str, Any]], None]) -> bytes:
    doc = json.loads(RAW)
    edit(doc)
    return json.dumps(doc).encode()


def _replaced(old: bytes, new: bytes) -> bytes:
    assert RAW.count(old) == 1, old
    return RAW.replace(old, new)


def _verify_cli(ck: Path) -> int:
    result = CliRunner().invoke(cli, ["verify", "--json", str(ck)])
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code


def _w_rows(rows: range) -> list[dict[str, Any]]:
    """One chunk per row of the golden "w", each pointing at that row's real bytes."""
    data = (GOLDEN / DATA).read_bytes()
    out = []
    for i, r in enumerate(rows):
        start = W_OFFSET + 12 * r
        out.append(
            {
                "offsets": [i, 0],
                "sizes": [1, 3],
                "file": DATA,
                "offset": start,
                "nbytes": 12,
                "crc32c": [crc32c.crc32c(data[start : start + 12])],
            }
        )
    return out


# ----------------------------------------------------------------------------- coverage


def test_overlapping_chunks_that_leave_a_hole_are_rejected_by_load_and_verify(
    tmp_path: Path,
) -> None:
    """Issue 11.7a: two chunks with the same box, half the tensor uncovered. The element
    count adds up, so the old check passed it and `verify` said OK while load failed."""

    def edit(doc: dict[str, Any]) -> None:
        doc["tensors"]["w"]["chunks"] = _w_rows(range(1)) * 2  # row 0 twice, row 1 never

    ck = _golden_copy(tmp_path, _edited(edit))
    with pytest.raises(CorruptCheckpointError, match=r"'w'.*do not tile.*overlap"):
        dckpt.load({"w": torch.zeros(2, 3)}, ck, strict=False)
    with pytest.raises(CorruptCheckpointError, match="do not tile"):
        open_checkpoint(ck).verify()
    assert _verify_cli(ck) == 1


def test_chunks_sharing_bytes_cannot_claim_more_than_the_files_hold(tmp_path: Path) -> None:
    """Issue 11.7b: many chunks pointing at the same bytes. Each chunk is in bounds, its
    checksum matches and the boxes tile, so 4096 chunks on the same 12 bytes described a
    tensor 227 times the size of the data file, `verify` said OK and `read_tensor`
    allocated all of it (the same trick scales to gigabytes)."""
    rows = 4096

    def edit(doc: dict[str, Any]) -> None:
        w = doc["tensors"]["w"]
        w["shape"] = [rows, 3]
        w["chunks"] = [dict(c, offsets=[i, 0]) for i, c in enumerate(_w_rows(range(1)) * rows)]

    ck = _golden_copy(tmp_path, _edited(edit))
    start = time.monotonic()
    with pytest.raises(CorruptCheckpointError, match=r"chunks of key 'w' claim byte 192 of"):
        open_checkpoint(ck)
    with pytest.raises(CorruptCheckpointError, match="chunks must not share bytes"):
        dckpt.load({"w": torch.zeros(rows, 3)}, ck)
    assert _verify_cli(ck) == 1
    assert time.monotonic() - start < 5


def test_chunks_of_different_keys_sharing_bytes_are_rejected() -> None:
    def edit(doc: dict[str, Any]) -> None:
        doc["tensors"]["mask"]["chunks"][0]["offset"] = 0  # on top of "h"
        doc["tensors"]["mask"]["chunks"][0]["crc32c"] = [0]

    with pytest.raises(CorruptCheckpointError, match=r"of keys 'h', 'mask' claim byte 0"):
        manifest_from_bytes(_edited(edit), source="golden")


def test_exact_tilings_of_any_shape_are_accepted(tmp_path: Path) -> None:
    """Row chunks, empty chunks and a valid checkpoint's own layout still load and verify."""

    def edit(doc: dict[str, Any]) -> None:
        rows = _w_rows(range(2))
        empty = {"offsets": [2, 0], "sizes": [0, 3], "file": DATA, "offset": 0, "nbytes": 0}
        doc["tensors"]["w"]["chunks"] = [*rows, {**empty, "crc32c": [0]}]

    ck = _golden_copy(tmp_path, _edited(edit))
    assert open_checkpoint(ck).verify() == []  # reading the empty chunk raised IndexError
    got = {"w": torch.zeros(2, 3)}
    dckpt.load(got, ck, strict=False)
    assert torch.equal(got["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert _verify_cli(ck) == 0


Boxes = list[tuple[tuple[int, ...], tuple[int, ...]]]


def test_verify_checks_the_files_a_load_reads(tmp_path: Path) -> None:
    """A listed file that holds no chunk's bytes is never opened by a load, so its absence
    is no problem for `verify` either (it used to report it while every key loaded)."""

    def edit(doc: dict[str, Any]) -> None:
        doc["files"].append({"name": "data/0golden/r0-1.bin", "size": 64})

    ck = _golden_copy(tmp_path, _edited(edit))
    assert open_checkpoint(ck).verify() == []
    dckpt.load({"w": torch.zeros(2, 3)}, ck, strict=False)
    assert _verify_cli(ck) == 0
    (ck / DATA).unlink()  # the file every tensor is in: both fail
    assert "missing" in " ".join(open_checkpoint(ck).verify())
    with pytest.raises(CorruptCheckpointError, match="missing"):
        dckpt.load({"w": torch.zeros(2, 3)}, ck, strict=False)


def _chunks(boxes: Boxes) -> list[ChunkRecord]:
    return [ChunkRecord(o, s, "f", 0, 0, (0,)) for o, s in boxes]


def test_non_grid_tilings_get_the_exact_general_check() -> None:
    # Bricks: each row band split at a different column (not a grid), and a pinwheel that
    # no sequence of straight cuts produces.
    bricks = [((0, 0), (2, 3)), ((0, 3), (2, 1)), ((2, 0), (2, 1)), ((2, 1), (2, 3))]
    pinwheel = [
        ((0, 0), (2, 1)),
        ((0, 1), (1, 2)),
        ((1, 2), (2, 1)),
        ((2, 0), (1, 2)),
        ((1, 1), (1, 1)),
    ]
    assert tiling_problem((4, 4), _chunks(bricks)) is None
    assert tiling_problem((3, 3), _chunks(pinwheel)) is None
    # Same element count, but [0:2, 2:3] twice and [2:4, 3:4] never.
    bad = [((0, 0), (2, 3)), ((0, 2), (2, 2)), ((2, 0), (2, 1)), ((2, 1), (2, 2))]
    assert "overlap" in (tiling_problem((4, 4), _chunks(bad)) or "")


boxes_3d = st.tuples(*[st.integers(0, 3)] * 6).map(
    lambda t: ((t[0], t[1], t[2]), (t[3] % (4 - t[0]), t[4] % (4 - t[1]), t[5] % (4 - t[2])))
)


def _grid(cuts: tuple[list[int], ...]) -> Boxes:
    """The boxes of a grid on a 4x4x4 tensor, cut at ``cuts`` along each dimension."""
    spans = [list(itertools.pairwise([0, *sorted(set(c) - {0, 4}), 4])) for c in cuts]
    return [
        (tuple(a for a, _ in combo), tuple(b - a for a, b in combo))
        for combo in itertools.product(*spans)
    ]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.lists(boxes_3d, max_size=9),
        st.tuples(*[st.lists(st.integers(0, 4), max_size=3)] * 3).map(_grid),
    ),
    st.data(),
)
def test_tiling_check_matches_counting_every_element(boxes: Boxes, data: st.DataObject) -> None:
    """Against brute force on a 4x4x4 tensor: random boxes, and grids with one box moved,
    dropped or repeated (layouts whose element counts can still add up)."""
    if boxes and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(boxes) - 1))
        sizes = boxes[i][1]
        op = data.draw(st.sampled_from(["move", "drop", "repeat"]))
        if op == "move":
            to = tuple(data.draw(st.integers(0, 4 - n)) for n in sizes)
            boxes = [*boxes[:i], (to, sizes), *boxes[i + 1 :]]
        else:
            boxes = [*boxes[:i], *boxes[i + 1 :], *[boxes[i]] * (2 if op == "repeat" else 0)]
    count = torch.zeros(4, 4, 4, dtype=torch.int64)
    for o, s in boxes:
        count[o[0] : o[0] + s[0], o[1] : o[1] + s[1], o[2] : o[2] + s[2]] += 1
    exact = bool((count == 1).all())
    assert (tiling_problem((4, 4, 4), _chunks(boxes)) is None) == exact


def test_per_rank_chunks_must_tile_for_each_rank() -> None:
    chunks = [
        ChunkRecord((0,), (4,), "f", 0, 0, (0,), 0),
        ChunkRecord((0,), (2,), "f", 0, 0, (0,), 1),
        ChunkRecord((0,), (2,), "f", 0, 0, (0,), 1),
    ]
    assert "of rank 1" in (tiling_problem((4,), chunks) or "")
    assert tiling_problem((4,), chunks[:1]) is None


def test_tiling_check_stays_fast_for_large_manifests() -> None:
    """160k chunks each: in 2-D grids, in a non-grid layout (the general check) and in rows."""
    grid = [((16 * a, 16 * b), (16, 16)) for a in range(4) for b in range(2)]
    uneven = [((0, 0), (1, 20)), ((0, 20), (1, 12)), ((1, 0), (63, 32))]
    rows = [((i, 0), (1, 32)) for i in range(64)]
    for layout, tensors in ((grid, 20_000), (uneven, 53_000), (rows, 2_500)):
        chunks = _chunks(layout)
        start = time.process_time()
        for _ in range(tensors):
            assert tiling_problem((64, 32), chunks) is None
        spent = time.process_time() - start
        assert spent < 5, (layout[:2], spent)  # about 0.2 s each on a laptop core


def test_a_terabyte_claim_is_refused_before_any_allocation(tmp_path: Path) -> None:
    """The manifest may claim a file of any size; `read_tensor` allocated the claimed tensor
    (1 TiB here) before checking the file against it."""

    def edit(doc: dict[str, Any]) -> None:
        doc["checksum"]["block_bytes"] = 1 << 30
        doc["files"][0]["size"] = (1 << 40) + 256
        w = doc["tensors"]["w"]
        w["shape"] = [1 << 38]
        w["chunks"] = [
            {
                "offsets": [0],
                "sizes": [1 << 38],
                "file": DATA,
                "offset": 256,
                "nbytes": 1 << 40,
                "crc32c": [0] * 1024,
            }
        ]

    ck = _golden_copy(tmp_path, _edited(edit))
    reader = open_checkpoint(ck)
    with pytest.raises(CorruptCheckpointError, match="manifest promises"):
        reader.read_tensor("w")
    assert any("manifest promises" in p for p in reader.verify())


# ----------------------------------------------------------------------------- strict JSON


STRICT_JSON = {
    "repeated top-level key": (
        b'{"checksum"',
        b'{"version":99,"checksum"',
        "'version' appears twice",
    ),
    "repeated chunk key": (b'"offset":64,', b'"offset":64,"offset":0,', "'offset' appears twice"),
    "repeated key in a value": (b'{"lr":0.1,', b'{"lr":0.1,"lr":0.2,', "'lr' appears twice"),
    "1e999 as created": (b"1700000000.0", b"1e999", "1e999 is out of the range"),
    "-1e999 in a value": (b'"value":3}', b'"value":-1e999}', "-1e999 is out of the range"),
    "1E400 in a value": (b'"lr":0.1', b'"lr":1E400', "1E400 is out of the range"),
    "NaN literal": (b'"value":3}', b'"value":NaN}', "constant NaN"),
}


@pytest.mark.parametrize("name", sorted(STRICT_JSON))
def test_json_the_format_forbids_is_rejected(name: str, tmp_path: Path) -> None:
    old, new, message = STRICT_JSON[name]
    raw = _replaced(old, new)
    with pytest.raises(CorruptCheckpointError, match=message):
        manifest_from_bytes(raw, source="golden")
    ck = _golden_copy(tmp_path, raw)
    with pytest.raises(CorruptCheckpointError, match=message):
        dckpt.load({"w": torch.zeros(2, 3)}, ck, strict=False)
    result = CliRunner().invoke(cli, ["inspect", str(ck)])  # 1e999 was an OverflowError here
    assert result.exit_code == 1 and message in result.stderr
    assert "OverflowError" not in result.output


def test_huge_finite_created_time_still_inspects(tmp_path: Path) -> None:
    ck = _golden_copy(tmp_path, _replaced(b"1700000000.0", b"1e300"))
    result = CliRunner().invoke(cli, ["inspect", str(ck)])
    assert result.exit_code == 0, result.output
    assert "created 1e+300 s after the epoch" in result.stdout


# ----------------------------------------------------------------------------- names and ranks


NAMES = {
    "file name ending in a newline": (
        b'"name":"data/0golden/r0-0.bin"',
        b'"name":"data/0golden/r0-0.bin\\n"',
        UnsafeCheckpointError,
        "refusing",
    ),
    "save_id ending in a newline": (
        b'"save_id":"0golden"',
        b'"save_id":"0golden\\n"',
        CorruptCheckpointError,
        "save_id '0golden\\\\n' is malformed",
    ),
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_names_must_match_their_pattern_entirely(name: str) -> None:
    old, new, error, message = NAMES[name]
    raw = _replaced(old, new)
    if b"r0-0.bin\\n" in raw:  # the chunks name the file too
        raw = raw.replace(b'"file":"data/0golden/r0-0.bin"', b'"file":"data/0golden/r0-0.bin\\n"')
    with pytest.raises(error, match=message):
        manifest_from_bytes(raw, source="golden")


def _per_rank(ranks: dict[str, object]) -> bytes:
    text = json.dumps({"path": ["meta", "epoch"], "per_rank": ranks}).encode()
    return _replaced(b'{"path":["meta","epoch"],"value":3}', text)


@pytest.mark.parametrize("rank", ["\u0660", "00", "+0", " 0", "0 ", "0x0", "-0", "\uff10"])
def test_per_rank_keys_are_canonical_ascii_decimals(rank: str) -> None:
    """int() reads all of these as rank 0, so {"0": a, "\\u0660": b} meant "rank 0: b"."""
    with pytest.raises(CorruptCheckpointError, match="not a canonical decimal"):
        manifest_from_bytes(_per_rank({"0": 1, rank: 2}), source="golden")


def test_canonical_per_rank_keys_load(tmp_path: Path) -> None:
    m = manifest_from_bytes(_per_rank({"0": 7}), source="golden")
    assert m.values["meta.epoch"].per_rank == {0: 7}
    with pytest.raises(CorruptCheckpointError, match="rank of 'meta.epoch'"):
        manifest_from_bytes(_per_rank({"1": 7}), source="golden")  # world_size is 1


# ----------------------------------------------------------------------------- values


VALUES = {
    "unknown tag": (b'"tuple"', b'"tuplex"', "unknown tag 'tuplex'"),
    "bad base64": (b'"AAH/"', b'"AAH"', "'meta.raw' is malformed"),
    "bad float repr": (b'"repr":"inf"', b'"repr":"1.5"', "bad float '1.5'"),
    "tuple without items": (b'"items":[1,2.5]', b'"things":[1,2.5]', "'meta.pair' is malformed"),
}


@pytest.mark.parametrize("name", sorted(VALUES))
def test_malformed_values_fail_when_the_manifest_is_read(name: str, tmp_path: Path) -> None:
    """A load that did not ask for the value used to succeed, and `verify` said OK, while
    loading the value failed: now the manifest is rejected whatever is asked for."""
    old, new, message = VALUES[name]
    ck = _golden_copy(tmp_path, _replaced(old, new))
    with pytest.raises(CorruptCheckpointError, match=message):
        dckpt.load({"w": torch.zeros(2, 3)}, ck, strict=False)
    with pytest.raises(CorruptCheckpointError, match=message):
        open_checkpoint(ck)
    assert _verify_cli(ck) == 1


def test_pickled_values_are_checked_without_being_unpickled(tmp_path: Path) -> None:
    blob = base64.b64encode(pickle.dumps(math.pi)).decode()
    pickled = json.dumps({"__dckpt__": "pickle", "b64": blob}, separators=(",", ":")).encode()
    ck = _golden_copy(tmp_path, _replaced(b'{"__dckpt__":"float","repr":"inf"}', pickled))
    assert open_checkpoint(ck).verify() == []
    got: dict[str, Any] = {"meta": {"lr": None}}
    dckpt.load(got, ck, strict=False, allow_pickle=True)
    assert got["meta"]["lr"] == math.pi
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
        dckpt.load(got, ck, strict=False)
    bad = _replaced(b'{"__dckpt__":"float","repr":"inf"}', pickled.replace(b'"b64":"', b'"b64":"!'))
    with pytest.raises(CorruptCheckpointError, match="bad pickle data"):
        manifest_from_bytes(bad, source="golden")

    def after_a_pickle(doc: dict[str, Any]) -> None:  # the decoder stops at the pickle
        value = [json.loads(pickled), {"__dckpt__": "nope"}]
        doc["values"] = {"v": {"path": ["v"], "value": value}}

    with pytest.raises(CorruptCheckpointError, match="unknown tag 'nope'"):
        manifest_from_bytes(_edited(after_a_pickle), source="golden")
