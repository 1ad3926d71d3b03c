"""Rank plumbing shared by the benchmarks: joining the gloo group, gathering, timing."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
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
