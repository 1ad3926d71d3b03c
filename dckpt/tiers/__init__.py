"""Tiered checkpoints: a node-local tier with replicas on other nodes, and a durable tier.

[`CheckpointManager`][dckpt.CheckpointManager] delegates here when it is given a
``local_dir``. Each module holds one concept:

- :mod:`._nodes`: which ranks share a host, and which ranks hold whose replicas;
- :mod:`._transfer`: data files sent between ranks over a gloo group;
- :mod:`._localtier`: the local tier's directory layout, listing, checks and retention;
- :mod:`._tsave`: one tier save (plan, write, replicate, commit);
- :mod:`._persist`: copying a committed local step to the durable tier;
- :mod:`._recover`: finding the newest recoverable step and fetching what is missing;
- :mod:`._tiered`: the object the manager delegates to.
"""

from __future__ import annotations

from dckpt.tiers._errors import LocalTierError, PersistError, TransferError
from dckpt.tiers._tiered import TieredCheckpoints

__all__ = ["LocalTierError", "PersistError", "TieredCheckpoints", "TransferError"]
