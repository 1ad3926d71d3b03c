#!/usr/bin/env python
"""Core benchmark: dckpt against torch DCP, torch_checkpointing and a plain-write floor.

An FSDP2 model (a stack of Linear layers, about ``--params-m`` million parameters) plus
Adam, after one training step, on ``--world-size`` gloo ranks on the CPU. In ONE run,
systems alternate round by round (the starting system rotates each round) after a
warm-up round that is not counted; every figure is the median over ``--rounds`` rounds
of the wall time of the collective call (barrier, call, barrier; measured on rank 0).

Figures
  * durable save   dckpt(durable=True) / DCP defaults (fsyncs) / torch_checkpointing
                   (sync saver, as it is) / floor: each rank's local shard bytes written
                   by ``--floor-threads`` threads, one file each, then fsync
  * first load     load right after the save, into a freshly built model+optimizer
  * warm load      a second load of the same checkpoint (page cache warm) into another
                   freshly built model+optimizer
  * small tensors  ``--small-count`` plain fp32 tensors of 64-256 elements per rank,
                   keys distinct per rank (``small.r<rank>.t<i>``), every system's default
  * non-durable    dckpt(durable=False) / DCP(sync_files=False, informative) /
                   torch_checkpointing save (same measurement as above: it never fsyncs) /
                   floor without fsync
  * memory         peak RSS (VmHWM) during a load above the RSS after building the target
                   model+optimizer, per rank, as a fraction of that rank's local state; in
                   fresh processes (one pair per system, after the timed rounds) and, for
                   information, inside the timed run (glibc trimmed before each baseline)

    python bench/bench_core.py                       # default: 100M params, 5 rounds, /dev/shm
    python bench/bench_core.py --params-m 10 --rounds 2 --small-count 2000   # quick
    python bench/bench_core.py --dir /var/tmp        # on disk
    python bench/bench_core.py --profile             # where dckpt's save/load time goes
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

import dckpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _model import LAYERS, build, local_tensors, width_for
from _ranks import gather, rmtree_collective, run_on_ranks, timed

# ----------------------------------------------------------------------------- model


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    """'' when equal, else a short description of the first differences."""
    if a.keys() != b.keys():
        return f"keys differ: {sorted(a.keys() ^ b.keys())[:5]}"
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    return f"{len(bad)} tensors differ, e.g. {bad[:3]}" if bad else ""


def small_state(rank: int, count: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    sizes = torch.randint(64, 257, (count,), generator=g).tolist()
    return {f"r{rank}.t{i:05d}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}


# ----------------------------------------------------------------------------- memory


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


_libc = None


def settle_memory() -> int:
    """Collect garbage, give freed heap back to the OS, reset the peak; returns VmRSS."""
    global _libc
    gc.collect()
    with contextlib.suppress(Exception):
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
    return _status()["VmRSS"]


def peak_rss() -> int:
    return _status()["VmHWM"]


# ----------------------------------------------------------------------------- systems


class Systems:
    """The save/load calls of every system, over this rank's state."""

    def __init__(self, opts: dict[str, Any]) -> None:
        self.opts = opts
        self.tc_manager: Any = None
        self.tc_error = ""
        if not opts["no_tc"]:
            try:
                self.tc_manager = self._make_tc()
            except Exception as exc:
                self.tc_error = f"{type(exc).__name__}: {exc}"

    # -- dckpt
    def dckpt_save(self, model: Any, optim: Any, path: str, *, durable: bool = True) -> None:
        dckpt.save({"model": model, "optimizer": optim}, path, durable=durable)

    def dckpt_load(self, model: Any, optim: Any, path: str) -> None:
        dckpt.load({"model": model, "optimizer": optim}, path)

    def dckpt_save_small(self, small: dict[str, torch.Tensor], path: str) -> None:
        dckpt.save({"small": small}, path)

    # -- torch DCP (defaults: FileSystemWriter, sync_files=True)
    def dcp_save(self, model: Any, optim: Any, path: str, *, durable: bool = True) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optim)
        if durable:
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
        else:
            writer = dcp.FileSystemWriter(path, sync_files=False)
            dcp.save({"model": msd, "optim": osd}, storage_writer=writer)

    def dcp_load(self, model: Any, optim: Any, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optim)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=path)
        set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

    def dcp_save_small(self, small: dict[str, torch.Tensor], path: str) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save({"small": small}, checkpoint_id=path)

    # -- torch_checkpointing (sync saver; buffered I/O because O_DIRECT fails here)
    @staticmethod
    def _make_tc() -> Any:
        from torch_checkpointing import CheckpointManager
        from torch_checkpointing.config import SyncCheckpointSaverConfig
        from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

        cfg = CheckpointManager.Config(
            save=SyncCheckpointSaverConfig(),
            storage_config=LocalFileSystemStorageConfig(use_direct_io=False),
        )
        return CheckpointManager(cfg)

    def tc_save(self, model: Any, optim: Any, path: str) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optim)
        self.tc_manager.save(path, {"model": msd, "optim": osd})

    def tc_load(self, model: Any, optim: Any, path: str) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optim)
        out = self.tc_manager.load(path, into={"model": msd, "optim": osd})
        set_state_dict(model, optim, model_state_dict=out["model"], optim_state_dict=out["optim"])

    def tc_save_small(self, small: dict[str, torch.Tensor], path: str) -> None:
        self.tc_manager.save(path, {"small": small})

    def close(self) -> None:
        if self.tc_manager is not None:
            with contextlib.suppress(Exception):
                self.tc_manager.close()


def floor_write(path: str, buffers: list[list[memoryview]], *, fsync: bool) -> None:
    """Each buffer group to its own file from its own thread, then (optionally) fsync."""
    os.makedirs(path, exist_ok=True)
    rank = dist.get_rank()

    def one(i: int) -> None:
        fd = os.open(f"{path}/floor-{rank}-{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pending = list(buffers[i])
            while pending:
                batch = pending[:512]
                n = os.writev(fd, batch)
                j = 0
                while j < len(batch) and n >= batch[j].nbytes:
                    n -= batch[j].nbytes
                    j += 1
                pending = pending[j:]
                if n:
                    pending[0] = pending[0][n:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(len(buffers)) as pool:
        list(pool.map(one, range(len(buffers))))


def floor_buffers(tensors: dict[str, torch.Tensor], n: int) -> list[list[memoryview]]:
    groups: list[list[memoryview]] = [[] for _ in range(n)]
    load = [0] * n
    for t in sorted(tensors.values(), key=lambda t: -t.nbytes):
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        i = load.index(min(load))
        groups[i].append(memoryview(flat))
        load[i] += t.nbytes
    return [g for g in groups if g] or [[]]


# ----------------------------------------------------------------------------- timing


def all_ok(ok: bool) -> bool:
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    return int(flag.item()) == 0


# ----------------------------------------------------------------------------- phases


def bench(opts: dict[str, Any], run_dir: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    width = width_for(opts["params_m"])
    orig_model, orig_optim = build(width, mesh, trained=True)
    orig_local = local_tensors(orig_model, orig_optim)
    local_bytes = sum(t.nbytes for t in orig_local.values())
    n_params = sum(p.numel() for p in orig_model.parameters())
    small = small_state(rank, opts["small_count"])
    small_bytes = sum(t.nbytes for t in small.values())
    buffers = floor_buffers(orig_local, opts["floor_threads"])
    sysm = Systems(opts)
    tc_ok = all_ok(sysm.tc_manager is not None)
    errors: dict[str, str] = {}
    if not tc_ok:
        errors["torch_checkpointing"] = "could not be set up: " + (
            sysm.tc_error or "disabled (--no-tc) or failed on another rank"
        )

    big = ["dckpt", "dcp"] + (["tc"] if tc_ok else [])
    save_fn = {
        "dckpt": lambda p: sysm.dckpt_save(orig_model, orig_optim, p),
        "dcp": lambda p: sysm.dcp_save(orig_model, orig_optim, p),
        "tc": lambda p: sysm.tc_save(orig_model, orig_optim, p),
    }
    load_fn = {"dckpt": sysm.dckpt_load, "dcp": sysm.dcp_load, "tc": sysm.tc_load}
    small_fn = {
        "dckpt": sysm.dckpt_save_small,
        "dcp": sysm.dcp_save_small,
        "tc": sysm.tc_save_small,
    }
    nd_fn = {
        "dckpt": lambda p: sysm.dckpt_save(orig_model, orig_optim, p, durable=False),
        "dcp": lambda p: sysm.dcp_save(orig_model, orig_optim, p, durable=False),
        "floor": lambda p: floor_write(p, buffers, fsync=False),
    }

    times: dict[str, dict[str, list[float]]] = {
        f: {} for f in ("save", "load_first", "load_warm", "small", "nondurable")
    }
    mem_inrun: dict[str, list[int]] = {}
    verified: dict[str, str] = {}
    keep: dict[str, str] = {}  # last round's checkpoints, for the fresh-process memory phase
    total_rounds = opts["rounds"] + 1

    def record(fig: str, system: str, rnd: int, t: float) -> None:
        if rnd > 0:
            times[fig].setdefault(system, []).append(t)

    def log(msg: str) -> None:
        if rank == 0 and not opts["quiet"]:
            print(msg, flush=True)

    def run_tc_guarded(fn: Callable[[], Any]) -> float | None:
        """torch_checkpointing may not work here at all: report it and drop it."""
        nonlocal big
        err = ""
        t = 0.0
        try:
            t = timed(fn)
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
        if all_ok(not err):
            return t
        errs = [e for e in gather(err) if e]
        errors["torch_checkpointing"] = errs[0] if errs else "failed on another rank"
        log(f"  torch_checkpointing failed, continuing without it: {errors['torch_checkpointing']}")
        big = [s for s in big if s != "tc"]
        return None

    for rnd in range(total_rounds):
        last = rnd == total_rounds - 1
        tag = "warm-up" if rnd == 0 else f"round {rnd}/{opts['rounds']}"
        log(f"[{tag}]")
        shift = rnd % len(big)
        order = big[shift:] + big[:shift]
        for s in list(order):
            if s not in big:
                continue
            path = f"{run_dir}/{s}-r{rnd}"
            if s == "tc":
                t = run_tc_guarded(lambda p=path: save_fn["tc"](p))
                if t is None:
                    rmtree_collective(path)
                    continue
            else:
                t = timed(lambda p=path, s=s: save_fn[s](p))
            record("save", s, rnd, t)
            if s == "tc":  # it never fsyncs: its save is also its non-durable save
                record("nondurable", "tc", rnd, t)
            # first load, then a second (warm) one, each into a freshly built target
            tm, to = build(width, mesh, trained=False)
            t1 = timed(lambda f=load_fn[s], m=tm, o=to, p=path: f(m, o, p))
            del tm, to
            tm, to = build(width, mesh, trained=False)
            base = settle_memory()
            t2 = timed(lambda f=load_fn[s], m=tm, o=to, p=path: f(m, o, p))
            deltas = gather(peak_rss() - base)
            if rnd == 0:
                verified[s] = same_state(local_tensors(tm, to), orig_local)
                if verified[s] and rank == 0:
                    print(f"  WARNING: {s} load did not restore the state: {verified[s]}")
            del tm, to
            record("load_first", s, rnd, t1)
            record("load_warm", s, rnd, t2)
            if rnd > 0:
                mem_inrun.setdefault(s, []).append(max(deltas))
            log(f"  {s:6s} save {t:7.3f}s  load {t1:7.3f}s  warm load {t2:7.3f}s")
            if last and s in ("dckpt", "dcp", "tc"):
                keep[s] = path
            else:
                rmtree_collective(path)

        # floor, durable (fsync) - part of the durable-save figure
        path = f"{run_dir}/floor-r{rnd}"
        t = timed(lambda p=path: floor_write(p, buffers, fsync=True))
        record("save", "floor", rnd, t)
        rmtree_collective(path)

        # non-durable saves
        nd = ["dckpt", "dcp", "floor"]
        nd = nd[rnd % 3 :] + nd[: rnd % 3]
        got = {}
        for s in nd:
            path = f"{run_dir}/nd-{s}-r{rnd}"
            got[s] = timed(lambda p=path, s=s: nd_fn[s](p))
            record("nondurable", s, rnd, got[s])
            rmtree_collective(path)
        log("  non-durable " + "  ".join(f"{s} {v:.3f}s" for s, v in got.items()))

        # many small tensors
        sm = [s for s in big]
        shift = rnd % len(sm)
        for s in sm[shift:] + sm[:shift]:
            path = f"{run_dir}/small-{s}-r{rnd}"
            if s == "tc":
                t = run_tc_guarded(lambda p=path: small_fn["tc"](small, p))
                if t is None:
                    rmtree_collective(path)
                    continue
            else:
                t = timed(lambda p=path, s=s: small_fn[s](small, p))
            record("small", s, rnd, t)
            rmtree_collective(path)
            log(f"  small  {s:6s} {t:7.3f}s")

    sysm.close()
    return {
        "world_size": world,
        "params": n_params,
        "width": width,
        "layers": LAYERS,
        "local_state_bytes": max(gather(local_bytes)),
        "total_state_bytes": sum(gather(local_bytes)),
        "small_count_per_rank": opts["small_count"],
        "small_bytes_per_rank": small_bytes,
        "floor_threads": len(buffers),
        "times": times,
        "mem_inrun": mem_inrun,
        "verified": verified,
        "errors": errors,
        "keep": keep,
        "systems": big,
    }


def memory_phase(opts: dict[str, Any], system: str, path: str) -> dict[str, Any]:
    """In a fresh process: build the target, reset the peak, load once, report the rise."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    width = width_for(opts["params_m"])
    sysm = Systems({**opts, "no_tc": system != "tc"})
    model, optim = build(width, mesh, trained=False)
    local = sum(t.nbytes for t in local_tensors(model, optim).values())
    fn = {"dckpt": sysm.dckpt_load, "dcp": sysm.dcp_load, "tc": sysm.tc_load}[system]
    base = settle_memory()
    dist.barrier()
    fn(model, optim, path)
    dist.barrier()
    rise = peak_rss() - base
    sysm.close()
    return {"rise": gather(rise), "local": gather(local)}


# ----------------------------------------------------------------------------- profile
#
# --profile times the engine's stages by wrapping functions where the engine looks them
# up: ``_describe.resolve`` is the name ``_describe``'s code calls, so wrapping it there
# times exactly those calls. The targets are references (``_describe.resolve``), not name
# strings: a stage renamed or moved makes ``probe_targets`` raise, which stops ``--profile``
# before it starts and fails tests/test_bench_tools.py; a target still there that the
# engine no longer calls through is reported as never called (and fails that test too).


class ProbeTargetError(Exception):
    """A profile target that no longer names a stage of the engine."""


@dataclass(frozen=True)
class Target:
    """One stage to time: ``owner.<name>``, where ``fn`` is what ``owner`` holds now."""

    owner: Any  # the module or class through which the engine calls the stage
    fn: Callable[..., Any]
    label: str

    @property
    def name(self) -> str:
        """The attribute of ``owner`` bound to ``fn``: what gets wrapped."""
        spaces = owner_namespaces(self.owner)
        fn = _unwrapped(self.fn)
        names = sorted({k for ns in spaces for k, v in ns.items() if _unwrapped(v) is fn})
        where = getattr(self.owner, "__qualname__", getattr(self.owner, "__name__", "?"))
        if len(names) != 1:
            found = f"several names {names}" if names else "no name"
            raise ProbeTargetError(
                f"profile target {self.label!r}: {where} has {found} bound to "
                f"{getattr(self.fn, '__qualname__', self.fn)!r}; name one stage per target"
            )
        static = spaces[0].get(names[0])
        if isinstance(self.owner, type) and isinstance(static, (staticmethod, classmethod)):
            raise ProbeTargetError(
                f"profile target {self.label!r}: {where}.{names[0]} is a {type(static).__name__}; "
                "only plain functions and methods can be wrapped"
            )
        return names[0]


def owner_namespaces(owner: Any) -> list[Mapping[str, Any]]:
    """Where ``owner``'s attributes live: a module's globals, a class's own then inherited."""
    if isinstance(owner, type):
        return [vars(c) for c in owner.__mro__ if c is not object]
    return [vars(owner)]


def _unwrapped(value: Any) -> Any:
    # A class's staticmethod/classmethod object, or a classmethod reached through the class.
    if isinstance(value, (staticmethod, classmethod, types.MethodType)):
        return value.__func__
    return value


def probe_targets() -> list[Target]:
    """The stages ``--profile`` times; raises ProbeTargetError when one is gone."""
    # Imported here, not at the top: only --profile depends on the engine's private layout.
    try:
        from dckpt import (
            _api,
            _coord,
            _describe,
            _loadcore,
            _optimpair,
            _plancache,
            _read,
            _reader,
            _request,
            _save,
            _stateful,
            _write,
        )
        from dckpt.storage import _local
    except ImportError as exc:
        raise ProbeTargetError(
            f"the modules of the profile targets do not import ({exc}): one moved (point its "
            "entries in probe_targets() in bench/bench_core.py at the new module) or dckpt "
            "itself does not import"
        ) from exc
    try:
        writer, storage, cache = _local._LocalWriter, _local.LocalStorage, _plancache.PlanCache
        module_state, optim_state = _stateful.ModuleState, _stateful.OptimizerState
        return [
            # save
            Target(_save, _save.drain, "save: drain pending async save"),
            Target(_request, _request.coordinator_for, "save: coordinator_for (store client)"),
            Target(_request, _request.describe, "save: describe (resolve + chunks)"),
            Target(_describe, _describe.resolve, "save:   resolve (get_state_dict + flatten)"),
            Target(_describe, _describe._tensor_offers, "save:   _tensor_offers (chunks)"),
            Target(_describe, _describe._checksummed, "save:   _checksummed (crc of plain)"),
            Target(_save, _save.plain_checksums, "save: plain_checksums (when not described)"),
            Target(_save, _save.structure_key, "save:   structure_key"),
            Target(cache, cache.plan, "save: PlanCache.plan (rank 0, plan cache)"),
            Target(_plancache, _plancache._divergent, "save:   _divergent (rank 0)"),
            Target(_plancache, _plancache.plan_save, "save:   plan_save (rank 0, cache miss)"),
            Target(_plancache, _plancache.manifest_template, "save:   manifest_template (miss)"),
            Target(_plancache, _plancache.with_save_id, "save:   with_save_id (cache hit)"),
            Target(_coord, _coord.encode, "save/load: coord encode (frames)"),
            Target(_save, _save.write_rank, "save: write_rank (wall)"),
            Target(_write, _write.host_bytes, "save:   host_bytes [threads]"),
            Target(_write, _write.block_crcs, "save:   crc32c of written data [threads]"),
            Target(writer, writer.write, "save:   writev [threads]"),
            Target(writer, writer.close, "save:   close+fsync [threads]"),
            Target(storage, storage.open_writer, "save:   open_writer [threads]"),
            Target(_save, _save.render_manifest, "save: render_manifest (rank 0)"),
            Target(storage, storage.sync_dir, "save/load: sync_dir"),
            Target(_save, _save.commit, "save: commit (rank 0)"),
            # load
            Target(_api, _api.coordinator_for, "load: coordinator_for (store client)"),
            Target(_reader, _reader.read_manifest, "load: read_manifest + parse"),
            Target(_loadcore, _loadcore.resolve, "load: resolve (get_state_dict + flatten)"),
            Target(_reader, _reader.plan_load, "load: plan_load"),
            Target(_reader, _reader.check_files, "load: check_files (stat)"),
            Target(_reader, _reader.execute_reads, "load: execute_reads (wall)"),
            Target(_local._FdRanges, _local._FdRanges.read_into, "load:   pread [threads]"),
            Target(_read, _read._check, "load:   crc32c verify [threads]"),
            # both
            Target(
                _optimpair.Partners,
                _optimpair.Partners.state_dict,
                "get_state_dict (a module with its optimizer, or either alone)",
            ),
            Target(module_state, module_state.load_state_dict, "load: set_model_state_dict"),
            Target(optim_state, optim_state.load_state_dict, "load: set_optimizer_state_dict"),
            Target(
                _coord.Coordinator,
                _coord.Coordinator._exchange,
                "exchange total (local work + waits)",
            ),
        ]
    except AttributeError as exc:
        raise ProbeTargetError(
            f"a profile target is gone from the engine ({exc}); point its entry in "
            "probe_targets() in bench/bench_core.py at where that stage lives now"
        ) from exc


def checked_targets() -> list[tuple[Target, str]]:
    """Every target with the attribute it wraps; raises ProbeTargetError on the first bad one."""
    targets = probe_targets()
    labels = [t.label for t in targets]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ProbeTargetError(f"profile targets share labels {twice}; labels name one stage")
    return [(t, t.name) for t in targets]


class Probe:
    """Time accumulated around the engine's stages (summed over calls and threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acc: dict[str, list[float]] = {}
        self.undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        # Class attributes: the one on the class itself, so an inherited method is shadowed
        # on this class only, and restoring leaves the same function reachable.
        orig = getattr(owner, name)
        probe = self

        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                with probe.lock:
                    slot = probe.acc.setdefault(label, [0.0, 0])
                    slot[0] += dt
                    slot[1] += 1

        setattr(owner, name, wrapper)
        self.undo.append((owner, name, orig))

    def restore(self) -> None:
        for owner, name, orig in reversed(self.undo):
            setattr(owner, name, orig)
        self.undo = []


def install_probes() -> Probe:
    """Wrap every stage of ``probe_targets``; ProbeTargetError if one is gone."""
    p = Probe()
    for target, name in checked_targets():
        p.wrap(target.owner, name, target.label)
    return p


def profile_phase(opts: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """After a warm-up, per operation: a plain run, a run under probes, one under cProfile.

    The warm-up runs under probes too, untimed, only to learn which stages are called at
    all: a first save plans afresh, later ones reuse the cached plan."""
    import cProfile
    import io
    import pstats

    from torch.distributed.device_mesh import init_device_mesh

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    width = width_for(opts["params_m"])
    model, optim = build(width, mesh, trained=True)
    tm, to = build(width, mesh, trained=False)
    small = small_state(rank, opts["small_count"])
    sysm = Systems({**opts, "no_tc": True})
    counter = [0]

    class Probes:
        def __init__(self) -> None:
            self.p = install_probes()

        def stop(self) -> None:
            self.p.restore()

    class Profiler:
        def __init__(self) -> None:
            self.p = cProfile.Profile() if rank == 0 else None
            if self.p is not None:
                self.p.enable()

        def stop(self) -> None:
            if self.p is not None:
                self.p.disable()

    def op(what: str, tool_factory: Any = None) -> tuple[float, Any]:
        """One dckpt call; a load's checkpoint is saved first, outside the measurement."""
        counter[0] += 1
        path = f"{run_dir}/prof-{counter[0]}"
        if what == "load":
            sysm.dckpt_save(model, optim, path)
        dist.barrier()
        tool = tool_factory() if tool_factory is not None else None
        try:
            t0 = time.perf_counter()
            if what == "save":
                sysm.dckpt_save(model, optim, path)
            elif what == "load":
                sysm.dckpt_load(tm, to, path)
            else:
                sysm.dckpt_save_small(small, path)
            wall = time.perf_counter() - t0
        finally:  # the engine must not stay wrapped (or profiled) past the call
            if tool is not None:
                tool.stop()
        rmtree_collective(path)
        return wall, tool

    called: set[str] = set()
    for what in ("save", "load", "small"):  # warm-up: imports, plan cache, thread pools
        _, warm = op(what, Probes)
        called.update(warm.p.acc)
    out: dict[str, Any] = {}
    for what in ("save", "load", "small"):
        plain, _ = op(what)
        probed, probes = op(what, Probes)
        called.update(probes.p.acc)
        _, prof = op(what, Profiler)
        s, s2 = io.StringIO(), io.StringIO()
        if prof.p is not None:
            pstats.Stats(prof.p, stream=s).sort_stats("cumulative").print_stats(35)
            pstats.Stats(prof.p, stream=s2).sort_stats("tottime").print_stats(20)
        out[what] = {
            "wall": gather(plain),
            "wall_probed": gather(probed),
            "probes": gather({k: tuple(v) for k, v in probes.p.acc.items()}),
            "cprofile_cumulative": s.getvalue(),
            "cprofile_tottime": s2.getvalue(),
        }
    # Some stages run on rank 0 only: a stage counts as called if any rank called it.
    everywhere = set().union(*gather(called))
    out["never_called"] = [t.label for t in probe_targets() if t.label not in everywhere]
    return out


# ----------------------------------------------------------------------------- workers


def phase(mode: str, opts: dict[str, Any], run_dir: str, extra: Any) -> Any:
    """What each rank runs for one phase of the benchmark (in fresh processes)."""
    if mode == "bench":
        return bench(opts, run_dir)
    if mode == "memory":
        return memory_phase(opts, extra[0], extra[1])
    return profile_phase(opts, run_dir)


def launch(mode: str, opts: dict[str, Any], run_dir: str, extra: Any = None) -> Any:
    return run_on_ranks(opts["world_size"], mode, phase, mode, opts, run_dir, extra)


# ----------------------------------------------------------------------------- report

NAMES = {
    "dckpt": "dckpt",
    "dcp": "torch DCP",
    "tc": "torch_checkpointing",
    "floor": "floor",
}


def med(xs: list[float] | None) -> float | None:
    return statistics.median(xs) if xs else None


def table(title: str, rows: list[tuple[str, list[float] | None]], nbytes: int | None) -> str:
    lines = [
        f"== {title} ==",
        f"  {'system':<42}{'median s':>10}{'min s':>9}{'max s':>9}{'GB/s':>8}  n",
    ]
    for name, xs in rows:
        if not xs:
            lines.append(f"  {name:<42}{'-':>10}")
            continue
        m = statistics.median(xs)
        gbs = f"{nbytes / m / 1e9:8.2f}" if nbytes else f"{'':>8}"
        lines.append(f"  {name:<42}{m:10.3f}{min(xs):9.3f}{max(xs):9.3f}{gbs}  {len(xs)}")
    return "\n".join(lines)


def ratio_line(
    label: str,
    num: float | None,
    den: float | None,
    target: float | None,
    *,
    higher_better: bool = True,
    unit: str = "x",
) -> tuple[str, dict[str, Any]]:
    if num is None or den is None or den == 0:
        return f"  {label:<56}{'n/a':>9}", {"label": label, "value": None}
    v = num / den
    if target is None:
        verdict, tgt = "", ""
    else:
        ok = v >= target if higher_better else v <= target
        verdict = "PASS" if ok else "MISS"
        tgt = f"(target {'>=' if higher_better else '<='} {target:g}{unit})"
    text = f"  {label:<56}{v:8.2f}{unit} {tgt:<18} {verdict}"
    return text, {
        "label": label,
        "value": v,
        "target": target,
        "pass": verdict == "PASS" if verdict else None,
    }


def report(
    res: dict[str, Any], mem: dict[str, Any], opts: dict[str, Any], where: str
) -> tuple[str, dict[str, Any]]:
    t = res["times"]
    total = res["total_state_bytes"]
    local = res["local_state_bytes"]
    out = [
        f"dckpt core benchmark: {res['params'] / 1e6:.1f}M params ({res['layers']} x Linear({res['width']}, "
        f"{res['width']})) + Adam, FSDP2 on {res['world_size']} gloo ranks (CPU, 1 thread each)",
        f"state {total / 1e9:.2f} GB total, {local / 1e9:.3f} GB per rank; dir {where}; "
        f"{opts['rounds']} rounds after 1 warm-up, systems alternating; wall time per collective call",
    ]
    if "loadavg" in res:
        out.append(
            f"machine: {os.cpu_count()} CPUs, 1-min load average {res['loadavg'][0]:.1f} at start, "
            f"{res['loadavg'][1]:.1f} at end of the timed rounds (others' jobs add noise)"
        )
    for k, v in res["errors"].items():
        out.append(f"NOTE {k}: {v}")
    for s, v in res["verified"].items():
        out.append(
            f"load check ({NAMES[s]}): {'restored state equals the saved one' if not v else 'MISMATCH ' + v}"
        )
    out.append("")
    ft = res["floor_threads"]
    out.append(
        table(
            "durable save",
            [
                ("dckpt (durable=True)", t["save"].get("dckpt")),
                ("torch DCP (defaults, fsync)", t["save"].get("dcp")),
                ("torch_checkpointing (sync, no fsync)", t["save"].get("tc")),
                (f"floor ({ft} threads, 1 file each + fsync)", t["save"].get("floor")),
            ],
            total,
        )
    )
    out.append("")
    out.append(
        table(
            "first load (right after the save; fresh target)",
            [(NAMES[s], t["load_first"].get(s)) for s in ("dckpt", "dcp", "tc")],
            total,
        )
    )
    out.append("")
    out.append(
        table(
            "warm load (2nd load of the same checkpoint; fresh target)",
            [(NAMES[s], t["load_warm"].get(s)) for s in ("dckpt", "dcp", "tc")],
            total,
        )
    )
    out.append("")
    nsmall = res["small_count_per_rank"]
    out.append(
        table(
            f"small tensors: {nsmall} plain fp32 tensors of 64-256 elements per rank, "
            f"distinct keys per rank ({res['small_bytes_per_rank'] / 1e6:.1f} MB/rank)",
            [
                ("dckpt (durable=True)", t["small"].get("dckpt")),
                ("torch DCP (defaults)", t["small"].get("dcp")),
                ("torch_checkpointing", t["small"].get("tc")),
            ],
            None,
        )
    )
    out.append("")
    out.append(
        table(
            "non-durable save",
            [
                ("dckpt (durable=False)", t["nondurable"].get("dckpt")),
                ("torch DCP (sync_files=False) [info]", t["nondurable"].get("dcp")),
                ("torch_checkpointing (= its save above)", t["nondurable"].get("tc")),
                (f"floor ({ft} threads, no fsync)", t["nondurable"].get("floor")),
            ],
            total,
        )
    )
    out.append("")
    out.append(
        "== load peak memory: VmHWM during one load above VmRSS after building the target, "
        "max over ranks =="
    )
    out.append(f"  {'system':<42}{'fresh process':>22}{'in-run median':>22}")
    for s in ("dckpt", "dcp", "tc"):
        f = mem.get(s)
        fr = f"{f['rise'] / 1e6:9.1f} MB {f['rise'] / f['local'] * 100:6.1f}%" if f else "-"
        ir = res["mem_inrun"].get(s)
        irs = f"{med(ir) / 1e6:9.1f} MB {med(ir) / local * 100:6.1f}%" if ir else "-"
        out.append(f"  {NAMES[s]:<42}{fr:>22}{irs:>22}")
    out.append(f"  (local state per rank: {local / 1e6:.1f} MB)")
    out.append("")
    ratios = []
    m = {fig: {s: med(v) for s, v in d.items()} for fig, d in t.items()}
    specs = [  # (label, figure, other system, target speedup or None)
        ("durable save speed: dckpt vs DCP", "save", "dcp", 1.4),
        ("durable save speed: dckpt vs floor", "save", "floor", 0.6),
        ("durable save speed: dckpt vs torch_checkpointing", "save", "tc", None),
        ("warm load speed: dckpt vs DCP", "load_warm", "dcp", 1.5),
        ("warm load speed: dckpt vs torch_checkpointing", "load_warm", "tc", None),
        ("small-tensor save speed: dckpt vs DCP", "small", "dcp", 10.0),
        ("small-tensor save speed: dckpt vs torch_checkpointing", "small", "tc", None),
        ("durable=False save speed: dckpt vs torch_checkpointing", "nondurable", "tc", None),
        ("durable=False save speed: dckpt vs floor (no fsync)", "nondurable", "floor", None),
    ]
    out.append("== ratios (speed = other's median time / dckpt's median time) ==")
    for label, fig, other, tgt in specs:
        text, rec = ratio_line(label, m[fig].get(other), m[fig].get("dckpt"), tgt)
        out.append(text)
        ratios.append(rec)
    f = mem.get("dckpt")
    if f:
        v = f["rise"] / f["local"] * 100
        verdict = "PASS" if v <= 10 else "MISS"
        out.append(
            f"  {'dckpt load peak memory overhead (fresh process)':<56}{v:8.2f}% (target <= 10%)    {verdict}"
        )
        ratios.append(
            {
                "label": "dckpt load peak memory overhead %",
                "value": v,
                "target": 10,
                "pass": v <= 10,
            }
        )
    else:
        ir = res["mem_inrun"].get("dckpt")
        if ir:
            v = med(ir) / local * 100
            verdict = "PASS" if v <= 10 else "MISS"
            out.append(
                f"  {'dckpt load peak memory overhead (in run)':<56}{v:8.2f}% (target <= 10%)    {verdict}"
            )
            ratios.append(
                {
                    "label": "dckpt load peak memory overhead %",
                    "value": v,
                    "target": 10,
                    "pass": v <= 10,
                }
            )
    out.append("  (PASS/MISS are informative only)")
    dump = {k: v for k, v in res.items() if k != "keep"}
    dump.update(
        memory_fresh=mem, ratios=ratios, options=opts, dir=where, medians=m, torch=torch.__version__
    )
    return "\n".join(out), dump


def never_called_note(prof: dict[str, Any]) -> str:
    """A warning naming the targets no rank called (empty when every one was)."""
    never = prof.get("never_called") or []
    if not never:
        return ""
    return (
        "WARNING: the engine never called these profile targets (warm-up included), so their "
        "time is missing below; point their entries in probe_targets() in "
        "bench/bench_core.py at where those stages run now: " + ", ".join(never)
    )


def print_profile(prof: dict[str, Any]) -> str:
    out = []
    note = never_called_note(prof)
    if note:
        out.append(note)
    for what in ("save", "load", "small"):
        p = prof[what]
        label = "small-tensor save" if what == "small" else what
        out.append(
            f"===== dckpt {label}: wall per rank "
            + ", ".join(f"{w:.3f}s" for w in p["wall"])
            + " (probed run: "
            + ", ".join(f"{w:.3f}s" for w in p["wall_probed"])
            + ")"
        )
        for r, acc in enumerate(p["probes"]):
            out.append(f"-- rank {r}: seconds summed over calls (and threads where marked), calls")
            for label, (sec, n) in sorted(acc.items(), key=lambda kv: kv[0]):
                out.append(f"   {label:<50}{sec:9.3f}s {n:7d}")
        out.append("-- rank 0 cProfile (main thread only), by cumulative time:")
        out.append(p["cprofile_cumulative"])
        out.append("-- rank 0 cProfile (main thread only), by own time:")
        out.append(p["cprofile_tottime"])
    if note:
        out.append(note)
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/dev/shm", help="where checkpoints go (default /dev/shm)")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds after one warm-up")
    ap.add_argument("--params-m", type=float, default=100.0, help="model size, millions of params")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--small-count", type=int, default=20000, help="small tensors per rank")
    ap.add_argument("--floor-threads", type=int, default=4, help="writer threads of the floor")
    ap.add_argument("--no-tc", action="store_true", help="leave torch_checkpointing out")
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory phase")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="instead: instrument one dckpt save and load and print where time goes",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    opts = {
        k: getattr(args, k)
        for k in (
            "rounds",
            "params_m",
            "world_size",
            "small_count",
            "floor_threads",
            "no_tc",
            "quiet",
        )
    }
    if args.profile:
        try:  # before any rank starts: a stale target would waste the run
            checked_targets()
        except ProbeTargetError as exc:
            raise SystemExit(f"bench_core --profile: {exc}") from None
    os.makedirs(args.dir, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix="dckpt-bench-core-", dir=args.dir)
    try:
        if args.profile:
            prof = launch("profile", opts, run_dir)
            text = print_profile(prof)
            print(text)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(prof, f, indent=1)
            return
        t0 = time.time()
        load_before = os.getloadavg()[0]
        res = launch("bench", opts, run_dir)
        res["loadavg"] = (load_before, os.getloadavg()[0])
        mem: dict[str, Any] = {}
        if not args.no_memory:
            for s, path in res["keep"].items():
                r = launch("memory", opts, run_dir, (s, path))
                i = max(range(len(r["rise"])), key=lambda k: r["rise"][k] / r["local"][k])
                mem[s] = {"rise": r["rise"][i], "local": r["local"][i], "per_rank": r["rise"]}
        text, dump = report(res, mem, opts, args.dir)
        print()
        print(text)
        print(f"(total {time.time() - t0:.0f}s)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dump, f, indent=1)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
