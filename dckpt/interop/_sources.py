"""Checkpoint-like sources read one tensor at a time: dckpt, torch DCP, safetensors
(one file or a Hugging Face sharded directory) and ``torch.save`` files.

A source lists its entries (key, dtype, shape) up front and materialises each tensor only
when asked, which is what lets conversion and ``dckpt diff`` stream.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dckpt._bytes import dtype_name
from dckpt._errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsupportedStateError,
)
from dckpt._format import DTYPE_ITEMSIZE, PathPart
from dckpt._formats import DCKPT_FORMAT, detect_format, format_of
from dckpt._state import resolve
from dckpt.storage import open_storage

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# torch dtype name <-> safetensors dtype code
ST_CODE = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ", "complex64": "C64",
}  # fmt: skip
ST_DTYPE = {code: name for name, code in ST_CODE.items()}


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True, slots=True)
class Entry:
    """One key of a source, known before any tensor byte is read."""

    key: str
    path: tuple[PathPart, ...]
    kind: str  # "tensor" | "value"
    dtype: str | None = None  # torch dtype name without "torch."
    shape: tuple[int, ...] | None = None
    origin: str = ""  # the key in the source, when ``key`` had a prefix stripped

    @property
    def source_key(self) -> str:
        return self.origin or self.key

    @property
    def nbytes(self) -> int:
        if self.dtype is None or self.shape is None:
            return 0
        return math.prod(self.shape) * DTYPE_ITEMSIZE[self.dtype]


class Source:
    """Keys with metadata up front; tensors and values read one at a time."""

    format = ""
    location = ""
    notes: tuple[str, ...] = ()

    def entries(self) -> list[Entry]:
        raise NotImplementedError

    def tensor(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def value(self, key: str) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        return None


class _ReaderSource(Source):
    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.format = str(reader.format)
        self.location = str(reader.location)
        per_rank = [i.key for i in reader.infos() if i.per_rank]
        if per_rank:
            self.notes = (f"{len(per_rank)} per-rank key(s) converted from rank 0's copy",)

    def entries(self) -> list[Entry]:
        return [Entry(i.key, tuple(i.path), i.kind, i.dtype, i.shape) for i in self.reader.infos()]

    def tensor(self, key: str) -> torch.Tensor:
        return self.reader.read_tensor(key)

    def value(self, key: str) -> Any:
        return self.reader.read_value(key)


class _SafetensorsSource(Source):
    """One or more safetensors files; each tensor is read lazily from its file."""

    def __init__(self, files: Mapping[str, str], location: str, fmt: str) -> None:
        self.format = fmt
        self.location = location
        self._file_of = dict(files)  # key -> file
        self._handles: dict[str, Any] = {}

    def _open(self, name: str) -> Any:
        from safetensors import safe_open  # lazy: `import dckpt` never loads safetensors

        if name not in self._handles:
            try:
                self._handles[name] = safe_open(name, framework="pt", device="cpu")
            except FileNotFoundError:
                raise CorruptCheckpointError(f"{name} is missing") from None
            except Exception as exc:
                raise CorruptCheckpointError(
                    f"{name} is not a valid safetensors file: {exc}"
                ) from None
        return self._handles[name]

    def entries(self) -> list[Entry]:
        out = []
        for key, name in sorted(self._file_of.items()):
            sl = self._open(name).get_slice(key)
            code = sl.get_dtype()
            if code not in ST_DTYPE:
                raise UnsupportedStateError(f"{name}: key {key!r} has unsupported dtype {code}")
            out.append(Entry(key, (key,), "tensor", ST_DTYPE[code], tuple(sl.get_shape())))
        return out

    def tensor(self, key: str) -> torch.Tensor:
        return self._open(self._file_of[key]).get_tensor(key)

    def value(self, key: str) -> Any:
        raise CheckpointError(f"{self.location} holds tensors only, not {key!r}")

    def close(self) -> None:
        self._handles.clear()


def _safetensors_file(path: str) -> _SafetensorsSource:
    from safetensors import safe_open  # lazy: `import dckpt` never loads safetensors

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except Exception as exc:
        raise CorruptCheckpointError(f"{path} is not a valid safetensors file: {exc}") from None
    return _SafetensorsSource(dict.fromkeys(keys, path), path, "safetensors")


def _hf_dir(path: str, index: str) -> _SafetensorsSource:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = {
            str(k): os.path.join(path, os.path.basename(str(v))) for k, v in weight_map.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{index} is not a valid safetensors index: {exc}") from None
    return _SafetensorsSource(files, path, "hf")


class _TorchSource(Source):
    """A ``torch.save`` file, memory-mapped so tensors are paged in as they are read."""

    format = "pt"

    def __init__(self, path: str) -> None:
        self.location = path
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no file at {path}") from None
        except Exception as exc:
            raise CorruptCheckpointError(
                f"{path} could not be loaded with torch.load(weights_only=True): {exc}"
            ) from None
        if not isinstance(obj, Mapping):
            raise UnsupportedStateError(f"{path} holds a {type(obj).__name__}, not a state dict")
        resolved = resolve(obj)
        self._tensors = {t.key: t for t in resolved.tensors}
        self._values = {v.key: v for v in resolved.values}

    def entries(self) -> list[Entry]:
        out = [
            Entry(k, t.path, "tensor", dtype_name(t.tensor.dtype), tuple(t.tensor.shape))
            for k, t in self._tensors.items()
        ]
        out += [Entry(k, v.path, "value") for k, v in self._values.items()]
        return sorted(out, key=lambda e: e.key)

    def tensor(self, key: str) -> torch.Tensor:
        return self._tensors[key].tensor

    def value(self, key: str) -> Any:
        return self._values[key].value

    def close(self) -> None:
        self._tensors.clear()
        self._values.clear()


def open_source(path: Any, storage_options: dict[str, Any] | None = None) -> Source:
    """Open any supported checkpoint for streaming reads, by what is at ``path``."""
    text = os.fspath(path)
    if not isinstance(text, str):
        raise CheckpointError(f"a path must be text, got {path!r}")
    if "://" in text:
        storage = open_storage(text, storage_options)
        return _ReaderSource(format_of(storage).open(storage))
    if os.path.isdir(text):
        storage = open_storage(text, storage_options)
        fmt = detect_format(storage)
        if fmt is None:  # no registered checkpoint format: perhaps Hugging Face weights
            indexes = sorted(n for n in os.listdir(text) if n.endswith(".safetensors.index.json"))
            if indexes:
                return _hf_dir(text, os.path.join(text, indexes[0]))
            single = os.path.join(text, "model.safetensors")
            if os.path.isfile(single):
                return _safetensors_file(single)
        return _ReaderSource((fmt or DCKPT_FORMAT).open(storage))
    if not os.path.exists(text):
        raise CheckpointNotFoundError(f"nothing at {text}")
    if text.endswith(".safetensors"):
        return _safetensors_file(text)
    if text.endswith(TORCH_SUFFIXES):
        return _TorchSource(text)
    raise CheckpointError(
        f"{text}: not a checkpoint directory, .safetensors or torch.save file "
        f"({', '.join(TORCH_SUFFIXES)})"
    )


def read_checked(src: Source, e: Entry) -> torch.Tensor:
    """Read ``e`` and make sure it is what the source's metadata promised."""
    t = src.tensor(e.source_key).detach()
    if dtype_name(t.dtype) != e.dtype or tuple(t.shape) != e.shape:
        raise CorruptCheckpointError(
            f"{src.location}: key {e.key!r} read as {dtype_name(t.dtype)}{list(t.shape)}, "
            f"its metadata says {e.dtype}{list(e.shape or ())}"
        )
    return t
