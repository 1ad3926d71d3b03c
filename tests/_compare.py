"""Comparing a state with what a load put back: shared by the multi-rank tests."""

from __future__ import annotations

from typing import Any

import torch


def zeroed(state: Any) -> Any:
    """``state`` with every tensor zeroed (same dtype and shape) and every int None."""
    if isinstance(state, dict):
        return {k: zeroed(v) for k, v in state.items()}
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    return None if isinstance(state, int) else state


def same(a: Any, b: Any) -> bool:
    """Equal keys, and equal dtypes and bytes (DTensors: this rank's shard)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        local = a.to_local() if hasattr(a, "to_local") else a
        back = b.to_local() if hasattr(b, "to_local") else b
        return a.dtype == b.dtype and torch.equal(local, back)
    return bool(a == b)
