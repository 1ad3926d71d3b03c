from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dckpt._errors import UnsupportedStateError
from dckpt._format import ALIGNMENT
from dckpt._manifest_text import manifest_to_bytes
from dckpt._plan import (
    ChunkOffer,
    FileResult,
    RankOffer,
    TensorOffer,
    ValueOffer,
    build_manifest,
    manifest_template,
    plan_save,
    render_manifest,
    with_save_id,
)
from dckpt._reshard import Box
from dckpt.storage import FileLayout


def full(shape: tuple[int, ...]) -> Box:
    return Box((0,) * len(shape), shape)


def plain(key: str, shape: tuple[int, ...], crc: int = 1) -> TensorOffer:
    return TensorOffer(key, (key,), "float32", shape, False, (ChunkOffer(full(shape), (crc,)),))


def value(key: str, v: object) -> ValueOffer:
    import json

    return ValueOffer(key, (key,), v, json.dumps(v))


def test_replicated_tensors_are_written_once_and_spread_by_bytes() -> None:
    tensors = tuple(plain(f"t{i}", (100 * (i + 1),)) for i in range(8))
    offers = [RankOffer(r, tensors, ()) for r in range(4)]
    plan = plan_save(offers, "x")
    written = [(i.key, r.rank) for r in plan.ranks for f in r.files for i in f.items]
    assert sorted(k for k, _ in written) == sorted(t.key for t in tensors)
    loads = [r.nbytes for r in plan.ranks]
    assert max(loads) - min(loads) <= 800 * 4 + ALIGNMENT * 8  # no rank holds it all
    assert all(r.files for r in plan.ranks)


def test_divergent_plain_tensor_is_stored_per_rank() -> None:
    offers = [RankOffer(r, (plain("rng", (4,), crc=r),), ()) for r in range(3)]
    plan = plan_save(offers, "x")
    assert plan.tensors["rng"].per_rank
    owners = sorted(r.rank for r in plan.ranks for f in r.files for i in f.items)
    assert owners == [0, 1, 2]


def test_values_equal_everywhere_are_stored_once() -> None:
    offers = [RankOffer(r, (), (value("step", 5), value("pos", r))) for r in range(2)]
    plan = plan_save(offers, "x")
    assert plan.values["step"].value == 5 and plan.values["step"].per_rank is None
    assert plan.values["pos"].per_rank == {0: 0, 1: 1}


def test_ranks_disagreeing_on_shape_is_an_error_naming_the_key() -> None:
    offers = [RankOffer(0, (plain("w", (4,)),), ()), RankOffer(1, (plain("w", (5,)),), ())]
    with pytest.raises(UnsupportedStateError, match="'w'.*rank 0.*rank 1"):
        plan_save(offers, "x")


@given(
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=40),
    world=st.integers(1, 5),
    max_files=st.integers(1, 4),
)
def test_layout_is_aligned_disjoint_and_complete(
    sizes: list[int], world: int, max_files: int
) -> None:
    tensors = tuple(plain(f"k{i}", (n,)) for i, n in enumerate(sizes))
    plan = plan_save(
        [RankOffer(r, tensors, ()) for r in range(world)], "abc", layout=FileLayout(max_files)
    )
    seen = set()
    for r in plan.ranks:
        assert len(r.files) <= max_files
        for f in r.files:
            end = 0
            for item in f.items:
                assert item.offset % ALIGNMENT == 0 and item.offset >= end
                end = item.offset + item.nbytes
                seen.add(item.key)
            assert f.size == end
    assert seen == {t.key for t in tensors}


@given(
    shapes=st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=2), min_size=1, max_size=8),
    world=st.integers(1, 3),
    diverge=st.booleans(),
    sharded=st.booleans(),
)
def test_rendered_manifest_equals_the_reference_encoding(
    shapes: list[list[int]], world: int, diverge: bool, sharded: bool
) -> None:
    offers = []
    for r in range(world):
        tensors = []
        for i, shape in enumerate(shapes):
            if sharded and shape and shape[0] >= world:  # split dim 0 across ranks
                n = shape[0] // world
                box = Box((r * n, *[0] * (len(shape) - 1)), (n, *shape[1:]))
                chunks: tuple[ChunkOffer, ...] = (ChunkOffer(box),)
                tensors.append(
                    TensorOffer(
                        f"k{i}", ("m", f"k{i}"), "float32", (n * world, *shape[1:]), True, chunks
                    )
                )
                continue
            crc = (r if diverge and i % 2 else 7,)
            chunks = (ChunkOffer(full(tuple(shape)), crc),)
            tensors.append(
                TensorOffer(f"k{i}", ("m", f"k{i}"), "float32", tuple(shape), False, chunks)
            )
        offers.append(RankOffer(r, tuple(tensors), (value("step", 3), value("pos", r))))
    plan = plan_save(offers, "abc12")
    results = [
        [
            FileResult(f.name, f.size, tuple((j, j + 1) for j, _ in enumerate(f.items)))
            for f in rp.files
        ]
        for rp in plan.ranks
    ]
    kwargs = {"created": 1.5, "block_bytes": 1 << 20, "library": "t"}
    reference = manifest_to_bytes(build_manifest(plan, results, **kwargs))
    assert render_manifest(manifest_template(plan), plan, results, **kwargs) == reference
    renamed_plan = with_save_id(plan, "def34", offers)
    results = [
        [FileResult(f.name, r.size, r.crcs) for f, r in zip(rp.files, rr, strict=True)]
        for rp, rr in zip(renamed_plan.ranks, results, strict=True)
    ]
    again = render_manifest(manifest_template(plan), renamed_plan, results, **kwargs)
    assert again == manifest_to_bytes(build_manifest(renamed_plan, results, **kwargs))
