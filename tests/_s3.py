"""A moto S3 server on loopback for the tests: start it, point the AWS environment at it.

Shared by the session's server (``conftest.s3_server``) and the private servers of tests
that freeze theirs (``test_s3_stall``).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

# Dummy credentials, and nothing that could reach a real account or metadata host.
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/dckpt-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/dckpt-test-aws-credentials",
}


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


@contextlib.contextmanager
def moto_process(snippet: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run ``snippet`` (which prints its port, then serves until stdin closes); yields the
    process and its endpoint, and kills it afterwards."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    proc = subprocess.Popen(
        [sys.executable, "-c", snippet],
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
        yield proc, f"http://127.0.0.1:{int(line)}"
    finally:
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def aws_env(server: S3Server, *, endpoint_env: bool = True) -> Iterator[None]:
    """Point the AWS environment at ``server`` and create its bucket."""
    with pytest.MonkeyPatch.context() as mp:
        env = dict(_AWS_ENV)
        if endpoint_env:
            env["AWS_ENDPOINT_URL"] = server.endpoint
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.options)
        fs.call_s3("create_bucket", Bucket=server.bucket)
        yield
