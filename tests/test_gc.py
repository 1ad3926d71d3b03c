from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import dckpt
from dckpt import _plancache, _save
from dckpt._gc import gc_paused, paused_gc


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_paused_gc_nests_and_restores() -> None:
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()  # a caller that keeps the collector off keeps it off
    with paused_gc():
        pass
    assert not gc.isenabled()


def test_gc_paused_binds_arguments() -> None:
    seen = gc_paused(lambda a, b: (a, b, gc.isenabled()), 1)(2)
    assert seen == (1, 2, False) and gc.isenabled()


def test_async_save_pauses_the_collector_for_planning_and_commit_not_for_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, bool] = {}

    def spy(name: str, real: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            seen[name] = gc.isenabled()
            return real(*args, **kwargs)

        return run

    monkeypatch.setattr(_save, "render_manifest", spy("commit", _save.render_manifest))
    monkeypatch.setattr(_save, "write_rank", spy("write", _save.write_rank))
    monkeypatch.setattr(_plancache, "plan_save", spy("plan", _plancache.plan_save))
    # A structure no other test saves, so that it is planned afresh (not from the cache).
    dckpt.async_save({"test_gc.w": torch.ones(8)}, tmp_path / "ck").result()
    # Background thread: the allocation-heavy steps run paused; a long write does not hold
    # the collector off for the training thread.
    assert seen == {"plan": False, "write": True, "commit": False}
    assert gc.isenabled()
