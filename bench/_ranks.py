"""Rank plumbing shared by the benchmarks: joining the gloo group, gathering, timing."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def join_group(rank: int, world: int, port: int) -> None:
    """One CPU thread per rank (as on a shared 2-core machine), quiet, in a gloo group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def gather(value: Any, group: Any = None) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def timed(fn: Callable[[], Any]) -> float:
    """Wall time of a collective call, from the first rank in to the last rank out."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def rmtree_collective(path: str) -> None:
    """Remove a checkpoint once every rank is done with it."""
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()


def _rank_main(
    rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...], q: Any
) -> None:
    join_group(rank, world, port)
    try:
        result = fn(*args)
        if rank == 0:
            q.put(("ok", result))
    except BaseException:
        q.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
        raise
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def run_on_ranks(world: int, label: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` on ``world`` fresh gloo ranks; rank 0's result, or the first error."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, port, fn, args, q), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        while True:
            try:
                kind, payload = q.get(timeout=1.0)
            except Exception:  # queue.Empty
                kind = None
            if kind == "ok":
                for p in procs:
                    p.join(timeout=120)
                return payload
            if kind == "error":
                raise RuntimeError(f"{label} phase failed on {payload}")
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"{label} phase: a rank exited with code {dead[0].exitcode}")
            if all(p.exitcode == 0 for p in procs):
                raise RuntimeError(f"{label} phase: ranks exited without a result")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
            if p.is_alive():
                p.kill()
