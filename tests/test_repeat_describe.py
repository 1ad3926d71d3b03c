"""Repeat saves describe less: small tensors' bytes are copied together, and a state of
plain tensors whose structure is unchanged reuses its offers and structure key. Both must
give exactly what describing afresh gives, whatever changed in between."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import dckpt
from dckpt import _bytes
from dckpt._bytes import gathered_host_bytes, host_bytes
from dckpt._describe import Skeletons, checksum_plain, describe
from dckpt._format import MANIFEST_NAME, manifest_from_bytes
from dckpt._plan import structure_key
from dckpt._wire import encode_offer
from tests._dist import RankPool


def _tensors() -> list[torch.Tensor]:
    x = torch.arange(12.0).reshape(3, 4)
    c = torch.tensor([1 + 2j, 3 - 4j])
    return [
        torch.tensor(3.0),  # 0-d: stacked
        torch.tensor(4.0),
        torch.arange(5, dtype=torch.int64),
        torch.ones(3, dtype=torch.bfloat16),  # no numpy dtype
        torch.tensor([True, False, True]),
        x.t(),  # not contiguous
        torch.arange(8.0).reshape(2, 4),  # 2-d, same trailing dims as the next
        torch.arange(4.0).reshape(1, 4),
        torch.arange(6.0).reshape(3, 2),  # other trailing dims: a group of its own
        c.conj(),  # a conjugate view
        torch._neg_view(torch.tensor([1.0 + 1j])),  # a negative view
        torch.ones(2, requires_grad=True),
        torch.zeros(0),
        torch.arange(2000.0),  # above the gathering size: viewed
        torch.arange(10.0)[::3],
    ]


def test_gathered_bytes_are_each_tensors_bytes_as_of_the_call() -> None:
    ts = _tensors()
    want = [bytes(host_bytes(t)) for t in ts]
    got = gathered_host_bytes(ts)
    assert [bytes(g) for g in got] == want
    ts[0].fill_(9.0)  # a copy, not a view, for the small ones
    assert bytes(got[0]) == want[0]
    assert gathered_host_bytes([]) == []


def test_gathering_stops_at_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_bytes, "_GATHER_BUDGET", 16)
    ts = [torch.full((2,), float(i)) for i in range(5)]  # 8 bytes each: two fit
    got = gathered_host_bytes(ts)
    assert [bytes(g) for g in got] == [bytes(host_bytes(t)) for t in ts]
    ts[4].fill_(-1.0)  # past the budget: a view of the tensor itself
    assert bytes(got[4]) == bytes(host_bytes(ts[4])) and bytes(got[0]) != bytes(host_bytes(ts[4]))


def test_a_dtype_torch_cannot_cat_falls_back_to_views(monkeypatch: pytest.MonkeyPatch) -> None:
    ts = _tensors()
    want = [bytes(host_bytes(t)) for t in ts]

    def refuse(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("cat: not for this dtype in this torch")

    monkeypatch.setattr(torch, "cat", refuse)
    monkeypatch.setattr(torch, "stack", refuse)
    assert [bytes(g) for g in gathered_host_bytes(ts)] == want


def _summary(d: Any, key: bytes | None) -> tuple[Any, ...]:
    offer, known = checksum_plain(d)
    return offer, d.crcs, key, {w: (c, bytes(data)) for w, (c, data) in known.items()}


def _fresh(state: dict[str, Any]) -> tuple[Any, ...]:
    d = describe(state, 0, allow_pickle=False, layouts=True, checksums=True)
    return _summary(d, structure_key(d.offer))


def test_the_memo_reuses_offers_only_while_the_structure_is_unchanged() -> None:
    memo = Skeletons()
    t = {"a": torch.arange(4.0), "b": torch.ones(2, 3)}
    state: dict[str, Any] = {"m": t, "step": 1}

    def described() -> Any:
        d = describe(state, 0, allow_pickle=False, layouts=True, checksums=True, memo=memo)
        assert _summary(d, d.key) == _fresh(state)
        return d

    first = described()
    t["a"].add_(1.0)
    state["step"] = 2
    again = described()
    assert again.offer.tensors is first.offer.tensors  # reused
    assert again.crcs != first.crcs  # but checksummed afresh

    changes: list[Callable[[], None]] = [
        lambda: setattr(t["a"], "data", torch.arange(5.0)),  # shape, in place
        lambda: setattr(t["a"], "data", torch.arange(5, dtype=torch.float16)),  # dtype
        lambda: t.update(c=t.pop("b")),  # a key renamed
        lambda: state.update(m={"x": {"y": torch.ones(1)}}),  # one key, two paths
        lambda: state.update(m={"x.y": torch.ones(1)}),
    ]
    for change in changes:
        before = described()
        change()
        after = described()
        assert after.offer.tensors is not before.offer.tensors and after.key != before.key


def test_states_with_empty_tensors_or_dtensors_are_not_memoized() -> None:
    memo = Skeletons()
    state = {"a": torch.ones(2), "e": torch.zeros(0, 3)}
    first = describe(state, 0, allow_pickle=False, checksums=True, memo=memo)
    state["e"].data = torch.zeros(0, 4)  # only an empty tensor's shape changes
    again = describe(state, 0, allow_pickle=False, checksums=True, memo=memo)
    assert first.key is None and again.key is None
    assert again.offer.tensors[1].shape == (0, 4)


def _w_repeats(path: str, background: bool) -> list[bool]:
    """Saves of one state, changed between saves in the ways a memo could miss; each
    loads back as saved, on every rank (``background``: as ``async_save`` took it, the
    tensors overwritten right after the call)."""
    rank = dist.get_rank()
    w = torch.arange(6.0) + rank
    state: dict[str, Any] = {"m": {f"r{rank}": w, "shared": torch.ones(3)}, "step": 0}
    steps: list[Callable[[], None]] = [
        lambda: w.mul_(2.0),
        lambda: setattr(w, "data", torch.arange(7.0) * (rank + 1)),
        lambda: setattr(w, "data", torch.arange(7, dtype=torch.float64)),
        lambda: state["m"].update(renamed=state["m"].pop("shared")),
        lambda: w.add_(1.0),
    ]
    ok = []
    for i, change in enumerate([lambda: None, *steps]):
        change()
        state["step"] = i
        saved = {k: v.clone() for k, v in state["m"].items()}
        if background:
            handle = dckpt.async_save(state, f"{path}/s{i}")
            for v in state["m"].values():
                v.fill_(-7.0)
            handle.result()
            for k, v in state["m"].items():
                v.copy_(saved[k])
        else:
            dckpt.save(state, f"{path}/s{i}")
        back: dict[str, Any] = {
            "m": {k: torch.zeros_like(v) for k, v in saved.items()},
            "step": None,
        }
        dckpt.load(back, f"{path}/s{i}")
        ok.append(
            back["step"] == i
            and all(torch.equal(back["m"][k], v) for k, v in saved.items())
            and all(back["m"][k].dtype == v.dtype for k, v in saved.items())
        )
    return ok


def _w_path_change(path: str) -> list[tuple[str | int, ...]]:
    """Two saves whose one tensor keeps its key but moves from a nested to a dotted name:
    the manifest records the path of each save (the plan cache must not reuse the first)."""
    t = torch.arange(3.0) + dist.get_rank()
    paths = []
    for i, m in enumerate([{"x": {"y": t}}, {"x.y": t}]):
        dckpt.save({"m": m}, f"{path}/p{i}")
        raw = Path(f"{path}/p{i}/{MANIFEST_NAME}").read_bytes()
        paths.append(manifest_from_bytes(raw, source="test").tensors["m.x.y"].path)
    return paths


def test_a_tensor_moved_to_another_path_under_the_same_key_is_recorded_at_its_new_path(
    rank_pool: Callable[[int], RankPool], tmp_path: Path
) -> None:
    assert rank_pool(2).run(_w_path_change, str(tmp_path)) == [[("m", "x", "y"), ("m", "x.y")]] * 2


@pytest.mark.parametrize("background", [False, True], ids=["save", "async_save"])
def test_repeat_saves_of_a_changing_state_load_back_as_saved(
    rank_pool: Callable[[int], RankPool], tmp_path: Path, background: bool
) -> None:
    assert rank_pool(2).run(_w_repeats, str(tmp_path), background) == [[True] * 6] * 2


def test_an_offer_sent_with_its_checksums_beside_it_encodes_as_the_full_offer() -> None:
    state = {"a": torch.arange(4.0), "e": torch.zeros(0), "b": torch.ones(2, 2), "n": 3}
    d = describe(state, 0, allow_pickle=False, layouts=True, checksums=True)
    full, _ = checksum_plain(d)
    key = structure_key(d.offer)
    assert d.crcs is not None and any(c is not None for c in d.crcs)
    assert encode_offer(d.offer, key, d.crcs) == encode_offer(full, key)
    assert encode_offer(d.offer, key) != encode_offer(full, key)  # the column is what differs
