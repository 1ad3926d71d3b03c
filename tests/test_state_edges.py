"""Edge cases of the state itself: keys that depend on runtime data, and states dckpt
cannot store (cycles, runaway nesting, nested tensors, an empty state)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import dckpt
from dckpt._values import encode_value
from tests._compare import same
from tests._dist import RankPool

Pools = Callable[[int], RankPool]


class Loader:
    """A data loader whose state holds one entry per worker it has seen: none when fresh."""

    def __init__(self) -> None:
        self.pos: dict[str, int] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self.history: list[torch.Tensor] = []

    def state_dict(self) -> dict[str, Any]:
        return {"pos": dict(self.pos), "buffers": dict(self.buffers), "history": list(self.history)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.pos = dict(sd["pos"])
        self.buffers = dict(sd["buffers"])
        self.history = list(sd["history"])


def _ran(rank: int = 0) -> Loader:
    loader = Loader()
    loader.pos = {"worker0": 3 + 10 * rank, "worker1": 5 + 10 * rank}
    loader.buffers = {"w0": torch.arange(4, dtype=torch.int64) + rank}
    loader.history = [torch.full((2,), float(i)) for i in range(3)]
    return loader


def _same(a: Loader, b: Loader) -> bool:
    return (
        a.pos == b.pos
        and a.buffers.keys() == b.buffers.keys()
        and all(torch.equal(a.buffers[k], b.buffers[k]) for k in a.buffers)
        and len(a.history) == len(b.history)
        and all(torch.equal(x, y) for x, y in zip(a.history, b.history, strict=True))
    )


# ----------------------------------------------------------------------------- runtime keys


@pytest.mark.parametrize("strict", [True, False])
def test_a_stateful_gets_back_keys_its_fresh_state_dict_lacks(tmp_path: Path, strict: bool) -> None:
    dckpt.save({"loader": _ran(), "step": 7}, tmp_path / "ck")
    fresh = Loader()
    fresh.history = [torch.zeros(2)]  # a list that grew since: one element now, three saved
    result = dckpt.load({"loader": fresh, "step": 0}, tmp_path / "ck", strict=strict)
    assert result == dckpt.LoadResult()
    assert _same(fresh, _ran())
    assert fresh.buffers["w0"].dtype == torch.int64 and fresh.buffers["w0"].device.type == "cpu"


def test_a_stateful_whose_fresh_state_holds_entries_the_saved_one_lacked(tmp_path: Path) -> None:
    dckpt.save({"loader": Loader()}, tmp_path / "ck")  # nothing seen yet: empty containers
    busy = _ran()
    dckpt.load({"loader": busy}, tmp_path / "ck")
    assert busy.pos == {} and busy.buffers == {} and busy.history == []


def test_empty_plain_containers_are_filled_and_others_left_as_asked(tmp_path: Path) -> None:
    saved = {
        "bufs": {"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.arange(2)},
        "hist": [torch.ones(1), torch.zeros(1)],
        "model": {"w": torch.ones(2), "head": torch.ones(5)},
    }
    dckpt.save(saved, tmp_path / "ck")
    state: dict[str, Any] = {"bufs": {}, "hist": [], "model": {"w": torch.zeros(2)}}
    result = dckpt.load(state, tmp_path / "ck")
    assert state["bufs"].keys() == {"a", "b"}
    assert all(torch.equal(state["bufs"][k], saved["bufs"][k]) for k in ("a", "b"))
    assert state["bufs"]["a"].dtype == torch.bfloat16
    assert [t.tolist() for t in state["hist"]] == [[1.0], [0.0]]
    # A non-empty plain dict may be a deliberate subset (a model without its head).
    assert state["model"].keys() == {"w"} and torch.equal(state["model"]["w"], torch.ones(2))
    assert result.unexpected_keys == ("model.head",)


def test_a_missing_key_names_the_closest_saved_ones(tmp_path: Path) -> None:
    dckpt.save({"step": 7, "model": {"weight": torch.ones(2)}}, tmp_path / "ck")
    with pytest.raises(dckpt.StateMismatchError) as info:
        dckpt.load({"stpe": 0, "model": {"wieght": torch.zeros(2)}}, tmp_path / "ck")
    msg = str(info.value)
    assert "'stpe' (did you mean 'step'?)" in msg
    assert "'model.wieght' (did you mean 'model.weight'?)" in msg


def _w_save_loader(path: str) -> None:
    dckpt.save({"loader": _ran(dist.get_rank())}, path)


def _w_load_loader(path: str) -> bool:
    rank = dist.get_rank()
    fresh = Loader()
    assert dckpt.load({"loader": fresh}, path) == dckpt.LoadResult()
    return _same(fresh, _ran(rank))


def test_runtime_keys_come_back_to_each_rank(rank_pool: Pools, tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    rank_pool(2).run(_w_save_loader, path)
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["values"]["loader.pos.worker0"]["per_rank"] == {"0": 3, "1": 13}
    assert manifest["tensors"]["loader.buffers.w0"]["per_rank"]
    assert rank_pool(2).run(_w_load_loader, path) == [True, True]
    # Per-rank entries cannot go to another world size: the error says so, by key.
    with pytest.raises(dckpt.StateMismatchError) as info:
        dckpt.load({"loader": Loader()}, path)
    assert "'loader.pos.worker0' was saved per rank by 2 ranks" in str(info.value)


# ----------------------------------------------------------------------------- unsupported


class _SelfReferring:
    def state_dict(self) -> dict[str, Any]:
        return {"me": self}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass


def _cyclic() -> dict[str, Any]:
    d: dict[str, Any] = {"t": torch.ones(1)}
    d["self"] = d
    return d


def _cyclic_list() -> list[object]:
    loop: list[object] = [1]
    loop.append(loop)
    return loop


def _deep(kind: type, depth: int = 5000) -> object:
    top: Any = kind()
    node = top
    for _ in range(depth):
        child = kind()
        if kind is list:
            node.append(child)
        else:
            node["k"] = child
        node = child
    return top


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: {"a": _cyclic()}, "key 'a.self' holds the same object as its enclosing key 'a'"),
        (lambda: {"a": _cyclic_list()}, "key 'a.1' holds the same object as its enclosing key 'a'"),
        (lambda: {"s": _SelfReferring()}, "key 's.me' holds the same object"),
        (lambda: {"a": _deep(list)}, "more than 100 levels deep, at key 'a.0.0.0."),
        (lambda: {"a": _deep(dict)}, "more than 100 levels deep, at key 'a.k.k.k."),
        (
            lambda: {"a": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])},
            "key 'a': a nested tensor",
        ),
    ],
    ids=["cyclic-dict", "cyclic-list", "cyclic-stateful", "deep-list", "deep-dict", "nested"],
)
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_unsupported_states_fail_clearly_on_save_and_load(
    tmp_path: Path, make: Callable[[], dict[str, Any]], words: str
) -> None:
    with pytest.raises(dckpt.UnsupportedStateError) as info:
        dckpt.save(make(), tmp_path / "ck")
    assert words in str(info.value)
    assert not (tmp_path / "ck" / "manifest.json").exists()
    dckpt.save({"a": torch.ones(1)}, tmp_path / "ok")
    with pytest.raises(dckpt.UnsupportedStateError) as info:
        dckpt.load(make(), tmp_path / "ok", strict=False)
    assert words in str(info.value)


def test_values_that_cycle_or_nest_too_deeply_are_refused_by_name() -> None:
    with pytest.raises(dckpt.UnsupportedStateError, match="'k'.*contains itself"):
        encode_value(_cyclic_list(), "k")
    with pytest.raises(dckpt.UnsupportedStateError, match="'k'.*more than 100 levels"):
        encode_value(_deep(list), "k")
    assert encode_value(_deep(list, 90), "k") is not None  # deep, but within the limit


def test_an_empty_state_saves_and_loads_back(tmp_path: Path) -> None:
    dckpt.save({}, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["tensors"] == {} and manifest["values"] == {}
    assert dckpt.load({}, tmp_path / "ck") == dckpt.LoadResult()
    with pytest.raises(dckpt.StateMismatchError, match="'a'"):
        dckpt.load({"a": torch.zeros(1)}, tmp_path / "ck")


def _w_tensorless(root: str) -> list[Any]:
    """Issue #11.4: values only, durable, through every way of saving on 2 ranks."""
    rank = dist.get_rank()
    got: list[Any] = []
    dckpt.save({"step": 5, "name": f"r{rank}"}, f"{root}/sync")
    dckpt.async_save({"step": 6}, f"{root}/async").result()
    mgr = dckpt.CheckpointManager(f"{root}/mgr")
    mgr.save(7, {"step": 7})
    for path, want in ((f"{root}/sync", 5), (f"{root}/async", 6)):
        state: dict[str, Any] = {"step": 0}
        dckpt.load(state, path, strict=False)
        got.append(state["step"] == want)
    state = {"step": 0}
    got.append(mgr.load(state) == 7 and state["step"] == 7)
    named: dict[str, Any] = {"name": ""}
    dckpt.load(named, f"{root}/sync", strict=False)
    got.append(named["name"] == f"r{rank}")
    return got


def test_a_state_without_tensors_saves_durably_on_two_ranks(
    rank_pool: Pools, tmp_path: Path
) -> None:
    assert rank_pool(2).run(_w_tensorless, str(tmp_path)) == [[True] * 4] * 2
    assert json.loads((tmp_path / "sync" / "manifest.json").read_text())["tensors"] == {}


def test_a_state_without_tensors_saves_durably_in_one_process(tmp_path: Path) -> None:
    dckpt.save({"step": 5}, tmp_path / "a")
    dckpt.async_save({"step": 6}, tmp_path / "b").result()
    state = {"step": 0}
    dckpt.load(state, tmp_path / "a")
    assert state == {"step": 5}
    dckpt.load(state, tmp_path / "b")
    assert state == {"step": 6}


def test_a_meta_tensor_is_named_as_one(tmp_path: Path) -> None:
    with pytest.raises(dckpt.UnsupportedStateError, match=r"'w'.*meta tensor.*materialize"):
        dckpt.save({"w": torch.empty(3, device="meta")}, tmp_path / "ck")
    assert "strided" not in _message(
        lambda: dckpt.save({"w": torch.empty(3, device="meta")}, tmp_path / "ck")
    )


def _message(call: Callable[[], object]) -> str:
    try:
        call()
    except dckpt.CheckpointError as exc:
        return str(exc)
    raise AssertionError("no error")


# ----------------------------------------------------------------------------- modules + optimizers


def _trained(steps: int = 1) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        model(torch.rand(5, 4)).sum().backward()
        optim.step()
    return model, optim


def _flat(state: dict[str, Any]) -> dict[str, object]:
    from dckpt._state import resolve

    out = resolve(state)
    found: dict[str, object] = {t.key: t.tensor.clone() for t in out.tensors}
    found.update({v.key: v.value for v in out.values})
    return found


@pytest.mark.parametrize("optimizer_first", [False, True])
def test_a_module_and_its_optimizer_are_captured_in_one_call(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, optimizer_first: bool
) -> None:
    """torch's helpers validate their options once for the pair (the costly part of a
    capture), and each key gets exactly the dict torch's separate helpers give."""
    from torch.distributed.checkpoint import state_dict as helpers

    model, optim = _trained()
    # The wrapper is never paired: its capture goes through the two separate helpers.
    apart = _flat({"model": model, "optimizer": dckpt.OptimizerState(model, optim)})
    assert "optimizer.state.0.weight.exp_avg" in apart and "model.2.bias" in apart
    calls: list[int] = []
    verify = helpers._verify_options

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return verify(*a, **k)

    monkeypatch.setattr(helpers, "_verify_options", counted)
    state = (
        {"optimizer": optim, "model": model}
        if optimizer_first
        else {"model": model, "optimizer": optim}
    )
    assert same(_flat(state), apart)
    assert len(calls) == 1
    fresh, fresh_optim = _trained(steps=0)  # no state yet: the load creates it
    dckpt.save(state, tmp_path / "ck")
    dckpt.load({"optimizer": fresh_optim, "model": fresh}, tmp_path / "ck")
    assert same(_flat({"model": fresh, "optimizer": fresh_optim}), apart)


def test_optimizers_sharing_a_module_and_look_only_walks_capture_apart() -> None:
    model, _ = _trained()
    first = torch.optim.SGD(list(model.parameters())[:2], lr=0.1, momentum=0.9)
    second = torch.optim.SGD(list(model.parameters())[2:], lr=0.1, momentum=0.9)
    model(torch.rand(5, 4)).sum().backward()
    first.step()
    second.step()
    flat = _flat({"model": model, "first": first, "second": second})
    assert {k for k in flat if k.startswith("first.state.")} == {
        "first.state.0.weight.momentum_buffer",
        "first.state.0.bias.momentum_buffer",
    }
    assert {k for k in flat if k.startswith("second.state.")} == {
        "second.state.2.weight.momentum_buffer",
        "second.state.2.bias.momentum_buffer",
    }
    # A walk that only looks leaves an optimizer without state alone: pairing it with its
    # module must not create its state (torch's helpers would, with a zero-gradient step).
    from dckpt._state import resolve

    idle = torch.optim.Adam(model.parameters(), lr=0.01)
    out = resolve({"model": model, "optimizer": idle}, fresh_optimizers=False)
    assert not idle.state
    assert {t.key for t in out.tensors} == {f"model.{k}" for k in model.state_dict()}


def test_modules_without_state_save_and_load_as_nothing(tmp_path: Path) -> None:
    """An activation or a loss module in the state holds nothing: torch's helpers refuse
    such a module (without a process group, with an unrelated ValueError)."""
    model, optim = _trained()
    state = {"model": model, "optimizer": optim, "act": torch.nn.ReLU(), "loss": torch.nn.MSELoss()}
    dckpt.save(state, tmp_path / "ck")
    fresh, fresh_optim = _trained(steps=0)
    back = {"model": fresh, "optimizer": fresh_optim, "act": torch.nn.ReLU()}
    back["loss"] = torch.nn.MSELoss()
    assert dckpt.load(back, tmp_path / "ck") == dckpt.LoadResult()
    assert same(_flat(back), _flat(state))
