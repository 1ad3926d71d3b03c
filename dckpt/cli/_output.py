"""How the command line shows things: sizes, times, tables, JSON and progress bars."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import click

Progress = Callable[[int], None]


def human(n: int | None) -> str:
    """Bytes in binary units: ``1.5 MiB``."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def when(t: float | None) -> str:
    if t is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (OverflowError, OSError, ValueError):  # a valid manifest may hold any finite time
        return f"{t!r} s after the epoch"


def want_progress(as_json: bool, stream: Any = None) -> bool:
    """Bars only for a person watching: stderr is a terminal and the output is not JSON."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not as_json and callable(isatty) and bool(isatty())


@contextlib.contextmanager
def bar(enabled: bool, total: int | None, desc: str) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    from tqdm import tqdm  # lazy: bars only on a terminal

    with tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False
    ) as bar:
        yield bar.update


def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))
