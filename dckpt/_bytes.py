"""Raw byte views of tensors and block checksums over them.

Tensors are written and read as their C-order bytes with no serialisation layer; these
helpers give zero-copy views for CPU tensors so that writes come straight from, and
reads land straight in, the tensor's own memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import crc32c
import numpy as np
import torch

from dckpt._errors import UnsupportedStateError


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise UnsupportedStateError(f"dtype {name!r} is not available in this torch build")
    return dt


def byte_view(t: torch.Tensor) -> np.ndarray:
    """A uint8 numpy view of a contiguous CPU tensor's memory (shared, not copied)."""
    flat = t.detach().reshape(-1)
    if flat.dtype is not torch.uint8:
        flat = flat.view(torch.uint8)
    return flat.numpy()


def host_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's C-order bytes on the host, copying only when it must."""
    if (
        t.is_cpu
        and t.dtype in NUMPY_DTYPES
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
    ):  # fast path: numpy's own view (saves microseconds per tensor at 100k tensors)
        return (t.detach() if t.requires_grad else t).numpy().reshape(-1).view(np.uint8)
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    return byte_view(t)


#: Tensors of at most this many bytes are gathered by :func:`gathered_host_bytes`.
GATHER_BYTES = 4096
_GATHER_BUDGET = 64 << 20  # bytes one call copies at most; past it, tensors are viewed


def gathered_host_bytes(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """:func:`host_bytes` of each of ``tensors``, the small ones (<= ``GATHER_BYTES``)
    copied together: one ``torch.cat`` per dtype and trailing shape (one ``torch.stack``
    for scalars), each tensor's bytes a slice of the copy, as of this call.

    At tens of thousands of small tensors (biases, norms, optimizer steps) numpy's view
    of each costs ~2 us, and a view of a GPU tensor a device sync each; one copy per
    group costs a fraction of that. The copies add at most 64 MiB.
    """
    out: list[np.ndarray | None] = [None] * len(tensors)
    groups: dict[tuple[object, ...], tuple[list[int], list[torch.Tensor], list[int]]] = {}
    budget = _GATHER_BUDGET
    for i, t in enumerate(tensors):
        n = t.nbytes
        if n > GATHER_BYTES or n > budget:
            out[i] = host_bytes(t)
            continue
        budget -= n
        # cat joins C-order bytes when the trailing dims agree (scalars are stacked)
        nd = t.dim()
        key = (t.dtype, nd if nd < 2 else t.shape[1:], None if t.is_cpu else t.device)
        group = groups.get(key)
        if group is None:
            group = groups[key] = ([], [], [])
        group[0].append(i)
        group[1].append(t)
        group[2].append(n)
    with torch.no_grad():
        for (_, trailing, _), (index, members, sizes) in groups.items():
            try:
                joined = torch.stack(members) if trailing == 0 else torch.cat(members)
            except (RuntimeError, NotImplementedError):  # a dtype an older torch cannot cat
                for i, t in zip(index, members, strict=True):
                    out[i] = host_bytes(t)
                continue
            data = byte_view(joined if joined.is_cpu else joined.cpu())
            start = 0
            for i, end in zip(index, itertools.accumulate(sizes), strict=True):
                out[i] = data[start:end]
                start = end
    return out  # type: ignore[return-value]  # every index was set


def as_memoryview(data: np.ndarray | memoryview) -> memoryview:
    """A flat byte memoryview (numpy arrays are buffers; older stubs do not say so)."""
    mv = data if isinstance(data, memoryview) else memoryview(data)  # type: ignore[arg-type]
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


# The dtypes whose tensors numpy can view as they are (no copy).
NUMPY_DTYPES = frozenset(
    {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16,
     torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128}
)  # fmt: skip


def block_crcs(data: np.ndarray | memoryview, block_bytes: int) -> tuple[int, ...]:
    """crc32c of each ``block_bytes`` block; one value for an empty buffer."""
    mv = as_memoryview(data)
    n = mv.nbytes
    if n <= block_bytes:
        return (crc32c.crc32c(mv),)
    return tuple(crc32c.crc32c(mv[i : i + block_bytes]) for i in range(0, n, block_bytes))


def frombuffer(buf: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of ``dtype``/``shape`` over a uint8 numpy buffer (no copy)."""
    t = torch.from_numpy(buf)
    if dtype is not torch.uint8:
        t = t.view(dtype)
    return t.view(shape)
