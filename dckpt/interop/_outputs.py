"""Writers of the output formats other than dckpt: single-file safetensors, Hugging Face
sharded safetensors and ``torch.save`` files, each appearing only once complete.

The safetensors writer lays out its JSON header from shapes and dtypes known up front,
then streams tensor bytes, because ``safetensors.torch.save_file`` needs every tensor in
memory at once. Only ``.pt`` output holds the whole state (``torch.save`` pickles one
object).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import struct
from collections.abc import Callable, Iterator
from typing import Any

import torch

from dckpt._bytes import as_memoryview, host_bytes
from dckpt._errors import CheckpointExistsError, UnsupportedStateError
from dckpt._format import PathPart
from dckpt.interop._sources import ST_CODE, Entry, Source, read_checked

HF_INDEX = "model.safetensors.index.json"


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
