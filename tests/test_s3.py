"""dckpt over the real S3 protocol (moto on loopback, through s3fs): round trips across
layouts, corruption, crashes before commit, overwrite, retention, and injected faults.

Faults come from a small HTTP proxy of our own in front of moto: it answers 503, drops
connections (before or after moto applied the request), or denies everything with 403.
"""

from __future__ import annotations

import collections
import http.client
import os
import signal
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import dckpt
from dckpt.storage._fsspec import FsspecStorage
from dckpt.storage._retry import classify, scrub, secret_values
from tests._dist import RankPool
from tests._probes import FailingState
from tests._s3 import S3Server

Pools = Callable[[int], RankPool]
MiB = 1 << 20
# Small parts and threshold so that a few MiB exercise multipart uploads (5 MiB: S3's min).
FAST = {
    "part_size": 5 * MiB,
    "multipart_threshold": 5 * MiB,
    "retry_initial": 0.01,
    "retry_timeout": 15,
}


@pytest.fixture
def s3(s3_server: S3Server) -> Iterator[tuple[str, dict[str, Any]]]:
    """A fresh prefix and the options that reach the server from any process."""
    url = s3_server.url(uuid.uuid4().hex)
    yield url, {**s3_server.options, "dckpt": FAST}
    FsspecStorage(url, s3_server.options).delete_prefix("")


# ----------------------------------------------------------------------------- model


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.big = nn.Linear(512, 4096)  # 8 MiB (24 with Adam): several objects per rank
        self.small = nn.ModuleList(nn.Linear(16, 9) for _ in range(4))  # many tiny reads


def build(fsdp: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = Net()
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in (model.big, *model.small):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, optim


def train_once(model: nn.Module, optim: torch.optim.Optimizer) -> None:
    loss = model.big(torch.ones(2, 512)).sum()  # type: ignore[operator]
    for layer in model.small:  # type: ignore[union-attr]
        loss = loss + layer(torch.ones(2, 16)).sum()
    loss.backward()
    optim.step()
    optim.zero_grad()


def full_state(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor

    def full(v: torch.Tensor) -> torch.Tensor:
        return v.full_tensor() if isinstance(v, DTensor) else v.clone()

    out = {f"model.{k}": full(v) for k, v in get_model_state_dict(model).items()}
    for fqn, s in get_optimizer_state_dict(model, optim)["state"].items():
        out.update({f"optim.{fqn}.{n}": full(v) for n, v in s.items()})
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- round trips


def _w_save(url: str, options: dict[str, Any]) -> dict[str, torch.Tensor]:
    model, optim = build(fsdp=True)
    train_once(model, optim)
    dckpt.save({"model": model, "optim": optim, "step": 7}, url, storage_options=options)
    full = full_state(model, optim)
    return full if dist.get_rank() == 0 else {}


def _w_load(url: str, options: dict[str, Any]) -> dict[str, torch.Tensor]:
    model, optim = build(fsdp=True)
    state = {"model": model, "optim": optim, "step": 0}
    dckpt.load(state, url, storage_options=options)
    assert state["step"] == 7
    full = full_state(model, optim)
    return full if dist.get_rank() == 0 else {}


def test_fsdp2_on_two_ranks_loads_on_one_process_and_three_ranks(
    rank_pool: Pools, s3: tuple[str, dict[str, Any]]
) -> None:
    url, options = s3
    saved = rank_pool(2).run(_w_save, url, options)[0]
    names = FsspecStorage(url, options).list()
    assert "manifest.json" in names, names
    # 12 MiB of DTensor shards per rank in part-sized (5 MiB) objects: three per rank,
    # each one PUT; next to them each rank's table and one file of planned chunks.
    files = [n.rsplit("/", 1)[1] for n in names if "/" in n]
    shards = collections.Counter(f.split("-")[0] for f in files if "-s" in f)
    assert shards == {"r0": 3, "r1": 3}, names
    assert {"r0.tab", "r1.tab"} <= set(files), names
    assert_same(saved, rank_pool(3).run(_w_load, url, options)[0])
    model, optim = build(fsdp=False)
    state = {"model": model, "optim": optim, "step": 0}
    assert dckpt.load(state, url, storage_options=options) == dckpt.LoadResult()
    assert_same(saved, full_state(model, optim))


def test_a_damaged_object_is_detected(s3: tuple[str, dict[str, Any]]) -> None:
    url, options = s3
    dckpt.save({"w": torch.arange(300_000, dtype=torch.float32)}, url, storage_options=options)
    st = FsspecStorage(url, options)
    (name,) = [n for n in st.list() if n.startswith("data/")]
    raw = bytearray(st.read_file(name) or b"")
    raw[len(raw) // 2] ^= 0x40
    st.fs.pipe_file(f"{st.root}/{name}", bytes(raw))
    with pytest.raises(dckpt.CorruptCheckpointError) as info:
        dckpt.load({"w": torch.zeros(300_000)}, url, storage_options=options)
    assert "'w'" in str(info.value) and f"{url}/{name}" in str(info.value)


# ----------------------------------------------------------------------------- no manifest, no load


def _w_fail_before_commit(url: str, options: dict[str, Any]) -> str:
    boom = FailingState(ValueError("rank one broke"), rank=1)
    with pytest.raises(dckpt.RankFailureError) as info:
        dckpt.save({"w": torch.ones(1000), "b": boom}, url, storage_options=options, timeout=20)
    return str(info.value)


def test_a_failed_save_leaves_nothing_loadable(
    rank_pool: Pools, s3: tuple[str, dict[str, Any]]
) -> None:
    url, options = s3
    assert all("rank one broke" in m for m in rank_pool(2).run(_w_fail_before_commit, url, options))
    assert FsspecStorage(url, options).read_file("manifest.json") is None
    with pytest.raises(dckpt.CheckpointNotFoundError):
        dckpt.load({"w": torch.zeros(1000)}, url, storage_options=options)


def _killed_mid_upload_main(url: str, options_json: str) -> None:
    """Run in a subprocess: commit a checkpoint, then die (SIGKILL) overwriting it while a
    multipart upload has a part in flight."""
    import json

    import dckpt.storage._s3write as f

    options = json.loads(options_json)
    dckpt.save({"w": torch.full((1000,), 1.0)}, url, storage_options=options)
    real = f.S3Writer._send_part

    def dying(self: Any, views: Any) -> None:
        real(self, views)
        os.kill(os.getpid(), signal.SIGKILL)

    f.S3Writer._send_part = dying  # type: ignore[method-assign]
    state = {"w": torch.full((1000,), 2.0), "big": torch.ones(6 * MiB // 4)}
    dckpt.save(state, url, overwrite=True, storage_options=options)


def test_a_save_killed_mid_upload_keeps_the_old_checkpoint(s3: tuple[str, dict[str, Any]]) -> None:
    import json
    import subprocess
    import sys

    url, options = s3
    code = "import sys; from tests.test_s3 import _killed_mid_upload_main as m; m(*sys.argv[1:])"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", code, url, json.dumps(options)], cwd=root, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL
    state = {"w": torch.zeros(1000)}
    dckpt.load(state, url, storage_options=options)
    assert torch.equal(state["w"], torch.full((1000,), 1.0))
    # The interrupted multipart upload never completed, so none of it is visible (a small
    # object of that save may be, unreferenced, until a CheckpointManager tidies it up).
    st = FsspecStorage(url, options)
    sizes = {n: st.size(n) for n in st.list("data")}
    assert sizes and all(n is not None and n < 6 * MiB for n in sizes.values()), sizes


def test_overwrite_keeps_the_old_checkpoint_until_the_manifest_lands(
    s3: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, options = s3
    dckpt.save({"w": torch.full((100,), 1.0)}, url, storage_options=options)
    real = FsspecStorage.commit
    seen: list[torch.Tensor] = []

    def checking(self: FsspecStorage, name: str, data: bytes, *, durable: bool) -> None:
        state = {"w": torch.zeros(100)}  # every new object is up; the old one still loads
        dckpt.load(state, url, storage_options=options)
        seen.append(state["w"])
        real(self, name, data, durable=durable)

    monkeypatch.setattr(FsspecStorage, "commit", checking)
    dckpt.save({"w": torch.full((100,), 2.0)}, url, overwrite=True, storage_options=options)
    assert len(seen) == 1 and torch.equal(seen[0], torch.full((100,), 1.0))

    def failing(self: FsspecStorage, name: str, data: bytes, *, durable: bool) -> None:
        raise dckpt.StorageError("injected commit failure")

    monkeypatch.setattr(FsspecStorage, "commit", failing)
    with pytest.raises(dckpt.StorageError, match="injected"):
        dckpt.save({"w": torch.full((100,), 3.0)}, url, overwrite=True, storage_options=options)
    state = {"w": torch.zeros(100)}
    dckpt.load(state, url, storage_options=options)
    assert torch.equal(state["w"], torch.full((100,), 2.0))
    data_dirs = {n.split("/")[1] for n in FsspecStorage(url, options).list("data")}
    assert len(data_dirs) == 1  # the old save's and the failed save's data are gone


def test_concurrent_commit_is_refused(s3: tuple[str, dict[str, Any]]) -> None:
    url, options = s3
    ours, theirs = FsspecStorage(url, options), FsspecStorage(url, options)
    for previous in (None, b"v1"):
        with ours.commit_lock():
            assert ours.read_file("manifest.json") == previous
            theirs.commit("manifest.json", b"v1" if previous is None else b"v2", durable=True)
            with pytest.raises(dckpt.CheckpointExistsError, match="another save committed"):
                ours.commit("manifest.json", b"ours", durable=True)
    with ours.commit_lock():
        assert ours.read_file("manifest.json") == b"v2"
        ours.commit("manifest.json", b"ours", durable=True)
    assert theirs.read_file("manifest.json") == b"ours"


def test_manager_lists_and_retains_on_s3(s3: tuple[str, dict[str, Any]]) -> None:
    manager_module = pytest.importorskip("dckpt._manager")
    url, options = s3
    mgr = manager_module.CheckpointManager(url, keep_last=2, storage_options=options)
    for step in (1, 2, 3):
        mgr.save(step, {"w": torch.full((10,), float(step))})
    assert mgr.steps() == [2, 3]
    FsspecStorage(f"{url}/step-00000009", options).commit("data/x/r0-0.bin", b"junk", durable=True)
    assert [e.step for e in mgr.entries()] == [2, 3, 9]  # 9 never committed
    state = {"w": torch.zeros(10)}
    assert mgr.load(state) == 3 and torch.equal(state["w"], torch.full((10,), 3.0))
    assert {n.split("/")[0] for n in FsspecStorage(url, options).list()} == {
        "step-00000002",
        "step-00000003",
        "step-00000009",
    }


def test_async_save_to_s3_and_save_load_through_memory_urls(
    s3: tuple[str, dict[str, Any]],
) -> None:
    url, options = s3
    state = {"big": torch.arange(3 * MiB // 4, dtype=torch.float32), "step": 5}
    handle = dckpt.async_save(state, url, storage_options=options)
    state["big"].zero_()  # the checkpoint keeps the values at the call
    handle.result()
    out = {"big": torch.empty(3 * MiB // 4), "step": 0}
    dckpt.load(out, url, storage_options=options)
    assert torch.equal(out["big"], torch.arange(3 * MiB // 4, dtype=torch.float32))
    assert out["step"] == 5
    mem = f"memory://dckpt-e2e-{uuid.uuid4().hex}/ck"
    dckpt.save({"w": torch.full((7,), 2.0)}, mem)
    got = {"w": torch.zeros(7)}
    dckpt.load(got, mem)
    assert torch.equal(got["w"], torch.full((7,), 2.0))
    FsspecStorage(mem).delete_prefix("")


def test_cli_reads_s3_urls_configured_by_the_environment(
    s3: tuple[str, dict[str, Any]], tmp_path: Any
) -> None:
    """The CLI takes no storage options: AWS_ENDPOINT_URL and the AWS_* keys (set by the
    server fixture) reach moto, as they would reach S3."""
    import json

    from click.testing import CliRunner

    from dckpt.cli._commands import cli

    url, options = s3
    mgr = dckpt.CheckpointManager(url, storage_options=options)
    for step in (1, 2):
        mgr.save(step, {"w": torch.full((10,), float(step)), "note": "hi"})

    def run(*args: str) -> Any:
        result = CliRunner().invoke(cli, list(args))
        assert "testing" not in result.output  # the credentials never show
        return result

    step2 = f"{url}/step-00000002"
    r = run("ls", url, "--json")
    assert r.exit_code == 0, r.output
    assert [e["step"] for e in json.loads(r.output) if e["committed"]] == [1, 2], r.output
    r = run("inspect", step2, "--json")
    assert r.exit_code == 0, r.output
    keys = {k["key"]: k for k in json.loads(r.output)["keys"]}
    assert keys["w"]["shape"] == [10] and keys["note"]["value"] == "'hi'"
    assert run("verify", step2).exit_code == 0
    r = run("diff", f"{url}/step-00000001", step2)
    assert r.exit_code == 1 and "w" in r.output, r.output
    out = tmp_path / "w.safetensors"
    assert run("convert", step2, str(out)).exit_code == 0
    from safetensors.torch import load_file

    assert torch.equal(load_file(out)["w"], torch.full((10,), 2.0))


# ----------------------------------------------------------------------------- credentials


def test_credentials_stay_out_of_locations_and_errors(s3_server: S3Server) -> None:
    options = {k: v for k, v in s3_server.options.items() if k not in ("key", "secret")}
    st = FsspecStorage("s3://AKIDLEAKCHECK:SuperSecret123@no-such-bucket/ck", options)
    assert st.location == "s3://no-such-bucket/ck"
    with pytest.raises(dckpt.StorageError) as info:
        st.commit("manifest.json", b"{}", durable=True)
    text = str(info.value)
    assert "NoSuchBucket" in text and "s3://no-such-bucket/ck/manifest.json" in text
    assert "SuperSecret123" not in text and "AKIDLEAKCHECK" not in text
    secrets = secret_values({**options, "secret": "TopSecretValue"})
    assert scrub("bad TopSecretValue at s3://u:p@b/k", secrets) == "bad *** at s3://b/k"


# ----------------------------------------------------------------------------- faults


class FaultProxy:
    """Forwards HTTP to moto; ``mode`` decides what each request meets first.

    ``flaky``: a request's 1st try gets 503, its 2nd is applied by moto but the answer is
    dropped (connection closed), later tries pass. ``deny``: every request gets 403.
    """

    def __init__(self, upstream: str, mode: str) -> None:
        self.upstream = urlsplit(upstream)
        self.mode = mode
        self.tries: collections.Counter[tuple[str, str]] = collections.Counter()
        self.injected: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def decide(self, method: str, path: str) -> str:
        if self.mode == "deny":
            action = "403"
        else:
            with self.lock:
                n = self.tries[(method, path)]
                self.tries[(method, path)] += 1
            action = {0: "503", 1: "lost"}.get(n, "pass")
        if action != "pass":
            with self.lock:
                self.injected[action] += 1
        return action

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_HOP = {"connection", "transfer-encoding", "content-length", "expect", "keep-alive"}


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    owner: FaultProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)[:size]
                if not size:
                    break
                chunks.append(chunk)
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._body()
        action = self.owner.decide(self.command, self.path)
        if action in ("503", "403"):
            code = "ServiceUnavailable" if action == "503" else "AccessDenied"
            xml = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
            self._send(int(action), [("Content-Type", "application/xml")], xml)
            return
        up = self.owner.upstream
        conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
            if self.command == "HEAD":
                out.append(("Content-Length", resp.getheader("Content-Length") or "0"))
        finally:
            conn.close()
        if action == "lost":  # moto applied it; the client never hears back
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        self._send(resp.status, out, data)

    def _send(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


@pytest.fixture
def proxy_for(s3_server: S3Server) -> Iterator[Callable[[str], FaultProxy]]:
    made: list[FaultProxy] = []

    def make(mode: str) -> FaultProxy:
        made.append(FaultProxy(s3_server.endpoint, mode))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_transient_faults_are_retried(
    s3_server: S3Server, proxy_for: Callable[[str], FaultProxy]
) -> None:
    proxy = proxy_for("flaky")
    url = s3_server.url(uuid.uuid4().hex)
    options = {
        **s3_server.options,
        "endpoint_url": proxy.endpoint,
        # botocore gives up at once, so every retry here is dckpt's (and s3fs's for resets)
        "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 1}},
        "dckpt": FAST,
    }
    state = {"w": torch.randn(3 * MiB // 4), "b": torch.randn(100), "n": torch.arange(5)}
    big = {"big": torch.randn(2, 5 * MiB // 4)}  # two parts
    dckpt.save({**state, **big}, url, storage_options=options)
    dckpt.save(state, url, overwrite=True, storage_options=options)  # conditional commit
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    dckpt.load(got, url, storage_options=options)
    for k in state:
        assert torch.equal(got[k], state[k]), k
    assert proxy.injected["503"] >= 10 and proxy.injected["lost"] >= 10, proxy.injected
    assert FsspecStorage(url, s3_server.options).read_file("manifest.json") is not None


def _w_denied(url: str, options: dict[str, Any]) -> list[str]:
    messages = []
    with pytest.raises(dckpt.CheckpointError) as info:
        dckpt.save({"w": torch.ones(10)}, url, storage_options=options, timeout=20)
    messages.append(str(info.value))
    with pytest.raises(dckpt.CheckpointError) as info:
        dckpt.load({"w": torch.ones(10)}, url, storage_options=options, timeout=20)
    messages.append(str(info.value))
    return messages


def test_access_denied_is_a_clear_error_on_every_rank(
    rank_pool: Pools, s3_server: S3Server, proxy_for: Callable[[str], FaultProxy]
) -> None:
    proxy = proxy_for("deny")
    url = s3_server.url(uuid.uuid4().hex)
    options = {**s3_server.options, "endpoint_url": proxy.endpoint, "dckpt": FAST}
    results = rank_pool(2).run(_w_denied, url, options, timeout=60)
    for messages in results:
        for m in messages:
            assert "HTTP 403 AccessDenied" in m and f"{url}/manifest.json" in m, m
            assert "check the credentials" in m


def test_classify() -> None:
    from botocore.exceptions import ClientError, ConnectionClosedError

    def client_error(status: int, code: str) -> ClientError:
        return ClientError(
            {
                "Error": {"Code": code, "Message": "m"},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            "PutObject",
        )

    assert classify(client_error(503, "SlowDown")).transient
    assert classify(client_error(500, "InternalError")).transient
    assert classify(client_error(429, "TooManyRequests")).transient
    assert not classify(client_error(403, "AccessDenied")).transient
    assert classify(client_error(403, "AccessDenied")).denied
    assert not classify(client_error(400, "InvalidArgument")).transient
    assert classify(client_error(412, "PreconditionFailed")).precondition_failed
    wrapped = OSError(16, "busy")  # what s3fs raises, with botocore's error as the cause
    wrapped.__cause__ = client_error(503, "ServiceUnavailable")
    assert classify(wrapped).transient and classify(wrapped).http_status == 503
    assert classify(ConnectionClosedError(endpoint_url="http://x")).transient
    assert classify(ConnectionResetError()).transient
    assert classify(TimeoutError()).transient
    assert not classify(FileNotFoundError()).transient
    assert not classify(ValueError()).transient
