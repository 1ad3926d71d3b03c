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

from collections.abc import Callable, Iterator

import pytest

from tests._dist import RankPool, close_all, get_pool


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

_MOTO_SNIPPET = (
    "import sys\n"
    "from moto.server import ThreadedMotoServer\n"
    "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)\n"
    "s.start()\n"
    "print(s.get_host_and_port()[1], flush=True)\n"
    "sys.stdin.read()\n"  # exits when the test session closes our end (or dies)
)


class S3Server:
    """A moto S3 server on loopback with one bucket; ``options`` reach it from any process."""

    def __init__(self, endpoint: str, bucket: str) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.options: dict[str, object] = {
            "endpoint_url": endpoint,
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"},
        }

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's standalone server in a subprocess, on a free 127.0.0.1 port, for the session."""
    import subprocess
    import sys

    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    proc = subprocess.Popen(
        [sys.executable, "-c", _MOTO_SNIPPET],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"moto server did not start (exit code {proc.poll()})")
        server = S3Server(f"http://127.0.0.1:{int(line)}", "dckpt-test")
        with pytest.MonkeyPatch.context() as mp:
            # Dummy credentials, and nothing that could reach a real account or metadata host.
            for k, v in {
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": server.endpoint,
                "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": "/nonexistent/dckpt-test-aws-config",
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/dckpt-test-aws-credentials",
            }.items():
                mp.setenv(k, v)
            mp.delenv("AWS_PROFILE", raising=False)
            mp.delenv("AWS_SESSION_TOKEN", raising=False)
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.options)
            fs.call_s3("create_bucket", Bucket=server.bucket)
            yield server
    finally:
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
