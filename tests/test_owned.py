"""Tensors one rank alone holds are laid out, written and rendered by that rank
(``dckpt._owned``); rank 0 merges their entries. On 4 real gloo ranks: keys named per rank
(runs that do not interleave) and keys whose ranks interleave in key order, beside a
replicated tensor, a value and a DTensor; repeats through the plan cache; a key that
becomes shared while its first holder's structure is unchanged; and the clash checks.
Every checkpoint is loaded back bit-exact on the ranks and in one process, its manifest
is canonical, and every chunk's checksum verifies."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import dckpt
from dckpt._api import open_checkpoint
from dckpt._format import manifest_from_bytes
from dckpt._manifest_text import manifest_to_bytes
from tests._compare import same, zeroed
from tests._dist import RankError, RankPool

WORLD = 4


def _state(rank: int, step: int, variant: str = "") -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh  # heavy: only in workers
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (WORLD,))
    per = {
        f"r{rank}.t{i:02d}": torch.full((i % 3 + 1,), rank * 100.0 + i + step) for i in range(30)
    }
    state: dict[str, Any] = {
        "per": per,  # own tensors, key ranges apart per rank
        "mix": {f"k{i:03d}": torch.arange(4.0) + i + step for i in range(rank, 40, WORLD)},
        "rep": torch.arange(6.0) + step,  # the same on every rank: planned by rank 0
        "w": DTensor.from_local(
            torch.full((2, 3), rank + step * 0.5), mesh, [Shard(0)], run_check=False
        ),
        "step": step,
    }
    if variant == "takeover" and rank == 1:  # rank 0's own key, now held by rank 1 too
        state["per"]["r0.t00"] = torch.full((1,), float(step))
    if variant == "clash" and rank == 2:
        state["per"]["r0.t01"] = "a value where rank 0 has a tensor"
    return state


def _w_save_and_load(path: str, step: int, variant: str, overwrite: bool) -> bool:
    state = _state(dist.get_rank(), step, variant)
    dckpt.save(state, path, overwrite=overwrite, timeout=60)
    back = zeroed(state)
    dckpt.load(back, path, timeout=60)
    return same(state, back)


def _check_checkpoint(path: Path, step: int) -> dict[str, Any]:
    """Canonical manifest, every checksum good, every key readable in one process."""
    raw = (path / "manifest.json").read_bytes()
    assert (
        manifest_to_bytes(manifest_from_bytes(raw, source=str(path))) == raw
    )  # rank-rendered text included
    reader = open_checkpoint(str(path))
    assert reader.verify() == []
    for rank in range(WORLD):
        for i in range(30):
            got = reader.read_tensor(f"per.r{rank}.t{i:02d}")
            if (rank, i) != (0, 0):  # r0.t00 may be rank 1's copy (equal values)
                assert torch.equal(got, torch.full((i % 3 + 1,), rank * 100.0 + i + step))
    for i in range(40):
        assert torch.equal(reader.read_tensor(f"mix.k{i:03d}"), torch.arange(4.0) + i + step)
    assert torch.equal(reader.read_tensor("rep"), torch.arange(6.0) + step)
    return json.loads(raw)


def _own_files(manifest: dict[str, Any]) -> set[str]:
    return {f["name"].rsplit("/", 1)[1] for f in manifest["files"] if "-o" in f["name"]}


def test_tensors_held_by_one_rank_are_written_and_rendered_by_it(
    rank_pool: Callable[[int], RankPool], tmp_path: Path
) -> None:
    pool, ckpt = rank_pool(WORLD), tmp_path / "ckpt"
    assert pool.run(_w_save_and_load, str(ckpt), 1, "", False, timeout=180) == [True] * WORLD
    manifest = _check_checkpoint(ckpt, 1)
    assert _own_files(manifest) == {f"r{r}-o0.bin" for r in range(WORLD)}
    chunks = manifest["tensors"]["per.r2.t05"]["chunks"]
    assert len(chunks) == 1 and chunks[0]["file"].endswith("/r2-o0.bin")
    assert manifest["version"] == 2  # the DTensor is a layout entry beside them

    # Same structure: briefs, reuse notes, each rank's own layout from its cache.
    assert pool.run(_w_save_and_load, str(ckpt), 2, "", True, timeout=180) == [True] * WORLD
    _check_checkpoint(ckpt, 2)

    # Rank 0 sends a brief (its structure is unchanged) while one of its own keys is now
    # also rank 1's: rank 0 plans that key from the offer it kept.
    assert pool.run(_w_save_and_load, str(ckpt), 3, "takeover", True, timeout=180) == [True] * WORLD
    manifest = _check_checkpoint(ckpt, 3)
    assert len(manifest["tensors"]["per.r0.t00"]["chunks"]) == 1  # equal copies: once
    assert "-o" not in manifest["tensors"]["per.r0.t00"]["chunks"][0]["file"]
    assert "-o" in manifest["tensors"]["per.r0.t01"]["chunks"][0]["file"]

    # And back: the key is rank 0's alone again.
    assert pool.run(_w_save_and_load, str(ckpt), 4, "", True, timeout=180) == [True] * WORLD
    _check_checkpoint(ckpt, 4)


def test_an_own_tensor_and_a_value_under_one_key_fail_on_every_rank(
    rank_pool: Callable[[int], RankPool], tmp_path: Path
) -> None:
    pool, ckpt = rank_pool(WORLD), tmp_path / "ckpt"
    with pytest.raises(RankError) as info:
        pool.run(_w_save_and_load, str(ckpt), 1, "clash", False, timeout=180)
    outcomes = info.value.outcomes or []
    assert len(outcomes) == WORLD
    for outcome in outcomes:
        assert (
            "UnsupportedStateError" in outcome.error_text
            or "RankFailureError" in outcome.error_text
        )
        assert "per.r0.t01" in outcome.error_text
    assert not (ckpt / "manifest.json").exists()


# ----------------------------------------------------------------------------- rank 0's merge


def _described(rank: int, keys: list[str]) -> tuple[Any, bytes]:
    from dckpt._describe import checksum_plain, describe
    from dckpt._plan import structure_key

    state = {k: torch.full((len(k) % 3 + 1,), float(len(k) + rank)) for k in keys}
    state["shared"] = {"step": torch.arange(3.0)}  # the same on every rank: rank 0's
    offer, _ = checksum_plain(describe(state, rank, allow_pickle=False))
    return offer, structure_key(offer)


@pytest.mark.parametrize(
    "layout",
    [
        "apart",  # per-rank names: whole runs, after the shared key ("shared.step")
        "before",  # every own key sorts before the shared one: whole runs, first
        "among",  # a shared key sorts between two ranks' own keys: entry by entry
        "interleaved",  # the ranks' own keys interleave: entry by entry
    ],
)
def test_rank_0_merges_what_ranks_rendered_into_the_manifest_it_would_render(
    layout: str,
) -> None:
    """The manifest through the split (each rank lays out and renders its own tensors)
    says the same of every tensor as the plan of rank 0 alone, and is canonical."""
    from dckpt._format import manifest_from_bytes
    from dckpt._manifest_text import manifest_to_bytes
    from dckpt._plan import FileResult, RankWritten, manifest_template, plan_save
    from dckpt._plancache import PlanCache
    from dckpt._save import rendered
    from dckpt._write import finish_layouts, with_layout_files
    from dckpt.storage._base import LOCAL_LAYOUT

    names = {
        "apart": lambda r: [f"t.r{r}.{i}" for i in range(5)],
        "before": lambda r: [f"a.r{r}.{i}" for i in range(5)],
        "among": lambda r: [f"{'a' if r == 0 else 'z'}.r{r}.{i}" for i in range(5)],
        "interleaved": lambda r: [f"k{i:02d}" for i in range(r, 15, 3)],
    }[layout]
    described = [_described(r, names(r)) for r in range(3)]
    offers = [o for o, _ in described]
    cached = PlanCache().plan(offers, LOCAL_LAYOUT, "0save", [k for _, k in described])
    assert cached is not None
    assert all(own for own in cached.split.own)  # every rank has tensors of its own

    def crcs_for(plan_files: Any) -> list[FileResult]:
        return [
            FileResult(f.name, f.size, tuple((len(i.key) * 7 + i.offset,) for i in f.items))
            for f in plan_files
        ]

    written = []
    for r, offer in enumerate(offers):
        from dckpt._owned import plan_own

        own = plan_own(offer, cached.split.own[r], "0save", LOCAL_LAYOUT, 3)
        every, pieces, _ = with_layout_files(cached.plan.ranks[r], offer, LOCAL_LAYOUT, own)
        results = crcs_for(every.files)
        n = len(cached.plan.ranks[r].files)
        written.append(
            finish_layouts(None, offer, n, every, results, pieces, durable=False, own=own)  # type: ignore[arg-type]
        )
    merged, files = rendered(cached.plan, cached.template, written, cached.split)
    assert manifest_to_bytes(manifest_from_bytes(merged, source="merged")) == merged

    alone = plan_save(offers, "0save")  # rank 0 plans everything, as before the split
    results = [crcs_for(rp.files) for rp in alone.ranks]
    reference, _ = rendered(
        alone, manifest_template(alone), [RankWritten(tuple(x)) for x in results]
    )

    def described_chunks(raw: bytes) -> dict[str, Any]:
        m = manifest_from_bytes(raw, source="x")
        return {
            k: (t.dtype, t.shape, t.path, [(c.offsets, c.sizes, c.nbytes) for c in t.chunks])
            for k, t in m.tensors.items()
        }

    assert described_chunks(merged) == described_chunks(reference)
    assert sorted(files) == sorted(f.name for f in manifest_from_bytes(merged, source="x").files)
