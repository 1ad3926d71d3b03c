"""Bad arguments: one clear CheckpointError (also a ValueError/TypeError), nothing done.

Issue #11.13: these used to escape as RecursionError, ValueError, TypeError or
AttributeError, or were silently accepted (``overwrite="no"`` overwrote).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import dckpt

BAD_COMMON: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"timeout": 0}, ValueError, "timeout"),
    ({"timeout": -1}, ValueError, "timeout"),
    ({"timeout": math.nan}, ValueError, "timeout"),
    ({"timeout": math.inf}, ValueError, "timeout"),
    ({"timeout": "10"}, TypeError, "timeout"),
    ({"timeout": None}, TypeError, "timeout"),
    ({"timeout": True}, TypeError, "timeout"),
    ({"process_group": "world"}, TypeError, "process_group"),
    ({"process_group": 0}, TypeError, "process_group"),
    ({"storage_options": "endpoint"}, TypeError, "storage_options"),
    ({"allow_pickle": "yes"}, TypeError, "allow_pickle"),
]
BAD_SAVE = [
    *BAD_COMMON,
    ({"overwrite": "no"}, TypeError, "overwrite"),
    ({"overwrite": 1}, TypeError, "overwrite"),
    ({"durable": None}, TypeError, "durable"),
]
BAD_LOAD = [
    *BAD_COMMON,
    ({"strict": "yes"}, TypeError, "strict"),
    ({"memory_budget": -1}, ValueError, "memory_budget"),
    ({"memory_budget": 0}, ValueError, "memory_budget"),
    ({"memory_budget": 1.5}, TypeError, "memory_budget"),
]


def _expect(call: Callable[[], object], kind: type[Exception], word: str) -> None:
    with pytest.raises(dckpt.CheckpointError) as info:
        call()
    assert isinstance(info.value, kind), type(info.value).__mro__
    assert isinstance(info.value, dckpt.ArgumentError)
    assert word in str(info.value)


@pytest.mark.parametrize(("kwargs", "kind", "word"), BAD_SAVE, ids=lambda x: repr(x)[:30])
def test_save_rejects_bad_arguments_and_writes_nothing(
    tmp_path: Path, kwargs: dict[str, Any], kind: type[Exception], word: str
) -> None:
    path = tmp_path / "ck"
    _expect(lambda: dckpt.save({"w": torch.ones(2)}, path, **kwargs), kind, word)
    assert not path.exists()


@pytest.mark.parametrize(("kwargs", "kind", "word"), BAD_SAVE, ids=lambda x: repr(x)[:30])
def test_async_save_rejects_bad_arguments(
    tmp_path: Path, kwargs: dict[str, Any], kind: type[Exception], word: str
) -> None:
    path = tmp_path / "ck"
    _expect(lambda: dckpt.async_save({"w": torch.ones(2)}, path, **kwargs), kind, word)
    dckpt.wait()
    assert not path.exists()


@pytest.mark.parametrize(("kwargs", "kind", "word"), BAD_LOAD, ids=lambda x: repr(x)[:30])
def test_load_rejects_bad_arguments_and_loads_nothing(
    tmp_path: Path, kwargs: dict[str, Any], kind: type[Exception], word: str
) -> None:
    dckpt.save({"w": torch.ones(2)}, tmp_path / "ck")
    state = {"w": torch.zeros(2)}
    _expect(lambda: dckpt.load(state, tmp_path / "ck", **kwargs), kind, word)
    assert torch.equal(state["w"], torch.zeros(2))


@pytest.mark.parametrize(
    "path", ["", "a\x00b", 5, None, b"bytes"], ids=["empty", "nul", "int", "none", "bytes"]
)
def test_paths_are_validated(tmp_path: Path, path: Any) -> None:
    kind = ValueError if isinstance(path, str) else TypeError
    _expect(lambda: dckpt.save({"w": torch.ones(2)}, path), kind, "path")
    _expect(lambda: dckpt.load({"w": torch.ones(2)}, path), kind, "path")


@pytest.mark.parametrize("state", [[torch.ones(2)], None, "w", torch.ones(2)])
def test_state_must_be_a_mapping(tmp_path: Path, state: Any) -> None:
    _expect(lambda: dckpt.save(state, tmp_path / "ck"), TypeError, "state")
    _expect(lambda: dckpt.load(state, tmp_path / "ck"), TypeError, "state")


@pytest.mark.parametrize(
    ("kwargs", "kind", "word"),
    [
        ({"keep_last": -1}, ValueError, "keep_last"),
        ({"keep_last": "3"}, TypeError, "keep_last"),
        ({"keep_every": 0}, ValueError, "keep_every"),
        ({"async_save": "yes"}, TypeError, "async_save"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"timeout": "1"}, TypeError, "timeout"),
        ({"process_group": 1}, TypeError, "process_group"),
        ({"storage_options": 1}, TypeError, "storage_options"),
        ({"durable": "no"}, TypeError, "durable"),
        ({"allow_pickle": 1}, TypeError, "allow_pickle"),
    ],
    ids=lambda x: repr(x)[:30],
)
def test_manager_rejects_bad_arguments(
    tmp_path: Path, kwargs: dict[str, Any], kind: type[Exception], word: str
) -> None:
    _expect(lambda: dckpt.CheckpointManager(tmp_path / "m", **kwargs), kind, word)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("step", "kind"), [(-1, ValueError), ("3", TypeError), (1.0, TypeError), (True, TypeError)]
)
def test_manager_steps_are_validated(tmp_path: Path, step: Any, kind: type[Exception]) -> None:
    mgr = dckpt.CheckpointManager(tmp_path / "m")
    _expect(lambda: mgr.save(step, {"w": torch.ones(2)}), kind, "step")
    assert mgr.steps() == []
    _expect(lambda: mgr.load({"w": torch.ones(2)}, step=step), kind, "step")


def test_manager_load_takes_the_step_by_keyword_only(tmp_path: Path) -> None:
    """``save(step, state)`` but ``load(state, *, step)``: a step passed by position (the
    order before 0.1) is refused with a message that shows the keyword, and loads nothing."""
    mgr = dckpt.CheckpointManager(tmp_path / "m")
    mgr.save(1, {"w": torch.ones(2)})
    mgr.save(2, {"w": torch.full((2,), 2.0)})
    state = {"w": torch.zeros(2)}
    _expect(lambda: mgr.load(state, 1), TypeError, "load(state, step=1)")  # type: ignore[misc]
    assert not state["w"].any()
    assert mgr.load(state, step=1) == 1 and torch.equal(state["w"], torch.ones(2))


def test_prepare_async_save_and_convert_validate(tmp_path: Path) -> None:
    _expect(
        lambda: dckpt.prepare_async_save({"w": torch.ones(2)}, staging_bytes=-1),
        ValueError,
        "staging_bytes",
    )
    _expect(lambda: dckpt.prepare_async_save([torch.ones(2)]), TypeError, "state")  # type: ignore[arg-type]
    dckpt.save({"w": torch.ones(2)}, tmp_path / "ck")
    _expect(lambda: dckpt.convert(tmp_path / "ck", ""), ValueError, "dst")
    _expect(lambda: dckpt.convert(tmp_path / "ck", tmp_path / "o", shard_size=0), ValueError, "shard_size")


def test_argument_errors_are_public_and_both_kinds() -> None:
    assert issubclass(dckpt.ArgumentError, dckpt.CheckpointError)
    assert issubclass(dckpt.ArgumentError, ValueError)
    assert issubclass(dckpt.ArgumentTypeError, dckpt.ArgumentError)
    assert issubclass(dckpt.ArgumentTypeError, TypeError)
