"""Streaming conversion between dckpt, torch DCP, safetensors, HF sharded and ``torch.save``.

Tensors travel one at a time: a source yields each tensor when asked, a destination writes
it and drops it, so memory stays near the largest tensor (plus the dckpt writer's 8 MB
batch). dckpt output is a one-process save through the save's own plan, write and commit
(:func:`dckpt._save.save_alone`); the other formats' writers are in
:mod:`dckpt.interop._outputs`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from dckpt._args import check_int, check_options, check_path
from dckpt._describe import value_text
from dckpt._errors import (
    ArgumentError,
    ArgumentTypeError,
    CheckpointError,
    CheckpointExistsError,
)
from dckpt._format import MANIFEST_NAME, PathPart
from dckpt._plan import ChunkOffer, RankOffer, TensorOffer, ValueOffer
from dckpt._reshard import Box
from dckpt._save import save_alone
from dckpt._values import encode_value
from dckpt.interop._outputs import write_hf, write_pt, write_safetensors
from dckpt.interop._sources import TORCH_SUFFIXES, Entry, Source, open_source, read_checked
from dckpt.storage import FileLayout, open_storage

FORMATS = ("dckpt", "safetensors", "hf", "pt")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``5GB`` (decimal, as Hugging Face counts), ``512MiB`` (binary) or plain bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB or a byte count)")
    unit = m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    scale |= {"KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30, "TI": 1 << 40}
    if unit not in scale:
        raise ValueError(f"unknown size unit in {text!r}")
    return int(float(m.group(1)) * scale[unit])


# --------------------------------------------------------------------------- report


@dataclass(frozen=True, slots=True)
class ConvertReport:
    """What a conversion wrote, and what it left out (``skipped``) and why (``notes``).

    Attributes:
        src: the source path, as given.
        dst: the destination path, as given.
        src_format: ``"dckpt"``, ``"dcp"``, ``"safetensors"``, ``"hf"`` or ``"pt"``.
        dst_format: the format written (the same names).
        tensors: how many tensors were written.
        values: how many non-tensor values were written.
        nbytes: tensor bytes written.
        files: the files written, relative to ``dst`` for directories.
        skipped: keys left out (values, for tensor-only formats).
        notes: why anything was left out or changed.

    Example:
        ```python
        report = dckpt.convert("ckpt/step-1000", "model.safetensors", prefix="model.")
        print(report.tensors, report.nbytes, report.skipped)
        ```
    """

    src: str
    dst: str
    src_format: str
    dst_format: str
    tensors: int
    values: int
    nbytes: int
    files: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())


# --------------------------------------------------------------------------- keys


def strip_prefix(path: tuple[PathPart, ...], prefix: str) -> tuple[PathPart, ...] | None:
    """``path`` without the leading ``prefix`` of its dotted key, or None if not under it.

    A prefix may end inside one path part (``model.layers.`` on ``("model",
    "layers.0.weight")``): that part keeps its remainder (``("0.weight",)``).
    """
    key = ".".join(str(p) for p in path)
    if not key.startswith(prefix) or len(key) == len(prefix):
        return None
    out: list[PathPart] = []
    pos, cut = 0, len(prefix)
    for part in path:
        s = str(part)
        end = pos + len(s)
        if end + 1 <= cut:  # the part and its trailing dot are inside the prefix
            pass
        elif pos < cut:
            rest = s[cut - pos :]
            if rest:
                out.append(rest)
        else:
            out.append(part)
        pos = end + 1
    return tuple(out) if out else None


def _select(entries: list[Entry], prefix: str | None) -> list[Entry]:
    if prefix is None:
        return entries
    if not prefix.endswith("."):
        prefix += "."
    out = []
    for e in entries:
        path = strip_prefix(e.path, prefix)
        if path is not None:
            key = ".".join(map(str, path))
            out.append(Entry(key, path, e.kind, e.dtype, e.shape, e.source_key))
    if not out:
        sample = ", ".join(repr(e.key) for e in entries[:5])
        raise CheckpointError(f"no keys under prefix {prefix!r}; the keys look like {sample}")
    return out


class _LazyTensors(Mapping[tuple[str, Box], torch.Tensor]):
    """The writer's source map, reading each tensor only when the writer reaches it."""

    def __init__(self, src: Source, entries: Mapping[str, Entry]) -> None:
        self.src = src
        self.entries = entries

    def __getitem__(self, item: tuple[str, Box]) -> torch.Tensor:
        return read_checked(self.src, self.entries[item[0]])

    def __iter__(self) -> Iterator[tuple[str, Box]]:
        for e in self.entries.values():
            yield (e.key, _whole(e))

    def __len__(self) -> int:
        return len(self.entries)


def _whole(e: Entry) -> Box:
    shape = e.shape or ()
    return Box((0,) * len(shape), shape)


def write_dckpt(
    path: str | os.PathLike[str],
    src: Source,
    entries: list[Entry],
    progress: Callable[[int], None] | None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[str, ...]:
    """A one-rank dckpt save through the save's own plan, write and commit, one tensor at
    a time."""
    storage = open_storage(path, storage_options)
    if storage.read_file(MANIFEST_NAME) is not None:
        raise CheckpointExistsError(f"{storage.location} already holds a committed checkpoint")
    lazy = _LazyTensors(src, {e.key: e for e in entries if e.kind == "tensor"})
    offer = _offer(src, entries)
    results = save_alone(storage, offer, lazy, layout=FileLayout(max_files=1), progress=progress)
    return (*sorted(f.name for f in results), MANIFEST_NAME)


def _offer(src: Source, entries: list[Entry]) -> RankOffer:
    """What one rank holding ``entries`` offers the planner (values read and encoded now)."""
    tensors, values = [], []
    for e in entries:
        if e.kind == "tensor":
            box = _whole(e)
            chunks = (ChunkOffer(box),) if box.numel else ()
            assert e.dtype is not None and e.shape is not None
            tensors.append(TensorOffer(e.key, e.path, e.dtype, e.shape, False, chunks))
        else:
            data = encode_value(src.value(e.source_key), e.key)
            values.append(ValueOffer(e.key, e.path, data, value_text(data)))
    return RankOffer(0, tuple(tensors), tuple(values))


# --------------------------------------------------------------------------- convert


def infer_format(dst: str) -> str:
    if dst.endswith(".safetensors"):
        return "safetensors"
    if dst.endswith(TORCH_SUFFIXES):
        return "pt"
    return "dckpt"


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str | None = None,
    prefix: str | None = None,
    shard_size: int = 5 * 10**9,
    progress: Callable[[int], None] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ConvertReport:
    """Convert a checkpoint to another format, streaming tensor by tensor.

    Reads dckpt, torch DCP, safetensors, Hugging Face sharded and ``torch.save`` files, in
    one process; memory stays near the largest tensor (``pt`` output holds them all).

    Args:
        src: The checkpoint to read: a directory, a file, or a URL.
        dst: Where to write; only dckpt output may go to a URL.
        to: "dckpt", "safetensors", "hf" or "pt"; None: by ``dst``'s suffix, else dckpt.
        prefix: Keep only keys under this dotted prefix, stripped (``"model."``).
        shard_size: The most bytes per file of hf output (``parse_size("5GB")``).
        progress: Called with byte counts as tensors are written.
        storage_options: Options for the fsspec filesystem of a URL ``src`` or ``dst``.

    Returns:
        What was written, and what safetensors or hf output left out (non-tensor values).

    Raises:
        ArgumentError: An argument is invalid, or the format is unknown.
        CheckpointNotFoundError: Nothing complete to read at ``src``.
        CheckpointExistsError: ``dst`` already exists (or holds a committed checkpoint).
        CheckpointError: No key is under ``prefix``, or a value cannot be converted.

    Example:
        ```python
        dckpt.convert("ckpt/step-1000", "weights.safetensors", prefix="model.")
        ```
    """
    fmt, dst_text = _check_convert(src, dst, to, prefix, shard_size, storage_options)
    source = open_source(src, storage_options)
    try:
        entries = _select(source.entries(), prefix)
        skipped: tuple[str, ...] = ()
        if fmt in ("safetensors", "hf"):
            skipped = tuple(e.key for e in entries if e.kind != "tensor")
            entries = [e for e in entries if e.kind == "tensor"]
        files = _write(fmt, dst_text, source, entries, shard_size, progress, storage_options)
        return _report(source, dst_text, fmt, entries, files, skipped)
    finally:
        source.close()


def _check_convert(
    src: object,
    dst: str | os.PathLike[str],
    to: str | None,
    prefix: object,
    shard_size: object,
    storage_options: object,
) -> tuple[str, str]:
    """Check ``convert``'s arguments; the output format and ``dst`` as text."""
    check_path(src, "src")
    check_path(dst, "dst")
    check_options(storage_options)
    check_int("shard_size", shard_size, minimum=1)
    if prefix is not None and not isinstance(prefix, str):
        raise ArgumentTypeError(f"prefix must be a str or None, got {prefix!r}")
    dst_text = os.fspath(dst)
    fmt = to or infer_format(dst_text)
    if fmt not in FORMATS:
        raise ArgumentError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt, dst_text


def _report(
    source: Source,
    dst: str,
    fmt: str,
    entries: list[Entry],
    files: tuple[str, ...],
    skipped: tuple[str, ...],
) -> ConvertReport:
    tensors = [e for e in entries if e.kind == "tensor"]
    return ConvertReport(
        src=source.location,
        dst=dst,
        src_format=source.format,
        dst_format=fmt,
        tensors=len(tensors),
        values=len(entries) - len(tensors),
        nbytes=sum(e.nbytes for e in tensors),
        files=files,
        skipped=skipped,
        notes=source.notes,
    )


def _write(
    fmt: str,
    dst: str,
    source: Source,
    entries: list[Entry],
    shard_size: int,
    progress: Callable[[int], None] | None,
    storage_options: dict[str, Any] | None,
) -> tuple[str, ...]:
    """Write ``entries`` to ``dst`` in ``fmt``; the paths of the files written."""
    if fmt != "dckpt" and "://" in dst:
        raise CheckpointError(f"{fmt} output goes to a local path, not {dst}")
    if fmt in ("safetensors", "pt") and os.path.exists(dst):
        raise CheckpointExistsError(f"{dst} already exists; remove it or pick a new name")
    if fmt == "safetensors":
        write_safetensors(dst, source, entries, progress)
        return (dst,)
    if fmt == "pt":
        write_pt(dst, source, entries, progress)
        return (dst,)
    if fmt == "hf":
        names = write_hf(dst, source, entries, shard_size, progress)
    else:
        fresh = "://" not in dst and not os.path.exists(dst)
        try:
            names = write_dckpt(dst, source, entries, progress, storage_options)
        except BaseException:
            if fresh:
                _remove_empty_dirs(dst)
            raise
    return tuple(f"{dst.rstrip('/')}/{name}" for name in names)


def _remove_empty_dirs(path: str) -> None:
    """Undo the directories a failed write created, if nothing else landed in them."""
    for dirpath, _dirs, files in os.walk(path, topdown=False):
        if not files:
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
