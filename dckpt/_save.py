"""``save``: plan -> write -> commit, collectively over the ranks of a process group."""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dckpt._bytes import block_crcs, dtype_name, host_bytes
from dckpt._coord import coordinator_for
from dckpt._errors import CheckpointExistsError, UnsupportedStateError
from dckpt._format import (
    DEFAULT_BLOCK_BYTES,
    DTYPE_ITEMSIZE,
    MANIFEST_NAME,
    data_dir,
    manifest_to_bytes,
)
from dckpt._plan import (
    ChunkOffer,
    FileResult,
    RankOffer,
    RankPlan,
    SavePlan,
    TensorOffer,
    ValueOffer,
    build_manifest,
    plan_save,
)
from dckpt._reshard import Box
from dckpt._state import Resolved, resolve
from dckpt._storage import Storage, open_storage
from dckpt._values import encode_value
from dckpt._write import SourceMap, write_rank

DEFAULT_TIMEOUT = 600.0
_clock = time.time  # replaced by the golden-format tests for byte-identical output


def _library_version() -> str:
    from dckpt import __version__

    return f"dckpt {__version__}"


def new_save_id() -> str:
    """Sortable by time, unique across concurrent jobs."""
    return f"{time.time_ns():x}{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class Staged:
    """One rank's state, flattened, with the tensors each planned chunk comes from."""

    offer: RankOffer
    sources: SourceMap
    resolved: Resolved


def stage(
    state: Mapping[str, Any], rank: int, *, allow_pickle: bool, check_replicas: bool
) -> Staged:
    resolved = resolve(state)
    return offer_for(resolved, rank, allow_pickle=allow_pickle, check_replicas=check_replicas)


def offer_for(resolved: Resolved, rank: int, *, allow_pickle: bool, check_replicas: bool) -> Staged:
    from torch.distributed.tensor import DTensor

    from dckpt._dtensor import dtensor_chunks

    tensors: list[TensorOffer] = []
    sources: dict[tuple[str, Box], torch.Tensor] = {}
    for leaf in resolved.tensors:
        t = leaf.tensor
        name = dtype_name(t.dtype)
        if name not in DTYPE_ITEMSIZE:
            raise UnsupportedStateError(f"key {leaf.key!r}: dtype {t.dtype} cannot be saved")
        if t.layout is not torch.strided or t.is_quantized or t.device.type == "meta":
            raise UnsupportedStateError(
                f"key {leaf.key!r}: {t.layout} / quantized / meta tensors cannot be saved; "
                "convert it to a dense tensor first"
            )
        shape = tuple(t.shape)
        if isinstance(t, DTensor):
            pieces = dtensor_chunks(t)
            chunks = tuple(ChunkOffer(box) for box, _ in pieces)
            for box, view in pieces:
                sources[(leaf.key, box)] = view
            tensors.append(TensorOffer(leaf.key, leaf.path, name, shape, True, chunks))
            continue
        box = Box((0,) * len(shape), shape)
        crc = None
        if check_replicas and box.numel:
            crc = block_crcs(host_bytes(t), DEFAULT_BLOCK_BYTES)
        if box.numel:
            sources[(leaf.key, box)] = t
        chunks = (ChunkOffer(box, crc),) if box.numel else ()
        tensors.append(TensorOffer(leaf.key, leaf.path, name, shape, False, chunks))
    values = []
    for v in resolved.values:
        data = encode_value(v.value, v.key, allow_pickle=allow_pickle)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        values.append(ValueOffer(v.key, v.path, data, text))
    offer = RankOffer(rank, tuple(tensors), tuple(values))
    return Staged(offer, sources, resolved)


def _manifest_digest(storage: Storage) -> bytes | None:
    return storage.read_file(MANIFEST_NAME)


def _previous_save_id(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    with contextlib.suppress(Exception):
        sid = json.loads(raw)["save_id"]
        if isinstance(sid, str) and sid.isalnum():
            return sid
    return None


@dataclass
class _Leader:
    """What only rank 0 keeps between the plan and the commit."""

    plan: SavePlan | None = None
    previous: bytes | None = None


def save(
    state: Mapping[str, Any],
    path: Any,
    *,
    process_group: Any = None,
    overwrite: bool = False,
    durable: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    allow_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> None:
    coord = coordinator_for(process_group, timeout=timeout)
    multi = coord.world_size > 1
    storage = open_storage(path, storage_options)
    leader = _Leader()
    staged: list[Staged] = []

    def local_plan() -> RankOffer:
        s = stage(state, coord.rank, allow_pickle=allow_pickle, check_replicas=multi)
        staged.append(s)
        return s.offer

    def reduce_plan(offers: list[RankOffer]) -> list[RankPlan]:
        leader.previous = _manifest_digest(storage)
        if leader.previous is not None and not overwrite:
            raise CheckpointExistsError(
                f"{storage.location} already holds a committed checkpoint; pass overwrite=True "
                "to replace it (the old one stays loadable until the new one commits), or save "
                "to a new path"
            )
        leader.plan = plan_save(offers, new_save_id())
        return list(leader.plan.ranks)

    rank_plan = coord.exchange("plan", local_plan, reduce_plan, scatter=True)
    assert isinstance(rank_plan, RankPlan)
    write_and_commit(coord, storage, rank_plan, staged[0].sources, leader, durable=durable)


def write_and_commit(
    coord: Any,
    storage: Storage,
    rank_plan: RankPlan,
    sources: SourceMap,
    leader: _Leader,
    *,
    durable: bool,
) -> None:
    def local_write() -> list[FileResult]:
        return write_rank(
            storage, rank_plan, sources, durable=durable, block_bytes=DEFAULT_BLOCK_BYTES
        )

    def reduce_commit(results: list[list[FileResult]]) -> None:
        assert leader.plan is not None
        manifest = build_manifest(
            leader.plan,
            results,
            created=_clock(),
            block_bytes=DEFAULT_BLOCK_BYTES,
            library=_library_version(),
        )
        if durable:
            storage.sync_dir(data_dir(rank_plan.save_id))
            storage.sync_dir("data")
        commit(storage, manifest_to_bytes(manifest), leader.previous, durable=durable)

    try:
        coord.exchange("write", local_write, reduce_commit)
    except BaseException:
        for f in rank_plan.files:
            with contextlib.suppress(Exception):
                storage.delete(f.name)
        if coord.rank == 0:
            with contextlib.suppress(Exception):
                storage.delete_prefix(data_dir(rank_plan.save_id))
        raise


def commit(storage: Storage, manifest: bytes, previous: bytes | None, *, durable: bool) -> None:
    """Publish the manifest unless another job committed since we planned, then tidy up."""
    with storage.commit_lock():
        current = storage.read_file(MANIFEST_NAME)
        if current != previous:
            raise CheckpointExistsError(
                f"another save committed to {storage.location} while this one was running; "
                "this save was discarded and the other checkpoint kept. Give concurrent jobs "
                "different paths."
            )
        storage.commit(MANIFEST_NAME, manifest, durable=durable)
    old = _previous_save_id(previous)
    if old is not None and old != _previous_save_id(manifest):
        with contextlib.suppress(Exception):
            storage.delete_prefix(data_dir(old))
