"""The save split by concern: the plan cache's protocol through its own API, the
in-flight registry that ``save`` and ``async_save`` share without importing each other,
and ``convert``'s dckpt output through the save's own write and commit steps."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dckpt
from dckpt import _faults
from dckpt._describe import checksum_plain, describe
from dckpt._plan import RankOffer, renamed, structure_key
from dckpt._plancache import Brief, PlanCache, Reuse, cache_for
from dckpt._save import new_save_id
from dckpt.interop._convert import convert
from dckpt.storage._base import LOCAL_LAYOUT
from tests._dist import RankPool
from tests._probes import counting_plans

PKG = Path(dckpt.__file__).parent


def _offer(rank: int, w: torch.Tensor, step: int) -> tuple[RankOffer, bytes]:
    """What ``rank`` offers in a 2-rank save: a replicated tensor, its own, a value."""
    state = {"w": w, f"r{rank}": torch.full((3,), float(rank)), "step": step}
    offer, _ = checksum_plain(describe(state, rank, allow_pickle=False))
    return offer, structure_key(offer)


def test_plan_cache_reuses_a_plan_and_sends_reuse_notes_once_every_rank_holds_it() -> None:
    rank0, rank1 = PlanCache(), PlanCache()  # each rank's cache; rank0 also plans

    def save(w1: torch.Tensor, step: int) -> tuple[list[object], list[object], int]:
        (o0, k0), (o1, k1) = _offer(0, torch.ones(4), step), _offer(1, w1, step)
        messages = [rank0.message(o0, k0, brief=True), rank1.message(o1, k1, brief=True)]
        with counting_plans() as calls:
            cached = rank0.plan(messages, LOCAL_LAYOUT, new_save_id())
        assert cached is not None
        answers = rank0.answers(cached)
        plans = []
        for cache, answer in zip((rank0, rank1), answers, strict=True):
            cache.received(answer)
            plans.append(cache.rank_plan(answer))
            assert plans[-1].save_id == cached.plan.save_id
        rank0.committed(k0, cached, 2)
        rank1.committed(k1, None, 2)
        return list(messages), list(answers), len(calls)

    messages, answers, planned = save(torch.ones(4), 1)
    assert planned == 1 and all(isinstance(m, RankOffer) for m in messages)
    assert all(isinstance(a, tuple) for a in answers)  # first time: each rank's plan

    messages, answers, planned = save(torch.ones(4), 2)  # same structure, new values
    assert planned == 0 and all(isinstance(m, Brief) for m in messages)
    assert all(isinstance(a, Reuse) for a in answers)  # every rank holds the plan

    _, answers, planned = save(torch.zeros(4), 3)  # rank 1's "w" no longer a replica
    assert planned == 1 and all(isinstance(a, tuple) for a in answers)

    rank0.failed()  # a failed save: rank 0 no longer knows what the ranks hold
    _, answers, planned = save(torch.ones(4), 4)
    assert planned == 0 and all(isinstance(a, tuple) for a in answers)


def test_a_brief_naming_an_offer_rank_0_lost_asks_for_full_offers() -> None:
    offer, key = _offer(1, torch.ones(4), 1)
    brief = Brief(1, key, (), offer.values)
    assert PlanCache().plan([brief], LOCAL_LAYOUT, new_save_id()) is None


def test_a_reuse_note_for_a_plan_this_rank_lacks_fails_naming_the_cause() -> None:
    with pytest.raises(dckpt.CheckpointError, match="out of step with rank 0"):
        PlanCache().rank_plan(Reuse(7, new_save_id()))


def test_a_reused_plan_is_renamed_for_the_new_save() -> None:
    cache = PlanCache()
    offer, _ = _offer(0, torch.ones(4), 1)
    first = cache.plan([offer], LOCAL_LAYOUT, new_save_id())
    assert first is not None
    cache.received((first.serial, first.plan.ranks[0], ()))
    again = cache.plan([offer], LOCAL_LAYOUT, "0second")
    assert again is not None and again.serial == first.serial
    assert again.template is first.template
    mine = cache.rank_plan(Reuse(again.serial, "0second"))
    assert mine == renamed(first.plan.ranks[0], "0second") == again.plan.ranks[0]


def _imports(module: str) -> set[str]:
    """Every dckpt module ``module`` imports, function-local imports included."""
    path = PKG.joinpath(*module.split(".")[1:]).with_suffix(".py")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dckpt"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("dckpt")}
    return out


def _reachable(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        for target in _imports(todo.pop()):
            path = PKG.joinpath(*target.split(".")[1:])
            if target not in seen and path.with_suffix(".py").exists():
                seen.add(target)
                todo.append(target)
    return seen


def test_save_and_async_save_do_not_import_each_other() -> None:
    assert "dckpt._async" not in _reachable("dckpt._save")
    assert not {"dckpt._async", "dckpt._save"} & _reachable("dckpt._inflight")


def test_a_sync_save_raises_an_unseen_async_failure_once(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    dckpt.async_save({"w": torch.ones(4)}, blocker / "ck")  # fails; nobody looks
    with pytest.raises(dckpt.StorageError, match="file"):
        dckpt.save({"w": torch.ones(4)}, tmp_path / "ok")
    assert not (tmp_path / "ok" / "manifest.json").exists()  # it never started
    dckpt.save({"w": torch.ones(4)}, tmp_path / "ok")  # reported once, then clear
    assert (tmp_path / "ok" / "manifest.json").exists()


@pytest.mark.parametrize("point", ["save.write.after", "save.commit.before"])
def test_convert_to_dckpt_fails_at_the_saves_steps_and_leaves_no_data(
    tmp_path: Path, point: str
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    dckpt.save({"w": torch.arange(8.0), "step": 3}, src)
    _faults.arm(_faults.injector(point, "raise"))
    try:
        with pytest.raises(_faults.InjectedFault):
            convert(src, out)
    finally:
        _faults.arm(None)
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.rglob("*") if p.is_file() and p.name != ".dckpt.lock"]
    convert(src, out)  # the failed one left nothing in the way
    state = {"w": torch.zeros(8), "step": 0}
    dckpt.load(state, out)
    assert torch.equal(state["w"], torch.arange(8.0)) and state["step"] == 3


def _w_save_after_rank0_lost_offers(path: str) -> tuple[list[str], bool]:
    """Two saves of one structure; before the second, rank 0 forgets every offer (as its
    cache does past its bound), so the ranks' briefs are answered with a request for
    full offers, through the real encoded exchange."""
    rank = dist.get_rank()
    cache = cache_for("sync", None)
    phases: list[str] = []

    def record(name: str) -> None:
        if name.endswith(".enter") and name.startswith("coord.plan"):
            phases.append(name.split(".")[1])

    state = {"w": torch.arange(6.0), f"own{rank}": torch.full((2,), float(rank)), "step": 1}
    dckpt.save(state, path)
    if rank == 0:
        cache._offers.clear()
    _faults.arm(record)
    try:
        state["step"] = 2
        dckpt.save(state, path, overwrite=True)
    finally:
        _faults.arm(None)
    back = {"w": torch.zeros(6), f"own{rank}": torch.zeros(2), "step": None}
    dckpt.load(back, path)
    same = torch.equal(back["w"], state["w"]) and back["step"] == 2
    return phases, same and torch.equal(back[f"own{rank}"], state[f"own{rank}"])


def test_briefs_naming_lost_offers_are_answered_with_a_resend_and_the_save_completes(
    rank_pool: Callable[[int], RankPool], tmp_path: Path
) -> None:
    results = rank_pool(2).run(_w_save_after_rank0_lost_offers, str(tmp_path / "c"))
    assert results == [(["plan", "plan-full"], True)] * 2
