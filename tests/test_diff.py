from __future__ import annotations

from contextlib import closing
from pathlib import Path

import torch

import dckpt
from dckpt.cli._diff import diff_sources, tensor_difference
from dckpt.interop._sources import open_source


def test_tensor_difference() -> None:
    nan = float("nan")
    assert tensor_difference(torch.tensor([1.0, nan]), torch.tensor([1.0, nan])) is None
    assert tensor_difference(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0])) == (0.5, 1)
    assert tensor_difference(torch.tensor([True]), torch.tensor([False])) == (1.0, 1)
    assert tensor_difference(torch.tensor([3, 9]), torch.tensor([5, 9])) == (2.0, 1)
    big = torch.tensor([1 + 2j, 0j])
    assert tensor_difference(big, torch.tensor([1 + 2j, 3j])) == (3.0, 1)


def test_diff_sources_reports_every_kind_of_difference(tmp_path: Path) -> None:
    a = {"w": torch.ones(4), "d": torch.ones(2), "s": torch.ones(3), "v": 1, "k": 1, "x": 0}
    b = {"w": torch.ones(4), "d": torch.ones(2, dtype=torch.int64), "s": torch.ones(4)}
    b |= {"v": 2, "k": torch.ones(1), "y": 0}
    b["w"][1] = 5.0
    dckpt.save(a, tmp_path / "a")
    dckpt.save(b, tmp_path / "b")
    seen: list[int] = []
    with closing(open_source(tmp_path / "a")) as sa, closing(open_source(tmp_path / "b")) as sb:
        report = diff_sources(sa, sb, seen.append)
    assert report.only_a == ["x"] and report.only_b == ["y"] and report.compared == 5
    kinds = {d.key: d.what for d in report.different}
    assert kinds == {"w": "values", "d": "dtype", "s": "shape", "v": "value", "k": "kind"}
    w = next(d for d in report.different if d.key == "w")
    assert (w.max_abs_diff, w.elements) == (4.0, 1)
    assert seen == [16] and not report.identical
