"""The coordination codec (dckpt._wire, dckpt._wireout): exact round trips of what a save
sends, equal bytes for equal state on different ranks, and malformed or hostile blobs
that fail as a CheckpointError naming the rank, never as anything else."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dckpt._coordframes import Shared
from dckpt._describe import checksum_plain, describe
from dckpt._dtensor import PlacementSpec
from dckpt._errors import CheckpointError
from dckpt._layout import LayoutOffer, MeshOffer
from dckpt._plan import (
    ChunkOffer,
    FilePlan,
    FileResult,
    RankOffer,
    RankPlan,
    TensorOffer,
    WriteItem,
    plan_save,
    structure_key,
)
from dckpt._plancache import RESEND, Brief, Held, Reuse, crcs_of
from dckpt._reshard import Box
from dckpt._wire import (
    WireError,
    decode_messages,
    decode_offer,
    dump,
    encode_message,
    encode_offer,
    load,
)
from dckpt._wireout import (
    decode_answer,
    decode_results,
    encode_answer,
    encode_answers,
    encode_results,
)


def _offer(rank: int, *, distinct: bool = True) -> RankOffer:
    """A real described offer: plain tensors of several ranks (0-d, empty, 2-d), values."""
    state = {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "step": torch.tensor(5),
        "empty": torch.zeros(0, 3),
        "half": torch.ones(7, dtype=torch.bfloat16),
        "cfg": {"lr": 0.5, "betas": (0.9, 0.95), "name": "adam", "none": None, "inf": float("inf")},
        "nested": {"a": [1, {"b": b"\x00\xff"}], 3: "int key"},
    }
    if distinct:
        state[f"own{rank}"] = torch.full((2,), float(rank))
    offer, _ = checksum_plain(describe(state, rank, allow_pickle=False))
    return offer


def _with_layouts(offer: RankOffer, position: int) -> RankOffer:
    mesh = MeshOffer(b"m" * 16, (2, 4), position)
    specs = (PlacementSpec("shard", 0, 1), PlacementSpec("strided_shard", 1, 4))
    layout = LayoutOffer("dt", ("model", "dt"), "float32", (8, 8), 0, specs)
    return RankOffer(offer.rank, offer.tensors, offer.values, (layout,), (mesh,))


def _sharded(rank: int) -> TensorOffer:
    box = Box((rank * 2, 0), (2, 5))
    return TensorOffer("s", ("s",), "float32", (8, 5), True, (ChunkOffer(box),))


def _roundtrip(offer: RankOffer) -> RankOffer:
    common, own = encode_offer(offer, structure_key(offer))
    decoded, key = decode_offer(common, own, offer.rank)
    assert key == structure_key(offer)
    return decoded


def test_offers_round_trip_exactly() -> None:
    offer = _offer(3)
    offer = RankOffer(3, (*offer.tensors, _sharded(3)), offer.values)
    assert _roundtrip(offer) == offer
    with_layouts = _with_layouts(offer, 5)
    assert _roundtrip(with_layouts) == with_layouts
    empty = RankOffer(0, (), ())
    assert _roundtrip(empty) == empty


def test_rank_0_makes_only_the_tensors_it_plans_from_an_offer() -> None:
    offer = _offer(3)
    offer = RankOffer(3, (*offer.tensors, _sharded(3)), offer.values)
    common, own = encode_offer(offer, structure_key(offer))
    ((held, _),) = decode_messages([Shared(common, own)])
    assert isinstance(held, Held)
    assert list(held.tensors.keys) == [t.key for t in offer.tensors]
    last = len(offer.tensors) - 1
    assert held.tensors.select(()) == ()
    assert held.tensors.select((1, last)) == (offer.tensors[1], offer.tensors[last])
    assert held.full() == dataclasses.replace(offer, rank=0)  # the sender: its place


def test_a_paths_column_that_lies_fails_naming_the_rank_when_read() -> None:
    offer = _offer(3)
    common, own = encode_offer(offer, structure_key(offer))
    tag, header, columns = load(common, 3, "offer")
    short = columns[4].rsplit(b"\n", 1)[0]  # one path fewer than keys
    for paths in (short, b"\n".join([b"{}"] * len(offer.tensors))):  # or not lists
        hostile = dump(tag, header, *columns[:4], paths)
        ((held, _),) = decode_messages([Shared(hostile, own)])
        assert isinstance(held, Held)
        with pytest.raises(WireError, match="rank 5"):
            decode_messages([Shared(common, own)] * 5 + [Shared(hostile, own)])[5][0].full()  # type: ignore[union-attr]


def test_decoded_values_keep_their_canonical_text() -> None:
    offer = _offer(1)
    decoded = _roundtrip(offer)
    assert [v.text for v in decoded.values] == [v.text for v in offer.values]
    assert [v.data for v in decoded.values] == [v.data for v in offer.values]


def test_ranks_holding_the_same_state_send_the_same_bytes_and_are_decoded_once() -> None:
    offers = [_with_layouts(_offer(r, distinct=False), position=r) for r in range(4)]
    encoded = [encode_message(o, structure_key(o)) for o in offers]
    assert len({common for common, _ in encoded}) == 1  # the rank is not in the message
    assert len({own for _, own in encoded}) == 4  # mesh positions differ
    common = encoded[0][0]  # as the coordinator delivers equal contents: one object
    decoded = decode_messages([Shared(common, own) for _, own in encoded])
    held = [m for m, _ in decoded if isinstance(m, Held)]
    assert [m.full() for m in held] == offers
    for m in held[1:]:  # one source of tensors: made once, and the planner groups them
        assert m.tensors is held[0].tensors and m.full().tensors is held[0].full().tensors
    plan = plan_save([m.full() for m in held], "abc")
    assert plan == plan_save(offers, "abc")


def test_briefs_round_trip() -> None:
    offer = _offer(2)
    brief = Brief(2, structure_key(offer), crcs_of(offer), offer.values)
    common, own = encode_message(brief, brief.key)
    assert own == b""
    ((decoded, key),) = decode_messages([Shared(common, own)])
    decoded_brief = Brief(2, decoded.key, decoded.crcs, decoded.values)  # type: ignore[union-attr]
    assert isinstance(decoded, Brief) and decoded_brief == brief and key == brief.key


def _rank_plan(rank: int) -> RankPlan:
    items = (
        WriteItem("a", Box((0, 0), (3, 4)), 0, 48),
        WriteItem("step", Box((), ()), 64, 8, per_rank=True),
        WriteItem("e", Box((0,), (0,)), 128, 0),
    )
    return RankPlan("0a1b", rank, (FilePlan(f"data/0a1b/r{rank}-0.bin", items, 128),))


def test_answers_round_trip() -> None:
    plan = _rank_plan(6)
    assert decode_answer(encode_answer((4, plan, ())), 6) == (4, plan, ())
    assert decode_answer(encode_answer((4, plan, (0, 3, 7, 9))), 6) == (4, plan, (0, 3, 7, 9))
    assert decode_answer(encode_answer(Reuse(9, "0a1b")), 6) == Reuse(9, "0a1b")
    assert decode_answer(encode_answer(RESEND), 6) == RESEND
    blobs = encode_answers([Reuse(1, "x"), (1, plan, ()), Reuse(1, "x")])
    assert blobs[0] is blobs[2]  # one note for every rank that holds the plan


def test_write_results_round_trip() -> None:
    results = [
        FileResult("data/x/r1-0.bin", 4096, ((1, 2, 3), (), (0xFFFFFFFF,))),
        FileResult("data/x/r1-1.bin", 0, ()),
    ]
    assert decode_results(encode_results(results), 1) == results
    assert decode_results(encode_results([]), 1) == []


@functools.cache
def _own() -> bytes:
    return encode_offer(_with_layouts(_offer(1), 2), b"")[1]


@functools.cache
def _blobs() -> list[tuple[str, bytes]]:
    offer = _with_layouts(_offer(1), 2)
    common, _ = encode_offer(offer, structure_key(offer))
    brief = encode_message(Brief(1, b"k" * 16, crcs_of(offer), offer.values), b"")[0]
    return [
        ("offer", common),
        ("brief", brief),
        ("answer", encode_answer((3, _rank_plan(1), (0, 5)))),
        ("results", encode_results([FileResult("f", 10, ((1,), (2, 3)))])),
    ]


def _decode(kind: str, blob: bytes) -> object:
    if kind in ("offer", "brief"):
        return decode_messages([Shared(blob, _own())])
    if kind == "answer":
        return decode_answer(blob, 1)
    return decode_results(blob, 7)


@pytest.mark.parametrize("kind", ["offer", "brief", "answer", "results"])
def test_every_truncation_fails_as_a_checkpoint_error(kind: str) -> None:
    blob = dict(_blobs())[kind]
    cuts = sorted({*range(0, len(blob), max(1, len(blob) // 300)), len(blob) - 1})
    for cut in cuts:
        with pytest.raises(CheckpointError):
            _decode(kind, blob[:cut])


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), flips=st.integers(1, 8))
def test_corrupted_blobs_decode_or_fail_as_checkpoint_errors(seed: int, flips: int) -> None:
    rng = random.Random(seed)
    for kind, blob in _blobs():
        raw = bytearray(blob)
        for _ in range(flips):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        with contextlib.suppress(CheckpointError):
            _decode(kind, bytes(raw))


_Q = b"\x00" * 8  # one integer


@pytest.mark.parametrize(
    "hostile",
    [
        dump("O", ["k"]),  # a header too short
        dump("O", [["a"], [["a"]], ["float32"], "00", [], [[], []]], _Q * 3, b"", b"", b""),
        dump("O", [["a"], [["a"]], ["nope"], "00", [], [[], []]], _Q * 4, b"", b"", _Q),
        dump("O", [["a"], [["a"]], ["float32"], "00", [], [[], []]], _Q * 4, b"", b"", b"\x01"),
        dump("B", ["00", []], b"\xfe" + b"\xff" * 7),  # a checksum count of -2
        dump("P", [1, "id", [["f", 1, ["k"]]]], b"", b""),  # an item without columns
        dump("R", [["f", 1]], b"\x01" + b"\x00" * 7, b""),  # a count with no checksums
        dump("U", ["not an int", "id"]),
        dump("Z", []),
        b"dckw1" + b"\xff\xff\xff\xff" + b"\x00" * 64,  # more sections than bytes
        b"dckw1\x01\x00\x00\x00" + b"\xff" * 8 + b"[",  # a length past the end
        b"dckw1\x01\x00\x00\x00\x01" + b"\x00" * 7 + b"[",  # JSON that does not parse
        b"dckw1\x01\x00\x00\x00\x04" + b"\x00" * 7 + b"null",
        b"dckw1\x01\x00\x00\x00\x40" + b"\x00" * 7 + b"[" * 64,
        b"\x80\x05pickle",
    ],
)
def test_hostile_messages_fail_naming_the_rank(hostile: bytes) -> None:
    fine = Shared(encode_offer(RankOffer(0, (), ()), b"k")[0])
    decoders = [
        lambda: decode_messages([fine, fine, Shared(hostile, b"")]),
        lambda: decode_results(hostile, 2),
    ]
    for decode in decoders:
        with pytest.raises(WireError, match="rank 2"):
            decode()
    with pytest.raises(WireError, match="rank 0"):  # answers come from rank 0
        decode_answer(hostile, 2)


def test_deep_json_and_huge_counts_stay_bounded() -> None:
    deep = dump("R", [[["x"] * 2] * 2]) + b""
    with pytest.raises(WireError):
        decode_results(deep, 1)
    nested = b"[" * 100_000 + b"]" * 100_000
    blob = b"dckw1\x01\x00\x00\x00" + len(nested).to_bytes(8, "little") + nested
    with pytest.raises(WireError, match="rank 4"):
        decode_results(blob, 4)
