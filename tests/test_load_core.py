"""The load core's seam: a format is one module (its reader and registry entry) plus one
registration, and ``load``, ``open_checkpoint`` and ``open_source`` all find it through the
one detection.

The toy format here stores each tensor as a JSON list in ``toy.json``; everything else
(the coordinator phases named after the format, the index comparison across ranks, the
strict check and its message, ``LoadResult``) comes from the core.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crc32c
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import dckpt
from dckpt import _formats
from dckpt._api import open_checkpoint
from dckpt._bytes import dtype_name
from dckpt._formats import CheckpointFormat, register_format
from dckpt._loadcore import KeyInfo, Matching, mismatch_message
from dckpt._state import Resolved
from dckpt.interop._sources import open_source
from dckpt.storage import LocalStorage, Storage, open_storage
from tests._dist import RankPool

TOY_INDEX = "toy.json"


@dataclass
class _ToyPlan(Matching):
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class ToyReader:
    """A complete format reader: random access plus the load core's Reader."""

    format = "toy"
    index_name = "toy indexes"
    world_size = 1

    def __init__(self, storage: Storage) -> None:
        raw = storage.read_file(TOY_INDEX)
        if raw is None:
            raise dckpt.CheckpointNotFoundError(f"no {TOY_INDEX} at {storage.location}")
        self.storage = storage
        self.index_digest = int(crc32c.crc32c(raw))
        self.tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in json.loads(raw).items()}

    @property
    def location(self) -> str:
        return self.storage.location

    def infos(self) -> list[KeyInfo]:
        return [
            KeyInfo(k, (k,), "tensor", dtype_name(t.dtype), tuple(t.shape))
            for k, t in sorted(self.tensors.items())
        ]

    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def read_tensor(self, key: str, *, rank: int = 0) -> torch.Tensor:
        return self.tensors[key].clone()

    def read_value(self, key: str, *, rank: int = 0, allow_pickle: bool = False) -> Any:
        raise dckpt.CheckpointError(f"{self.location} holds tensors only, not {key!r}")

    def verify(self, progress: Callable[[int], None] | None = None) -> list[str]:
        return []

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.keys():
            yield key, self.read_tensor(key)

    def grower(self, rank: int, world_size: int, *, allow_pickle: bool) -> None:
        return None

    def plan(
        self, resolved: Resolved, rank: int, world_size: int, *, allow_pickle: bool
    ) -> _ToyPlan:
        plan = _ToyPlan()
        for leaf in resolved.tensors:
            saved = self.tensors.get(leaf.key)
            if saved is None:
                plan.missing.append(leaf.key)
            elif saved.shape != leaf.tensor.shape:
                plan.mismatched.append(leaf.key)
                plan.problems.append(f"{leaf.key!r}: saved {list(saved.shape)}")
            else:
                plan.copies.append((saved, leaf.tensor))
        plan.unexpected = sorted(set(self.tensors) - resolved.keys())
        return plan

    def mismatch_message(self, plan: _ToyPlan) -> str:
        return mismatch_message(self.location, plan, plan.unexpected)

    def check_files(self, plan: _ToyPlan) -> None:
        return None

    def read(self, plan: _ToyPlan, *, memory_budget: int, threads: int) -> None:
        for src, dest in plan.copies:
            dest.copy_(src)


def _has_toy_index(storage: Storage) -> bool:
    return storage.size(TOY_INDEX) is not None


TOY_FORMAT = CheckpointFormat("toy", "toy-load", _has_toy_index, ToyReader)


@contextlib.contextmanager
def _toy_registered() -> Iterator[None]:
    """The one registration line a new format needs, undone so other tests see the default."""
    before = list(_formats._FORMATS)
    register_format(TOY_FORMAT)
    try:
        yield
    finally:
        _formats._FORMATS[:] = before


def _write_toy(path: Path, tensors: dict[str, list[float]]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / TOY_INDEX).write_text(json.dumps(tensors))


def test_a_registered_format_loads_opens_and_streams(tmp_path: Path) -> None:
    path = tmp_path / "toy"
    _write_toy(path, {"w": [1.0, 2.0], "b": [3.0], "extra": [0.0]})
    with _toy_registered():
        state = {"w": torch.zeros(2), "b": torch.zeros(1)}
        result = dckpt.load(state, path)
        assert state["w"].tolist() == [1.0, 2.0] and state["b"].tolist() == [3.0]
        assert result == dckpt.LoadResult(unexpected_keys=("extra",))

        with pytest.raises(dckpt.StateMismatchError) as info:
            dckpt.load({"ww": torch.zeros(2)}, path)
        assert str(info.value).startswith(f"the state does not match the checkpoint at {path}")
        assert "'ww' (did you mean 'w'?)" in str(info.value)

        reader = open_checkpoint(path)
        assert isinstance(reader, ToyReader) and reader.read_tensor("b").tolist() == [3.0]
        source = open_source(path)
        assert source.format == "toy" and [e.key for e in source.entries()] == ["b", "extra", "w"]
    with pytest.raises(dckpt.CheckpointNotFoundError, match="not a committed checkpoint"):
        dckpt.load({"w": torch.zeros(2)}, path)  # unregistered: dckpt's format reports it


def test_registration_comes_after_dckpt_and_dcp(tmp_path: Path) -> None:
    """A directory that is also a dckpt checkpoint stays one: formats are tried in order."""
    path = tmp_path / "both"
    dckpt.save({"w": torch.ones(2)}, path)
    _write_toy(path, {"w": [5.0, 5.0]})
    with _toy_registered():
        assert [f.name for f in _formats._FORMATS] == ["dckpt", "dcp", "toy"]
        assert _formats.detect_format(open_storage(path)) is _formats.DCKPT_FORMAT
        state = {"w": torch.zeros(2)}
        dckpt.load(state, path)
        assert state["w"].tolist() == [1.0, 1.0]


def _w_toy_load(path: str) -> tuple[list[float], str]:
    rank = dist.get_rank()
    with _toy_registered():
        state = {"w": torch.zeros(2)}
        dckpt.load(state, path)
        wrong = {"w": torch.zeros(2)} if rank == 0 else {"w": torch.zeros(3)}
        try:
            dckpt.load(wrong, path)
        except dckpt.RankFailureError as exc:
            return state["w"].tolist(), str(exc)
    return state["w"].tolist(), ""


def test_a_registered_format_loads_collectively(
    rank_pool: Callable[[int], RankPool], tmp_path: Path
) -> None:
    """The core runs the foreign format on every rank, its phases named after it: a
    mismatch on rank 1 fails both ranks with the same error."""
    _write_toy(tmp_path / "toy", {"w": [7.0, 8.0]})
    results = rank_pool(2).run(_w_toy_load, str(tmp_path / "toy"))
    for loaded, error in results:
        assert loaded == [7.0, 8.0]
        assert "'toy-load-plan' failed on rank 1" in error and "saved [2]" in error


def test_load_opens_the_storage_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Detection and the load share one storage (it used to be opened twice)."""
    dckpt.save({"w": torch.ones(2)}, tmp_path / "dckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"w": torch.ones(2)}, checkpoint_id=tmp_path / "dcp")
    opened: list[str] = []
    init = LocalStorage.__init__

    def counting(self: LocalStorage, *args: Any, **kwargs: Any) -> None:
        opened.append(str(args[0] if args else kwargs))
        init(self, *args, **kwargs)

    monkeypatch.setattr(LocalStorage, "__init__", counting)
    for name in ("dckpt", "dcp"):
        opened.clear()
        state = {"w": torch.zeros(2)}
        dckpt.load(state, tmp_path / name)
        assert state["w"].tolist() == [1.0, 1.0] and len(opened) == 1, (name, opened)
