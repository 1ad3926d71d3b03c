#!/usr/bin/env python
"""Tiered-checkpoint benchmark: node-local saves with replicas, and recovery from a lost node.

``--world-size`` (4) gloo ranks on the CPU form simulated nodes of ``--ranks-per-node`` (2)
ranks (``node_of = rank // ranks_per_node``), each node with its own local directory under
``--local-dir`` (/dev/shm). The state is the one of ``bench_core.py``: an FSDP2 model (24
Linear layers, about ``--params-m`` million parameters) plus Adam after one training step,
about 1.2 GB at 100M. The durable tier is moto's S3 server on 127.0.0.1 (started here, by
``tools/moto_server.py``). Managers: ``CheckpointManager("s3://...", local_dir=<node dir>,
replicas=1, persist_every=--persist-every, keep_local=--keep-local, async_save=True,
node_of=...)``.

Figures (one run; systems alternate, the starting one rotating each round; medians over
rounds; a time is the max over ranks):

  * blocked        training time blocked by one tiered ``save`` (the previous save waited
                   for first, so this is the save's own cost), against one ``copy_`` of the
                   rank's local state into preallocated host memory; wall time, and the
                   process's CPU time (``time.process_time``, steadier on a shared machine)
  * background     from ``save`` returning to ``wait`` returning: local write, replication,
                   commit, and on every ``--persist-every``-th step the persist to S3
  * recovery       node 1's local directory wiped, fresh processes, manager built, ``load``:
                   the tiered manager (node 1's shards come from node 0's replicas) against
                   a plain manager loading the same step from S3 (the step the tiers
                   persisted; ``--s3-baseline plain``: the same state saved there by a
                   plain manager), and from a durable copy
                   on ``--disk-dir`` (/var/tmp) read with a cold page cache (``sync; echo 3 >
                   /proc/sys/vm/drop_caches`` right before; ``posix_fadvise(DONTNEED)`` of
                   each file when that is not allowed). Also the restart-to-loaded time:
                   from launching the processes to the state loaded; and each rank's CPU
                   time (``time.process_time``, every thread), in all and, for the
                   tiered recovery, per step of the tier engine (``TIMED``)
  * bytes per save local files written, replica bytes sent, and the durable step's bytes
                   divided by ``--persist-every``
  * memory         steady state per node: its local tier's bytes on disk (``keep_local``
                   steps of its own and its replicated shards) plus the RSS of its ranks

    python bench/bench_tiers.py                          # 100M params (1.2 GB), 5 + 3 rounds
    python bench/bench_tiers.py --params-m 10 --rounds 2 --recover-rounds 1   # quick check
    python bench/bench_tiers.py --only-save --rounds 7   # the save figures only (no recovery)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
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
from tools.moto_server import AWS_ENV, AWS_ENV_UNSET, S3Server, moto_process

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _model import LAYERS, build, local_tensors, width_for
from _ranks import gather, run_on_ranks

BUCKET = "bench-tiers"
SYSTEMS = ("tiered", "s3", "disk")
NAMES = {
    "tiered": "tiered: local tier + replicas",
    "s3": "durable tier on S3 (moto)",
    "disk": "durable copy on disk, cold cache",
}
_DATA_FILE = re.compile(r"^r(\d+)(?:-[os]?\d+\.bin|\.tab)$")  # data, shards, tables


# ----------------------------------------------------------------------------- helpers


def vm_stat(field: str = "VmRSS") -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def node_of_for(per_node: int) -> Any:
    def node_of(rank: int) -> int:
        return rank // per_node

    return node_of


def tier_manager(opts: dict[str, Any], rank: int) -> dckpt.CheckpointManager:
    per_node = opts["ranks_per_node"]
    return dckpt.CheckpointManager(
        opts["s3_url"],
        storage_options=opts["s3_options"],
        local_dir=node_dir(opts, rank // per_node),
        node_of=node_of_for(per_node),
        replicas=1,
        persist_every=opts["persist_every"],
        keep_local=opts["keep_local"],
        keep_last=2,
        async_save=True,
        timeout=opts["timeout"],
    )


def plain_s3(opts: dict[str, Any]) -> dckpt.CheckpointManager:
    """The S3 baseline: the tiered manager's root (its persisted steps), or with
    ``--s3-baseline plain`` a prefix where a plain manager saved the same step."""
    url = opts["s3_url"] + ("-plain" if opts["s3_baseline"] == "plain" else "")
    return dckpt.CheckpointManager(url, storage_options=opts["s3_options"], timeout=opts["timeout"])


def node_dir(opts: dict[str, Any], node: int) -> str:
    return os.path.join(opts["run_local"], f"node{node}")


def step_of(name: str) -> int | None:
    if not name.startswith("step-"):
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


def tree_bytes(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def step_bytes(opts: dict[str, Any], node: int, step: int) -> dict[str, int]:
    """One step of a node's local tier: bytes of its own ranks' files, of the files it
    holds for other nodes' ranks, and the rest (manifest)."""
    out = {"own": 0, "replica": 0, "other": 0}
    root = node_dir(opts, node)
    names = [n for n in os.listdir(root) if step_of(n) == step] if os.path.isdir(root) else []
    for name in names:
        for dirpath, _dirs, files in os.walk(os.path.join(root, name)):
            for f in files:
                size = os.lstat(os.path.join(dirpath, f)).st_size
                m = _DATA_FILE.match(f)
                if m is None:
                    out["other"] += size
                elif int(m.group(1)) // opts["ranks_per_node"] == node:
                    out["own"] += size
                else:
                    out["replica"] += size
    return out


def evict_cache(path: str) -> str:
    """Make the next read of ``path`` come from the disk; returns how it was done."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        pass
    # Not root (or a read-only /proc/sys): evict the checkpoint's own pages instead.
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "fadvise"


# ----------------------------------------------------------------------------- save phase


def save_phase(opts: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model, optim = build(width_for(opts["params_m"]), mesh, trained=True)
    tensors = list(local_tensors(model, optim).values())
    floor_bufs = [torch.empty_like(t) for t in tensors]
    for b, t in zip(floor_bufs, tensors, strict=True):
        b.copy_(t)  # touched: preallocated, as a real staging pool is
    mgr = tier_manager(opts, rank)
    state: dict[str, Any] = {"model": model, "optimizer": optim, "step": 0}
    R: dict[str, Any] = {
        "blocked": {"tiered": [], "floor": []},
        "blocked_cpu": {"tiered": [], "floor": []},
        "background": [],
    }

    def tiered() -> None:
        state["step"] += 1
        mgr.save(state["step"], state)

    def floor() -> None:
        for b, t in zip(floor_bufs, tensors, strict=True):
            b.copy_(t)

    def one(system: str) -> tuple[float, float, float]:
        mgr.wait()  # nothing of the previous save (or persist) runs in the background now
        dist.barrier()
        c0, t0 = time.process_time(), time.perf_counter()
        (tiered if system == "tiered" else floor)()
        blocked, cpu = time.perf_counter() - t0, time.process_time() - c0
        t1 = time.perf_counter()
        mgr.wait()
        return blocked, time.perf_counter() - t1, cpu

    for _warm in range(2):  # the first saves reserve staging memory and plan: not counted
        one("tiered")
    for rnd in range(opts["rounds"]):
        order = ("tiered", "floor") if rnd % 2 == 0 else ("floor", "tiered")
        for system in order:
            blocked, background, cpu = (max(x) for x in zip(*gather(one(system)), strict=True))
            R["blocked"][system].append(blocked)
            R["blocked_cpu"][system].append(cpu)
            if system == "tiered":
                R["background"].append((state["step"], background))
        if rank == 0 and not opts["quiet"]:
            print(
                f"  save round {rnd + 1}/{opts['rounds']}: tiered blocked "
                f"{R['blocked']['tiered'][-1]:.3f} s, copy_ {R['blocked']['floor'][-1]:.3f} s, "
                f"background {R['background'][-1][1]:.3f} s",
                flush=True,
            )
    R["local_bytes"] = gather(sum(t.numel() * t.element_size() for t in tensors))
    if opts["only_save"]:
        mgr.wait()
        R["ok"] = all(gather(True))
        return R
    while state["step"] % opts["persist_every"]:  # end on a step that reached S3 too
        one("tiered")
    mgr.wait()
    R["final_step"] = state["step"]
    R.update(steady_memory(opts, rank, state["step"]))
    # The same step, durably on a local disk, for the cold-cache recovery figure.
    t0 = time.perf_counter()
    dckpt.CheckpointManager(opts["disk_root"], timeout=opts["timeout"]).save(state["step"], state)
    R["disk_save"] = max(gather(time.perf_counter() - t0))
    if opts["s3_baseline"] == "plain":
        t0 = time.perf_counter()
        plain_s3(opts).save(state["step"], state)
        R["plain_s3_save"] = max(gather(time.perf_counter() - t0))
    R["ok"] = all(gather(True))
    return R


def steady_memory(opts: dict[str, Any], rank: int, step: int) -> dict[str, Any]:
    """Per node: its local tier's bytes and the RSS of its ranks, after the last save."""
    per_node = opts["ranks_per_node"]
    rss = gather(vm_stat("VmRSS"))
    nodes = dist.get_world_size() // per_node
    out: dict[str, Any] = {"rss": rss, "hwm": gather(vm_stat("VmHWM"))}
    if rank == 0:
        out["tier_bytes"] = [tree_bytes(node_dir(opts, n)) for n in range(nodes)]
        out["step_bytes"] = [step_bytes(opts, n, step) for n in range(nodes)]
    return out


# ----------------------------------------------------------------------------- recovery

#: The tier engine's recovery steps timed in the tiered recovery: (module, attribute or
#: "Class.method", label).
TIMED = (
    ("dckpt._manager", "open_storage", "open the root"),
    ("dckpt.tiers._tiered", "discover", "node map"),
    ("dckpt.tiers._tiered", "_refuse_unwritable", "probe"),
    ("dckpt.tiers._tiered", "_new_group", "gloo group"),
    ("dckpt.tiers._recover", "_inventory", "inventory"),
    ("dckpt.tiers._recover", "_verify", "verify copies"),
    ("dckpt.tiers._recover", "_fetch", "fetch"),
    ("dckpt.tiers._recover", "_Rounds.fetched", "wait for the durable listing"),
    ("dckpt.tiers._tiered", "recover", "recover (all)"),
    ("dckpt._loadcore", "_prepare", "load: plan"),
    ("dckpt._loadcore", "_read", "load: read"),
    ("dckpt.tiers._tiered", "run_load", "load"),
    ("dckpt.tiers._tiered", "newer_durable", "durable tier newer?"),
)


def time_steps() -> dict[str, list[float]]:
    """Wrap the functions of ``TIMED`` in this process; the dict fills in as they run:
    label -> [wall seconds, CPU seconds of the whole process (every thread)]."""
    import importlib

    spent: dict[str, list[float]] = {}
    for module, path, label in TIMED:
        mod: Any = importlib.import_module(module)
        *owner, attr = path.split(".")  # "Class.method" wraps a method
        for name in owner:
            mod = getattr(mod, name, None)
        fn = getattr(mod, attr, None)
        if fn is None:
            continue

        def timed(*a: Any, _fn: Any = fn, _label: str = label, **kw: Any) -> Any:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return _fn(*a, **kw)
            finally:
                got = spent.setdefault(_label, [0.0, 0.0])
                got[0] += time.perf_counter() - t0
                got[1] += time.process_time() - c0

        setattr(mod, attr, timed)
    return spent


def recover_phase(opts: dict[str, Any], system: str, verify: bool) -> dict[str, Any]:
    """A restarted job: fresh processes, a fresh model and optimizer, a manager, one load."""
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    width = width_for(opts["params_m"])
    model, optim = build(width, mesh, trained=False)
    state: dict[str, Any] = {"model": model, "optimizer": optim, "step": -1}
    evicted = ""
    spent = time_steps() if system == "tiered" else {}
    dist.barrier()
    if system == "disk" and rank == 0:
        evicted = evict_cache(opts["disk_root"])
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    if system == "tiered":
        mgr = tier_manager(opts, rank)
    elif system == "s3":
        mgr = plain_s3(opts)
    else:
        mgr = dckpt.CheckpointManager(opts["disk_root"], timeout=opts["timeout"])
    built = time.perf_counter() - t0  # the tiered manager's is collective: node map, group
    step = mgr.load(state)
    dist.barrier()
    took = time.perf_counter() - t0
    cpu = time.process_time() - c0
    loaded_at = time.time()
    mgr.wait()
    ranks = gather(spent)
    bad = -1
    if verify:  # the state built and trained exactly as the saving run did
        ref_model, ref_optim = build(width, mesh, trained=True)
        ref, got = local_tensors(ref_model, ref_optim), local_tensors(model, optim)
        bad = sum(not torch.equal(ref[k], got[k]) for k in ref) + len(ref.keys() ^ got.keys())
    return {
        "time": max(gather(took)),
        "construct": max(gather(built)),
        "loaded_at": max(gather(loaded_at)),
        "steps": gather(step),
        "bad": max(gather(bad)),
        "evicted": evicted,
        "steps_s": {k: max(d[k][0] for d in ranks if k in d) for k in _labels(ranks)},
        "steps_cpu": {k: max(d[k][1] for d in ranks if k in d) for k in _labels(ranks)},
        "cpu": gather(cpu),
        "per_rank": ranks,
    }


def _labels(per_rank: list[dict[str, list[float]]]) -> list[str]:
    """The timed labels any rank ran, in ``TIMED``'s order."""
    return [label for _m, _a, label in TIMED if any(label in d for d in per_rank)]


def phase(mode: str, opts: dict[str, Any], system: str = "", verify: bool = False) -> Any:
    """What each rank runs for one phase (in fresh processes)."""
    if mode == "save":
        return save_phase(opts)
    return recover_phase(opts, system, verify)


def recover_rounds(opts: dict[str, Any], final_step: int) -> dict[str, Any]:
    """Each round: every system in fresh processes, node 1's local directory wiped before
    the tiered one, the order rotating; round 0 also checks the state bit for bit."""
    times: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    construct: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    restart: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    breakdown: list[dict[str, float]] = []
    breakdown_cpu: list[dict[str, float]] = []
    cpu: dict[str, list[list[float]]] = {s: [] for s in SYSTEMS}  # per round, per rank
    evicted = ""
    for rnd in range(opts["recover_rounds"]):
        order = SYSTEMS[rnd % 3 :] + SYSTEMS[: rnd % 3]
        for system in order:
            if system == "tiered":
                shutil.rmtree(node_dir(opts, 1), ignore_errors=True)  # node 1 is lost
            launched = time.time()
            r = run_on_ranks(
                opts["world_size"], f"recover-{system}", phase, "recover", opts, system, rnd == 0
            )
            if set(r["steps"]) != {final_step} or r["bad"] > 0:
                raise SystemExit(
                    f"{system} recovery loaded steps {r['steps']} (expected {final_step}), "
                    f"{r['bad']} tensors differ from the saved state"
                )
            times[system].append(r["time"])
            construct[system].append(r["construct"])
            restart[system].append(r["loaded_at"] - launched)
            evicted = r["evicted"] or evicted
            cpu[system].append(r["cpu"])
            if system == "tiered":
                breakdown.append(r["steps_s"])
                breakdown_cpu.append(r["steps_cpu"])
            if not opts["quiet"]:
                print(
                    f"  recovery round {rnd + 1}/{opts['recover_rounds']} {system}: "
                    f"manager + load {r['time']:.2f} s (manager {r['construct']:.2f} s), "
                    f"restart to loaded {restart[system][-1]:.1f} s, CPU per rank "
                    f"{' '.join(f'{c:.2f}' for c in r['cpu'])} s",
                    flush=True,
                )
    return {
        "time": times,
        "construct": construct,
        "restart": restart,
        "evicted": evicted,
        "breakdown": breakdown,
        "breakdown_cpu": breakdown_cpu,
        "cpu": cpu,
    }


# ----------------------------------------------------------------------------- report


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def background(res: dict[str, Any], opts: dict[str, Any], persisted: bool) -> str:
    k = opts["persist_every"]
    xs = [t for step, t in res["background"] if (step % k == 0) == persisted]
    return f"{med(xs):.2f} s, {max(xs):.2f} s" if xs else "-"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(
    res: dict[str, Any], rec: dict[str, Any], durable_bytes: int, opts: dict[str, Any]
) -> str:
    per_node, world = opts["ranks_per_node"], opts["world_size"]
    state_bytes = sum(res["local_bytes"])
    gb = 1e9
    L = [
        f"state {state_bytes / gb:.2f} GB on {world} ranks as {world // per_node} nodes "
        f"({LAYERS} layers, {opts['params_m']:g}M params + Adam); local tier under "
        f"{opts['local_dir']}, durable tier moto S3 (S3 baseline: {opts['s3_baseline']}), "
        f"cold copy under {opts['disk_dir']}; "
        f"persist_every={opts['persist_every']} keep_local={opts['keep_local']} replicas=1",
        f"load average {res['loadavg'][0]:.1f} before, {res['loadavg'][1]:.1f} after",
        "",
        f"== training blocked per save (median of {opts['rounds']} rounds, max over ranks) ==",
    ]
    L += blocked_report(res, opts)
    L += [
        f"== recovery after losing node 1 (fresh processes; manager + load; median of "
        f"{opts['recover_rounds']} rounds) ==",
        f"  {'system':<36}{'manager + load s':>17}{'of which manager':>17}{'restart-to-loaded s':>21}",
    ]
    t = {s: med(rec["time"][s]) for s in SYSTEMS}
    for s in SYSTEMS:
        L.append(
            f"  {NAMES[s]:<36}{t[s]:17.2f}{med(rec['construct'][s]):17.2f}"
            f"{med(rec['restart'][s]):21.1f}"
        )
    how = {
        "drop_caches": "sync; echo 3 > /proc/sys/vm/drop_caches",
        "fadvise": ("drop_caches NOT possible here: posix_fadvise(DONTNEED) of each file instead"),
    }
    steps = {k: med([b.get(k, 0.0) for b in rec["breakdown"]]) for k in rec["breakdown"][0]}
    L.append(
        "  tiered, by step (max over ranks, median of rounds): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in steps.items())
    )
    cpu_steps = {
        k: med([b.get(k, 0.0) for b in rec["breakdown_cpu"]]) for k in rec["breakdown_cpu"][0]
    }
    L.append(
        "  tiered, CPU by step (process time of the rank's every thread, max over ranks, "
        "median): " + ", ".join(f"{k} {v:.2f} s" for k, v in cpu_steps.items())
    )
    L.append(
        "  CPU of manager + load per rank (median of rounds): "
        + "; ".join(
            f"{s} {' '.join(f'{med(list(c)):.2f}' for c in zip(*rec['cpu'][s], strict=True))} s"
            for s in SYSTEMS
        )
    )
    L += [
        f"  tiered vs S3: {t['s3'] / t['tiered']:.1f}x faster (target >= 5x: "
        f"{verdict(t['s3'] >= 5 * t['tiered'])})",
        f"  tiered vs cold disk: {t['disk'] / t['tiered']:.1f}x faster (target >= 2x: "
        f"{verdict(t['disk'] >= 2 * t['tiered'])}); cache emptied by "
        f"{how.get(rec['evicted'], rec['evicted'])}",
        "",
    ]
    L += bytes_report(res, durable_bytes, opts, state_bytes)
    return "\n".join(L)


def blocked_report(res: dict[str, Any], opts: dict[str, Any]) -> list[str]:
    bt, bf = med(res["blocked"]["tiered"]), med(res["blocked"]["floor"])
    ct, cf = med(res["blocked_cpu"]["tiered"]), med(res["blocked_cpu"]["floor"])
    return [
        f"  {'':<44}{'wall':>9}  {'CPU':>9}",
        f"  {'tiered save (async_save=True)':<44}{bt:9.3f}  {ct:9.3f} s",
        f"  {'copy_ into preallocated host memory':<44}{bf:9.3f}  {cf:9.3f} s",
        f"  ratio {bt / bf:.2f}x the copy, CPU {ct / cf:.2f}x (target <= 1.2x: "
        f"{verdict(bt <= 1.2 * bf)})",
        "  background, save returned -> wait returned (median, max): local write + "
        f"replicate + commit {background(res, opts, False)}; steps divisible by "
        f"{opts['persist_every']}, with their persist: {background(res, opts, True)}",
        "",
    ]


def bytes_report(
    res: dict[str, Any], durable_bytes: int, opts: dict[str, Any], state_bytes: int
) -> list[str]:
    gb, per_node = 1e9, opts["ranks_per_node"]
    own = sum(s["own"] for s in res["step_bytes"])
    replica = sum(s["replica"] for s in res["step_bytes"])
    share = durable_bytes / opts["persist_every"]
    L = [
        "== bytes per save (whole job) ==",
        f"  local tier, own shards written   {own / gb:7.3f} GB",
        f"  replicas sent to other nodes     {replica / gb:7.3f} GB",
        f"  durable share (step / {opts['persist_every']})        {share / gb:7.3f} GB "
        f"(a durable step: {durable_bytes / gb:.3f} GB)",
        f"  total                            {(own + replica + share) / gb:7.3f} GB = "
        f"{(own + replica + share) / state_bytes:.2f}x the state",
        "",
        "== steady memory per node (after the last save) ==",
    ]
    for n, tier in enumerate(res["tier_bytes"]):
        ranks = range(n * per_node, (n + 1) * per_node)
        rss = sum(res["rss"][r] for r in ranks)
        hwm = sum(res["hwm"][r] for r in ranks)
        node_state = sum(res["local_bytes"][r] for r in ranks)
        L.append(
            f"  node {n}: local tier {tier / gb:.2f} GB + RSS of its ranks {rss / gb:.2f} GB = "
            f"{(tier + rss) / gb:.2f} GB ({(tier + rss) / node_state:.1f}x its ranks' state of "
            f"{node_state / gb:.2f} GB); peak RSS of its ranks {hwm / gb:.2f} GB"
        )
    L.append(
        "  (RSS: model + Adam, the staging copy, the copy_ baseline's buffers, and what "
        "torch and the runtime keep)"
    )
    return L


# ----------------------------------------------------------------------------- main


def durable_step_bytes(server: S3Server, prefix: str, step: int) -> int:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.options)
    for entry in fs.ls(f"{BUCKET}/{prefix}", detail=False):
        if step_of(entry.rstrip("/").rsplit("/", 1)[-1]) == step:
            return int(fs.du(entry))
    raise SystemExit(f"step {step} is not on the durable tier: the persist did not happen")


def save_only_report(res: dict[str, Any], opts: dict[str, Any]) -> str:
    state_bytes = sum(res["local_bytes"])
    return "\n".join(
        [
            f"state {state_bytes / 1e9:.2f} GB on {opts['world_size']} ranks; load average "
            f"{res['loadavg'][0]:.1f} before, {res['loadavg'][1]:.1f} after",
            f"== training blocked per save (median of {opts['rounds']} rounds, max over ranks) ==",
            *blocked_report(res, opts),
        ]
    )


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params-m", type=float, default=100.0, help="model size, millions of params")
    ap.add_argument("--rounds", type=int, default=5, help="measured save rounds after 2 warm-ups")
    ap.add_argument("--recover-rounds", type=int, default=3, help="recovery rounds per system")
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--ranks-per-node", type=int, default=2, help="ranks per simulated node")
    ap.add_argument("--persist-every", type=int, default=3)
    ap.add_argument("--keep-local", type=int, default=2)
    ap.add_argument("--local-dir", default="/dev/shm", help="where node-local dirs go")
    ap.add_argument("--disk-dir", default="/var/tmp", help="a disk, for the cold-cache copy")
    ap.add_argument(
        "--s3-baseline",
        choices=("persisted", "plain"),
        default="persisted",
        help="S3 recovery baseline: the step the tiers persisted (default), or the same "
        "step saved to S3 by a plain manager",
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="dckpt's collective timeout")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    ap.add_argument(
        "--only-save",
        action="store_true",
        help="the save phase only: blocked and background times (no recovery, no baselines)",
    )
    args = ap.parse_args()
    if args.rounds < 1 or args.recover_rounds < 1:
        ap.error("--rounds and --recover-rounds must be >= 1")
    if args.world_size % args.ranks_per_node or args.world_size // args.ranks_per_node < 2:
        ap.error("--world-size must be a multiple of --ranks-per-node, with at least 2 nodes")
    return args


def main() -> None:
    args = parse()
    os.environ.update(AWS_ENV)  # dummy credentials: nothing may reach a real account
    for k in AWS_ENV_UNSET:
        os.environ.pop(k, None)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    run_local = tempfile.mkdtemp(prefix="dckpt-bench-tiers-", dir=args.local_dir)
    run_disk = tempfile.mkdtemp(prefix="dckpt-bench-tiers-", dir=args.disk_dir)
    t_start = time.time()
    try:
        with moto_process() as (_proc, endpoint):
            server = S3Server(endpoint, BUCKET)
            server.create_bucket()
            opts = {k.replace("-", "_"): v for k, v in vars(args).items()}
            opts.update(
                run_local=run_local,
                disk_root=os.path.join(run_disk, "durable"),
                s3_url=server.url("run"),
                s3_options=server.options,
            )
            load_before = os.getloadavg()[0]
            res = run_on_ranks(args.world_size, "save", phase, "save", opts)
            if args.only_save:
                res["loadavg"] = (load_before, os.getloadavg()[0])
                print()
                print(save_only_report(res, opts))
                return
            durable = durable_step_bytes(server, "run", res["final_step"])
            rec = recover_rounds(opts, res["final_step"])
            res["loadavg"] = (load_before, os.getloadavg()[0])
        text = report(res, rec, durable, opts)
        print()
        print(text)
        print(f"(total {time.time() - t_start:.0f} s)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {"save": res, "recover": rec, "durable_bytes": durable, "args": vars(args)},
                    f,
                    indent=1,
                )
    finally:
        shutil.rmtree(run_local, ignore_errors=True)
        shutil.rmtree(run_disk, ignore_errors=True)


if __name__ == "__main__":
    main()
