"""Chunk geometry: planned copies must reproduce the wanted region byte for byte."""

from __future__ import annotations

import itertools
import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dckpt import _reshard
from dckpt._reshard import (
    Box,
    ChunkIndex,
    Copy,
    contiguous_span,
    plan_copies,
    row_bytes,
    rows_box,
)

DTYPES = [np.int8, np.int16, np.int32, np.float64]


def full_box(shape: tuple[int, ...]) -> Box:
    return Box((0,) * len(shape), shape)


def sl(box: Box) -> tuple[slice, ...]:
    return box.relative_to(Box((0,) * box.ndim, box.stops))


def grid_tiling(shape: tuple[int, ...], cuts: list[list[int]]) -> list[Box]:
    bounds = [[0, *sorted(set(c)), n] for c, n in zip(cuts, shape, strict=True)]
    per_dim = [list(itertools.pairwise(b)) for b in bounds]
    return [
        Box(tuple(a for a, _ in combo), tuple(b - a for a, b in combo))
        for combo in itertools.product(*per_dim)
        if all(b > a for a, b in combo)
    ]


@st.composite
def shapes(draw: st.DrawFn, max_ndim: int = 4, max_size: int = 5) -> tuple[int, ...]:
    ndim = draw(st.integers(0, max_ndim))
    return tuple(draw(st.lists(st.integers(1, max_size), min_size=ndim, max_size=ndim)))


@st.composite
def grid_tilings(draw: st.DrawFn, shape: tuple[int, ...]) -> list[Box]:
    cuts = [draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=n)) for n in shape]
    cuts = [[c for c in cs if 0 < c < n] for cs, n in zip(cuts, shape, strict=True)]
    return grid_tiling(shape, cuts)


@st.composite
def kd_tilings(draw: st.DrawFn, shape: tuple[int, ...]) -> list[Box]:
    """Recursive splits: dim-0 intervals of different boxes partially overlap."""
    out: list[Box] = []
    todo = [full_box(shape)]
    while todo:
        box = todo.pop()
        splittable = [d for d, n in enumerate(box.sizes) if n > 1]
        if not splittable or len(out) + len(todo) > 40 or not draw(st.booleans()):
            out.append(box)
            continue
        d = draw(st.sampled_from(splittable))
        cut = draw(st.integers(1, box.sizes[d] - 1))
        lo = Box(box.offsets, (*box.sizes[:d], cut, *box.sizes[d + 1 :]))
        hi_off = (*box.offsets[:d], box.offsets[d] + cut, *box.offsets[d + 1 :])
        hi = Box(hi_off, (*box.sizes[:d], box.sizes[d] - cut, *box.sizes[d + 1 :]))
        todo += [lo, hi]
    return out


@st.composite
def sub_boxes(draw: st.DrawFn, shape: tuple[int, ...], min_size: int = 1) -> Box:
    offsets, sizes = [], []
    for n in shape:
        o = draw(st.integers(0, n - min_size))
        offsets.append(o)
        sizes.append(draw(st.integers(min_size, n - o)))
    return Box(tuple(offsets), tuple(sizes))


@st.composite
def problems(draw: st.DrawFn, max_ndim: int = 4, max_size: int = 5) -> tuple:
    shape = draw(shapes(max_ndim, max_size))
    tiling = draw(st.one_of(grid_tilings(shape), kd_tilings(shape)))
    tiling = draw(st.permutations(tiling))
    # Replicated saves repeat identical boxes; the planner must use the first only.
    dups = draw(st.lists(st.sampled_from(tiling), max_size=3))
    saved = tiling + dups
    want = draw(sub_boxes(shape))
    dtype = draw(st.sampled_from(DTYPES))
    return shape, saved, want, dtype


def execute(full: np.ndarray, saved: list[Box], want: Box, copies: list[Copy]) -> np.ndarray:
    """Run a plan the way a loader would: fetch byte_span, then slice the overlap out."""
    itemsize = full.dtype.itemsize
    out = np.zeros(want.sizes, dtype=full.dtype)
    hits = np.zeros(want.sizes, dtype=np.int64)
    for c in copies:
        src = saved[c.source]
        chunk = np.ascontiguousarray(full[sl(src)])
        data = chunk.tobytes()
        got = data[c.byte_span[0] : c.byte_span[1]]
        if c.contiguous:
            assert got == np.ascontiguousarray(full[sl(c.overlap)]).tobytes()
            region = np.frombuffer(got, dtype=full.dtype).reshape(c.overlap.sizes)
        else:
            rb = rows_box(src, c.rows)
            assert got == np.ascontiguousarray(chunk[c.rows[0] : c.rows[1]]).tobytes()
            assert c.byte_span == (
                c.rows[0] * row_bytes(src, itemsize),
                c.rows[1] * row_bytes(src, itemsize),
            )
            held = np.frombuffer(got, dtype=full.dtype).reshape(rb.sizes)
            region = held[c.overlap.relative_to(rb)]
        if src.ndim:
            assert c.overlap.offsets[0] == src.offsets[0] + c.rows[0]
            assert c.overlap.sizes[0] == c.rows[1] - c.rows[0]
        else:
            assert c.rows == (0, 1)
        out[c.overlap.relative_to(want)] = region
        hits[c.overlap.relative_to(want)] += 1
    assert (hits == 1).all()
    return out


def arange_full(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return (np.arange(math.prod(shape)) % 113).astype(dtype).reshape(shape)


@settings(max_examples=400, deadline=None)
@given(problems())
def test_plan_reproduces_want(problem: tuple) -> None:
    shape, saved, want, dtype = problem
    full = arange_full(shape, dtype)
    copies = plan_copies(saved, want, full.dtype.itemsize)
    assert [c.source for c in copies] == sorted({c.source for c in copies})
    first = {b: i for i, b in reversed(list(enumerate(saved)))}
    assert all(first[saved[c.source]] == c.source for c in copies)
    np.testing.assert_array_equal(execute(full, saved, want, copies), full[sl(want)])


@settings(max_examples=300, deadline=None)
@given(problems(max_ndim=3, max_size=12))
def test_indexed_plan_matches_linear_scan(problem: tuple) -> None:
    """The bisecting path (forced on for any size) must find exactly what a scan finds."""
    shape, saved, want, dtype = problem
    full = arange_full(shape, dtype)
    with mock.patch.object(_reshard, "_LINEAR_SCAN_MAX", 0):
        index = ChunkIndex(saved)
    copies = index.plan_copies(want, full.dtype.itemsize)
    assert copies == plan_copies(saved, want, full.dtype.itemsize)
    expect = {
        i for i, b in enumerate(saved) if b.intersect(want) is not None and saved.index(b) == i
    }
    assert {c.source for c in copies} == expect
    assert expect <= set(index.candidates(want))
    np.testing.assert_array_equal(execute(full, saved, want, copies), full[sl(want)])


@settings(max_examples=200, deadline=None)
@given(problems(), st.data())
def test_uncovered_want_raises(problem: tuple, data: st.DataObject) -> None:
    _, saved, want, _ = problem
    hit = [b for b in saved if b.intersect(want) is not None]
    drop = data.draw(st.sampled_from(hit))
    kept = [b for b in saved if b != drop]
    with pytest.raises(ValueError, match="do not cover") as info:
        plan_copies(kept, want, 4)
    missing = drop.intersect(want)
    assert missing is not None
    assert f" {missing.numel} of {want.numel} elements are missing" in str(info.value)
    if missing.numel == want.numel:
        assert str(missing) in str(info.value)


def test_overlapping_saved_raise() -> None:
    saved = [Box((0,), (4,)), Box((2,), (4,))]
    with pytest.raises(ValueError, match="overlap"):
        plan_copies(saved, Box((0,), (6,)), 4)


def test_no_saved_chunks() -> None:
    with pytest.raises(ValueError, match=r"\[0:3, 1:2\]"):
        plan_copies([], Box((0, 1), (3, 1)), 4)


def test_scalar() -> None:
    s = Box((), ())
    assert s.numel == 1 and s.ndim == 0 and not s.is_empty()
    assert s.intersect(s) == s and s.relative_to(s) == ()
    copies = plan_copies([s, s, s], s, 8)
    assert copies == [Copy(0, s, (0, 1), (0, 8), True)]
    assert row_bytes(s, 8) == 8 and contiguous_span(s, s, 8) == (0, 8)
    with pytest.raises(ValueError, match="scalar"):
        plan_copies([], s, 8)


def test_box_basics() -> None:
    a, b = Box((0, 0), (4, 4)), Box((2, 3), (4, 4))
    assert a.intersect(b) == Box((2, 3), (2, 1))
    assert a.intersect(Box((4, 0), (1, 4))) is None
    assert Box((1, 0), (0, 3)).is_empty()
    assert Box((2, 3), (2, 1)).relative_to(a) == (slice(2, 4), slice(3, 4))
    assert row_bytes(Box((0,), (5,)), 4) == 4 and row_bytes(a, 2) == 8
    with pytest.raises(ValueError):
        b.relative_to(a)
    with pytest.raises(ValueError):
        Box((0,), (1, 2))
    with pytest.raises(ValueError):
        a.intersect(Box((0,), (1,)))
    assert plan_copies([a], Box((1, 0), (0, 4)), 4) == []


def all_regions(shape: tuple[int, ...]) -> list[Box]:
    ranges = [[(o, n - o) for o in range(n)] for n in shape]
    per_dim = [[(o, s) for o, m in r for s in range(1, m + 1)] for r in ranges]
    return [
        Box(tuple(o for o, _ in c), tuple(s for _, s in c)) for c in itertools.product(*per_dim)
    ]


@pytest.mark.parametrize("ndim", [0, 1, 2, 3])
def test_contiguous_span_exhaustive(ndim: int) -> None:
    base = (7, 3, 1, 5)[:ndim]  # outer boxes do not start at the origin
    for shape in itertools.product([1, 2, 3], repeat=ndim):
        outer = Box(base, shape)
        idx = np.arange(math.prod(shape)).reshape(shape)
        for rel in all_regions(shape):
            region = Box(tuple(b + o for b, o in zip(base, rel.offsets, strict=True)), rel.sizes)
            view = idx[sl(rel)]
            flat = view.ravel()
            one_run = bool(np.array_equal(flat, np.arange(flat[0], flat[0] + flat.size)))
            assert one_run == view.flags.c_contiguous
            span = contiguous_span(outer, region, 4)
            if one_run:
                assert span == (int(flat[0]) * 4, (int(flat[-1]) + 1) * 4), (shape, rel)
            else:
                assert span is None, (shape, rel)


def test_contiguous_span_edges() -> None:
    outer = Box((0, 0), (4, 5))
    assert contiguous_span(outer, Box((1, 0), (0, 5)), 4) == (0, 0)
    with pytest.raises(ValueError):
        contiguous_span(outer, Box((3, 0), (2, 5)), 4)


def test_rows_box() -> None:
    src = Box((10, 2), (6, 3))
    assert rows_box(src, (1, 3)) == Box((11, 2), (2, 3))
    with pytest.raises(ValueError):
        rows_box(src, (5, 7))


def test_index_prunes_to_log_n() -> None:
    """10k saved row chunks: a plan examines only the chunks near the wanted rows."""
    rows = [Box((3 * i, 0), (3, 8)) for i in range(10_000)]
    rows.reverse()
    index = ChunkIndex(rows)
    want = Box((15_001, 2), (7, 4))
    cands = index.candidates(want)
    assert len(cands) <= 4
    copies = index.plan_copies(want, 4)
    assert sum(c.overlap.numel for c in copies) == want.numel
    assert all(not c.contiguous for c in copies)


def test_index_prunes_grid() -> None:
    """100x100 grid: only the one row band is examined, not all 10k chunks."""
    grid = grid_tiling((1000, 1000), [list(range(10, 1000, 10))] * 2)
    assert len(grid) == 10_000
    index = ChunkIndex(grid)
    want = Box((505, 0), (3, 1000))
    assert len(index.candidates(want)) == 100
    copies = index.plan_copies(want, 2)
    assert len(copies) == 100
    # Uneven lengths: a long chunk ahead must not hide later short ones.
    mixed = [Box((0, 0), (100, 1))] + [Box((i, 1), (1, 1)) for i in range(100)]
    mixed_index = ChunkIndex(mixed)
    assert len(mixed_index.plan_copies(Box((50, 0), (1, 2)), 1)) == 2
