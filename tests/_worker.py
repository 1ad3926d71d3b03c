"""The process side of the multi-rank test harness (see ``tests/_dist.py``).

Each worker joins a gloo group once, then runs task after task sent by the parent, so the
suite pays the group setup once per pool instead of once per test.  Workers are forked
from a server process that imported torch once (see ``tests/_dist.py``).
"""

from __future__ import annotations

import faulthandler
import importlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

STORE_TIMEOUT = timedelta(seconds=60)


def main(rank: int, world_size: int, conn: Connection, log_path: str, env: dict[str, str]) -> None:
    """Entry point of one rank: join the group, then serve tasks until told to exit."""
    _sync_env(env)  # the test process's, not the forkserver's (started earlier)
    log = _redirect_output(log_path)
    # SIGUSR1 dumps every thread's stack into the log: the parent sends it before killing
    # a hung task, so the timeout error shows where each rank was stuck.
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)
    _exit_with_parent()

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    # Rank 0 binds the store to a free port and reports it, so there is no port race.
    if rank == 0:
        store = dist.TCPStore(
            "127.0.0.1", 0, world_size, True, STORE_TIMEOUT, wait_for_workers=False
        )
        conn.send(("port", store.port))
    else:
        _, port = conn.recv()
        store = dist.TCPStore("127.0.0.1", port, world_size, False, STORE_TIMEOUT)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=STORE_TIMEOUT
    )
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message[0] == "exit":
            break
        _, task_id, module, qualname, args, kwargs, env = message
        _sync_env(env)
        _run_task(conn, task_id, module, qualname, args, kwargs)
    os._exit(0)  # skip interpreter teardown: a broken group can hang in its destructors


def _run_task(
    conn: Connection,
    task_id: str,
    module: str,
    qualname: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    print(f"=== task {task_id}: {module}.{qualname}", flush=True)
    try:
        from dckpt import _coord

        _coord._set_epoch(task_id)
        value = _resolve(module, qualname)(*args, **kwargs)
    except BaseException:
        reply: tuple[Any, ...] = ("done", task_id, False, None, traceback.format_exc())
    else:
        reply = ("done", task_id, True, value, "")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        conn.send(reply)
    except Exception:  # the value did not pickle
        conn.send(("done", task_id, False, None, traceback.format_exc()))


def _sync_env(env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if sys.platform.startswith("linux"):
        # Loopback for every gloo group (new_group too), without resolving the host name.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def _resolve(module: str, qualname: str) -> Callable[..., Any]:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _redirect_output(path: str) -> Any:
    """Send fds 1 and 2 (C++ logging included) to the rank's log file, unbuffered."""
    log = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    return log


def _exit_with_parent() -> None:
    """Die when the parent does, even if the parent was SIGKILLed: never leave orphans."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
