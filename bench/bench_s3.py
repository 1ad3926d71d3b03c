#!/usr/bin/env python
"""S3 benchmark: dckpt against torch DCP's fsspec writer/reader, over a local moto server.

An FSDP2 model (a stack of Linear layers) plus Adam after one training step, about
``--size-mb`` MB of state in all, on 2 gloo ranks on the CPU. The script starts moto's S3
server on 127.0.0.1 (a subprocess, by ``tools/moto_server.py``, the tests' launcher too)
and talks to it through s3fs, the real S3 protocol.
In ONE run the systems alternate (the starting one rotates each round) after a warm-up
round that is not counted and checks both restore the exact state; figures are medians
over ``--rounds`` rounds of the collective call's wall time (barrier, call, barrier).

  * save  ``dckpt.save(state, "s3://...")`` / ``dcp.save(get_state_dict(...),
          storage_writer=FsspecWriter("s3://..."))`` (DCP defaults: one thread per rank)
  * load  into a freshly built model+optimizer: ``dckpt.load`` / ``dcp.load`` with
          ``FsspecReader`` (+ ``get_state_dict``/``set_state_dict``, part of the call)

moto is a Python server sharing 2 cores with both ranks: it, not the network, bounds
throughput (about 100 MB/s each way for DCP here), so the default size is 300 MB rather
than the 1.2 GB of ``bench_core.py``, and the ratios say how much less server work and
waiting a client causes, not what real S3 would give.

    python bench/bench_s3.py                     # 300 MB, 3 rounds
    python bench/bench_s3.py --size-mb 1200 --rounds 3
    python bench/bench_s3.py --size-mb 60 --rounds 2   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
import torch.nn as nn

import dckpt
from tools.moto_server import AWS_ENV, AWS_ENV_UNSET, S3Server, moto_process

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _model import LAYERS, build, local_tensors, width_for
from _ranks import free_port, join_group, timed

BUCKET = "bench"
SYSTEMS = ("dckpt", "dcp")


# ----------------------------------------------------------------------------- systems


def save_dckpt(model: nn.Module, optim: Any, url: str, opts: dict[str, Any]) -> None:
    dckpt.save({"model": model, "optim": optim}, url, storage_options=opts)


def load_dckpt(model: nn.Module, optim: Any, url: str, opts: dict[str, Any]) -> None:
    dckpt.load({"model": model, "optim": optim}, url, storage_options=opts)


def save_dcp(model: nn.Module, optim: Any, url: str, opts: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, storage_writer=FsspecWriter(url, **opts))


def load_dcp(model: nn.Module, optim: Any, url: str, opts: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd}
    dcp.load(state, storage_reader=FsspecReader(url, **opts))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])


OPS: dict[str, tuple[Callable[..., None], Callable[..., None]]] = {
    "dckpt": (save_dckpt, load_dckpt),
    "dcp": (save_dcp, load_dcp),
}


# ----------------------------------------------------------------------------- ranks


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    join_group(rank, world, port)
    import s3fs
    from torch.distributed.device_mesh import init_device_mesh

    server = S3Server(args.endpoint, BUCKET)
    s3 = server.options
    mine = {**s3, "dckpt": {"part_size": args.part_mb << 20, "max_concurrency": args.concurrency}}
    options = {"dckpt": mine, "dcp": s3}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3)
    mesh = init_device_mesh("cpu", (world,))
    width = width_for(args.size_mb / 12)  # 12 bytes per parameter: fp32 + two Adam moments
    model, optim = build(width, mesh, trained=True)
    target, toptim = build(width, mesh, trained=False)
    ref = {k: v.clone() for k, v in local_tensors(model, optim).items()}
    nbytes = sum(v.numel() * v.element_size() for v in ref.values())
    times: dict[str, list[float]] = {f"{s}.{op}": [] for s in SYSTEMS for op in ("save", "load")}
    for rnd in range(args.rounds + 1):
        order = SYSTEMS[rnd % 2 :] + SYSTEMS[: rnd % 2]
        for system in order:
            save, load = OPS[system]
            url = server.url(f"{system}-{rnd}")
            t_save = timed(lambda: save(model, optim, url, options[system]))  # noqa: B023
            t_load = timed(lambda: load(target, toptim, url, options[system]))  # noqa: B023
            if rnd == 0:
                got = local_tensors(target, toptim)
                bad = [k for k in ref if not torch.equal(ref[k], got[k])]
                if bad:
                    raise SystemExit(f"{system} restored {len(bad)} tensors wrongly: {bad[:3]}")
                with torch.no_grad():
                    for v in got.values():
                        v.zero_()
            else:
                times[f"{system}.save"].append(t_save)
                times[f"{system}.load"].append(t_load)
            dist.barrier()
            if rank == 0:
                fs.rm(f"{BUCKET}/{system}-{rnd}", recursive=True)
            dist.barrier()
    total = [torch.tensor(nbytes)]
    dist.all_reduce(total[0])
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"times": times, "bytes": int(total[0]), "width": width}, f)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=300.0, help="total state (all ranks)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--part-mb", type=int, default=16, help="dckpt multipart part size")
    p.add_argument("--concurrency", type=int, default=16, help="dckpt requests in flight")
    p.add_argument("--json", default="", help="also write the measurements here")
    args = p.parse_args()
    # Dummy credentials; nothing may reach a real account or a metadata endpoint.
    os.environ.update(AWS_ENV)
    for k in AWS_ENV_UNSET:
        os.environ.pop(k, None)
    with moto_process() as (_proc, args.endpoint):
        S3Server(args.endpoint, BUCKET).create_bucket()
        port = free_port()
        out = os.path.join(tempfile.mkdtemp(prefix="dckpt-bench-s3-"), "result.json")
        import torch.multiprocessing as mp

        mp.spawn(rank_main, args=(args.world_size, port, args, out), nprocs=args.world_size)
        with open(out) as f:
            result = json.load(f)
    report(result, args)


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    times = result["times"]
    mb = result["bytes"] / 1e6
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"state {mb:.0f} MB on {args.world_size} ranks (width {result['width']}, {LAYERS} "
        f"layers), moto on 127.0.0.1, {args.rounds} rounds, medians"
    )
    print(
        f"{'':6} {'dckpt s':>9} {'DCP s':>9} {'dckpt MB/s':>11} {'DCP MB/s':>9} {'dckpt/DCP':>10}"
    )
    for op in ("save", "load"):
        d, c = med[f"dckpt.{op}"], med[f"dcp.{op}"]
        print(f"{op:6} {d:9.2f} {c:9.2f} {mb / d:11.1f} {mb / c:9.1f} {d / c:10.2f}")
    print("dckpt/DCP is a time ratio: below 1 means dckpt is faster")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "median": med, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
