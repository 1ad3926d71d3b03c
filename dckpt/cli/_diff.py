"""Comparing two checkpoints key by key (``dckpt diff``), one tensor of each at a time.

Any pair of formats ``dckpt.interop._sources`` reads can be compared; tensors are read through
their checksums like any load, so a damaged file is an error rather than a difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dckpt.cli._output import Progress
from dckpt.interop._sources import Entry, Source, read_checked


@dataclass
class Difference:
    key: str
    what: str  # "kind" | "dtype" | "shape" | "values" | "value"
    a: str = ""
    b: str = ""
    max_abs_diff: float | None = None
    elements: int | None = None  # how many elements differ


@dataclass
class DiffReport:
    compared: int = 0
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    different: list[Difference] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not (self.only_a or self.only_b or self.different)


def tensor_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int] | None:
    """(max |a - b|, differing elements), or None when equal (NaNs in the same places
    count as equal)."""
    same = a == b
    if a.is_floating_point() or a.is_complex():
        same |= a.isnan() & b.isnan()
    count = int((~same).sum())
    if count == 0:
        return None
    if a.dtype == torch.bool:
        return 1.0, count
    if a.is_complex():
        d = (a.to(torch.complex128) - b.to(torch.complex128)).abs()
    elif a.is_floating_point():
        d = (a.to(torch.float64) - b.to(torch.float64)).abs()
    else:
        d = (a.to(torch.int64) - b.to(torch.int64)).abs().to(torch.float64)
    d = torch.where(same, torch.zeros((), dtype=d.dtype), d)
    return float(d.max()), count


def diff_sources(a: Source, b: Source, progress: Progress | None = None) -> DiffReport:
    """Compare key by key, holding one tensor of each side at a time."""
    ea: dict[str, Entry] = {e.key: e for e in a.entries()}
    eb: dict[str, Entry] = {e.key: e for e in b.entries()}
    report = DiffReport(only_a=sorted(set(ea) - set(eb)), only_b=sorted(set(eb) - set(ea)))
    for key in sorted(set(ea) & set(eb)):
        x, y = ea[key], eb[key]
        report.compared += 1
        if x.kind != y.kind:
            report.different.append(Difference(key, "kind", x.kind, y.kind))
        elif x.kind == "value":
            va, vb = a.value(key), b.value(key)
            if not _equal_values(va, vb):
                report.different.append(Difference(key, "value", _short(va), _short(vb)))
        elif x.dtype != y.dtype:
            report.different.append(Difference(key, "dtype", str(x.dtype), str(y.dtype)))
        elif x.shape != y.shape:
            report.different.append(
                Difference(key, "shape", shape_text(x.shape), shape_text(y.shape))
            )
        else:
            delta = tensor_difference(read_checked(a, x), read_checked(b, y))
            if delta is not None:
                report.different.append(
                    Difference(key, "values", max_abs_diff=delta[0], elements=delta[1])
                )
            if progress is not None:
                progress(x.nbytes)
    return report


def _equal_values(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) or (
            isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        )
    except Exception:
        return False


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def shape_text(shape: Sequence[int] | None) -> str:
    return "-" if shape is None else "[" + ", ".join(map(str, shape)) + "]"
