"""An async save still running when the process exits normally is finished, or reported.

Each test runs a real Python process (or two ranks) that starts a save and exits right
away: at the end of the script, through ``sys.exit``, or through an uncaught exception.
The checkpoint must then load with exactly the saved values; a save that fails at exit
must print its error and make the exit status non-zero.
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest
import torch

import dckpt
from dckpt._manager import CheckpointManager

REPO = Path(__file__).resolve().parents[1]
BIG = 8 << 20  # float32 elements: 32 MB per tensor
RUN_TIMEOUT = 180.0
# The scripts import the dckpt this test imported, wherever they are run from.
ENV = {k: v for k, v in os.environ.items() if k != "DCKPT_FAULT"}
ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def _tensor(name: str, numel: int) -> torch.Tensor:
    """The same values in every process: seeded by the key's name."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(numel, generator=g)


def _script(*bodies: str, **params: object) -> str:
    """A script that defines ``_tensor`` and the given constants, then runs ``bodies``."""
    lines = [
        "import os, sys, threading, time, zlib",
        "import torch",
        "import dckpt",
        "from dckpt import _faults",
        textwrap.dedent(inspect.getsource(_tensor)),
    ]
    lines += [f"{k} = {v!r}" for k, v in params.items()]
    return "\n".join(lines + [textwrap.dedent(b) for b in bodies])


# Arms a fault hook that holds the writer thread back until the main thread has begun to
# exit: the save then reaches its data files during interpreter shutdown every time,
# not only when the writer happens to lose the race (it usually does with 128 MB). MARK
# proves the hook ran.
_SLOW_WRITER = """
def _slow_writer(name):
    if name == "save.write.before":
        open(MARK, "w").close()
        while not threading._SHUTTING_DOWN:
            time.sleep(0.01)
        time.sleep(0.2)  # well into the exit: past the thread pools' own exit hook, if first

_faults.arm(_slow_writer)
"""


def _run(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"script-{len(list(tmp_path.glob('script-*')))}.py"
    path.write_text(script)
    return subprocess.run(
        [sys.executable, str(path), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=ENV,
    )


def _assert_loads(path: Path, names: list[str], numel: int) -> None:
    state = {n: torch.zeros(numel) for n in names}
    dckpt.load(state, path)
    for n in names:
        assert torch.equal(state[n], _tensor(n, numel)), n


FOUR = [f"t{i}" for i in range(4)]

_SAVE_FOUR = """
state = {n: _tensor(n, BIG) for n in NAMES}
handle = dckpt.async_save(state, PATH)
assert not handle.done()  # still writing when the process starts to exit
"""


@pytest.mark.parametrize(
    ("ending", "status"),
    [
        ("sys.exit(0)", 0),
        ("", 0),  # the end of the script
        ("raise RuntimeError('training blew up')", 1),
    ],
    ids=["sys-exit", "end-of-script", "uncaught-exception"],
)
def test_a_save_in_flight_at_exit_commits(tmp_path: Path, ending: str, status: int) -> None:
    ck, mark = tmp_path / "ck", tmp_path / "mark"
    script = _script(
        _SLOW_WRITER, _SAVE_FOUR + ending, NAMES=FOUR, BIG=BIG, PATH=str(ck), MARK=str(mark)
    )
    proc = _run(tmp_path, script)
    assert proc.returncode == status, proc.stderr
    assert mark.exists()
    if status:
        assert "training blew up" in proc.stderr  # the script's own error, unchanged
    assert "dckpt:" not in proc.stderr, proc.stderr
    _assert_loads(ck, FOUR, BIG)


def test_a_manager_save_in_flight_at_exit_commits_its_step(tmp_path: Path) -> None:
    body = """
    manager = dckpt.CheckpointManager(ROOT, async_save=True)
    manager.save(7, {n: _tensor(n, BIG) for n in NAMES})
    sys.exit(0)
    """
    root, mark = tmp_path / "run", tmp_path / "mark"
    script = _script(_SLOW_WRITER, body, NAMES=FOUR, BIG=BIG, ROOT=str(root), MARK=str(mark))
    proc = _run(tmp_path, script)
    assert proc.returncode == 0, proc.stderr
    assert mark.exists()
    manager = CheckpointManager(root)
    assert manager.steps() == [7]
    _assert_loads(Path(manager.path_of(7)), FOUR, BIG)


def test_a_save_failing_at_exit_prints_its_error_and_fails_the_exit(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file where the checkpoint's parent should be")
    ck = blocker / "ck"
    body = """
    dckpt.async_save({"w": torch.ones(1000)}, PATH)
    print("script done", flush=True)
    sys.exit(0)
    """
    proc = _run(tmp_path, _script(body, PATH=str(ck)))
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stdout == "script done\n"
    assert "failed while the process was exiting" in proc.stderr
    assert "StorageError" in proc.stderr and str(blocker) in proc.stderr, proc.stderr
    assert not blocker.is_dir()


def test_a_failure_already_raised_by_result_does_not_fail_the_exit(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    body = """
    handle = dckpt.async_save({"w": torch.ones(1000)}, PATH)
    try:
        handle.result()
    except dckpt.StorageError:
        print("handled", flush=True)
    """
    proc = _run(tmp_path, _script(body, PATH=str(blocker / "ck")))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "handled\n", "")


def test_a_prepare_in_flight_at_exit_is_waited_for(tmp_path: Path) -> None:
    # The reservation runs on the writer thread too; exiting under it must neither crash
    # nor hang, and a save queued behind it still commits.
    body = """
    state = {n: _tensor(n, BIG) for n in NAMES}
    dckpt.prepare_async_save(state)
    dckpt.async_save(state, PATH)
    sys.exit(0)
    """
    ck, mark = tmp_path / "ck", tmp_path / "mark"
    script = _script(_SLOW_WRITER, body, NAMES=FOUR, BIG=BIG, PATH=str(ck), MARK=str(mark))
    proc = _run(tmp_path, script)
    assert (proc.returncode, proc.stderr, mark.exists()) == (0, "", True)
    _assert_loads(ck, FOUR, BIG)


def test_a_forked_child_exits_without_waiting_for_its_parents_save(tmp_path: Path) -> None:
    # The child has none of the parent's threads: waiting for the parent's save at its
    # exit would hang forever.
    body = """
    state = {n: _tensor(n, BIG) for n in NAMES}
    handle = dckpt.async_save(state, PATH)
    assert not handle.done()  # held back until this process exits
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # a normal exit: the exit hooks run
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            print("child status", os.waitstatus_to_exitcode(status), flush=True)
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        print("child hung at exit", flush=True)
    """
    ck, mark = tmp_path / "ck", tmp_path / "mark"
    script = _script(_SLOW_WRITER, body, NAMES=FOUR, BIG=BIG, PATH=str(ck), MARK=str(mark))
    proc = _run(tmp_path, script)
    assert (proc.returncode, proc.stdout) == (0, "child status 0\n"), proc.stderr
    _assert_loads(ck, FOUR, BIG)


def test_an_interrupt_while_waiting_at_exit_abandons_the_save(tmp_path: Path) -> None:
    # The writer stalls once the main thread is in the exit wait; Ctrl-C then ends the
    # process at once, and the checkpoint is simply not there.
    body = """
    def stall(name):
        if name == "storage.write":
            while not threading._SHUTTING_DOWN:
                time.sleep(0.01)
            time.sleep(0.3)  # the main thread is now inside the exit wait
            open(READY, "w").close()
            time.sleep(120)

    _faults.arm(stall)
    dckpt.async_save({"w": torch.ones(1000)}, PATH)
    sys.exit(0)
    """
    ck, ready = tmp_path / "ck", tmp_path / "ready"
    path = tmp_path / "interrupt.py"
    path.write_text(_script(body, PATH=str(ck), READY=str(ready)))
    with subprocess.Popen(
        [sys.executable, str(path)], cwd=REPO, stderr=subprocess.PIPE, text=True, env=ENV
    ) as proc:
        try:
            deadline = time.monotonic() + 60
            while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert ready.exists(), "the writer never reached the stall"
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted while waiting for the async save to" in err
    assert not (ck / "manifest.json").exists()


# ----------------------------------------------------------------------------- two ranks

_RANK = """
from datetime import timedelta
import torch.distributed as dist

rank = int(sys.argv[1])
os.environ["RANK"] = str(rank)
if STORE == "file":
    dist.init_process_group(
        "gloo", init_method="file://" + os.path.join(WORK, "rdv"), rank=rank, world_size=2
    )
else:  # a TCPStore served from rank 0's process, as under torchrun
    port_file = os.path.join(WORK, "port")
    if rank == 0:
        store = dist.TCPStore(
            "127.0.0.1", 0, 2, True, timedelta(seconds=60), wait_for_workers=False
        )
        with open(port_file + ".tmp", "w") as f:
            f.write(str(store.port))
        os.replace(port_file + ".tmp", port_file)
    else:
        while not os.path.exists(port_file):
            time.sleep(0.01)
        with open(port_file) as f:
            port = int(f.read())
        store = dist.TCPStore("127.0.0.1", port, 2, False, timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)

if SLOW_FOLLOWER and rank == 1:
    # Rank 1 is descheduled right after sending its part of the commit exchange: rank 0
    # commits and publishes the outcome long before rank 1 comes back to read it.
    def slow(name):
        _slow_writer(name)
        if name == "coord.write.sent":
            open(os.path.join(WORK, "slowed"), "w").close()
            time.sleep(2)

    _faults.arm(slow)

# Equal on both ranks (each writes half of them), plus one of its own: 96 MB per rank,
# written as two files in parallel, through a thread pool.
state = {n: _tensor(n, SIZE) for n in SHARED}
state[f"own{rank}"] = _tensor(f"own{rank}", SIZE)
dckpt.async_save(state, PATH, timeout=60)
sys.exit(0)
"""

SHARED = ["a", "b", "c", "d"]

# torch's gloo backend can abort in its C++ destructors at interpreter teardown, about one
# run in fifty, with or without dckpt (see examples/stateful_example.py); that happens
# after every exit hook, so the save's outcome is already settled by then.
_GLOO_TEARDOWN = "terminate called"


def _run_ranks(tmp_path: Path, store: str, slow_follower: bool) -> list[tuple[int, str]]:
    script = tmp_path / "rank.py"
    params = dict(
        STORE=store,
        WORK=str(tmp_path),
        PATH=str(tmp_path / "ck"),
        SIZE=BIG,
        SHARED=SHARED,
        MARK=str(tmp_path / "mark"),
    )
    script.write_text(_script(_SLOW_WRITER, _RANK, SLOW_FOLLOWER=slow_follower, **params))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for r in range(2)
    ]
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=RUN_TIMEOUT)
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


@pytest.mark.parametrize(
    ("store", "slow_follower"),
    [("file", False), ("tcp", False), ("tcp", True)],
    ids=["file-store", "tcp-store", "tcp-store-slow-follower"],
)
def test_two_ranks_exiting_right_after_async_save_commit(
    tmp_path: Path, store: str, slow_follower: bool
) -> None:
    outcomes = _run_ranks(tmp_path, store, slow_follower)
    for rank, (status, err) in enumerate(outcomes):
        assert "dckpt:" not in err, f"rank {rank}: {err}"
        # Rank 0 kept the store up until rank 1 was done with it: no save had to recover
        # from losing it (nor did the store's client complain of a closed connection).
        assert "lost contact" not in err and "TCPStore.cpp" not in err, f"rank {rank}: {err}"
        gloo_abort = status == -signal.SIGABRT and _GLOO_TEARDOWN in err
        assert status == 0 or gloo_abort, f"rank {rank} exited with {status}: {err}"
    assert (tmp_path / "mark").exists()
    if slow_follower:
        assert (tmp_path / "slowed").exists()  # the fault point was reached
    _assert_loads(tmp_path / "ck", [*SHARED, "own0", "own1"], BIG)
