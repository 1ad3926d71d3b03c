"""Shared fixtures.

Multi-rank tests::

    def _w_roundtrip(path: str) -> int:          # module level: workers import it by name
        return torch.distributed.get_rank()

    def test_roundtrip(rank_pool, tmp_path):
        assert rank_pool(3).run(_w_roundtrip, str(tmp_path)) == [0, 1, 2]

Pools are started once per world size and shared by the whole session.  Tests that kill a
rank or break the group use ``tests._dist.run_fresh`` instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests._dist import RankPool, close_all, get_pool
from tests._s3 import S3Server, aws_env, moto_process

# Every rank's store connection does a reverse-DNS lookup of the loopback address (c10d
# names its peer), which /etc/hosts does not answer for the IPv4-mapped form c10d uses: a
# lost reply costs the resolver's default 5 s, more than the fault tests' timeouts, and it
# happens inside a collective whenever a thread opens its connection. The tests run many
# fresh groups side by side, so now and then one lost a reply and a setup save timed out.
# Retrying after 1 s keeps that well inside every timeout; the timeouts stay as tight.
# Workers take the test process's environment, so this reaches every rank.
os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:5")


@pytest.fixture(scope="session")
def rank_pool() -> Iterator[Callable[[int], RankPool]]:
    """``rank_pool(world_size)`` -> the session's shared :class:`RankPool` of that size."""
    yield get_pool
    close_all()


@pytest.fixture(scope="session")
def ranks(rank_pool: Callable[[int], RankPool]) -> Callable[[int], RankPool]:
    """Alias of ``rank_pool``."""
    return rank_pool


# -- S3 (moto) ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's standalone server in a subprocess, on a free 127.0.0.1 port, for the session."""
    with moto_process() as (_proc, endpoint):
        server = S3Server(endpoint, "dckpt-test")
        with aws_env(server):
            yield server
