#!/usr/bin/env python
"""Coordination cost at thousands of ranks, by simulation: the real planner, manifest
encoder/decoder and load planner, fed with what W ranks would offer, in one process.

The state is Llama-3-70B-like (80 layers, hidden 8192, FFN 28672, 8 KV heads, vocabulary
128256) with Adam (exp_avg, exp_avg_sq, and a plain replicated ``step`` tensor per
parameter; ``param_groups`` as a value), named as torch's state-dict helpers name them
(``model.layers.0.attention.wq.weight``, ``optimizer.state.layers.0.attention.wq.weight
.exp_avg``), all float32. Two layouts:

  * ``fsdp``      FSDP2 on W ranks: every parameter and moment Shard(0) over a 1-D mesh
  * ``fsdp-tp8``  FSDP2 x TP-8 on a (W/8, 8) mesh: column-parallel weights (wq, wk, wv,
                  w1, w3, output) and the row-parallel embedding are (_StridedShard(0, 8),
                  Shard(0)), row-parallel weights (wo, w2) (Shard(0), Shard(1)), norms
                  (Shard(0), Replicate()) -- what FSDP2 over torchtitan-style TP holds

The save is format 2's: every DTensor is a layout offer that stays on its rank (each
rank plans and writes its own shards and table, and reports its files, its table and the
entries whose first shard it writes, ``LayoutWriter``); only the plain ``step`` tensors
reach rank 0's planner. The load reads and checks the tables it needs.

No process runs per simulated rank. Each rank's offer is built from the engine's own
DTensor box math (checked against real DTensors on a "fake" process group for one rank)
and pickled as the coordinator pickles it; rank 0's part is then run for real:
unpickle the W offers, plan, pickle the W answers, unpickle the W write results, render
the manifest. One rank's load: read the manifest bytes, decode them, plan its reads into
real (meta-device) DTensors of rank 0 of the same layout.

Figures (one table per layout; MB = 10^6 bytes)
  rank 0 plan s     wall time of rank 0's coordination work in a first save (gather +
                    plan + scatter + render; broken down in the second table)
  rank 0 peak MB    peak RSS above the RSS before it (VmHWM reset via /proc/self/clear_refs
                    after a malloc_trim, in a fresh process per W), plus the pickled
                    offers rank 0 receives (built before the baseline)
  manifest MB       the manifest's size (format 2: its header, without the tables)
  table KB/rank     the largest table a rank writes (format 2: the offsets and checksums
                    of its layout shards), and tables MB, all of them together
  load s / peak MB  one rank: manifest decode + load planning, peak RSS as above
  send / recv KB    the most any rank sends to / receives from rank 0 in one save, pickled
                    as the coordinator does: first save = offer + write results / its
                    RankPlan; later saves (plan cached) = brief + write results / a reuse
                    note
  gather MB         everything rank 0 receives in the plan exchange of a first save

Memory is RSS rather than tracemalloc (which slows these allocation-bound steps several
times over); garbage collection is off during the measured steps, as the engine pauses
it. Before each W the script estimates the memory (and time) from the previous W and
skips what would not fit (``--mem-gb``, ``--max-s``), extrapolating those rows from
the largest two measured W; extrapolated rows are marked ``~``. ``--dcp`` adds torch
DCP's planner functions on the same input (DefaultSavePlanner.create_global_plan, which
runs dedup, create_default_global_save_plan and _validate_global_plan, with
create_default_local_save_plan for the offers; FileSystemWriter.finish's metadata; and
create_default_local_load_plan for one rank's load), each W capped at ``--dcp-cap`` s.
Not simulated: the store itself (its server usually lives in rank 0's process and holds
every message in flight), storage I/O, and each rank's own staging.

    python bench/bench_scale.py --quick                    # W = 64, 256, fsdp (~1 min)
    python bench/bench_scale.py                            # W up to 16k, as far as fits
    python bench/bench_scale.py --worlds 1024 --layouts fsdp --profile   # where time goes
    python bench/bench_scale.py --dcp --dcp-cap 120
"""

from __future__ import annotations

import argparse
import contextlib
import copyreg
import ctypes
import dataclasses
import gc
import io
import json
import math
import os
import pickle
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ============================================================================ engine adapters
# Everything the simulator asks of dckpt is in these few functions: a new format version or
# planner changes only them. ``Leaf``/``Layout`` below are the simulator's own neutral input.

PROBE_CRC = 0x1234ABCD  # every rank's ``step`` holds the same bytes, so the same checksum


def engine_boxes(
    shape: tuple[int, ...],
    mesh: tuple[int, ...],
    coord: tuple[int, ...],
    specs: tuple[tuple[str, int, int], ...],
) -> list[Any]:
    """The global boxes rank ``coord`` holds, by the engine's DTensor math."""
    from dckpt._dtensor import PlacementSpec, local_boxes

    placements = [PlacementSpec(k, d, f) for k, d, f in specs]  # type: ignore[arg-type]
    return [box for box, _ in local_boxes(shape, mesh, coord, placements)]


def engine_values(values: dict[str, Any], rank: int) -> tuple[Any, ...]:
    """A rank's non-tensor value offers, made by the save's own description of a state."""
    from dckpt._describe import describe

    return describe(values, rank, allow_pickle=False).offer.values


def engine_offer(
    rank: int,
    leaves: Sequence[Leaf],
    layouts: Sequence[Layout],
    mesh: tuple[int, ...],
    coord: tuple[int, ...],
    values: tuple[Any, ...],
) -> Any:
    """What ``_describe.describe(..., layouts=True)`` + ``checksum_plain`` offer for this
    rank (format 2): plain tensors as chunks, every DTensor as a layout offer on its mesh.
    The layout offers are the same objects on every rank (only the mesh position differs),
    as equal states make them."""
    from dckpt._layout import MeshOffer, ravel
    from dckpt._plan import ChunkOffer, RankOffer, TensorOffer
    from dckpt._reshard import Box

    tensors = []
    for leaf in leaves:
        if leaf.layout < 0:  # a plain tensor: one whole chunk, checksummed up front
            chunk = ChunkOffer(Box((0,) * len(leaf.shape), leaf.shape), (PROBE_CRC,))
            tensors.append(
                TensorOffer(leaf.key, leaf.path, "float32", tuple(leaf.shape), False, (chunk,))
            )
    ident = _mesh_ident(mesh)
    meshes = (MeshOffer(ident, mesh, ravel(coord, mesh)),)
    return RankOffer(rank, tuple(tensors), values, _layout_offers(leaves, layouts), meshes)


_LAYOUT_OFFERS: dict[int, tuple[Any, ...]] = {}
_MESH_IDENTS: dict[tuple[int, ...], bytes] = {}


def _mesh_ident(mesh: tuple[int, ...]) -> bytes:
    """The mesh digest ``_describe`` makes (of the shape and the ranks, arange(W) here)."""
    import hashlib

    if mesh not in _MESH_IDENTS:
        text = repr((mesh, tuple(range(math.prod(mesh))))).encode()
        _MESH_IDENTS[mesh] = hashlib.blake2b(text, digest_size=16).digest()
    return _MESH_IDENTS[mesh]


def _layout_offers(leaves: Sequence[Leaf], layouts: Sequence[Layout]) -> tuple[Any, ...]:
    from dckpt._dtensor import PlacementSpec
    from dckpt._layout import LayoutOffer

    if id(leaves) not in _LAYOUT_OFFERS:
        _LAYOUT_OFFERS[id(leaves)] = tuple(
            LayoutOffer(
                leaf.key,
                leaf.path,
                "float32",
                tuple(leaf.shape),
                0,
                tuple(PlacementSpec(k, d, f) for k, d, f in layouts[leaf.layout].specs),  # type: ignore[arg-type]
            )
            for leaf in leaves
            if leaf.layout >= 0
        )
    return _LAYOUT_OFFERS[id(leaves)]


def engine_sent_offer(offer: Any) -> Any:
    """What a rank sends rank 0 in the plan exchange: its offer without the layouts, which
    only the rank itself plans (format 2)."""
    return dataclasses.replace(offer, layouts=(), meshes=())


def engine_brief(offer: Any) -> Any:
    """A later save's plan message from a rank whose structure is unchanged."""
    from dckpt._plan import structure_key
    from dckpt._plancache import Brief, crcs_of

    return Brief(offer.rank, structure_key(offer), crcs_of(offer), offer.values)


def engine_frames(messages: Iterable[Any]) -> tuple[Any, list[bytes]]:
    """What the ranks put in the store for the plan exchange, as ``_Round._message`` and
    the coordinator make it: each message encoded (``dckpt._wire``) as a ``Shared`` value;
    the first rank with a content sends it, the others a reference (the store's counter,
    simulated in rank order). Returns rank 0's own value and the followers' blobs."""
    from dckpt._coordframes import Shared, content_digest, shared_frame
    from dckpt._plan import RankOffer, structure_key
    from dckpt._wire import encode_message

    seen: set[bytes] = set()
    own0, blobs = None, []
    for message in messages:
        key = structure_key(message) if isinstance(message, RankOffer) else b""
        value = Shared(*encode_message(message, key))
        digest = content_digest(value.common)
        first = digest not in seen
        seen.add(digest)
        if own0 is None:
            own0 = value
        else:
            blobs.append(shared_frame(digest, value, first=first))
    return own0, blobs


def engine_gather(own0: Any, blobs: list[bytes]) -> list[Any]:
    """Rank 0's gather: read the frames (references resolved), decode each distinct
    message once."""
    from dckpt._coordframes import content_digest, sort_outcomes
    from dckpt._wire import decode_messages

    values: list[Any] = [own0] + [None] * len(blobs)
    failures: dict[int, Any] = {}
    commons = {content_digest(own0.common): own0.common}
    sort_outcomes(dict(enumerate(blobs, 1)), values, failures, commons)
    if failures:
        raise RuntimeError(f"frames did not decode: {list(failures.items())[:2]}")
    return decode_messages(values)


def engine_scatter(answers: list[Any]) -> list[bytes]:
    """Rank 0's answers as they go into the store (a reuse note is encoded once)."""
    from dckpt._wireout import encode_answers

    return [coord_blob(b) for b in encode_answers(answers)]


def engine_plan(decoded: list[Any]) -> Any:
    """Rank 0's planning as ``run_save`` does it (through a fresh plan cache, which
    leaves each rank the tensors it alone holds): the plan and its manifest template."""
    from dckpt._plancache import PlanCache
    from dckpt.storage._base import LOCAL_LAYOUT

    cache = PlanCache()
    messages, keys = [m for m, _ in decoded], [k for _, k in decoded]
    cached = cache.plan(messages, LOCAL_LAYOUT, "0123456789abcdef0123", keys)
    assert cached is not None and cached.template is not None  # the template made now
    return cache, cached


def engine_answers(cache: Any, cached: Any) -> tuple[list[Any], Any]:
    """What rank 0 scatters: each rank's plan (first save), and the reuse note (later)."""
    from dckpt._plancache import Reuse

    return cache.answers(cached), Reuse(cached.serial, cached.plan.save_id)


def engine_results(rank_plan: Any, rng: random.Random) -> list[Any]:
    """What a rank reports after writing: per file, its size and per-item block checksums."""
    from dckpt._format import DEFAULT_BLOCK_BYTES, block_count
    from dckpt._plan import FileResult

    return [
        FileResult(
            fp.name,
            fp.size,
            tuple(
                tuple(
                    rng.getrandbits(32) for _ in range(block_count(i.nbytes, DEFAULT_BLOCK_BYTES))
                )
                for i in fp.items
            ),
        )
        for fp in rank_plan.files
    ]


def engine_render(cached: Any, written: list[Any]) -> bytes:
    """Rank 0's commit-time work: merge the ranks' layout reports and the entries of
    tensors ranks hold alone (none in these states), render the manifest."""
    from dckpt._manifest_build import merge_layouts
    from dckpt._owned import owned_part
    from dckpt._plan import render_manifest

    plan, split = cached.plan, cached.split
    taken = {*plan.tensors, *plan.values, *split.keys}
    part = merge_layouts([w.layouts for w in written], plan.world_size, taken)
    return render_manifest(
        cached.template,
        plan,
        [w.files for w in written],
        created=1.7e9,
        block_bytes=1 << 20,
        library="dckpt bench",
        layouts=part,
        owned=owned_part([w.own for w in written], split.own_keys),
    )


class LayoutWriter:
    """Each rank's layout report (what it tells rank 0 after writing), and the tables a
    load reads. A rank's shard files and table come from the engine's own planning
    (``plan_layout_files``, ``encode_table``) for the ranks a load of rank 0 reads from
    and one more; every other rank reports those sizes under its own names (listing all
    W ranks' real shards would cost the simulator W x tensors)."""

    def __init__(self, offer0: Any, world: int, save_id: str, needed: set[int]) -> None:
        from dckpt._layout import unravel, writer_coordinate
        from dckpt._manifest_build import entries_digest

        self.world, self.save_id, self.needed = world, save_id, needed
        mesh = self.mesh = offer0.meshes[0]
        self.digest = entries_digest(offer0.layouts)
        self.first: dict[int, list[Any]] = {}  # mesh position -> entries it reports
        for e in offer0.layouts:
            zeros = tuple(0 for _ in mesh.shape)
            w = writer_coordinate(e.key, mesh.shape, e.placements, zeros)
            pos = 0
            for c, n in zip(w, mesh.shape, strict=True):
                pos = pos * n + c
            self.first.setdefault(pos, []).append(e)
        assert unravel(0, mesh.shape) == tuple(0 for _ in mesh.shape)
        self.real: dict[int, tuple[tuple[tuple[str, int], ...], tuple[str, int, int], bytes]] = {}
        self.sample = min(1, world - 1)

    def files(self, offer: Any) -> tuple[tuple[tuple[str, int], ...], tuple[str, int, int], bytes]:
        from dckpt._format import block_count, data_dir
        from dckpt._table import Row, encode_table, table_crc, table_name
        from dckpt._write import plan_layout_files
        from dckpt.storage import FileLayout

        files, pieces = plan_layout_files(offer, self.save_id, FileLayout())
        rows = [
            Row(i.key, pieces[(i.key, i.box)], f, i.offset, i.nbytes,
                (PROBE_CRC,) * block_count(i.nbytes, 1 << 20))
            for f, fp in enumerate(files)
            for i in fp.items
        ]  # fmt: skip
        data = encode_table(offer.rank, rows)
        name = table_name(data_dir(self.save_id), offer.rank)
        return tuple((fp.name, fp.size) for fp in files), (name, len(data), table_crc(data)), data

    def report(self, rank: int, make_offer: Callable[[int], Any]) -> Any:
        from dckpt._layout import LayoutReport, MeshReport

        offer = make_offer(rank) if rank in self.needed or rank == self.sample else None
        if offer is not None:
            got = self.real.get(rank)
            if got is None:
                got = self.real[rank] = self.files(offer)
            files, table = got[0], got[1]
            m = offer.meshes[0]
        else:
            sample_files, (_, size, crc), _ = self.real[self.sample]
            old, new = f"/r{self.sample}-", f"/r{rank}-"
            files = tuple((n.replace(old, new), s) for n, s in sample_files)
            table = (sample_files[0][0].rsplit("/", 1)[0] + f"/r{rank}.tab", size, crc)
            m = dataclasses.replace(self.mesh, position=rank)  # meshes are arange(W)
        meshes = (MeshReport(m.ident, m.shape, m.position, self.digest),)
        return LayoutReport(rank, meshes, tuple(self.first.get(m.position, ())), files, table)

    def write_tables(self, root: str) -> int:
        """Write the tables of the ranks a load of rank 0 reads; their total bytes."""
        total = 0
        for rank in self.needed:
            name, _, _ = self.real[rank][1]
            os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
            with open(os.path.join(root, name), "wb") as f:
                f.write(self.real[rank][2])
            total += len(self.real[rank][2])
        return total


def engine_decode(raw: bytes) -> Any:
    from dckpt._format import manifest_from_bytes

    return manifest_from_bytes(raw, source="bench/manifest.json")


def engine_load_plan(
    manifest: Any, state: dict[str, Any], rank: int, world: int, tables: str
) -> int:
    """One rank's load preparation after the decode; returns the number of read tasks."""
    from dckpt._load import Saved, plan_load
    from dckpt._state import resolve
    from dckpt.storage import open_storage

    # The simulated state asks for every saved key, so nothing is grown and no data file
    # read; the tables of the writers whose shards this rank needs are read and checked.
    storage = open_storage(tables)
    saved = Saved(manifest, rank, world, allow_pickle=False, storage=storage)
    resolved = resolve(state, saved=saved)
    lp = plan_load(manifest, resolved, rank, world, allow_pickle=False, tables=saved.tables)
    if lp.missing or lp.problems:
        raise RuntimeError(f"load plan does not match: {lp.missing[:3]} {lp.problems[:3]}")
    return len(lp.tasks)


def engine_dtensor_boxes(dt: Any) -> list[Any]:
    from dckpt._dtensor import dtensor_chunks

    return [box for box, _ in dtensor_chunks(dt)]


def coord_blob(payload: Any) -> bytes:
    """A payload as the coordinator puts it in the store."""
    from dckpt._coord import encode

    return encode("ok", payload)


def offer_blob(offer: Any) -> bytes:
    """``coord_blob(offer)``, faster: building W offers is the simulator's own cost, not the
    engine's. Slots dataclasses pickle through a Python ``__getstate__`` that calls
    ``dataclasses.fields`` per object; reducers that return the same state give the same
    bytes (checked on each run's first offer; on a difference this falls back)."""
    global _fast_ok
    if _fast_ok is None:
        _fast_ok = _fast_dumps(offer) == coord_blob(offer)
    return _fast_dumps(offer) if _fast_ok else coord_blob(offer)


_fast_ok: bool | None = None
_reducers: dict[type, Callable[[Any], Any]] = {}


def _fast_dumps(payload: Any) -> bytes:
    from dckpt._plan import ChunkOffer, RankOffer, TensorOffer, ValueOffer
    from dckpt._reshard import Box

    if not _reducers:
        for cls in (RankOffer, TensorOffer, ChunkOffer, ValueOffer, Box):
            if dataclasses.is_dataclass(cls) and hasattr(cls, "__slots__"):
                _reducers[cls] = _reducer(cls, tuple(f.name for f in dataclasses.fields(cls)))
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _reducers
    pickler.dump(("ok", payload))
    return buf.getvalue()


def _reducer(cls: type, names: tuple[str, ...]) -> Callable[[Any], Any]:
    def reduce(obj: Any) -> Any:
        return (copyreg.__newobj__, (cls,), [getattr(obj, n) for n in names])  # type: ignore[attr-defined]

    return reduce


def blob_payload(blob: bytes) -> Any:
    if blob[:1] == b"\x80":  # a plain pickle (``_fast_dumps``)
        return pickle.loads(blob)[1]
    from dckpt._coordframes import decode

    return decode(blob)[1]


# ============================================================================ synthetic state

TP = 8


@dataclasses.dataclass(frozen=True, slots=True)
class Leaf:
    key: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    layout: int  # index into the layouts, or -1 for a plain (replicated) tensor


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    shape: tuple[int, ...]
    specs: tuple[tuple[str, int, int], ...]  # (kind, tensor dim, split factor) per mesh dim


def llama_params(
    layers: int = 80,
    dim: int = 8192,
    ffn: int = 28672,
    kv_heads: int = 8,
    heads: int = 64,
    vocab: int = 128256,
) -> list[tuple[str, tuple[int, ...], str]]:
    """(fqn, shape, tensor-parallel style) of a Llama-3-70B-like model, in module order."""
    kv = dim // heads * kv_heads
    out: list[tuple[str, tuple[int, ...], str]] = [("tok_embeddings.weight", (vocab, dim), "col")]
    for i in range(layers):
        p = f"layers.{i}."
        out += [
            (p + "attention.wq.weight", (dim, dim), "col"),
            (p + "attention.wk.weight", (kv, dim), "col"),
            (p + "attention.wv.weight", (kv, dim), "col"),
            (p + "attention.wo.weight", (dim, dim), "row"),
            (p + "feed_forward.w1.weight", (ffn, dim), "col"),
            (p + "feed_forward.w2.weight", (dim, ffn), "row"),
            (p + "feed_forward.w3.weight", (ffn, dim), "col"),
            (p + "attention_norm.weight", (dim,), "rep"),
            (p + "ffn_norm.weight", (dim,), "rep"),
        ]
    return [*out, ("norm.weight", (dim,), "rep"), ("output.weight", (vocab, dim), "col")]


def mesh_of(layout: str, world: int) -> tuple[int, ...]:
    return (world,) if layout == "fsdp" else (world // TP, TP)


def coord_of(layout: str, world: int, rank: int) -> tuple[int, ...]:
    return (rank,) if layout == "fsdp" else (rank // TP, rank % TP)


def specs_of(layout: str, style: str) -> tuple[tuple[str, int, int], ...]:
    if layout == "fsdp":
        return (("shard", 0, 1),)
    # FSDP2 over TP: the dp mesh dim shards dim 0; where TP already shards dim 0 it is a
    # _StridedShard so that the dp chunks interleave with the TP ones.
    return {
        "col": (("strided_shard", 0, TP), ("shard", 0, 1)),
        "row": (("shard", 0, 1), ("shard", 1, 1)),
        "rep": (("shard", 0, 1), ("replicate", -1, 1)),
    }[style]


def param_groups(fqns: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "lr": 3e-4,
            "betas": (0.9, 0.95),
            "eps": 1e-8,
            "weight_decay": 0.1,
            "amsgrad": False,
            "foreach": None,
            "maximize": False,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "decoupled_weight_decay": False,
            "params": fqns,
        }
    ]


def synthetic_state(layout: str) -> tuple[list[Leaf], list[Layout], list[dict[str, Any]]]:
    params = llama_params()
    layouts: list[Layout] = []
    index: dict[Layout, int] = {}
    leaves: list[Leaf] = []
    per_param: list[tuple[str, tuple[int, ...], int]] = []
    for fqn, shape, style in params:
        lay = Layout(shape, specs_of(layout, style))
        li = index.setdefault(lay, len(layouts))
        if li == len(layouts):
            layouts.append(lay)
        per_param.append((fqn, shape, li))
        leaves.append(Leaf(f"model.{fqn}", ("model", fqn), shape, li))
    for fqn, shape, li in per_param:
        base = ("optimizer", "state", fqn)
        leaves.append(Leaf(f"optimizer.state.{fqn}.step", (*base, "step"), (), -1))
        for moment in ("exp_avg", "exp_avg_sq"):
            leaves.append(Leaf(f"optimizer.state.{fqn}.{moment}", (*base, moment), shape, li))
    return leaves, layouts, param_groups([fqn for fqn, _, _ in params])


# ============================================================================ real DTensors


def fake_world(layout: str, world: int, rank: int) -> Any:
    """A process group of ``world`` ranks that is really this one process (torch's "fake"
    backend), and the device mesh of ``layout`` on it, as rank ``rank``."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    return DeviceMesh("cpu", torch.arange(world).reshape(mesh_of(layout, world)))


def torch_placements(specs: tuple[tuple[str, int, int], ...]) -> list[Any]:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    out: list[Any] = []
    for kind, dim, factor in specs:
        if kind == "shard":
            out.append(Shard(dim))
        elif kind == "strided_shard":
            out.append(_StridedShard(dim, split_factor=factor))
        else:
            out.append(Replicate())
    return out


def real_state(
    layout: str,
    world: int,
    rank: int,
    leaves: list[Leaf],
    layouts: list[Layout],
    groups: list[dict[str, Any]],
    *,
    model_only: bool = False,
) -> dict[str, Any]:
    """The state rank ``rank`` holds, as DTensors over meta-device local tensors (no memory):
    the load destination, and the input of DCP's local planning."""
    import torch
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    mesh = fake_world(layout, world, rank)
    coord = coord_of(layout, world, rank)
    model: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    for leaf in leaves:
        if model_only and leaf.path[0] != "model":
            continue
        if leaf.layout < 0:
            t: Any = torch.empty(leaf.shape, device="meta")
        else:
            lay = layouts[leaf.layout]
            places = torch_placements(lay.specs)
            local, _ = _compute_local_shape_and_global_offset(
                lay.shape, mesh.shape, list(coord), places
            )
            stride = tuple(math.prod(lay.shape[i + 1 :]) for i in range(len(lay.shape)))
            t = DTensor.from_local(
                torch.empty(local, device="meta"),
                mesh,
                places,
                run_check=False,
                shape=torch.Size(lay.shape),
                stride=stride,
            )
        if leaf.path[0] == "model":
            model[leaf.path[1]] = t
        else:
            optim.setdefault(leaf.path[2], {})[leaf.path[3]] = t
    return {"model": model, "optimizer": {"state": optim, "param_groups": groups}}


# ============================================================================ measuring

_libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Meter:
    """Peak RSS above the RSS at entry, and named wall times, with the collector off."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.cpu = 0.0  # process CPU seconds of all steps: steadier than wall time when
        self.peak = 0  # other work shares the cores

    def __enter__(self) -> Meter:
        gc.collect()
        if _libc is not None:
            _libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        self.base = _status("VmRSS")
        gc.disable()
        return self

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t, c = time.perf_counter(), time.process_time()
        yield
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t
        self.cpu += time.process_time() - c

    def __exit__(self, *exc: object) -> None:
        self.peak = _status("VmHWM") - self.base
        gc.enable()


@contextlib.contextmanager
def profiled(on: bool, title: str) -> Iterator[None]:
    if not on:
        yield
        return
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        for order in ("tottime", "cumulative"):
            print(f"--- cProfile: {title} (top by {order} time)", file=sys.stderr)
            pstats.Stats(prof, stream=sys.stderr).sort_stats(order).print_stats(16)


# ============================================================================ children


def child_save(layout: str, world: int, out: str, profile: bool) -> dict[str, Any]:
    from dckpt._plan import RankWritten

    leaves, layouts, groups = synthetic_state(layout)
    mesh = mesh_of(layout, world)
    values = engine_values({"optimizer": {"param_groups": groups}}, 0)
    _check_boxes(layout, world, leaves, layouts, groups)

    def offer(rank: int) -> Any:
        return engine_offer(rank, leaves, layouts, mesh, coord_of(layout, world, rank), values)

    t = time.perf_counter()
    offer0 = offer(0)
    own0, blobs = engine_frames(engine_sent_offer(offer(r)) for r in range(world))
    build_s = time.perf_counter() - t
    probes = sorted({0, 1, world // 2, world - 1})
    _, briefs = engine_frames(engine_brief(engine_sent_offer(offer(r))) for r in probes)
    brief_bytes = max(len(b) for b in briefs)  # the rank sending the one full copy
    offer_bytes = max(len(b) for b in blobs)
    gathered = sum(len(b) for b in blobs)
    rng = random.Random(0)
    with Meter() as m, profiled(profile, f"rank 0, {layout}, W={world}"):
        with m.step("gather"):
            decoded = engine_gather(own0, blobs)
        with m.step("plan"):
            cache, cached = engine_plan(decoded)
            plan = cached.plan
        with m.step("scatter"):
            firsts, reuse = engine_answers(cache, cached)
            answers = engine_scatter(firsts[1:])
        # The ranks write, then report; rank 0 receives their reports (not its own work).
        lw = LayoutWriter(offer0, world, plan.save_id, _load_writers(layout, world, offer0))
        written0 = RankWritten(tuple(engine_results(plan.ranks[0], rng)), lw.report(0, offer))
        reports = [
            coord_blob(RankWritten(tuple(engine_results(rp, rng)), lw.report(r, offer)))
            for r, rp in enumerate(plan.ranks[1:], 1)
        ]
        with m.step("render"):
            written = [written0] + [blob_payload(b) for b in reports]
            manifest = engine_render(cached, written)
    with open(out, "wb") as f:
        f.write(manifest)
    lw.write_tables(out + ".tables")
    report_bytes = max(len(b) for b in reports)
    return {
        "rank0_s": sum(m.times.values()),
        "times": m.times,
        "rank0_peak": m.peak + gathered,
        "rank0_cpu": m.cpu,
        "manifest": len(manifest),
        "table": max(len(v[2]) for v in lw.real.values()),
        "tables": sum(t.layouts.table[1] for t in written if t.layouts and t.layouts.table),
        "gather": gathered,
        "build_s": build_s,
        "send_first": max(len(o) + len(r) for o, r in zip(blobs, reports, strict=True)),
        "send_later": brief_bytes + report_bytes,
        "offer": offer_bytes,
        "brief": brief_bytes,
        "recv_first": max(len(a) for a in answers),
        "recv_later": len(engine_scatter([reuse])[0]),
        # what most ranks send in the plan exchange: a reference when a peer holds the same
        "send_typical": sorted(len(b) for b in blobs)[len(blobs) // 2],
        "recv_typical": sorted(len(a) for a in answers)[len(answers) // 2],
        "chunks": sum(len(t.chunks) for m, _ in decoded for t in m.full().tensors),
    }


def _load_writers(layout: str, world: int, offer0: Any) -> set[int]:
    """The ranks whose tables a load of rank 0's state reads: the writers of the shards
    its boxes overlap (the mesh is arange(W), so a flat position is a rank)."""
    from dckpt._layout import overlapping_shards, ravel, writer_coordinate

    mesh = mesh_of(layout, world)
    coord = coord_of(layout, world, 0)
    out: set[int] = set()
    for e in offer0.layouts:
        specs = tuple((p.kind, p.dim, p.split_factor) for p in e.placements)
        for box in engine_boxes(e.shape, mesh, coord, specs):
            for c, _ in overlapping_shards(e.shape, mesh, e.placements, box):
                out.add(ravel(writer_coordinate(e.key, mesh, e.placements, c), mesh))
    return out


def _check_boxes(
    layout: str, world: int, leaves: list[Leaf], layouts: list[Layout], groups: list[dict[str, Any]]
) -> None:
    """The synthetic boxes of one non-trivial rank equal what its real DTensors give."""
    rank = world // 3 + 1
    state = real_state(layout, world, rank, leaves, layouts, groups, model_only=True)
    coord = coord_of(layout, world, rank)
    for leaf in leaves:
        if leaf.layout >= 0 and leaf.path[0] == "model":
            lay = layouts[leaf.layout]
            mine = engine_boxes(lay.shape, mesh_of(layout, world), coord, lay.specs)
            real = engine_dtensor_boxes(state["model"][leaf.path[1]])
            if mine != real:
                raise RuntimeError(f"{leaf.key} rank {rank}: synthetic {mine} != real {real}")


def child_load(layout: str, world: int, path: str, profile: bool) -> dict[str, Any]:
    leaves, layouts, groups = synthetic_state(layout)
    state = real_state(layout, world, 0, leaves, layouts, groups)
    import dckpt._load  # noqa: F401  (heavy: importing the engine is not the load's work)

    with Meter() as m, profiled(profile, f"one rank's load, {layout}, W={world}"):
        with m.step("read"), open(path, "rb") as f:
            raw = f.read()
        with m.step("decode"):
            manifest = engine_decode(raw)
        with m.step("plan"):
            tasks = engine_load_plan(manifest, state, 0, world, path + ".tables")
    return {
        "load_s": m.times["decode"] + m.times["plan"],
        "times": m.times,
        "load_cpu": m.cpu,
        "load_peak": m.peak,
        "tasks": tasks,
    }


def child_dcp(layout: str, world: int) -> dict[str, Any]:
    """DCP's planner functions on the same state."""
    import torch
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.default_planner import (
        DefaultSavePlanner,
        create_default_local_load_plan,
        create_default_local_save_plan,
    )
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import (
        SavePlan,
        TensorWriteData,
        WriteItem,
        WriteItemType,
    )
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    leaves, layouts, groups = synthetic_state(layout)
    by_key = {leaf.key: leaf for leaf in leaves}
    mesh = mesh_of(layout, world)
    probe = world // 3 + 1
    flat, mappings = flatten_state_dict(real_state(layout, world, probe, leaves, layouts, groups))
    t = time.perf_counter()
    real = create_default_local_save_plan(flat, probe == 0)
    local_s = time.perf_counter() - t
    places = [torch_placements(lay.specs) for lay in layouts]

    def plan(rank: int) -> Any:
        coord = list(coord_of(layout, world, rank))
        chunks: dict[int, tuple[Any, Any]] = {}  # per layout: (offsets, chunk), as torch makes
        for i, lay in enumerate(layouts):
            sizes, offsets = _compute_local_shape_and_global_offset(
                lay.shape, mesh, coord, places[i]
            )
            chunks[i] = (torch.Size(offsets), torch.Size(sizes))
        items = []
        for item in real.items:
            if item.type != WriteItemType.SHARD:
                items.append(item)
                continue
            offsets, sizes = chunks[by_key[item.index.fqn].layout]
            data = item.tensor_data
            assert data is not None
            items.append(
                WriteItem(
                    index=MetadataIndex(item.index.fqn, offsets),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                        properties=data.properties,
                        size=data.size,
                    ),
                )
            )
        return SavePlan(items, planner_data=mappings)

    if plan(probe).items != real.items:
        raise RuntimeError("synthetic DCP local plan differs from create_default_local_save_plan")
    blobs = [pickle.dumps(plan(r), protocol=pickle.HIGHEST_PROTOCOL) for r in range(world)]
    with Meter() as m:
        with m.step("gather"):
            plans = [pickle.loads(b) for b in blobs]
        with m.step("plan"):
            planner = DefaultSavePlanner()
            global_plan, metadata = planner.create_global_plan(plans)
        with m.step("scatter"):
            answers = [pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL) for p in global_plan]
        reports = []
        for r, p in enumerate(global_plan):
            pos, wrs = 0, []
            for item in p.items:
                data = item.tensor_data
                n = 64 if data is None else math.prod(data.chunk.sizes) * 4
                wrs.append(WriteResult(item.index, n, _StorageInfo(f"__{r}_0.distcp", pos, n)))
                pos += n
            reports.append(pickle.dumps(wrs, protocol=pickle.HIGHEST_PROTOCOL))
        with m.step("finish"):  # FileSystemWriter.finish: merge the results, pickle metadata
            storage = {}
            for b in reports:
                storage.update({wr.index: wr.storage_data for wr in pickle.loads(b)})
            metadata.storage_data = storage
            md_bytes = pickle.dumps(metadata)
    del plans, global_plan, metadata, storage, reports
    state = real_state(layout, world, 0, leaves, layouts, groups)
    flat, _ = flatten_state_dict(state)
    with Meter() as lm:
        with lm.step("decode"):
            md = pickle.loads(md_bytes)
        with lm.step("plan"):
            lp = create_default_local_load_plan(flat, md, True)
    return {
        "rank0_s": sum(m.times.values()),
        "times": m.times,
        "rank0_cpu": m.cpu,
        "load_cpu": lm.cpu,
        "rank0_peak": m.peak + sum(len(b) for b in blobs),
        "manifest": len(md_bytes),
        "local_s": local_s,
        "load_s": sum(lm.times.values()),
        "load_times": lm.times,
        "load_peak": lm.peak + len(md_bytes),  # the bytes read are held before the baseline
        "tasks": len(lp.items),
        "offer": max(len(b) for b in blobs),
        "recv_first": max(len(a) for a in answers),
        "gather": sum(len(b) for b in blobs),
    }


# ============================================================================ the driver


def run_child(args: list[str], timeout: float, mem_bytes: int) -> tuple[dict[str, Any] | None, str]:
    """Run one measurement in a fresh process; (result, "") or (None, why not)."""

    def limit() -> None:  # a wrong estimate fails this process, not the machine
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))

    cmd = [sys.executable, os.path.abspath(__file__), *args]
    t = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit
        )
    except subprocess.TimeoutExpired as exc:
        sys.stderr.write(exc.stderr.decode() if isinstance(exc.stderr, bytes) else "")
        return None, f"gave up after {timeout:.0f} s"
    sys.stderr.write(proc.stderr if "cProfile" in proc.stderr else "")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[7:])
            out["wall"] = time.perf_counter() - t
            return out, ""
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return None, f"failed (exit {proc.returncode}: {tail[:120]})"


GB = 1e9
# Before anything is measured: bytes of rank-0 memory per chunk record (a rough prior; each
# measured W replaces it).
PRIOR_PER_CHUNK = 2500


def _estimate(done: list[dict[str, Any]], world: int, field: str, prior: float) -> float:
    """Linear in W from the largest measured W (the costs measured so far are linear)."""
    if not done:
        return prior
    last = done[-1]
    return last[field] * world / last["world"]


def drive(opts: argparse.Namespace) -> None:
    worlds = [64, 256] if opts.quick else [int(w) for w in opts.worlds.split(",")]
    # --quick is a smoke run: one layout unless asked for more (rank 0's own work at W=256
    # is tens of seconds per layout on a busy 2-core machine).
    layouts = (opts.layouts or ("fsdp" if opts.quick else "fsdp,fsdp-tp8")).split(",")
    mem = int(opts.mem_gb * GB)
    hard = mem + int(6 * GB)  # the address-space limit: torch maps far more than it touches
    print(
        f"# bench_scale: Llama-3-70B-like + Adam, float32; worlds {worlds}; memory cap "
        f"{opts.mem_gb:g} GB per process; {time.strftime('%Y-%m-%d %H:%M')}",
        flush=True,
    )
    tmp = tempfile.mkdtemp(prefix="dckpt-bench-scale-")
    try:
        for layout in layouts:
            leaves, _, _ = synthetic_state(layout)
            rows: list[dict[str, Any]] = []
            skipped: dict[int, str] = {}
            dcp_rows: list[dict[str, Any]] = []
            dcp_skipped: dict[int, str] = {}
            for w in worlds:
                if layout != "fsdp" and w % TP:
                    skipped[w] = f"not a multiple of {TP}"
                    continue
                rows_needed = _estimate(rows, w, "proc_bytes", w * len(leaves) * PRIOR_PER_CHUNK)
                t_needed = _estimate(rows, w, "wall", 0.0)
                if skipped or rows_needed > mem or t_needed > opts.max_s:
                    skipped[w] = (
                        (
                            f"skipped: would need ~{rows_needed / GB:.1f} GB"
                            f" and ~{t_needed / 60:.0f} min"
                        )
                        if not skipped
                        else "skipped"
                    )
                    print(f"{layout} W={w}: {skipped[w]}", flush=True)
                else:
                    _measure(layout, w, tmp, opts, hard, rows, skipped)
                if opts.dcp and not dcp_skipped:
                    need = _estimate(dcp_rows, w, "proc_bytes", w * len(leaves) * PRIOR_PER_CHUNK)
                    t_needed = _estimate(dcp_rows, w, "wall", 0.0)
                    if need > mem or t_needed > opts.dcp_cap:
                        dcp_skipped[w] = (
                            f"skipped: would need ~{need / GB:.1f} GB and "
                            f"~{t_needed / 60:.0f} min (cap {opts.dcp_cap:.0f} s)"
                        )
                    else:
                        res, why = run_child(
                            ["--child", "dcp", "--layout", layout, "--world", str(w)],
                            opts.dcp_cap,
                            hard,
                        )
                        if res is None:
                            dcp_skipped[w] = why
                        else:
                            res["world"] = w
                            res["proc_bytes"] = res["rank0_peak"] + res["load_peak"]
                            dcp_rows.append(res)
                    print(f"{layout} W={w} DCP: {dcp_skipped.get(w, 'done')}", flush=True)
            report(
                layout, worlds, rows, skipped, leaves, dcp_rows if opts.dcp else None, dcp_skipped
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(
    layout: str,
    w: int,
    tmp: str,
    opts: argparse.Namespace,
    hard: int,
    rows: list[dict[str, Any]],
    skipped: dict[int, str],
) -> None:
    path = os.path.join(tmp, f"{layout}-{w}.json")
    common = ["--layout", layout, "--world", str(w), "--path", path]
    prof = ["--profile"] if opts.profile else []
    save, why = run_child(["--child", "save", *common, *prof], opts.max_s * 2, hard)
    if save is None:
        skipped[w] = why
        print(f"{layout} W={w}: {why}", flush=True)
        return
    load, why = run_child(["--child", "load", *common, *prof], opts.max_s * 2, hard)
    os.unlink(path)
    shutil.rmtree(path + ".tables", ignore_errors=True)
    if load is None:
        skipped[w] = why
        print(f"{layout} W={w}: load {why}", flush=True)
        return
    row = {**save, **{k: v for k, v in load.items() if k not in ("times", "wall")}}
    row.update(world=w, load_times=load["times"], wall=save["wall"] + load["wall"])
    # What the save process holds at its peak besides the measured steps: the offers it
    # built, and the interpreter with torch (about 0.5 GB).
    row["proc_bytes"] = max(row["rank0_peak"] + row["gather"], row["load_peak"]) + 0.5 * GB
    rows.append(row)
    print(
        f"{layout} W={w}: rank 0 {row['rank0_s']:.2f} s, manifest "
        f"{row['manifest'] / 1e6:.1f} MB, load {row['load_s']:.2f} s "
        f"({row['wall']:.0f} s wall); plan exchange bytes per rank: sends "
        f"{row['send_typical']:,} typical / {row['offer']:,} most, receives "
        f"{row['recv_typical']:,} typical / {row['recv_first']:,} most; rank 0 gathers "
        f"{row['gather']:,} in all",
        flush=True,
    )


# ============================================================================ the report


def _sig(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


COLUMNS = [  # (title, field(s), scale, format)
    ("rank 0 plan s", "rank0_s", 1, _sig),
    ("rank 0 peak MB", "rank0_peak", 1e-6, "{:,.0f}".format),
    ("manifest MB", "manifest", 1e-6, "{:,.1f}".format),
    ("table KB/rank", "table", 1e-3, "{:,.1f}".format),
    ("tables MB", "tables", 1e-6, "{:,.1f}".format),
    ("load s", "load_s", 1, _sig),
    ("load peak MB", "load_peak", 1e-6, "{:,.0f}".format),
    ("send KB 1st/later", ("send_first", "send_later"), 1e-3, "{:,.0f}".format),
    ("recv KB 1st/later", ("recv_first", "recv_later"), 1e-3, "{:,.1f}".format),
    ("gather MB", "gather", 1e-6, "{:,.0f}".format),
]
DCP_COLUMNS = [
    ("rank 0 plan s", "rank0_s", 1, _sig),
    ("rank 0 peak MB", "rank0_peak", 1e-6, "{:,.0f}".format),
    ("metadata MB", "manifest", 1e-6, "{:,.1f}".format),
    ("load s", "load_s", 1, _sig),
    ("load peak MB", "load_peak", 1e-6, "{:,.0f}".format),
    ("send KB (plan)", "offer", 1e-3, "{:,.0f}".format),
    ("recv KB (plan)", "recv_first", 1e-3, "{:,.0f}".format),
    ("gather MB", "gather", 1e-6, "{:,.0f}".format),
]
TARGETS = [
    ("rank0_s", 10.0, "rank 0 planning <= 10 s"),
    ("rank0_peak", 4e9, "rank 0 peak <= 4 GB"),
    ("manifest", 64e6, "manifest <= 64 MB"),
    ("load_s", 1.0, "one rank's load planning <= 1 s"),
    ("load_peak", 256e6, "one rank's load peak <= 256 MB"),
]


def exponent(rows: list[dict[str, Any]], field: str) -> float | None:
    if len(rows) < 2:
        return None
    a, b = rows[-2], rows[-1]
    va, vb = _value(a, field), _value(b, field)
    if va <= 0 or vb <= 0:
        return None
    return math.log(vb / va) / math.log(b["world"] / a["world"])


def _value(row: dict[str, Any], field: str | tuple[str, ...]) -> float:
    return float(row[field if isinstance(field, str) else field[0]])


def _extrapolate(rows: list[dict[str, Any]], w: int, columns: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"world": w}
    for _, fields, _, _ in columns:
        for f in (fields,) if isinstance(fields, str) else fields:
            e = exponent(rows, f)
            last = rows[-1]
            out[f] = last[f] * (w / last["world"]) ** (e if e is not None else 1.0)
    return out


def _table(
    rows: list[dict[str, Any]], worlds: list[int], skipped: dict[int, str], columns: list[Any]
) -> list[str]:
    head = "| W | " + " | ".join(c[0] for c in columns) + " |"
    lines = [head, "|" + " --- |" * (len(columns) + 1)]
    measured = {r["world"]: r for r in rows}
    for w in worlds:
        row, mark = measured.get(w), ""
        if row is None:
            if len(rows) < 2 or w < rows[-1]["world"]:
                lines.append(f"| {w:,} | {skipped.get(w, '?')} |" + " |" * (len(columns) - 1))
                continue
            row, mark = _extrapolate(rows, w, columns), "~"
        cells = []
        for _, fields, scale, fmt in columns:
            fs = (fields,) if isinstance(fields, str) else fields
            cells.append(mark + " / ".join(fmt(row[f] * scale) for f in fs))
        lines.append(f"| {w:,}{' (extrapolated)' if mark else ''} | " + " | ".join(cells) + " |")
    return lines


def report(
    layout: str,
    worlds: list[int],
    rows: list[dict[str, Any]],
    skipped: dict[int, str],
    leaves: list[Leaf],
    dcp_rows: list[dict[str, Any]] | None,
    dcp_skipped: dict[int, str],
) -> None:
    plain = sum(1 for leaf in leaves if leaf.layout < 0)
    print(
        f"\n## {layout}: {len(leaves):,} tensors ({len(leaves) - plain:,} sharded, {plain} "
        f"plain replicated `step`s) + param_groups\n"
    )
    print("\n".join(_table(rows, worlds, skipped, COLUMNS)))
    if rows:
        print("\nbreakdown: wall s of rank 0's steps and of the load's, CPU s of both, chunks:\n")
        print(
            "| W | gather | plan | scatter | render | load decode | load plan "
            "| rank 0 CPU | load CPU | chunks |"
        )
        print("|" + " --- |" * 10)
        for r in rows:
            t, lt = r["times"], r["load_times"]
            print(
                f"| {r['world']:,} | {_sig(t['gather'])} | {_sig(t['plan'])} "
                f"| {_sig(t['scatter'])} | {_sig(t['render'])} | {_sig(lt['decode'])} "
                f"| {_sig(lt['plan'])} | {_sig(r['rank0_cpu'])} | {_sig(r['load_cpu'])} "
                f"| {r['chunks']:,} |"
            )
        _growth(rows, COLUMNS)
        _targets(layout, rows, worlds)
    if dcp_rows is not None:
        print(f"\n### torch DCP planner functions, {layout}\n")
        print("\n".join(_table(dcp_rows, worlds, dcp_skipped, DCP_COLUMNS)))
        if dcp_rows:
            for r in dcp_rows:
                t, lt = r["times"], r["load_times"]
                print(
                    f"\nW={r['world']:,}: rank 0 "
                    + ", ".join(f"{k} {v:.3g} s" for k, v in t.items())
                    + "; load "
                    + ", ".join(f"{k} {v:.3g} s" for k, v in lt.items())
                    + f"; one rank's create_default_local_save_plan {r['local_s']:.3g} s"
                )
            _growth(dcp_rows, DCP_COLUMNS)
    sys.stdout.flush()


def _growth(rows: list[dict[str, Any]], columns: list[Any]) -> None:
    if len(rows) < 2:
        return
    a, b = rows[-2]["world"], rows[-1]["world"]
    parts = []
    for title, fields, _, _ in columns:
        e = exponent(rows, fields if isinstance(fields, str) else fields[0])
        if e is not None:
            parts.append(f"{title.replace(' 1st/later', '')} {e:.2f}")
    for title, field in (("rank 0 CPU s", "rank0_cpu"), ("load CPU s", "load_cpu")):
        e = exponent(rows, field)
        if e is not None:
            parts.append(f"{title} {e:.2f}")
    print(f"\ngrowth exponent W={a:,} -> {b:,} (log(cost ratio)/log(W ratio)): " + ", ".join(parts))


def _targets(layout: str, rows: list[dict[str, Any]], worlds: list[int]) -> None:
    if layout != "fsdp" or 16384 not in worlds or not rows:
        return
    measured = rows[-1]["world"] == 16384
    row = rows[-1] if measured else _extrapolate(rows, 16384, COLUMNS)
    how = "measured" if measured else f"extrapolated from W={rows[-1]['world']:,}"
    out = []
    for field, bound, text in TARGETS:
        out.append(f"{text}: {'PASS' if row[field] <= bound else 'MISS'}")
    e = exponent(rows, "rank0_s")
    if e is not None:
        out.append(
            f"growth exponent of rank 0's time <= 1.1: {'PASS' if e <= 1.1 else 'MISS'} ({e:.2f})"
        )
    print(f"\ntargets at W=16,384 ({how}): " + "; ".join(out))


# ============================================================================ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="64,256,1024,4096,16384")
    p.add_argument("--layouts", help="fsdp,fsdp-tp8 (--quick: fsdp)")
    p.add_argument("--quick", action="store_true", help="W = 64, 256 only (and fsdp only)")
    p.add_argument("--dcp", action="store_true", help="also torch DCP's planner functions")
    p.add_argument("--dcp-cap", type=float, default=600.0, help="seconds per W for DCP")
    p.add_argument("--mem-gb", type=float, default=8.0, help="skip a W estimated above this")
    p.add_argument("--max-s", type=float, default=300.0, help="skip a W estimated above this")
    p.add_argument("--profile", action="store_true", help="cProfile rank 0 and the load")
    p.add_argument("--child", choices=["save", "load", "dcp"], help=argparse.SUPPRESS)
    p.add_argument("--layout", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.child is None:
        drive(opts)
        return
    if opts.child == "save":
        res = child_save(opts.layout, opts.world, opts.path, opts.profile)
    elif opts.child == "load":
        res = child_load(opts.layout, opts.world, opts.path, opts.profile)
    else:
        res = child_dcp(opts.layout, opts.world)
    print("RESULT " + json.dumps(res), flush=True)
    os._exit(0)  # skip tearing down millions of objects


if __name__ == "__main__":
    main()
