"""The fault-point matrix: every protocol step x every fault x every rank.

A case runs one protocol (save, async save, load, manager save with retention) on a fresh
2-rank gloo group over a checkpoint that already holds an older commit, with one fault
armed on one rank through :mod:`dckpt._faults`: SIGKILL, an abrupt clean exit
(``os._exit(0)``), a stall past the timeout, or an exception, at the n-th time that rank
passes one named point. The parent then checks the invariants on what is on disk.

The points come from a recording run of the protocol, so a new step in the engine joins
the matrix without anyone listing it.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import dckpt
from dckpt import _faults

N = 4096
OLD, NEW = 1.0, 2.0
TIMEOUT = 3.0
# Past every bound a survivor waits for (a follower waits 2 x timeout + 5 s for rank 0).
STALL_S = 3 * TIMEOUT + 8
PROTOCOLS = ("save", "async_save", "load", "manager")
KINDS = _faults.KINDS


@dataclass(frozen=True)
class Case:
    protocol: str
    point: str
    nth: int
    kind: str
    victim: int

    @property
    def id(self) -> str:
        return f"{self.protocol}-{self.point}#{self.nth}-{self.kind}@{self.victim}"


def state(value: float, rank: int) -> dict[str, Any]:
    """A replicated tensor, a tensor only this rank holds, a value and, in a process
    group, a DTensor sharded over the ranks (a layout entry with per-rank tables)."""
    out: dict[str, Any] = {
        "w": torch.full((N,), value),
        f"r{rank}": torch.full((N // 2,), value + rank),
        "step": int(value),
    }
    if dist.is_initialized():  # one-process cases (an object store's commit) have none
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        local = torch.full((N // 2,), value + 10 * rank)
        out["d"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, DTensor):
        return torch.equal(a.to_local(), b.to_local())
    return torch.equal(a, b) if isinstance(b, torch.Tensor) else bool(a == b)


def ckpt_path(root: str, protocol: str) -> str:
    return os.path.join(root, "mgr" if protocol == "manager" else "ck")


def w_case(root: str, protocol: str, arm: tuple[str, int, str, int] | None) -> dict[str, Any]:
    """Run on every rank: commit OLD, then run ``protocol`` with ``arm`` on its victim.

    Returns what this rank saw: ``ok``, the error's type and text, the elapsed seconds,
    and, for a recording run (``arm`` None), the points this rank passed.
    """
    rank = dist.get_rank()
    path = ckpt_path(root, protocol)
    manager = dckpt.CheckpointManager(path, keep_last=1, timeout=TIMEOUT) if protocol == "manager" else None
    if manager is not None:
        manager.save(1, state(OLD, rank))
    elif protocol == "load":
        dckpt.save(state(NEW, rank), path, timeout=TIMEOUT)
    else:
        dckpt.save(state(OLD, rank), path, timeout=TIMEOUT)
    dist.barrier()
    if arm is None:
        _faults.record(True)
    elif arm[3] == rank:
        point, nth, kind, _ = arm
        _faults.arm(_faults.injector(point, kind, nth=nth, stall_s=STALL_S))
    start = time.monotonic()
    out: dict[str, Any] = {"ok": True, "error": "", "type": ""}
    try:
        if protocol == "save":
            dckpt.save(state(NEW, rank), path, overwrite=True, timeout=TIMEOUT)
        elif protocol == "async_save":
            dckpt.async_save(state(NEW, rank), path, overwrite=True, timeout=TIMEOUT).result()
        elif protocol == "load":
            dest = state(0.0, rank)
            dckpt.load(dest, path, timeout=TIMEOUT)
            want = state(NEW, rank)
            out["exact"] = all(_same(dest[k], want[k]) for k in want)
        else:
            assert manager is not None
            manager.save(2, state(NEW, rank))
            manager.wait()
    except BaseException as exc:  # reported, then judged by the parent
        out.update(ok=False, type=type(exc).__name__, error=str(exc)[:2000])
        out["checkpoint_error"] = isinstance(exc, dckpt.CheckpointError)
    out["elapsed"] = time.monotonic() - start
    _faults.arm(None)
    if arm is None:
        out["points"] = _faults.record(False)
    return out


def cases_for(protocol: str, points: list[list[str]]) -> list[Case]:
    """Every (point, occurrence) each rank passed, x every fault kind."""
    out = []
    for rank, seen in enumerate(points):
        for point, count in sorted(Counter(seen).items()):
            for nth in sorted({1, count}):
                for kind in KINDS:
                    out.append(Case(protocol, point, nth, kind, rank))
    return out


def snapshot(root: Path, exclude: str) -> dict[str, bytes]:
    """Every file under ``root`` outside ``exclude``, with its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel == exclude or rel.startswith(exclude + "/"):
            continue
        out[rel] = p.read_bytes() if p.is_file() else b"<dir>"
    return out


def committed_values(root: str, protocol: str) -> float | None:
    """The value every tensor of the newest committed checkpoint holds; asserts no mix."""
    path = ckpt_path(root, protocol)
    if protocol == "manager":
        mgr = dckpt.CheckpointManager(path)
        step = mgr.latest_step()
        if step is None:
            return None
        path = os.path.join(path, dckpt_step_name(step))
    dest: dict[str, Any] = {
        "w": torch.zeros(N),
        "r0": torch.zeros(N // 2),
        "r1": torch.zeros(N // 2),
        "d": torch.zeros(N),
        "step": 0,
    }
    dckpt.load(dest, path)
    value = float(dest["w"][0])
    assert value in (OLD, NEW), value
    for rank in (0, 1):
        assert torch.equal(dest[f"r{rank}"], torch.full((N // 2,), value + rank)), "mixed checkpoint"
    assert torch.equal(dest["w"], torch.full((N,), value)), "mixed checkpoint"
    halves = [torch.full((N // 2,), value + 10 * r) for r in (0, 1)]
    assert torch.equal(dest["d"], torch.cat(halves)), "mixed checkpoint"
    assert dest["step"] == int(value), "mixed checkpoint"
    problems = dckpt_verify(path)
    assert not problems, problems
    return value


def dckpt_step_name(step: int) -> str:
    from dckpt._manager import step_name

    return step_name(step)


def dckpt_verify(path: str) -> list[Any]:
    from dckpt._api import open_checkpoint

    return open_checkpoint(path).verify()
