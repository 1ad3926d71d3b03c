"""Streaming conversion between dckpt, torch DCP, safetensors, HF sharded and ``torch.save``.

Tensors travel one at a time: a source yields each tensor when asked, a destination writes
it and drops it, so memory stays near the largest tensor (plus the dckpt writer's 8 MB
batch). The single-file safetensors writer lays out its JSON header from shapes and dtypes
known up front, then streams tensor bytes, because ``safetensors.torch.save_file`` needs
every tensor in memory at once. Only ``.pt`` output holds the whole state (``torch.save``
pickles one object).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from dckpt._args import check_int, check_options, check_path
from dckpt._bytes import as_memoryview, host_bytes
from dckpt._errors import (
    ArgumentError,
    ArgumentTypeError,
    CheckpointError,
    CheckpointExistsError,
    UnsupportedStateError,
)
from dckpt._format import (
    DEFAULT_BLOCK_BYTES,
    MANIFEST_NAME,
    PathPart,
    data_dir,
    manifest_to_bytes,
)
from dckpt._reshard import Box
from dckpt._version import __version__
from dckpt.interop._sources import ST_CODE, TORCH_SUFFIXES, Entry, Source, open_source, read_checked
from dckpt.storage._base import FileLayout, open_storage

FORMATS = ("dckpt", "safetensors", "hf", "pt")
HF_INDEX = "model.safetensors.index.json"
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
    """What a conversion wrote, and what it left out (``skipped``) and why (``notes``)."""

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


def nest(items: list[tuple[tuple[PathPart, ...], Any]]) -> dict[str, Any]:
    """Rebuild the nested state from key paths (integer parts index lists)."""
    root: dict[PathPart, Any] = {}
    for path, value in items:
        node = root
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UnsupportedStateError(f"key path {list(path)} passes through a leaf")
            node = child
        node[path[-1]] = value
    return _listify(root)


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    out = {k: _listify(v) for k, v in node.items()}
    ints = all(isinstance(k, int) and not isinstance(k, bool) for k in out)
    if out and ints and sorted(out) == list(range(len(out))):
        return [out[i] for i in range(len(out))]
    return {str(k): v for k, v in out.items()}


# --------------------------------------------------------------------------- writers


def _tmp(path: str) -> str:
    return f"{path}.tmp-{secrets.token_hex(4)}"


@contextlib.contextmanager
def _atomic_file(path: str) -> Iterator[Any]:
    """A file that appears under ``path`` only once fully written and flushed."""
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _st_header(entries: list[Entry]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for e in entries:
        if e.dtype not in ST_CODE:
            raise UnsupportedStateError(f"key {e.key!r}: safetensors cannot store {e.dtype}")
        header[e.key] = {
            "dtype": ST_CODE[e.dtype],
            "shape": list(e.shape or ()),
            "data_offsets": [pos, pos + e.nbytes],
        }
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    path: str, src: Source, entries: list[Entry], progress: Callable[[int], None] | None
) -> None:
    """One safetensors file, header first, then each tensor's bytes in header order."""
    with _atomic_file(path) as f:
        f.write(_st_header(entries))
        for e in entries:
            data = host_bytes(read_checked(src, e))
            f.write(as_memoryview(data))
            del data
            if progress is not None:
                progress(e.nbytes)


def shard(entries: list[Entry], shard_size: int) -> list[list[Entry]]:
    """Greedy in key order; a tensor larger than ``shard_size`` gets a shard of its own."""
    shards: list[list[Entry]] = [[]]
    used = 0
    for e in entries:
        if shards[-1] and used + e.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(e)
        used += e.nbytes
    return shards


def write_hf(
    path: str,
    src: Source,
    entries: list[Entry],
    shard_size: int,
    progress: Callable[[int], None] | None,
) -> tuple[str, ...]:
    """Sharded safetensors plus ``model.safetensors.index.json`` (written last)."""
    shards = shard(entries, shard_size)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    created = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    clash = [n for n in [HF_INDEX, *names] if os.path.exists(os.path.join(path, n))]
    if clash:
        raise CheckpointExistsError(f"{os.path.join(path, clash[0])} already exists")
    try:
        for name, group in zip(names, shards, strict=True):
            write_safetensors(os.path.join(path, name), src, group, progress)
    except BaseException:  # leave no shards without an index behind
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(path, name))
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise
    index = {
        "metadata": {"total_size": sum(e.nbytes for e in entries)},
        "weight_map": {e.key: n for n, g in zip(names, shards, strict=True) for e in g},
    }
    with _atomic_file(os.path.join(path, HF_INDEX)) as f:
        f.write(json.dumps(index, indent=2, sort_keys=True).encode("utf-8") + b"\n")
    return (*names, HF_INDEX)


def write_pt(
    path: str, src: Source, entries: list[Entry], progress: Callable[[int], None] | None
) -> None:
    """``torch.save`` of the nested state: memory holds the whole state here."""
    items: list[tuple[tuple[PathPart, ...], Any]] = []
    for e in entries:
        if e.kind == "tensor":
            items.append((e.path, read_checked(src, e)))
            if progress is not None:
                progress(e.nbytes)
        else:
            items.append((e.path, src.value(e.source_key)))
    with _atomic_file(path) as f:
        torch.save(nest(items), f)


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
    path: Any,
    src: Source,
    entries: list[Entry],
    progress: Callable[[int], None] | None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[str, ...]:
    """A one-rank dckpt save through the planning/writing layers, one tensor at a time."""
    from dckpt._commit import commit
    from dckpt._plan import (
        ChunkOffer,
        RankOffer,
        TensorOffer,
        ValueOffer,
        build_manifest,
        plan_save,
    )
    from dckpt._save import new_save_id
    from dckpt._values import encode_value
    from dckpt._write import write_rank

    storage = open_storage(path, storage_options)
    if storage.read_file(MANIFEST_NAME) is not None:
        raise CheckpointExistsError(f"{storage.location} already holds a committed checkpoint")
    tensors, values = [], []
    for e in entries:
        if e.kind == "tensor":
            box = _whole(e)
            chunks = (ChunkOffer(box),) if box.numel else ()
            assert e.dtype is not None and e.shape is not None
            tensors.append(TensorOffer(e.key, e.path, e.dtype, e.shape, False, chunks))
        else:
            data = encode_value(src.value(e.source_key), e.key)
            text = json.dumps(data, sort_keys=True, separators=(",", ":"))
            values.append(ValueOffer(e.key, e.path, data, text))
    plan = plan_save(
        [RankOffer(0, tuple(tensors), tuple(values))],
        new_save_id(),
        layout=FileLayout(max_files=1),
    )
    lazy = _LazyTensors(src, {e.key: e for e in entries if e.kind == "tensor"})
    try:
        results = write_rank(
            storage, plan.ranks[0], lazy, durable=True, block_bytes=DEFAULT_BLOCK_BYTES,
            progress=progress,
        )  # fmt: skip
        manifest = build_manifest(
            plan, [results], created=time.time(), block_bytes=DEFAULT_BLOCK_BYTES,
            library=f"dckpt {__version__}",
        )  # fmt: skip
        commit(
            storage,
            manifest_to_bytes(manifest),
            None,
            durable=True,
            save_id=plan.save_id,
            files=[f.name for f in results],
        )
    except BaseException:
        with contextlib.suppress(Exception):
            storage.delete_prefix(data_dir(plan.save_id))
        raise
    return (*(f.name for f in manifest.files), MANIFEST_NAME)


# --------------------------------------------------------------------------- convert


def infer_format(dst: str) -> str:
    if dst.endswith(".safetensors"):
        return "safetensors"
    if dst.endswith(TORCH_SUFFIXES):
        return "pt"
    return "dckpt"


def convert(
    src: Any,
    dst: Any,
    *,
    to: str | None = None,
    prefix: str | None = None,
    shard_size: int = 5 * 10**9,
    progress: Callable[[int], None] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ConvertReport:
    """Convert ``src`` into ``dst`` (``to``: dckpt, safetensors, hf or pt; inferred from
    ``dst``'s suffix otherwise, dckpt for a directory), streaming tensor by tensor.

    ``prefix`` keeps only keys under it and strips it, e.g. ``"model."`` turns a training
    checkpoint into loadable weights. safetensors and hf hold tensors only: other values
    are skipped and listed in the report. ``progress`` receives byte counts as tensors
    are written.
    """
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
    source = open_source(src, storage_options)
    try:
        entries = _select(source.entries(), prefix)
        skipped: tuple[str, ...] = ()
        if fmt in ("safetensors", "hf"):
            skipped = tuple(e.key for e in entries if e.kind != "tensor")
            entries = [e for e in entries if e.kind == "tensor"]
        if fmt != "dckpt" and "://" in dst_text:
            raise CheckpointError(f"{fmt} output goes to a local path, not {dst_text}")
        if fmt in ("safetensors", "pt") and os.path.exists(dst_text):
            raise CheckpointExistsError(f"{dst_text} already exists; remove it or pick a new name")
        files: tuple[str, ...] = (dst_text,)
        if fmt == "safetensors":
            write_safetensors(dst_text, source, entries, progress)
        elif fmt == "hf":
            files = write_hf(dst_text, source, entries, shard_size, progress)
        elif fmt == "pt":
            write_pt(dst_text, source, entries, progress)
        else:
            fresh = "://" not in dst_text and not os.path.exists(dst_text)
            try:
                files = write_dckpt(dst_text, source, entries, progress, storage_options)
            except BaseException:
                if fresh:
                    _remove_empty_dirs(dst_text)
                raise
        if fmt in ("hf", "dckpt"):
            files = tuple(f"{dst_text.rstrip('/')}/{name}" for name in files)
        tensors = [e for e in entries if e.kind == "tensor"]
        return ConvertReport(
            src=source.location,
            dst=dst_text,
            src_format=source.format,
            dst_format=fmt,
            tensors=len(tensors),
            values=len(entries) - len(tensors),
            nbytes=sum(e.nbytes for e in tensors),
            files=files,
            skipped=skipped,
            notes=source.notes,
        )
    finally:
        source.close()


def _remove_empty_dirs(path: str) -> None:
    """Undo the directories a failed write created, if nothing else landed in them."""
    for dirpath, _dirs, files in os.walk(path, topdown=False):
        if not files:
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
