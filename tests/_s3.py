"""A moto S3 server on loopback for the tests: start it, point the AWS environment at it.

Shared by the session's server (``conftest.s3_server``) and the private servers of tests
that freeze theirs (``test_s3_stall``). The launcher itself is ``tools.moto_server``, which
the benchmarks use too; this module adds what only tests need: a skip when moto or s3fs
is missing, and an environment that is undone when the test ends.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

import pytest

from tools import moto_server
from tools.moto_server import AWS_ENV, AWS_ENV_UNSET, MOTO_SERVER, S3Server

__all__ = ["MOTO_SERVER", "S3Server", "aws_env", "moto_process"]


@contextlib.contextmanager
def moto_process(snippet: str = MOTO_SERVER) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run ``snippet`` (which prints its port, then serves until stdin closes); yields the
    process and its endpoint, and kills it afterwards. Skips the test without moto or s3fs."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    with moto_server.moto_process(snippet) as started:
        yield started


@contextlib.contextmanager
def aws_env(server: S3Server, *, endpoint_env: bool = True) -> Iterator[None]:
    """Point the AWS environment at ``server`` and create its bucket."""
    with pytest.MonkeyPatch.context() as mp:
        env = dict(AWS_ENV)
        if endpoint_env:
            env["AWS_ENDPOINT_URL"] = server.endpoint
        for k, v in env.items():
            mp.setenv(k, v)
        for k in AWS_ENV_UNSET:
            mp.delenv(k, raising=False)
        server.create_bucket()
        yield
