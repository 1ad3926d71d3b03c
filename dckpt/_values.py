"""Non-tensor values as JSON, with a small tagged extension for what JSON lacks.

JSON keeps the manifest language-neutral and means loading never executes code from a
checkpoint. The tags cover Python values training state commonly holds (tuples, bytes,
non-finite floats, dicts with non-string keys). Arbitrary objects need ``allow_pickle``
on both save and load, and are then stored base64-encoded under the ``pickle`` tag.
"""

from __future__ import annotations

import base64
import math
import pickle
from typing import Any

from dckpt._errors import CorruptCheckpointError, UnsafeCheckpointError, UnsupportedStateError

TAG = "__dckpt__"

# How deeply a state (its key paths, and each value within) may nest. Walking and encoding
# recurse, a few Python frames per level, and may start deep in a caller's stack: 100 levels
# keep well inside the interpreter's default limit of 1000 frames, and real training state
# nests a handful of levels.
MAX_DEPTH = 100

JSON = Any  # a value json.dumps accepts: dict[str, JSON] | list[JSON] | str | int | float | bool | None


def encode_value(value: object, key: str, *, allow_pickle: bool = False) -> JSON:
    """Turn ``value`` into JSON data, raising a clear error naming ``key`` when it cannot."""
    try:
        return _encode(value, allow_pickle, 0, set())
    except _Unencodable as exc:
        if exc.structural:
            raise UnsupportedStateError(f"cannot store the value at key {key!r}: {exc}") from None
        raise UnsupportedStateError(
            f"cannot store the value at key {key!r}: {exc}. Store tensors, numbers, strings, "
            "bytes, None and lists/dicts of them, or pass allow_pickle=True to both save and load "
            "to pickle arbitrary objects (only for checkpoints you trust)."
        ) from None


def decode_value(data: JSON, key: str, *, allow_pickle: bool = False) -> object:
    """Inverse of :func:`encode_value`; refuses pickled values unless allowed."""
    try:
        return _decode(data, allow_pickle, key)
    except (UnsafeCheckpointError, UnsupportedStateError):
        raise
    except RecursionError:
        raise CorruptCheckpointError(
            f"the value stored at key {key!r} is nested too deeply to decode"
        ) from None
    except Exception as exc:  # malformed tagged data from a damaged manifest
        raise CorruptCheckpointError(
            f"the value stored at key {key!r} is malformed: {exc}"
        ) from None


class _Unencodable(Exception):
    def __init__(self, message: str, *, structural: bool = False) -> None:
        super().__init__(message)
        self.structural = structural  # the shape is the problem: pickling would not help


def _encode(value: object, allow_pickle: bool, depth: int, active: set[int]) -> JSON:
    if isinstance(value, (list, tuple, dict)):
        if depth >= MAX_DEPTH:
            raise _Unencodable(
                f"it nests lists, tuples or dicts more than {MAX_DEPTH} levels deep; "
                "flatten it, or store it as bytes or a string",
                structural=True,
            )
        if id(value) in active:
            raise _Unencodable(
                "it contains itself (a reference cycle); a stored value must be a tree",
                structural=True,
            )
        active.add(id(value))
        try:
            return _encode_container(value, allow_pickle, depth + 1, active)
        finally:
            active.discard(id(value))
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        # bool is handled above; int subclasses (IntEnum) lose their type, like json does.
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {TAG: "float", "repr": repr(value)}
    if isinstance(value, (bytes, bytearray)):
        return {TAG: "bytes", "b64": base64.b64encode(bytes(value)).decode("ascii")}
    return _encode_other(value, allow_pickle)


def _encode_container(
    value: list[Any] | tuple[Any, ...] | dict[Any, Any],
    allow_pickle: bool,
    depth: int,
    active: set[int],
) -> JSON:
    if isinstance(value, list):
        return [_encode(v, allow_pickle, depth, active) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return {TAG: "tuple", "items": [_encode(v, allow_pickle, depth, active) for v in value]}
    if isinstance(value, dict) and type(value) is dict:
        if all(isinstance(k, str) for k in value) and TAG not in value:
            return {k: _encode(v, allow_pickle, depth, active) for k, v in value.items()}
        return {
            TAG: "dict",
            "items": [
                [_encode(k, allow_pickle, depth, active), _encode(v, allow_pickle, depth, active)]
                for k, v in value.items()
            ],
        }
    return _encode_other(value, allow_pickle)  # tuple and dict subclasses


def _encode_other(value: object, allow_pickle: bool) -> JSON:
    dtype_name = _torch_dtype_name(value)
    if dtype_name is not None:
        return {TAG: "dtype", "name": dtype_name}
    if allow_pickle:
        try:
            blob = pickle.dumps(value, protocol=4)
        except Exception as exc:
            raise _Unencodable(f"{type(value).__name__} cannot be pickled either ({exc})") from None
        return {TAG: "pickle", "b64": base64.b64encode(blob).decode("ascii")}
    raise _Unencodable(f"{type(value).__module__}.{type(value).__qualname__} is not JSON-encodable")


def _torch_dtype_name(value: object) -> str | None:
    mod = type(value).__module__
    if mod == "torch" and type(value).__name__ == "dtype":
        return str(value).removeprefix("torch.")
    return None


def _decode(data: JSON, allow_pickle: bool, key: str) -> object:
    if isinstance(data, list):
        return [_decode(v, allow_pickle, key) for v in data]
    if not isinstance(data, dict):
        if data is None or isinstance(data, (bool, int, float, str)):
            return data
        raise ValueError(f"unexpected JSON type {type(data).__name__}")
    tag = data.get(TAG)
    if tag is None:
        return {k: _decode(v, allow_pickle, key) for k, v in data.items()}
    if tag == "float":
        r = data["repr"]
        if r not in ("nan", "inf", "-inf"):
            raise ValueError(f"bad float {r!r}")
        return float(r)
    if tag == "bytes":
        return base64.b64decode(data["b64"], validate=True)
    if tag == "tuple":
        return tuple(_decode(v, allow_pickle, key) for v in data["items"])
    if tag == "dict":
        return {
            _hashable(_decode(k, allow_pickle, key)): _decode(v, allow_pickle, key)
            for k, v in data["items"]
        }
    if tag == "dtype":
        import torch  # lazy: the manifest parser and its fuzzer run without torch

        dt = getattr(torch, str(data["name"]), None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"unknown dtype {data['name']!r}")
        return dt
    if tag == "pickle":
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"the value at key {key!r} is a pickled Python object; loading it could run "
                "code from the checkpoint. Pass allow_pickle=True only if you trust this checkpoint."
            )
        return pickle.loads(base64.b64decode(data["b64"], validate=True))
    raise ValueError(f"unknown tag {tag!r}")


def _hashable(k: object) -> object:
    if isinstance(k, list):
        return tuple(_hashable(x) for x in k)
    return k
