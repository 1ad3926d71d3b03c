"""Torch DCP's ``.metadata``, parsed without trusting it.

``.metadata`` is a pickle; plain ``pickle.load`` would run whatever the file asks. The
unpickler here can build only inert stand-ins for the handful of classes DCP metadata is
made of (it never constructs torch's own classes, so no ``__init__``/``__setstate__`` of
theirs runs), and the result is converted into small frozen dataclasses of our own.
"""

from __future__ import annotations

import io
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dckpt._errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from dckpt._format import PathPart, check_file_name
from dckpt._reshard import Box
from dckpt.storage import Storage

DCP_METADATA = ".metadata"
RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")

# -- the data model, detached from torch's classes -----------------------------------------


@dataclass(frozen=True, slots=True)
class DcpItem:
    """Where one ``torch.save`` archive lives: a byte range of one data file."""

    file: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class DcpChunk:
    box: Box
    item: DcpItem


@dataclass(frozen=True, slots=True)
class DcpTensor:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[DcpChunk, ...]

    @property
    def nbytes(self) -> int:
        return Box((0,) * len(self.shape), self.shape).numel * self.dtype.itemsize


@dataclass(frozen=True)
class DcpMetadata:
    """What ``.metadata`` says, validated; ``paths`` is DCP's flatten mapping when recorded."""

    tensors: dict[str, DcpTensor]
    values: dict[str, DcpItem]
    paths: dict[str, tuple[PathPart, ...]]
    version: str | None = None

    def keys(self) -> list[str]:
        return sorted([*self.tensors, *self.values])

    def path(self, key: str) -> tuple[PathPart, ...]:
        return self.paths.get(key) or (key,)


# -- safe metadata --------------------------------------------------------------------------
#
# The unpickler never builds torch's classes: every DCP metadata class resolves to an inert
# stand-in that only records what the pickle sets, and _convert reads those records. So no
# constructor or __setstate__ from torch runs, and since every stand-in defines __setstate__,
# a pickle cannot reach setattr on a class object to alter it for later loads.


class _Inert:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args  # REDUCE-style construction, e.g. an enum member by value
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slot state)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state  # TensorProperties pickles a tuple: (dtype, layout, ...)


class _Layout(_Inert):
    """Stands in for ``torch.serialization._get_layout``: a lookup, never a call into torch."""

    def __new__(cls, name: object) -> Any:
        for v in vars(torch).values():
            if isinstance(v, torch.layout) and str(v) == name:
                return v
        raise CorruptCheckpointError(f"unknown tensor layout {name!r} in DCP metadata")


class _PathText(_Inert):
    """StorageMeta.checkpoint_id may be a pathlib path; it becomes inert text."""

    def __new__(cls, *parts: object) -> Any:
        return "/".join(p for p in parts if isinstance(p, str))


_METADATA_CLASSES = [
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "TensorProperties",
    "_MEM_FORMAT_ENCODING",
    "_StorageInfo",
]
_STAND_INS: dict[str, type[_Inert]] = {n: type(n, (_Inert,), {}) for n in _METADATA_CLASSES}
_MODULES = {
    "torch.distributed.checkpoint.metadata": set(_METADATA_CLASSES) - {"_StorageInfo"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    # torch < 2.2 pickled TensorProperties from its sharded-tensor home.
    "torch.distributed._shard.sharded_tensor.metadata": {"TensorProperties"},
}
_OTHERS: dict[tuple[str, str], Any] = {
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): _Layout,
    ("collections", "OrderedDict"): OrderedDict,
    **{("pathlib", n): _PathText for n in ("PosixPath", "WindowsPath", "PurePosixPath", "Path")},
    ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"): _STAND_INS[
        "_MEM_FORMAT_ENCODING"
    ],
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _MODULES.get(module, ()):
            return _STAND_INS[name]
        if module == "torch":
            # vars(), not getattr: torch's module __getattr__ imports submodules by name.
            dtype = vars(torch).get(name)
            if isinstance(dtype, torch.dtype):
                return dtype
        found = _OTHERS.get((module, name))
        if found is None:
            raise UnsafeCheckpointError(
                f"the DCP metadata asks for {module}.{name}, which DCP metadata never needs; "
                "refusing to unpickle it (nothing from the file was run)"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("the DCP metadata uses pickle persistent ids; refusing it")


def parse_metadata(data: bytes, *, source: str) -> DcpMetadata:
    """Unpickle ``.metadata`` into inert records, then check every field."""
    try:
        md = _MetadataUnpickler(io.BytesIO(data)).load()
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or garbled pickle; nothing but the stand-ins ran
        raise CorruptCheckpointError(
            f"{source} is not a readable DCP metadata pickle ({type(exc).__name__}: {exc})"
        ) from None
    try:
        return _convert(md, source)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CorruptCheckpointError(f"{source} holds malformed DCP metadata: {exc}") from None


def _bad(source: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{source}: {what}; the DCP metadata is damaged")


def _is(obj: object, name: str) -> bool:
    return type(obj) is _STAND_INS[name]


def _ints(x: object, what: str, source: str) -> tuple[int, ...]:
    if type(x) is torch.Size:  # the common case, and its items are ints already
        t = tuple(x)
        if not t or min(t) >= 0:
            return t
    elif isinstance(x, (tuple, list)) and all(
        type(i) is int and i >= 0  # bool is not a size
        for i in x
    ):
        return tuple(x)
    raise _bad(source, f"{what} is {x!r}, not a tuple of non-negative integers")


def _dtype_of(props: object) -> object:
    state = getattr(props, "state", None)
    if isinstance(state, tuple) and state:
        return state[0]
    return getattr(props, "dtype", None)


def _convert(md: object, source: str) -> DcpMetadata:
    if not _is(md, "Metadata"):
        raise _bad(source, f"it holds a {type(md).__name__}, not DCP Metadata")
    sdm, storage = getattr(md, "state_dict_metadata", None), getattr(md, "storage_data", None)
    if not isinstance(sdm, dict) or not isinstance(storage, dict):
        raise _bad(source, "state_dict_metadata or storage_data is not a dict")
    items = _storage_items(storage, source)
    tensors: dict[str, DcpTensor] = {}
    values: dict[str, DcpItem] = {}
    for key, entry in sdm.items():
        if not isinstance(key, str):
            raise _bad(source, f"key {key!r} is not a string")
        if _is(entry, "BytesStorageMetadata"):
            if (key, None) not in items:
                raise _bad(source, f"value {key!r} has no storage entry")
            values[key] = items[(key, None)]
            continue
        if not _is(entry, "TensorStorageMetadata"):
            raise _bad(source, f"key {key!r} has entry type {type(entry).__name__}")
        tensors[key] = _tensor(key, entry, items, source)
    version = getattr(md, "version", None)
    paths = _flatten_paths(getattr(md, "planner_data", None), sdm)
    return DcpMetadata(tensors, values, paths, version if isinstance(version, str) else None)


_Items = dict[tuple[str, tuple[int, ...] | None], DcpItem]  # (key, chunk offsets) -> archive


def _storage_items(storage: dict[Any, Any], source: str) -> _Items:
    items: _Items = {}
    names: dict[object, str] = {}  # few distinct files: check each name once
    for index, info in storage.items():
        fqn, offset = getattr(index, "fqn", None), getattr(index, "offset", None)
        if not _is(index, "MetadataIndex") or not _is(info, "_StorageInfo") or type(fqn) is not str:
            raise _bad(source, f"storage entry {index!r} -> {info!r} has unexpected types")
        offsets = None if offset is None else _ints(offset, f"{fqn!r} offset", source)
        transforms = getattr(info, "transform_descriptors", None)
        if transforms:
            raise CheckpointError(
                f"{source}: {fqn!r} was written through DCP stream transforms {transforms!r} "
                "(e.g. compression), which dckpt does not support; load this checkpoint with "
                "torch.distributed.checkpoint"
            )
        name = getattr(info, "relative_path", None)
        file = names.get(name) or names.setdefault(name, check_file_name(name))
        where = (getattr(info, "offset", None), getattr(info, "length", None))
        start, length = _ints(where, f"{fqn!r} byte range", source)
        items[(fqn, offsets)] = DcpItem(file, start, length)
    return items


def _tensor(key: str, entry: object, items: _Items, source: str) -> DcpTensor:
    props = getattr(entry, "properties", None)
    dtype = _dtype_of(props) if _is(props, "TensorProperties") else None
    if not isinstance(dtype, torch.dtype):
        raise _bad(source, f"tensor {key!r} has dtype {dtype!r}")
    shape = _ints(getattr(entry, "size", None), f"{key!r} size", source)
    chunks: list[DcpChunk] = []
    for c in getattr(entry, "chunks", None) or ():
        if not _is(c, "ChunkStorageMetadata"):
            raise _bad(source, f"tensor {key!r} has a chunk of type {type(c).__name__}")
        offs = _ints(getattr(c, "offsets", None), f"{key!r} chunk offsets", source)
        box = Box(offs, _ints(getattr(c, "sizes", None), f"{key!r} chunk sizes", source))
        if len(offs) != len(shape) or any(map(int.__gt__, box.stops, shape)):
            raise _bad(source, f"tensor {key!r} of shape {list(shape)} has chunk {box}")
        if (key, offs) not in items:
            raise _bad(source, f"chunk {box} of tensor {key!r} has no storage entry")
        chunks.append(DcpChunk(box, items[(key, offs)]))
    return DcpTensor(key, dtype, shape, tuple(chunks))


def _flatten_paths(
    planner_data: object, keys: Mapping[str, Any]
) -> dict[str, tuple[PathPart, ...]]:
    """DCP's default planner records each flat key's path; keep the entries that check out."""
    out: dict[str, tuple[PathPart, ...]] = {}
    if not isinstance(planner_data, dict):
        return out
    for key, path in planner_data.items():
        if (
            key in keys
            and isinstance(path, tuple)
            and path
            and all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path)
            and ".".join(map(str, path)) == key
        ):
            out[key] = path
    return out


def read_metadata(storage: Storage) -> tuple[DcpMetadata, bytes]:
    """The checkpoint's ``.metadata``, parsed and validated, and its raw bytes."""
    raw = storage.read_file(DCP_METADATA)
    if raw is None:
        raise CorruptCheckpointError(f"{storage.location} has no DCP {DCP_METADATA} file")
    return parse_metadata(raw, source=f"{storage.location}/{DCP_METADATA}"), raw
