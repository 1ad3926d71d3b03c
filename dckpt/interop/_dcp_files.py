"""Reading the data files of a torch DCP checkpoint without trusting its metadata.

Every size in ``.metadata`` is a claim. :class:`DcpFiles` checks each claim against the
files on storage before a byte is read or a tensor allocated: an item must lie within its
file, a chunk's archive must be big enough for the chunk's elements, and a tensor read
whole must be no bigger than the files holding it. Each item is a complete ``torch.save``
archive, decoded with ``torch.load(weights_only=True)`` unless the caller opted in to
pickle.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from typing import Any

import torch

from dckpt._bytes import dtype_name
from dckpt._errors import CorruptCheckpointError, UnsafeCheckpointError
from dckpt.interop._dcp_meta import DcpChunk, DcpItem, DcpTensor
from dckpt.storage._base import Storage

_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"


class DcpFiles:
    """Checks claims against the data files before anything is read or allocated: each file
    present, each item within its file, each tensor no bigger than the bytes holding it."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._sizes: dict[str, int] = {}

    def size(self, file: str) -> int:
        size = self._sizes.get(file)
        if size is None:
            got = self.storage.size(file)
            if got is None:
                raise CorruptCheckpointError(
                    f"data file {self.storage.location}/{file} is missing; "
                    "the checkpoint is damaged"
                )
            size = self._sizes[file] = got
        return size

    def require(self, item: DcpItem) -> None:
        size = self.size(item.file)
        if item.offset + item.length > size:
            raise CorruptCheckpointError(
                f"data file {self.storage.location}/{item.file} has {size} bytes but the "
                f"metadata places an item at byte {item.offset} of length {item.length}; "
                "it was truncated"
            )

    def require_chunk(self, tensor: DcpTensor, chunk: DcpChunk) -> None:
        """The chunk's archive lies within its file and can hold the chunk's elements (DCP
        saves each chunk as an uncompressed ``torch.save`` of exactly those elements)."""
        self.require(chunk.item)
        need = chunk.box.numel * tensor.dtype.itemsize
        if chunk.item.length < need:
            raise CorruptCheckpointError(
                f"key {tensor.key!r}: chunk {chunk.box} of {dtype_name(tensor.dtype)} needs "
                f"{need} bytes, but the metadata gives it {chunk.item.length} bytes of "
                f"{self.storage.location}/{chunk.item.file}; the DCP metadata is damaged"
            )

    def require_tensor(self, tensor: DcpTensor) -> None:
        """Before allocating ``tensor`` whole: every chunk checked, and its claimed size no
        more than its data files hold, so a metadata claim cannot reach the allocator."""
        for chunk in tensor.chunks:
            self.require_chunk(tensor, chunk)
        files = sorted({c.item.file for c in tensor.chunks})
        held = sum(self.size(f) for f in files)
        if tensor.nbytes > held:
            raise CorruptCheckpointError(
                f"key {tensor.key!r} claims {dtype_name(tensor.dtype)}{list(tensor.shape)} "
                f"({tensor.nbytes} bytes), but its data files in {self.storage.location} "
                f"({', '.join(files) or 'none'}) hold {held} bytes in all; the DCP "
                "metadata is damaged"
            )

    def read(self, item: DcpItem) -> bytes:
        self.require(item)
        buf = bytearray(item.length)
        self.storage.read_into(item.file, item.offset, memoryview(buf))
        return bytes(buf)


def _check_archive(data: bytes, what: str) -> None:
    """torch's zip reader ignores the CRC-32 each archive member carries; DCP has no other."""
    try:
        bad = zipfile.ZipFile(io.BytesIO(data)).testzip()
    except Exception as exc:
        raise CorruptCheckpointError(
            f"{what} is not a torch.save archive ({type(exc).__name__}: {exc})"
        ) from None
    if bad is not None:
        raise CorruptCheckpointError(f"{what} fails the CRC check of its member {bad!r}")


def decode(data: bytes, what: str, *, allow_pickle: bool = False) -> Any:
    """One ``torch.save`` archive, via ``weights_only`` unless the caller opted in to pickle."""
    _check_archive(data, what)
    for weights_only in (True, False):
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)
        except pickle.UnpicklingError as exc:
            if not weights_only or _WEIGHTS_ONLY_REFUSAL not in str(exc):
                raise CorruptCheckpointError(f"{what} cannot be unpickled: {exc}") from None
            if not allow_pickle:
                raise UnsafeCheckpointError(
                    f"{what} holds objects that torch.load(weights_only=True) refuses; it needs "
                    "an unsafe unpickle, which could run code from the checkpoint, and dckpt "
                    "refuses that. Pass allow_pickle=True only if you trust this checkpoint."
                ) from None
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise CorruptCheckpointError(
                f"{what} is not a readable torch.save archive ({type(exc).__name__}: {first})"
            ) from None
    raise AssertionError("unreachable")


def decode_tensor(data: bytes, what: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Any:
    """A chunk as a CPU tensor, checked against the metadata's dtype and shape."""
    try:
        obj = decode(data, what)
    except UnsafeCheckpointError:
        raise UnsafeCheckpointError(
            f"{what} holds objects that torch.load(weights_only=True) refuses; a tensor chunk "
            "never needs them, so dckpt refuses to unpickle it"
        ) from None
    if type(obj) is not torch.Tensor:
        raise CorruptCheckpointError(f"{what} holds a {type(obj).__name__}, not a tensor")
    if obj.dtype != dtype or tuple(obj.shape) != shape:
        raise CorruptCheckpointError(
            f"{what} holds {dtype_name(obj.dtype)}{list(obj.shape)}, the metadata promises "
            f"{dtype_name(dtype)}{list(shape)}"
        )
    return obj
