#!/usr/bin/env python
"""GPU benchmark: dckpt against torch DCP for a state held on a CUDA device, in one process.

The model of ``bench_core.py`` (a stack of ``Linear`` layers, about ``--params-m`` million
parameters, no sharding) and Adam after one step, on ``--device`` (cuda). Systems
alternate, the starting one rotating each round; figures are medians over ``--rounds``
rounds after one warm-up round.

Figures
  * blocked      training time an async save takes from the caller: until the state may
                 change again. dckpt: ``async_save`` returning (it stages through pinned
                 buffers on a side stream and waits for them). DCP: ``get_state_dict`` +
                 ``async_save`` + its staging future, with its default stager and with
                 ``DefaultStager(StagingOptions(use_pinned_memory=True,
                 use_shared_memory=False))``. Floor: one device-to-host copy of every
                 tensor into preallocated pinned memory (``copy_(non_blocking=True)``,
                 then a synchronize).
  * compute      a fixed loop of bf16 matmuls on the device right after the save returns,
                 while the write goes on, as a fraction of its speed with nothing running
  * save, load   ``dckpt.save`` / ``dcp.save`` of the same state (device to file), and
                 ``dckpt.load`` / ``dcp.load`` + ``set_state_dict`` back into it

    python bench/bench_gpu.py                              # 500M params (6 GB), 3 rounds
    python bench/bench_gpu.py --params-m 2000 --rounds 5   # 24 GB of state
    python bench/bench_gpu.py --device cpu --params-m 5    # the script's logic, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dckpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _model import LAYERS, Stack, local_tensors, width_for

SYSTEMS = ("dckpt", "dcp", "dcp-pinned")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.device, self.dir = args.device, tempfile.mkdtemp(prefix="bench-gpu-", dir=args.dir)
        torch.manual_seed(0)
        width = width_for(args.params_m)
        self.model = Stack(width, LAYERS).to(self.device)
        self.optim = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        x = torch.randn(8, width, device=self.device)
        self.model(x).square().mean().backward()
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        self.state = {"model": self.model, "optimizer": self.optim}
        self.tensors = list(local_tensors(self.model, self.optim).values())
        self.nbytes = sum(t.nbytes for t in self.tensors)
        pin = self.device.startswith("cuda")
        self.floor_bufs = [
            torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in self.tensors
        ]
        self.pinned_stager: Any = None
        if pin:
            try:  # torch 2.9 and later
                from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
            except ImportError:
                print("  (this torch has no DefaultStager: DCP's pinned staging is skipped)")
            else:
                options = StagingOptions(use_pinned_memory=True, use_shared_memory=False)
                self.pinned_stager = DefaultStager(options)
        n = 4096 if pin else 256
        self.a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        self.c = torch.empty_like(self.a)
        self.iters = 10
        self.seq = 0

    def path(self, tag: str) -> str:
        self.seq += 1
        return os.path.join(self.dir, f"{tag}-{self.seq}")

    def floor(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for b, t in zip(self.floor_bufs, self.tensors, strict=True):
            b.copy_(t, non_blocking=True)
        sync(self.device)
        return time.perf_counter() - t0

    def compute(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(self.iters):
            torch.mm(self.a, self.a, out=self.c)
        sync(self.device)
        return time.perf_counter() - t0

    def dcp_state(self) -> dict[str, Any]:
        """What DCP saves and loads: the model's and Adam's state dicts (torch's helpers)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optim)
        return {"model": msd, "optim": osd}

    def start(self, system: str) -> tuple[float, Callable[[], Any], str]:
        """Start an async save: (seconds the caller was blocked, wait for it, its path)."""
        path = self.path(system)
        sync(self.device)
        t0 = time.perf_counter()
        if system == "dckpt":
            handle = dckpt.async_save(self.state, path)
            return time.perf_counter() - t0, handle.result, path
        import torch.distributed.checkpoint as dcp

        stager = self.pinned_stager if system == "dcp-pinned" else None
        out = dcp.async_save(self.dcp_state(), checkpoint_id=path, async_stager=stager)
        staged = getattr(out, "staging_completion", None)
        if staged is not None:
            staged.result()  # the state may change only once DCP has its copy
        blocked = time.perf_counter() - t0
        return blocked, getattr(out, "upload_completion", out).result, path

    def save_load(self, system: str) -> tuple[float, float]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        path = self.path(f"sync-{system}")
        sync(self.device)
        t0 = time.perf_counter()
        if system == "dckpt":
            dckpt.save(self.state, path)
        else:
            dcp.save(self.dcp_state(), checkpoint_id=path)
        saved = time.perf_counter() - t0
        sync(self.device)
        t0 = time.perf_counter()
        if system == "dckpt":
            dckpt.load(self.state, path)
        else:
            sd = self.dcp_state()
            dcp.load(sd, checkpoint_id=path)
            set_state_dict(
                self.model, self.optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"]
            )
        sync(self.device)
        loaded = time.perf_counter() - t0
        shutil.rmtree(path, ignore_errors=True)
        return saved, loaded


def run(args: argparse.Namespace) -> dict[str, Any]:
    b = Bench(args)
    systems = [s for s in SYSTEMS if s != "dcp-pinned" or b.pinned_stager is not None]
    res: dict[str, Any] = {"bytes": b.nbytes, "floor": [], "base": []}
    for key in ("blocked", "frac", "save", "load"):
        res[key] = {s: [] for s in systems}
    # Warm-up: first saves (buffers, plans, imports) and the compute loop's length.
    longest = 0.0
    for system in systems:
        t0 = time.perf_counter()
        _, wait, path = b.start(system)
        wait()
        longest = max(longest, time.perf_counter() - t0)
        shutil.rmtree(path, ignore_errors=True)
    per = b.compute() / b.iters
    b.iters = max(10, int(1.5 * longest / per))
    for rnd in range(args.rounds):
        order = systems[rnd % len(systems) :] + systems[: rnd % len(systems)]
        res["floor"].append(b.floor())
        res["base"].append(b.compute())
        for system in order:
            blocked, wait, path = b.start(system)
            c = b.compute()
            wait()
            shutil.rmtree(path, ignore_errors=True)
            res["blocked"][system].append(blocked)
            res["frac"][system].append(res["base"][-1] / c)
        for system in [s for s in order if s != "dcp-pinned"]:
            saved, loaded = b.save_load(system)
            res["save"][system].append(saved)
            res["load"][system].append(loaded)
        if not args.quiet:
            print(
                f"  round {rnd + 1}/{args.rounds}: floor {res['floor'][-1]:.3f} s, "
                + ", ".join(f"{s} blocked {res['blocked'][s][-1]:.3f} s" for s in systems),
                flush=True,
            )
    shutil.rmtree(b.dir, ignore_errors=True)
    return res


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    med = statistics.median
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    floor = med(res["floor"])
    lines = [
        f"== {args.params_m:g}M params + Adam: {res['bytes'] / 1e9:.2f} GB on {args.device} "
        f"({name}), torch {torch.__version__}, files under {args.dir}; medians of "
        f"{args.rounds} rounds ==",
        f"  floor: device-to-host copy into pinned memory  {floor:.3f} s "
        f"({res['bytes'] / floor / 1e9:.1f} GB/s)",
        "  training blocked by an async save, and compute speed while it writes:",
    ]
    for s, xs in res["blocked"].items():
        lines.append(
            f"    {s:<11} {med(xs):.3f} s = {med(xs) / floor:.2f}x the floor; "
            f"compute x{med(res['frac'][s]):.2f}"
        )
    d = med(res["blocked"]["dckpt"])
    for s in res["blocked"]:
        if s != "dckpt":
            lines.append(f"  dckpt blocks {med(res['blocked'][s]) / d:.2f}x less than {s}")
    for what in ("save", "load"):
        a, c = med(res[what]["dckpt"]), med(res[what]["dcp"])
        lines.append(f"  {what}: dckpt {a:.3f} s, DCP {c:.3f} s: dckpt {c / a:.2f}x faster")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--params-m", type=float, default=500.0, help="millions of parameters")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds after a warm-up")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a logic check)")
    p.add_argument("--dir", default="/dev/shm", help="where checkpoints go")
    p.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")
    p.add_argument("--quiet", action="store_true", help="no per-round lines")
    args = p.parse_args()
    # DCP says, each call, that it runs without a process group: as intended here
    warnings.filterwarnings("ignore", message=".*assuming the intent is to")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device here (use --device cpu to check the script)")
    res = run(args)
    print(report(res, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **res}, f, indent=1)


if __name__ == "__main__":
    main()
