"""Validation of the arguments of public calls: one place, one error class per kind.

A bad argument raises :class:`ArgumentTypeError` (a ``TypeError``) or
:class:`ArgumentError` (a ``ValueError``), both ``CheckpointError``s, naming the argument
and what it accepts, before anything is read, written or coordinated. Checks are cheap:
they run on every call.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

from dckpt._errors import ArgumentError, ArgumentTypeError
from dckpt.storage import Storage


def _typename(value: object) -> str:
    return type(value).__name__


def check_bool(name: str, value: object) -> bool:
    """A real ``bool``: ``overwrite="no"`` is a mistake, not a truthy string."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {_typename(value)} {value!r}")
    return value


def check_timeout(value: object, name: str = "timeout") -> float:
    """A finite number of seconds > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            f"{name} must be a number of seconds, got {_typename(value)} {value!r}"
        )
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ArgumentError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return seconds


def check_int(name: str, value: object, *, minimum: int, optional: bool = False) -> int | None:
    """An ``int`` (not a bool) >= ``minimum``; None too when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        what = "an int or None" if optional else "an int"
        raise ArgumentTypeError(f"{name} must be {what}, got {_typename(value)} {value!r}")
    number = int(value)
    if number < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {number}")
    return number


def check_path(value: object, name: str = "path") -> str | os.PathLike[str]:
    """A non-empty str or PathLike (or a Storage object) without NUL characters."""
    if isinstance(value, Storage):
        return value  # type: ignore[return-value]
    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"{name} must be a str or os.PathLike, got {_typename(value)} {value!r}"
        )
    text = os.fspath(value)
    if not isinstance(text, str):
        raise ArgumentTypeError(f"{name} must name a path as str, got {text!r}")
    if not text:
        raise ArgumentError(f"{name} must not be empty")
    if "\x00" in text:
        raise ArgumentError(f"{name} contains a NUL character: {text!r}")
    return value


def check_options(value: object, name: str = "storage_options") -> dict[str, Any] | None:
    """None or a mapping with string keys."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ArgumentTypeError(
            f"{name} must be None or a dict with str keys, got {_typename(value)} {value!r}"
        )
    return dict(value)


def check_process_group(value: object) -> None:
    """None or a ``torch.distributed.ProcessGroup``."""
    if value is None:
        return
    if not isinstance(value, dist.ProcessGroup):
        raise ArgumentTypeError(
            "process_group must be None (the default group, or one plain process) or a "
            f"torch.distributed.ProcessGroup, got {_typename(value)} {value!r}"
        )


def check_state(value: object, name: str = "state") -> None:
    """A mapping (a dict of the things to save or load into)."""
    if not isinstance(value, Mapping):
        raise ArgumentTypeError(
            f"{name} must be a dict of tensors, modules, optimizers, Stateful objects and "
            f"values, got {_typename(value)}"
        )


def check_collective(
    *,
    state: object,
    path: object,
    process_group: object,
    timeout: object,
    storage_options: object,
    allow_pickle: object,
) -> None:
    """The arguments every collective save and load shares."""
    check_state(state)
    check_path(path)
    check_process_group(process_group)
    check_timeout(timeout)
    check_options(storage_options)
    check_bool("allow_pickle", allow_pickle)


def check_save(
    *,
    state: object,
    path: object,
    process_group: object,
    timeout: object,
    storage_options: object,
    allow_pickle: object,
    overwrite: object,
    durable: object,
) -> None:
    """The arguments ``save`` and ``async_save`` share."""
    check_collective(
        state=state,
        path=path,
        process_group=process_group,
        timeout=timeout,
        storage_options=storage_options,
        allow_pickle=allow_pickle,
    )
    check_bool("overwrite", overwrite)
    check_bool("durable", durable)


def check_choice(name: str, value: object, choices: tuple[str, ...], *, optional: bool) -> None:
    """One of ``choices`` (strings); None too when ``optional``."""
    if value is None and optional:
        return
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices) + (" or None" if optional else "")
        raise ArgumentError(f"{name} must be {allowed}, got {_typename(value)} {value!r}")


def check_tiers(
    local_dir: object, replicas: object, persist_every: object, keep_local: object, node_of: object
) -> None:
    """The tiered manager's arguments (``local_dir`` None: the others are still checked)."""
    if local_dir is not None:
        if isinstance(local_dir, Storage):
            raise ArgumentTypeError("local_dir must be a str or os.PathLike, got a Storage")
        path = check_path(local_dir, "local_dir")
        if "://" in os.fspath(path):
            raise ArgumentError(
                f"local_dir must be a local directory (a RAM disk or a local drive), got the "
                f"URL {os.fspath(path)!r}; URLs go in the root (the durable tier)"
            )
    check_int("replicas", replicas, minimum=0)
    check_int("persist_every", persist_every, minimum=1)
    check_int("keep_local", keep_local, minimum=1)
    if node_of is not None and not callable(node_of):
        raise ArgumentTypeError(
            f"node_of must be None or a function of the rank returning its node's label, "
            f"got {_typename(node_of)} {node_of!r}"
        )
