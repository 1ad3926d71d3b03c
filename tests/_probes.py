"""Small probes shared by tests: a Stateful that fails on demand, a plan counter."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist


class FailingState:
    """A Stateful whose ``state_dict()`` raises ``error`` (on ``rank`` only, if given)."""

    def __init__(self, error: Exception, rank: int | None = None) -> None:
        self.error = error
        self.rank = rank

    def state_dict(self) -> dict[str, Any]:
        if self.rank is None or dist.get_rank() == self.rank:
            raise self.error
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass


@contextlib.contextmanager
def counting_plans() -> Iterator[list[int]]:
    """Counts the save plans made from scratch (not taken from the plan cache)."""
    import dckpt._plancache as plancache

    calls: list[int] = []
    real = plancache.plan_save

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    plancache.plan_save = counting  # type: ignore[assignment]
    try:
        yield calls
    finally:
        plancache.plan_save = real
