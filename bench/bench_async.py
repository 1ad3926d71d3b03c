#!/usr/bin/env python
"""Async-save benchmark: dckpt.async_save against torch DCP async_save, in one run.

An FSDP2 model (a stack of Linear layers, about ``--params-m`` million parameters; the
one of ``bench_core.py``, from ``_model.build``) plus Adam after one training step, on 2
gloo ranks on the CPU (one compute thread per rank).
Systems alternate (the starting one rotates each round); every later-save figure is the
median over ``--rounds`` rounds after two warm-up rounds, taken as the max over ranks.

Figures
  * first blocking  wall time of the first async_save call of a process: each system in
                    its own fresh ranks (so none reuses memory another just freed), median
                    over ``--first-runs`` (3) launches each, the systems rotating; torch's
                    state-dict helpers, which both use, imported before
  * first, prepared the same for dckpt after ``dckpt.prepare_async_save`` (waited for)
  * fresh floor     a plain ``copy_`` of the local state into new, never-touched buffers,
                    in fresh ranks like the first saves: what any first save that
                    snapshots by copying pays at least
  * later blocking  the same for every later save (median), next to the floor: a plain
                    ``copy_`` of the rank's local state into preallocated buffers
  * compute         a fixed loop of matmuls run right after async_save returns, while
                    the write goes on; speed as a fraction of the same loop with no save
                    running (the loop is sized to outlast the slower system's write)
  * memory          VmRSS after each of 10 consecutive dckpt async saves (each waited
                    for); growth from save 2 to save 10
  * many tensors    later blocking time with ``--many-count`` (20k) one-element tensors
                    per rank instead of the model: per-tensor overhead (median of 3)
  * scale           coordination cost on ``--scale-ranks`` (8) gloo ranks of a save of
                    ``--scale-count`` (20k) one-element tensors per rank: first save and
                    repeated saves (plan caching), dckpt vs DCP (default planner, and
                    ``DefaultSavePlanner(enable_plan_caching=True)``)

DCP: ``torch.distributed.checkpoint.async_save(get_state_dict(...), checkpoint_id=...,
process_group=<a second gloo group>)``, torch defaults otherwise (thread executor,
default stager); its future is waited for before the next save. get_state_dict is part
of DCP's blocking time (it is part of the user's call).

    python bench/bench_async.py                           # 100M params, 5 rounds, /dev/shm
    python bench/bench_async.py --params-m 30 --rounds 3  # quicker
    python bench/bench_async.py --dir /var/tmp            # on disk
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

import dckpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _model import build, local_tensors, width_for
from _ranks import gather, rmtree_collective, run_on_ranks

MM = 384  # matmul size of the compute loop


# ----------------------------------------------------------------------------- helpers


def vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Compute:
    """A fixed amount of training-like work: ``iters`` matmuls of MM x MM."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.a = torch.randn(MM, MM, generator=g) / MM**0.5
        self.b = torch.randn(MM, MM, generator=g) / MM**0.5
        self.c = torch.empty(MM, MM)
        self.iters = 50

    def run(self) -> float:
        t0 = time.perf_counter()
        for _ in range(self.iters):
            torch.mm(self.a, self.b, out=self.c)
        return time.perf_counter() - t0

    def calibrate(self, seconds: float) -> None:
        self.iters = 200
        per = min(self.run() for _ in range(3)) / self.iters
        self.iters = max(50, int(seconds / per))


# ----------------------------------------------------------------------------- 2-rank phase


def bench(opts: dict[str, Any], run_dir: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model, optim = build(width_for(opts["params_m"]), mesh, trained=True)
    dcp_pg = dist.new_group(backend="gloo")  # DCP's background collectives go here
    tensors = list(local_tensors(model, optim).values())
    local_bytes = sum(t.numel() * t.element_size() for t in tensors)
    floor_bufs = [torch.empty_like(t) for t in tensors]
    for b, t in zip(floor_bufs, tensors, strict=False):
        b.copy_(t)  # touch: preallocated, as in a real staging pool
    compute = Compute()
    seq = [0]

    def new_path(tag: str) -> str:
        seq[0] += 1
        return os.path.join(run_dir, f"{tag}-{seq[0]}")

    # Each system: start an async save; return (blocking seconds, handle-like, path).
    def start_dckpt() -> tuple[float, Any, str]:
        path = new_path("dckpt")
        dist.barrier()
        t0 = time.perf_counter()
        h = dckpt.async_save({"model": model, "optimizer": optim}, path)
        return time.perf_counter() - t0, h.result, path

    def start_dcp() -> tuple[float, Any, str]:
        path = new_path("dcp")
        dist.barrier()
        t0 = time.perf_counter()
        msd, osd = get_state_dict(model, optim)
        fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=path, process_group=dcp_pg)
        block = time.perf_counter() - t0
        res: Any = getattr(fut, "upload_completion", fut)  # AsyncSaveResponse or Future
        return block, res.result, path

    starts = {"dckpt": start_dckpt, "dcp": start_dcp}
    R: dict[str, Any] = {
        "local_bytes": local_bytes,
        "block": {"dckpt": [], "dcp": []},
        "floor": [],
        "frac": {"dckpt": [], "dcp": []},
        "base": [],
        "total": {"dckpt": [], "dcp": []},
    }

    def log(msg: str) -> None:
        if rank == 0 and not opts["quiet"]:
            print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # ---- warm-up: the first saves (measured in fresh ranks by ``first``) and the second,
    # which sizes the compute loop
    for _warm in range(2):
        longest = 0.0
        for system in ("dckpt", "dcp"):
            t0 = time.perf_counter()
            block, wait, path = starts[system]()
            wait()
            longest = max(longest, max(gather(time.perf_counter() - t0)))
            rmtree_collective(path)
    compute.calibrate(max(0.3, min(60.0, longest * opts["compute_factor"])))
    iters = max(gather(compute.iters))
    compute.iters = iters
    R["compute_iters"] = iters
    log(f"warm-up done; compute loop {iters} x mm{MM} (~{longest * opts['compute_factor']:.2f} s)")

    # ---- measured rounds
    for rnd in range(opts["rounds"]):
        order = ["dckpt", "dcp"] if rnd % 2 == 0 else ["dcp", "dckpt"]
        # floor: copy_ of the local state into preallocated buffers
        dist.barrier()
        t0 = time.perf_counter()
        for b, t in zip(floor_bufs, tensors, strict=False):
            b.copy_(t)
        R["floor"].append(max(gather(time.perf_counter() - t0)))
        # baseline compute, nothing running
        dist.barrier()
        R["base"].append(max(gather(compute.run())))
        for system in order:
            t0 = time.perf_counter()
            block, wait, path = starts[system]()
            c = compute.run()
            wait()
            total = time.perf_counter() - t0
            b_all, c_all, t_all = zip(*gather((block, c, total)), strict=False)
            R["block"][system].append(max(b_all))
            R["frac"][system].append(min(R["base"][-1] / x for x in c_all))
            R["total"][system].append(max(t_all))
            rmtree_collective(path)
        log(
            f"round {rnd + 1}/{opts['rounds']}: "
            + ", ".join(
                f"{s} block {R['block'][s][-1]:.3f} s compute x{R['frac'][s][-1]:.2f}"
                for s in ("dckpt", "dcp")
            )
            + f", floor {R['floor'][-1]:.3f} s"
        )

    # ---- memory: 10 consecutive dckpt async saves
    series = []
    for _i in range(10):
        block, wait, path = starts["dckpt"]()
        wait()
        rmtree_collective(path)
        gc.collect()
        series.append(gather(vm_rss()))
    R["rss"] = [max(r) for r in series]
    R["rss_growth"] = max(series[9][r] - series[1][r] for r in range(world))
    log("memory series done")
    dckpt.wait()
    if opts["many_count"]:
        R["many"] = many_small(opts, run_dir, dcp_pg)
        log("many-small-tensors phase done")
    return R


def many_small(opts: dict[str, Any], run_dir: str, dcp_pg: Any) -> dict[str, list[float]]:
    """Blocking time of later async saves of ``--many-count`` one-element tensors per rank:
    there, per-tensor overhead, not the copy, is what training waits for."""
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    small = {f"r{rank}.t{i:05d}": torch.full((1,), float(i)) for i in range(opts["many_count"])}
    out: dict[str, list[float]] = {"dckpt": [], "dcp": []}
    for i in range(4):  # the first of each is a warm-up
        for system in ("dckpt", "dcp"):
            path = os.path.join(run_dir, f"many-{system}-{i}")
            dist.barrier()
            t0 = time.perf_counter()
            if system == "dckpt":
                h = dckpt.async_save({"small": small}, path)
                block = time.perf_counter() - t0
                h.result()
            else:
                fut = dcp.async_save({"small": small}, checkpoint_id=path, process_group=dcp_pg)
                block = time.perf_counter() - t0
                res: Any = getattr(fut, "upload_completion", fut)
                res.result()
            if i:
                out[system].append(max(gather(block)))
            rmtree_collective(path)
    return out


# ----------------------------------------------------------------------------- first saves


FIRST_KINDS = ("dckpt", "dckpt-prepared", "dcp", "copy")


def first_save(opts: dict[str, Any], run_dir: str) -> dict[str, float]:
    """One first save of a process, of one kind, in fresh ranks set up as in ``bench``.

    Each kind gets its own processes, so no system reuses memory another just freed and
    the order of the systems does not matter. ``dckpt-prepared`` calls
    ``prepare_async_save`` first and waits for it, so the reservation does not overlap
    the timing; ``copy`` times a plain ``copy_`` into new buffers instead of a save."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    kind = opts["first_kind"]
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model, optim = build(width_for(opts["params_m"]), mesh, trained=True)
    dcp_pg = dist.new_group(backend="gloo")
    tensors = list(local_tensors(model, optim).values())
    floor_bufs = [t.clone() for t in tensors]  # as in bench
    state = {"model": model, "optimizer": optim}
    path = os.path.join(run_dir, f"first-{kind}")
    out: dict[str, float] = {}
    if kind == "dckpt-prepared":
        t0 = time.perf_counter()
        dckpt.prepare_async_save(state)
        call = time.perf_counter() - t0
        dckpt.wait()
        out["prepare_call"] = max(gather(call))
        out["prepare_total"] = max(gather(time.perf_counter() - t0))
    dist.barrier()
    t0 = time.perf_counter()
    if kind == "copy":
        # The floor of a copy-based first save: copy_ into buffers never touched before.
        fresh = [torch.empty_like(t) for t in tensors]
        for f, t in zip(fresh, tensors, strict=True):
            f.copy_(t)
        out["block"] = out["total"] = max(gather(time.perf_counter() - t0))
        del floor_bufs, fresh
        return out
    if kind == "dcp":
        msd, osd = get_state_dict(model, optim)
        fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=path, process_group=dcp_pg)
        block = time.perf_counter() - t0
        res: Any = getattr(fut, "upload_completion", fut)  # AsyncSaveResponse or Future
        res.result()
    else:
        h = dckpt.async_save(state, path)
        block = time.perf_counter() - t0
        h.result()
    out["block"] = max(gather(block))
    out["total"] = max(gather(time.perf_counter() - t0))
    rmtree_collective(path)
    del floor_bufs
    return out


def firsts(opts: dict[str, Any], run_dir: str) -> dict[str, list[dict[str, float]]]:
    """``--first-runs`` launches of each kind, the kinds rotating from run to run."""
    out: dict[str, list[dict[str, float]]] = {k: [] for k in FIRST_KINDS}
    for run in range(opts["first_runs"]):
        for i in range(len(FIRST_KINDS)):
            kind = FIRST_KINDS[(run + i) % len(FIRST_KINDS)]
            r = launch("first", 2, {**opts, "first_kind": kind}, run_dir)
            out[kind].append(r)
            if not opts["quiet"]:
                print(
                    f"  [{time.strftime('%H:%M:%S')}] first save, {kind} "
                    f"(run {run + 1}/{opts['first_runs']}): blocking {r['block']:.3f} s, "
                    f"to commit {r['total']:.3f} s",
                    flush=True,
                )
    return out


# ----------------------------------------------------------------------------- scale phase


def scale(opts: dict[str, Any], run_dir: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner

    rank = dist.get_rank()
    small = {f"r{rank}.t{i:05d}": torch.full((1,), float(i)) for i in range(opts["scale_count"])}
    seq = [0]

    def one(fn: Any) -> float:
        seq[0] += 1
        path = os.path.join(run_dir, f"scale-{seq[0]}")
        dist.barrier()
        t0 = time.perf_counter()
        fn(path)
        dist.barrier()
        t = time.perf_counter() - t0
        rmtree_collective(path)
        return t

    systems = {
        "dckpt save": lambda p: dckpt.save({"small": small}, p),
        "dckpt async_save": lambda p: dckpt.async_save({"small": small}, p).result(),
        "DCP save": lambda p: dcp.save({"small": small}, checkpoint_id=p),
        "DCP save, plan caching": lambda p: dcp.save(
            {"small": small}, checkpoint_id=p, planner=DefaultSavePlanner(enable_plan_caching=True)
        ),
    }
    if opts["scale_dckpt_only"]:  # DCP's repeats take about a minute each here
        systems = {k: v for k, v in systems.items() if k.startswith("dckpt")}
    out: dict[str, Any] = {}
    for name, fn in systems.items():
        first = one(fn)
        rep = [one(fn) for _ in range(opts["scale_repeats"])]
        out[name] = {"first": first, "repeat": rep}
        if rank == 0 and not opts["quiet"]:
            print(
                f"  [{time.strftime('%H:%M:%S')}] scale {name}: first {first:.3f} s, "
                f"repeat {statistics.median(rep):.3f} s",
                flush=True,
            )
    return out


# ----------------------------------------------------------------------------- launch


def phase(mode: str, opts: dict[str, Any], run_dir: str) -> Any:
    """What each rank runs for one phase of the benchmark (in fresh processes)."""
    return {"bench": bench, "first": first_save, "scale": scale}[mode](opts, run_dir)


def launch(mode: str, world: int, opts: dict[str, Any], run_dir: str) -> Any:
    return run_on_ranks(world, mode, phase, mode, opts, run_dir)


# ----------------------------------------------------------------------------- report


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(res: dict[str, Any] | None, sc: dict[str, Any] | None, opts: dict[str, Any]) -> str:
    L: list[str] = []
    if res is not None:
        mb = res["local_bytes"] / 2**20
        L.append(
            f"== async save, 2 gloo ranks, {opts['params_m']:g}M params, local state "
            f"{mb:.0f} MiB/rank, {opts['rounds']} rounds, dir {opts['dir']} =="
        )
        L.append(
            f"  {'figure':<40}{'dckpt':>10}{'DCP':>10}{'floor':>10}   n   (s; median, max over ranks)"
        )
        b = res["block"]
        fs = res["firsts"]
        fb = {k: [r["block"] for r in v] for k, v in fs.items()}
        n1 = len(fb["dckpt"])
        L.append(
            f"  {'first async_save, blocking':<40}{med(fb['dckpt']):>10.3f}{med(fb['dcp']):>10.3f}"
            f"{'':>10}{n1:>4}   (fresh ranks per save)"
        )
        fresh = fb["copy"]
        mm1 = [f"{min(x):.3f}-{max(x):.3f}" for x in (fb["dckpt"], fb["dcp"], fresh)]
        L.append(
            f"  {'  first blocking, min-max':<40}dckpt {mm1[0]}, DCP {mm1[1]}, fresh floor {mm1[2]}"
        )
        L.append(
            f"  {'  floor: copy_ into fresh buffers':<40}{med(fresh):>10.3f}{'':>10}{'':>10}"
            f"{len(fresh):>4}   (never-touched memory: page faults included)"
        )
        tot = {k: [r["total"] for r in v] for k, v in fs.items()}
        L.append(
            f"  {'first async_save, to commit':<40}{med(tot['dckpt']):>10.3f}"
            f"{med(tot['dcp']):>10.3f}{'':>10}{n1:>4}"
        )
        pp = fs["dckpt-prepared"]
        L.append(
            f"  {'first, after prepare_async_save':<40}{med(fb['dckpt-prepared']):>10.3f}"
            f"{med(fb['dcp']):>10.3f}{'':>10}{len(pp):>4}   (the reservation took "
            f"{med([r['prepare_total'] for r in pp]):.3f} s in the background, "
            f"{med([r['prepare_call'] for r in pp]):.3f} s in the call)"
        )
        L.append(
            f"  {'later async_save, blocking':<40}{med(b['dckpt']):>10.3f}{med(b['dcp']):>10.3f}"
            f"{med(res['floor']):>10.3f}{len(b['dckpt']):>4}"
        )
        mm = [f"{min(x):.3f}-{max(x):.3f}" for x in (b["dckpt"], b["dcp"], res["floor"])]
        L.append(f"  {'  later blocking, min-max':<40}dckpt {mm[0]}, DCP {mm[1]}, floor {mm[2]}")
        L.append(
            f"  {'later, call to commit (with compute)':<40}{med(res['total']['dckpt']):>10.3f}"
            f"{med(res['total']['dcp']):>10.3f}"
        )
        fr = res["frac"]
        L.append(
            f"  {'compute speed during the write':<40}{med(fr['dckpt']):>10.2f}{med(fr['dcp']):>10.2f}"
            f"{'':>10}{len(fr['dckpt']):>4}   (x of no-save speed, "
            f"{res['compute_iters']} mm{MM}, {med(res['base']):.2f} s alone)"
        )
        rss = res["rss"]
        L.append(
            "  VmRSS after each of 10 dckpt async saves (MiB, max over ranks): "
            + " ".join(f"{r / 2**20:.0f}" for r in rss)
        )
        growth = res["rss_growth"]
        L.append(
            f"  VmRSS growth save 2 -> 10: {growth / 2**20:+.1f} MiB "
            f"({100 * growth / res['local_bytes']:+.2f}% of the local state)"
        )
        many = res.get("many")
        if many:
            L.append(
                f"  {'later blocking, ' + str(opts['many_count']) + ' tiny tensors/rank':<40}"
                f"{med(many['dckpt']):>10.3f}{med(many['dcp']):>10.3f}{'':>10}"
                f"{len(many['dckpt']):>4}   (dckpt {med(many['dcp']) / med(many['dckpt']):.1f}x "
                "faster)"
            )
        L.append("")
        L.append("  targets (informative)")
        r1 = med(fb["dckpt"]) / med(fb["dcp"])
        L.append(f"    first blocking  dckpt/DCP      {r1:6.2f}x  (<= 0.50x)  {verdict(r1 <= 0.5)}")
        r1f = med(fresh) / med(fb["dcp"])
        L.append(f"      (the fresh-buffer copy_ alone is {r1f:.2f}x DCP's first)")
        r1p = med(fb["dckpt-prepared"]) / med(fb["dcp"])
        L.append(
            f"    first blocking, prepared, dckpt/DCP {r1p:6.2f}x  (<= 0.50x)  {verdict(r1p <= 0.5)}"
        )
        r2 = med(b["dckpt"]) / med(b["dcp"])
        L.append(f"    later blocking  dckpt/DCP      {r2:6.2f}x  (<= 1.00x)  {verdict(r2 <= 1.0)}")
        r3 = med(b["dckpt"]) / med(res["floor"])
        L.append(f"    later blocking  dckpt/floor    {r3:6.2f}x  (<= 1.50x)  {verdict(r3 <= 1.5)}")
        d, c = med(fr["dckpt"]), med(fr["dcp"])
        L.append(
            f"    compute speed   dckpt vs DCP   {d:.2f} vs {c:.2f}  (dckpt >= DCP)  {verdict(d >= c)}"
        )
        tol = max(16 * 2**20, 0.02 * res["local_bytes"])
        L.append(
            f"    VmRSS flat      growth {growth / 2**20:+.1f} MiB (<= {tol / 2**20:.0f} MiB: "
            f"max(16 MiB, 2% of state))  {verdict(growth <= tol)}"
        )
    if sc is not None:
        L.append("")
        L.append(
            f"== scale: coordination cost, {opts['scale_ranks']} gloo ranks x "
            f"{opts['scale_count']} one-element tensors/rank (call + barrier, s) =="
        )
        L.append(f"  {'system':<28}{'first':>9}{'repeat':>9}{'min':>8}{'max':>8}  n  first/repeat")
        for name, v in sc.items():
            rep = v["repeat"]
            L.append(
                f"  {name:<28}{v['first']:>9.3f}{med(rep):>9.3f}{min(rep):>8.3f}{max(rep):>8.3f}"
                f"{len(rep):>3}  {v['first'] / med(rep):6.1f}x"
            )
        dk, dc = sc.get("dckpt save"), sc.get("DCP save")
        if dk and dc:
            best = min(med(sc[k]["repeat"]) for k in sc if k.startswith("DCP"))
            L.append(
                f"  dckpt save vs DCP save: first {dc['first'] / dk['first']:.1f}x faster, "
                f"repeat {med(dc['repeat']) / med(dk['repeat']):.1f}x faster "
                f"({best / med(dk['repeat']):.1f}x vs DCP's best repeat)"
            )
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/dev/shm", help="where checkpoints go (default /dev/shm)")
    ap.add_argument("--params-m", type=float, default=100.0, help="model size, millions of params")
    ap.add_argument(
        "--rounds", type=int, default=5, help="measured rounds after two warm-up rounds"
    )
    ap.add_argument(
        "--compute-factor",
        type=float,
        default=1.5,
        help="compute loop length as a multiple of the slower warm-up save",
    )
    ap.add_argument(
        "--first-runs", type=int, default=3, help="fresh-rank launches per kind of first save"
    )
    ap.add_argument(
        "--many-count",
        type=int,
        default=20000,
        help="one-element tensors per rank for the many-small-tensors figure (0: skip)",
    )
    ap.add_argument("--scale-ranks", type=int, default=8)
    ap.add_argument("--scale-count", type=int, default=20000, help="tiny tensors per rank")
    ap.add_argument("--scale-repeats", type=int, default=3)
    ap.add_argument("--no-scale", action="store_true", help="skip the 8-rank scale phase")
    ap.add_argument("--only-scale", action="store_true", help="run only the scale phase")
    ap.add_argument("--scale-dckpt-only", action="store_true", help="the scale phase without DCP")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--quiet", action="store_true")
    opts = vars(ap.parse_args())
    run_dir = tempfile.mkdtemp(prefix="dckpt-bench-async-", dir=opts["dir"])
    res = sc = None
    try:
        if not opts["only_scale"]:
            res = launch("bench", 2, opts, run_dir)
            res["firsts"] = firsts(opts, run_dir)
            print(report(res, None, opts), flush=True)  # before the (long) scale phase
            dump(opts, res, sc)
        if not opts["no_scale"]:
            sc = launch("scale", opts["scale_ranks"], opts, run_dir)
            print(report(None, sc, opts), flush=True)
            dump(opts, res, sc)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def dump(opts: dict[str, Any], res: Any, sc: Any) -> None:
    if opts["json"]:
        with open(opts["json"], "w") as f:
            json.dump({"opts": opts, "bench": res, "scale": sc}, f, indent=1)


if __name__ == "__main__":
    main()
