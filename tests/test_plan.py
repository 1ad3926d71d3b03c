from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dckpt._errors import UnsupportedStateError
from dckpt._format import ALIGNMENT
from dckpt._manifest_build import build_manifest
from dckpt._manifest_text import manifest_to_bytes
from dckpt._plan import (
    ChunkOffer,
    FileResult,
    RankOffer,
    SavePlan,
    TensorOffer,
    ValueOffer,
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


def _greedy_reference(offers: list[RankOffer]) -> dict[tuple[str, tuple[int, ...], int], int]:
    """The one-rank-at-a-time planner this replaced: every chunk with all its holders,
    largest first, to the least-loaded holder (lowest rank on a tie); per rank when the
    holders of a plain tensor disagree. Returns (key, offsets, owner or -1) -> writer."""
    holders: dict[tuple[str, Box], list[tuple[int, object]]] = {}
    sharded = {}
    for o in offers:
        for t in o.tensors:
            sharded[t.key] = t.sharded
            for c in t.chunks:
                holders.setdefault((t.key, c.box), []).append((o.rank, c.crc))
    divergent = {
        k for (k, _), hs in holders.items() if not sharded[k] and len({c for _, c in hs}) > 1
    }
    jobs: list[tuple[int, str, Box, tuple[int, ...], int]] = []
    for (key, box), hs in holders.items():
        if key in divergent:
            jobs += [(box.numel * 4, key, box, (r,), r) for r, _ in hs]
        else:
            jobs.append((box.numel * 4, key, box, tuple(r for r, _ in hs), -1))
    jobs.sort(key=lambda j: (-j[0], j[1], j[2].offsets))
    load = [0] * len(offers)
    out = {}
    for nbytes, key, box, cands, owner in jobs:
        writer = min(cands, key=lambda r: (load[r], r))
        load[writer] += nbytes
        out[(key, box.offsets, owner)] = writer
    return out


def _writers(plan: SavePlan) -> dict[tuple[str, tuple[int, ...], int], int]:
    return {
        (i.key, i.box.offsets, r.rank if i.per_rank else -1): r.rank
        for r in plan.ranks
        for f in r.files
        for i in f.items
    }


@given(
    kinds=st.lists(st.sampled_from(["same", "diverge", "shard", "some"]), min_size=1, max_size=12),
    sizes=st.lists(st.integers(1, 300), min_size=12, max_size=12),
    world=st.integers(1, 7),
    pattern=st.lists(st.integers(0, 2), min_size=7, max_size=7),
)
def test_ranks_planned_as_groups_get_exactly_the_one_at_a_time_plan(
    kinds: list[str], sizes: list[int], world: int, pattern: list[int]
) -> None:
    """Ranks in the same group (``pattern``) share one tensors tuple, as decoded equal
    messages do; the plan equals the reference greedy's and that of unshared copies."""
    shared: dict[int, tuple[TensorOffer, ...]] = {}
    offers, copies = [], []
    for r in range(world):
        g = pattern[r]
        if g not in shared:
            tensors = []
            for i, kind in enumerate(kinds):
                n = sizes[i] * world
                if kind == "shard":
                    box = Box((r * sizes[i],), (sizes[i],))
                    tensors.append(
                        TensorOffer(f"k{i}", (f"k{i}",), "float32", (n,), True, (ChunkOffer(box),))
                    )
                elif kind != "some" or g == 0:  # "some": held by group 0's ranks only
                    tensors.append(plain(f"k{i}", (sizes[i],), crc=g if kind == "diverge" else 7))
            shared[g] = tuple(tensors)
        offers.append(RankOffer(r, shared[g], ()))
        copies.append(RankOffer(r, tuple(list(shared[g])), ()))
    if any(k == "shard" for k in kinds) and len(shared) < world:
        return  # sharded boxes differ per rank: ranks sharing a tuple cannot hold them
    plan = plan_save(offers, "x")
    assert plan == plan_save(copies, "x")
    assert _writers(plan) == _greedy_reference(offers)


@pytest.mark.timeout(15)  # generous (~1 s); the tensors x ranks planner took ~30 s
def test_sixteen_thousand_equal_ranks_plan_in_time_linear_in_tensors_plus_ranks() -> None:
    world = 16384
    steps = tuple(plain(f"optimizer.state.p{i}.step", ()) for i in range(700))
    offers = [RankOffer(r, steps, (value("lr", 0.1),)) for r in range(world)]
    plan = plan_save(offers, "x")
    written = [i.key for r in plan.ranks for f in r.files for i in f.items]
    assert sorted(written) == sorted(t.key for t in steps)  # each once
    assert max(len(r.files) for r in plan.ranks) == 1  # spread: no rank writes two files
    assert plan.values["lr"].value == 0.1
