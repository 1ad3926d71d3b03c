"""Which ranks share a node, and which ranks hold the replicas of whose files.

Ranks whose node label is equal form a node. Nodes are numbered by their lowest rank.
Rank ``r`` at position ``i`` among the ranks of node ``n`` has its replicas on nodes
``n+1 .. n+replicas`` (modulo the node count), each on the rank at position ``i`` (modulo
that node's size): a ring, so every node sends and receives about the same bytes.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from dckpt._coord import Coordinator, LocalCoordinator

log = logging.getLogger("dckpt")

NodeOf = Callable[[int], Hashable]


@dataclass(frozen=True)
class NodeMap:
    """The node of every rank (``nodes[rank]``) and the replica count in effect."""

    nodes: tuple[int, ...]
    replicas: int

    @property
    def count(self) -> int:
        return max(self.nodes) + 1 if self.nodes else 1

    def ranks_of(self, node: int) -> tuple[int, ...]:
        return tuple(r for r, n in enumerate(self.nodes) if n == node)

    def leader(self, node: int) -> int:
        """The rank that writes the node's manifests and applies its retention."""
        return self.ranks_of(node)[0]

    def is_leader(self, rank: int) -> bool:
        return self.leader(self.nodes[rank]) == rank

    def holders(self, rank: int) -> tuple[int, ...]:
        """The ranks (on other nodes) that hold replicas of ``rank``'s files."""
        node = self.nodes[rank]
        index = self.ranks_of(node).index(rank)
        out = []
        for k in range(1, self.replicas + 1):
            peers = self.ranks_of((node + k) % self.count)
            out.append(peers[index % len(peers)])
        return tuple(out)

    def sources(self, rank: int) -> tuple[int, ...]:
        """The ranks whose replicas ``rank`` holds."""
        return tuple(r for r in range(len(self.nodes)) if rank in self.holders(r))


def own_label(rank: int, node_of: NodeOf | None) -> Hashable:
    """This rank's node label: ``node_of(rank)``, else torchrun's node rank, else the host."""
    if node_of is not None:
        return node_of(rank)
    group_rank = os.environ.get("GROUP_RANK")
    return f"node-{group_rank}" if group_rank is not None else socket.gethostname()


def discover(
    coord: Coordinator | LocalCoordinator, node_of: NodeOf | None, replicas: int
) -> NodeMap:
    """Collective: every rank's node label, exchanged; the replicas capped by the nodes."""
    labels = coord.exchange("tiers-nodes", lambda: own_label(coord.rank, node_of))
    index: dict[Hashable, int] = {}
    nodes = tuple(index.setdefault(label, len(index)) for label in labels)
    count = len(index)
    effective = min(replicas, count - 1)
    if effective < replicas and coord.rank == 0 and coord.world_size > 1:
        log.warning(
            "replicas=%d, but the job spans %d node(s): each shard is held on %d other "
            "node(s); a lost node then falls back to the durable tier",
            replicas,
            count,
            effective,
        )
    return NodeMap(nodes, effective)
