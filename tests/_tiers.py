"""The tiered manager the tier tests build: 4 gloo ranks as 2 simulated nodes x 2 ranks.

Each node gets its own local directory, ``<base>/node<n>``, as real nodes each have
their own disk; the durable tier is ``root``. Every option can be overridden, the
timeout and the durable tier's schedule must be chosen (each test file sizes them).
"""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist

import dckpt


def node_of(rank: int) -> int:
    """Ranks 0 and 1 form node 0, ranks 2 and 3 node 1."""
    return rank // 2


def node_dir(base: str, node: int) -> str:
    """The local directory of ``node``."""
    return f"{base}/node{node}"


def tiered_manager(
    root: str,
    base: str,
    *,
    timeout: float,
    persist_every: int,
    keep_last: int,
    **overrides: Any,
) -> dckpt.CheckpointManager:
    """This rank's tiered manager: one replica on the other node, 2 local steps kept,
    async saves. Collective (construction exchanges node labels and creates a group)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    options: dict[str, Any] = dict(
        local_dir=node_dir(base, node_of(rank)),
        replicas=1,
        persist_every=persist_every,
        keep_local=2,
        keep_last=keep_last,
        async_save=True,
        timeout=timeout,
        node_of=node_of,
    )
    options.update(overrides)
    return dckpt.CheckpointManager(root, **options)


class Heard(logging.Handler):
    """The WARNING lines of dckpt's logger in this process, once added to it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        logging.getLogger("dckpt").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
