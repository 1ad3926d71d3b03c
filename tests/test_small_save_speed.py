"""The small-tensor save's fast paths give exactly what the plain paths give: the
manifest template with layout entries between its chunk entries, describing with
checksums in one pass, and the write results as they travel to rank 0."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dckpt import CheckpointError
from dckpt._describe import checksum_plain, describe
from dckpt._dtensor import PlacementSpec
from dckpt._format import FileRecord, Manifest, TensorEntry
from dckpt._layout import Layout, LayoutOffer, LayoutReport, MeshRecord, MeshReport
from dckpt._manifest_build import build_manifest
from dckpt._manifest_text import layout_entry_text, manifest_to_bytes
from dckpt._plan import (
    ChunkOffer,
    FileResult,
    LayoutPart,
    OwnReport,
    RankOffer,
    RankWritten,
    TensorOffer,
    manifest_template,
    plan_save,
    render_manifest,
)
from dckpt._reshard import Box
from dckpt._wireout import decode_written, encode_written

_KW: dict[str, Any] = {"created": 2.5, "block_bytes": 1 << 20, "library": "t"}


def _offers(keys: list[str], empty: set[str], world: int) -> list[RankOffer]:
    out = []
    for r in range(world):
        tensors = []
        for i, key in enumerate(keys):
            if key in empty:
                tensors.append(TensorOffer(key, (key,), "float32", (0,), False, ()))
                continue
            box = Box((0,), (i + 1,))
            crc = (r,) if i % 3 == 0 else (5,)  # every third one diverges: per-rank chunks
            tensors.append(
                TensorOffer(key, (key,), "float32", (i + 1,), False, (ChunkOffer(box, crc),))
            )
        out.append(RankOffer(r, tuple(tensors), ()))
    return out


@given(
    keys=st.lists(st.sampled_from("bdfhjlnp"), unique=True, max_size=8),
    empty=st.sets(st.sampled_from("bdfhjlnp")),
    layout_keys=st.lists(st.sampled_from("abcdefghijklmnopq"), unique=True, max_size=6),
    world=st.integers(1, 3),
)
def test_layout_entries_land_in_key_order_among_chunk_entries(
    keys: list[str], empty: set[str], layout_keys: list[str], world: int
) -> None:
    layout_keys = sorted(set(layout_keys) - set(keys))
    plan = plan_save(_offers(keys, empty, world), "abc12")
    results = [
        [FileResult(f.name, f.size, tuple((j, 7) for j, _ in enumerate(f.items))) for f in rp.files]
        for rp in plan.ranks
    ]
    layout = Layout(0, (PlacementSpec("shard", 0),))
    texts = [layout_entry_text("float32", layout, (k,), (4,)) for k in layout_keys]
    part = LayoutPart(
        tuple((k, f'"{k}":{t}') for k, t in zip(layout_keys, texts, strict=True)),
        (FileRecord("data/abc12/r0-s0.bin", 64),),
        (MeshRecord((1,), (0,)),),
        (),
    )
    got = render_manifest(manifest_template(plan), plan, results, layouts=part, **_KW)
    chunked = build_manifest(plan, results, **_KW)
    entries = {k: TensorEntry((k,), "float32", (4,), (), layout=layout) for k in layout_keys}
    reference = dataclasses.replace(
        chunked,
        files=tuple(sorted((*chunked.files, *part.files), key=lambda f: f.name)),
        tensors=dict(sorted({**chunked.tensors, **entries}.items())),
        version=2,
        meshes=part.meshes,
    )
    assert isinstance(reference, Manifest)
    assert got == manifest_to_bytes(reference)


def test_describing_with_checksums_equals_checksumming_after() -> None:
    state = {
        "a": torch.arange(6.0).reshape(2, 3),
        "b": torch.zeros(0),
        "c": torch.ones(3, dtype=torch.bfloat16),
        "d": torch.arange(6.0).reshape(2, 3) + 1,  # a shape met before: a shared box
        "step": 4,
    }
    plain = describe(state, 1, allow_pickle=False)
    fused = describe(state, 1, allow_pickle=False, checksums=True)
    offer, known = checksum_plain(plain)
    assert fused.offer == plain.offer  # the checksums travel beside the offer
    assert fused.crcs == tuple(
        None if t.sharded or not t.chunks else t.chunks[0].crc for t in offer.tensors
    )
    assert fused.known is not None and fused.known.keys() == known.keys()
    for where, (crcs, data) in known.items():
        assert fused.known[where][0] == crcs and bytes(fused.known[where][1]) == bytes(data)
    assert checksum_plain(fused) == (offer, fused.known)  # not checksummed twice


def test_write_reports_round_trip() -> None:
    files = (FileResult("data/x/r3-0.bin", 128, ((1,), (2, 3), ())),)
    layouts = LayoutReport(
        3,
        (MeshReport(b"m" * 16, (2, 2), 3, b"e" * 16),),
        (LayoutOffer("w", ("m", "w"), "float32", (4, 2), 0, (PlacementSpec("shard", 0),)),),
        (("data/x/r3-s0.bin", 64),),
        ("data/x/r3.tab", 80, 12345),
    )
    for written in (RankWritten(files), RankWritten(files, layouts), RankWritten(())):
        assert decode_written(encode_written(written), 3) == written
    # The own entries' text arrives as bytes (rank 0 joins them into the manifest as they
    # are), checked ASCII; a report with any other byte is refused naming the rank.
    text = '"a":{"x":1},"b":{"y":2}'
    own = RankWritten(files, None, OwnReport(text, (0, 12), (("data/x/r3-o0.bin", 64),)))
    back = decode_written(encode_written(own), 3)
    assert back.own is not None and back.own.text == text.encode() and back.own.starts == (0, 12)
    blob = encode_written(own)
    bad = blob.replace(b'"b":{"y"', b'"\xff":{"y"')
    assert bad != blob
    with pytest.raises(CheckpointError, match="rank 3"):
        decode_written(bad, 3)
