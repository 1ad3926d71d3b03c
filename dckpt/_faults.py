"""Named fault points in the save, load and manager protocols (no-ops in production).

The engine calls :func:`fault_point` at each step an adversary could pick to die at:
every coordination exchange, every file create / write / fsync / rename / delete, and
just before and after a commit. Nothing happens unless a test has armed a hook with
:func:`arm` (or through ``DCKPT_FAULT`` in a child process); the hook may then kill the
process, exit it, stall it or raise, so the fault-point matrix can enumerate every step
x every fault without guessing at timings.

``DCKPT_FAULT`` has the form ``<point>[#<nth>]:<kind>[@<rank>]``, where ``kind`` is one of
``sigkill``, ``exit``, ``stall`` or ``raise``; ``nth`` (default 1) counts occurrences of
the point in this process and ``rank`` (default: any) compares with ``RANK``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

Hook = Callable[[str], None]

_hook: Hook | None = None
_seen: list[str] = []
_record = False
_lock = threading.Lock()

#: The kinds of fault a hook built by :func:`injector` can inject.
KINDS = ("sigkill", "exit", "stall", "raise")


class InjectedFault(Exception):
    """Raised by a ``raise`` fault; a plain Exception, as an unexpected bug would be."""


def fault_point(name: str) -> None:
    """Mark one protocol step; calls the armed hook, if any, with the step's name."""
    if _record:
        with _lock:
            _seen.append(name)
    hook = _hook
    if hook is not None:
        hook(name)


def arm(hook: Hook | None) -> None:
    """Install ``hook`` (None disarms). Test-only."""
    global _hook
    _hook = hook


def record(on: bool = True) -> list[str]:
    """Start (or stop) recording the points passed in this process; returns the list."""
    global _record
    with _lock:
        _record = on
        if on:
            _seen.clear()
        return list(_seen)


def seen() -> list[str]:
    with _lock:
        return list(_seen)


def injector(
    point: str,
    kind: str,
    *,
    nth: int = 1,
    stall_s: float = 3600.0,
    until: Callable[[], bool] | None = None,
) -> Hook:
    """A hook that injects ``kind`` at the ``nth`` time ``point`` is passed.

    A ``stall`` sleeps ``stall_s`` seconds, or, given ``until``, until it returns True
    (polled every 0.1 s; at most ``stall_s``): a test can keep the victim frozen exactly
    until every other rank has given up on it, instead of a fixed, longer sleep."""
    if kind not in KINDS:
        raise ValueError(f"fault kind must be one of {KINDS}, got {kind!r}")
    count = 0

    def hook(name: str) -> None:
        nonlocal count
        if name != point:
            return
        with _lock:
            count += 1
            hit = count == nth
        if not hit:
            return
        if kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "exit":
            os._exit(0)
        elif kind == "stall":
            _stall(stall_s, until)
        else:
            raise InjectedFault(f"injected fault at {point} (occurrence {nth})")

    return hook


def _stall(seconds: float, until: Callable[[], bool] | None) -> None:
    if until is None:
        time.sleep(seconds)
        return
    deadline = time.monotonic() + seconds
    while not until() and time.monotonic() < deadline:
        time.sleep(0.1)


def _from_env() -> None:
    spec = os.environ.get("DCKPT_FAULT")
    if not spec:
        return
    target, _, kind = spec.rpartition(":")
    kind, _, rank = kind.partition("@")
    if rank and rank != os.environ.get("RANK", ""):
        return
    point, _, nth = target.partition("#")
    arm(injector(point, kind, nth=int(nth or 1)))


_from_env()
