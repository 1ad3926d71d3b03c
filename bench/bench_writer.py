"""Thread or process for async_save's background writer: which slows training less?

Stages a state of ``--mb`` MiB into host buffers, then writes it to ``--dir`` the way
dckpt's writer does (crc32c per 1 MiB block, write, fsync), once from a thread of this
process and once from a separate, already-started process reading the buffers through
shared memory, while this process runs a fixed matmul loop. Prints the loop's speed as a
fraction of its speed with no write going on, for each, alternating, medians of rounds.

    python bench/bench_writer.py [--mb 576] [--rounds 5] [--dir /dev/shm]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from multiprocessing.connection import Connection

import crc32c
import torch

BLOCK = 1 << 20


def write_buffers(buffers: list[torch.Tensor], directory: str) -> None:
    for i, buf in enumerate(buffers):
        path = os.path.join(directory, f"part-{i}.bin")
        view = memoryview(buf.numpy()).cast("B")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for start in range(0, view.nbytes, BLOCK):
                block = view[start : start + BLOCK]
                crc32c.crc32c(block)
                os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(path)


def writer_process(conn: Connection, buffers: list[torch.Tensor], directory: str) -> None:
    torch.set_num_threads(1)
    while conn.recv():
        write_buffers(buffers, directory)
        conn.send(True)


def compute(iters: int) -> float:
    a = torch.randn(384, 384)
    t0 = time.perf_counter()
    for _ in range(iters):
        a = torch.tanh(a @ a)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=576, help="staged state, MiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default="/dev/shm")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = max(1, args.mb // 64)
    buffers = [torch.randn(64 << 18).share_memory_() for _ in range(n)]  # 64 MiB each
    directory = tempfile.mkdtemp(prefix="dckpt-bench-writer-", dir=args.dir)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=writer_process, args=(child, buffers, directory), daemon=True)
    proc.start()

    t = time.perf_counter()
    write_buffers(buffers, directory)
    write_s = time.perf_counter() - t
    iters = 50
    while compute(iters) < 1.5 * write_s:
        iters *= 2
    fractions: dict[str, list[float]] = {"thread": [], "process": []}
    for r in range(args.rounds):
        alone = compute(iters)
        for mode in ("thread", "process") if r % 2 == 0 else ("process", "thread"):
            if mode == "thread":
                th = threading.Thread(target=write_buffers, args=(buffers, directory))
                th.start()
                busy = compute(iters)
                th.join()
            else:
                parent.send(True)
                busy = compute(iters)
                parent.recv()
            fractions[mode].append(alone / busy)
    parent.send(False)
    proc.join(timeout=10)
    os.rmdir(directory)
    print(f"state {args.mb} MiB, write alone {write_s:.2f} s, compute loop {iters} x mm384")
    for mode, xs in fractions.items():
        print(
            f"  compute speed while a {mode:<7} writes: {statistics.median(xs):.2f} of no-write speed"
        )


if __name__ == "__main__":
    main()
