"""moto's S3 server on loopback, in a subprocess: the one launcher of the tests and benchmarks.

``moto_process()`` starts it and yields the process and its endpoint; ``S3Server`` holds
the endpoint and a bucket and gives the ``storage_options`` that reach it from any
process; ``AWS_ENV`` is the dummy environment that keeps every AWS client off real
accounts and metadata hosts. Needs ``moto[server]`` (the server) and ``s3fs`` (the
bucket), both in ``dckpt[dev]``.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

# Dummy credentials, and nothing that could reach a real account or metadata host.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/dckpt-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/dckpt-test-aws-credentials",
}
# Variables that would override the dummy credentials: removed along with setting AWS_ENV.
AWS_ENV_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN")

# A server program prints its port on one line, then serves until its stdin closes, so it
# ends with whoever started it, even if that process dies without cleaning up.
MOTO_SERVER = (
    "import sys\n"
    "from moto.server import ThreadedMotoServer\n"
    "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)\n"
    "s.start()\n"
    "print(s.get_host_and_port()[1], flush=True)\n"
    "sys.stdin.read()\n"
)


class S3Server:
    """A moto S3 server on loopback with one bucket; ``options`` reach it from any process."""

    def __init__(self, endpoint: str, bucket: str) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.options: dict[str, object] = {
            "endpoint_url": endpoint,
            "key": AWS_ENV["AWS_ACCESS_KEY_ID"],
            "secret": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"region_name": AWS_ENV["AWS_DEFAULT_REGION"]},
        }

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def create_bucket(self) -> None:
        # A deferred import: s3fs is optional, and a caller without it gets its ImportError
        # here, not when importing this module.
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.options)
        fs.call_s3("create_bucket", Bucket=self.bucket)


@contextlib.contextmanager
def moto_process(snippet: str = MOTO_SERVER) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run the server program ``snippet`` (default: moto's threaded server) in a subprocess;
    yield the process and its endpoint, and stop it afterwards.

    Raises ``RuntimeError`` when the program ends or prints something other than a port
    first (moto missing, or the snippet broken)."""
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
            raise RuntimeError(
                f"the moto S3 server did not start (exit code {proc.poll()}); "
                "it needs pip install 'moto[server]'"
            )
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
