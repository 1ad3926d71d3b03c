"""The fault-point matrix (docs/reliability.md): every protocol step x fault x rank.

The suite runs a fixed, representative sample; ``DCKPT_FAULT_MATRIX=full`` runs every
case (``python -m pytest tests/test_fault_matrix.py``, about half an hour on 2 cores).
The invariants after each case:

- every rank that returned either succeeded or raised a ``CheckpointError``, within its
  timeout bound (no hang);
- the newest committed checkpoint loads exactly: all OLD or all NEW, never a mix, and
  ``verify`` finds nothing wrong (so no committed byte was deleted);
- a rank that reported success means NEW is committed;
- nothing outside the checkpoint directory changed;
- a later clean save leaves no data directory but its own (killed saves' leftovers go).
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import dckpt
from dckpt.storage import LocalStorage
from tests import _matrix
from tests._dist import Outcome, run_fresh

FULL = os.environ.get("DCKPT_FAULT_MATRIX") == "full"
# Each case costs a fresh 2-rank group (forked with torch's lazy imports done, about 0.2 s
# of CPU); most of a case's time is waiting for a stall or a timeout, so several run at once.
PARALLEL = 8
# A survivor's longest legitimate wait (a follower waits 2 x timeout + 5 s for rank 0),
# plus the stall of the victim itself, plus slack for a loaded machine.
CASE_TIMEOUT = _matrix.STALL_S + 2 * _matrix.TIMEOUT + 60
SURVIVOR_BOUND = 2 * _matrix.TIMEOUT + 5 + 20


@functools.cache
def _points(protocol: str, tmp: str) -> tuple[list[str], ...]:
    outcomes = run_fresh(2, _matrix.w_case, os.path.join(tmp, protocol), protocol, None, timeout=120)
    for o in outcomes:
        assert o.ok and o.value["ok"], o
    return tuple(o.value["points"] for o in outcomes)


def _run(case: _matrix.Case, root: Path) -> list[Outcome]:
    root.mkdir(parents=True)
    (root / "outside").mkdir()
    (root / "outside" / "keep.bin").write_bytes(b"not the checkpoint's")
    arm = (case.point, case.nth, case.kind, case.victim)
    return run_fresh(2, _matrix.w_case, str(root), case.protocol, arm, timeout=CASE_TIMEOUT)


def _check(case: _matrix.Case, root: Path, outcomes: list[Outcome], before: dict[str, bytes]) -> None:
    __tracebackhide__ = True
    for o in outcomes:
        assert not o.timed_out, (case.id, o.error_text[-3000:])
        if o.exitcode is not None:  # the victim died as injected
            assert o.rank == case.victim and case.kind in ("sigkill", "exit"), (case.id, o)
            continue
        assert o.ok, (case.id, o.error_text[-3000:])
        seen = o.value
        if not seen["ok"]:
            # The victim of an injected exception may raise it as itself (as one process
            # does); every other failure must be a CheckpointError.
            injected = o.rank == case.victim and seen["type"] == "InjectedFault"
            assert seen["checkpoint_error"] or injected, (case.id, o.rank, seen)
        if o.rank != case.victim or case.kind != "stall":
            assert seen["elapsed"] < SURVIVOR_BOUND, (case.id, o.rank, seen)
    assert _matrix.snapshot(root, _matrix.ckpt_path(str(root), case.protocol).rsplit("/", 1)[1]) == before
    value = _matrix.committed_values(str(root), case.protocol)
    succeeded = [o for o in outcomes if o.exitcode is None and o.value["ok"]]
    if case.protocol == "load":
        assert value == _matrix.NEW, case.id
        for o in succeeded:
            assert o.value["exact"], (case.id, o.rank)
        return
    assert value is not None, case.id  # OLD was committed before the fault
    if succeeded:
        assert value == _matrix.NEW, (case.id, "a rank reported success but NEW is not committed")
    if case.protocol != "manager":
        _check_tidy(Path(_matrix.ckpt_path(str(root), case.protocol)))


def _check_tidy(path: Path) -> None:
    """A later clean save (one process) leaves exactly its own data directory."""
    dckpt.save({"w": torch.ones(8)}, path, overwrite=True)
    manifest = (path / "manifest.json").read_text()
    dirs = sorted(p.name for p in (path / "data").iterdir())
    assert len(dirs) == 1 and dirs[0] in manifest, dirs


def _sample(cases: list[_matrix.Case]) -> list[_matrix.Case]:
    """Every point once, the fault kind and victim rotating, so each kind and each rank
    meet every region of the protocol across the sample."""
    if FULL:
        return cases
    by_point: dict[tuple[str, int], list[_matrix.Case]] = {}
    for c in cases:
        by_point.setdefault((c.point, c.nth), []).append(c)
    out = []
    for i, (_key, group) in enumerate(sorted(by_point.items())):
        out.append(group[i % len(group)])
    return out


def _matrix_for(protocol: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    rec = tmp_path_factory.mktemp(f"record-{protocol}")
    points = _points(protocol, str(rec))
    every = _matrix.cases_for(protocol, list(points))
    cases = _sample(every)
    assert cases, "no fault points recorded: is the engine calling fault_point?"
    root = tmp_path_factory.mktemp(f"matrix-{protocol}")
    before = {"outside": b"<dir>", "outside/keep.bin": b"not the checkpoint's"}
    failures = []
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {c: pool.submit(_run, c, root / c.id.replace("/", "_")) for c in cases}
        for c, fut in futures.items():
            case_root = root / c.id.replace("/", "_")
            try:
                _check(c, case_root, fut.result(), before)
            except AssertionError as exc:
                failures.append(f"{c.id}: {exc}")
            else:
                shutil.rmtree(case_root, ignore_errors=True)
    print(f"{protocol}: {len(cases)} of {len(every)} cases run, {len(failures)} failed")
    assert not failures, "\n".join(failures)


# The full matrix runs a few hundred cases per protocol: past the suite's 300 s budget.
@pytest.mark.timeout(3600 if FULL else 300)
@pytest.mark.parametrize("protocol", _matrix.PROTOCOLS)
def test_fault_matrix(protocol: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    _matrix_for(protocol, tmp_path_factory)


def _w_exit_right_after_commit(path: str) -> str:
    """Rank 0 leaves the moment ``save`` returns, as a preempted job does."""
    import torch.distributed as dist

    rank = dist.get_rank()
    dckpt.save(_matrix.state(_matrix.OLD, rank), path, timeout=_matrix.TIMEOUT)
    dist.barrier()
    dckpt.save(_matrix.state(_matrix.NEW, rank), path, overwrite=True, timeout=_matrix.TIMEOUT)
    if rank == 0:
        os._exit(0)
    return "saved"


def test_rank0_leaving_right_after_the_commit_loses_nothing(tmp_path: Path) -> None:
    """Issue #11.1: rank 1 lost the store before hearing the commit; it must not delete
    the files the committed manifest references, and it reports success."""
    for i in range(4):  # the race was lost 7 times in 8 before the fix
        path = Path(_matrix.ckpt_path(str(tmp_path / f"r{i}"), "save"))
        outcomes = run_fresh(2, _w_exit_right_after_commit, str(path), timeout=90)
        assert outcomes[0].exitcode == 0
        assert outcomes[1].ok and outcomes[1].value == "saved", outcomes[1].error_text
        assert _matrix.committed_values(str(tmp_path / f"r{i}"), "save") == _matrix.NEW


class _LateManifest(LocalStorage):
    """A store whose manifest write times out on the client but lands later, as an object
    store PUT can: the manifest is held back and published by the test afterwards."""

    held: ClassVar[dict[str, bytes]] = {}

    def __init__(self, url: str, options: dict[str, object]) -> None:
        super().__init__(url.removeprefix("late://"))

    def commit(self, name: str, data: bytes, *, durable: bool) -> None:
        if name == "manifest.json" and self.read_file(name) is not None:
            _LateManifest.held[self.root] = data
            raise dckpt.StorageError("PUT manifest.json: read timeout", errno=errno.ETIMEDOUT)
        super().commit(name, data, durable=durable)


def test_a_manifest_that_lands_after_its_save_failed_still_loads(tmp_path: Path) -> None:
    """The worst moment for cleanup: the commit's answer is lost, the save reports
    failure, and the manifest is published only afterwards. No file it names may have
    been deleted in between."""
    dckpt.storage.register_backend("late", _LateManifest)
    try:
        url = f"late://{tmp_path / 'ck'}"
        dckpt.save(_matrix.state(_matrix.OLD, 0), url)
        with pytest.raises(dckpt.StorageError, match="may still be published"):
            dckpt.save(_matrix.state(_matrix.NEW, 0), url, overwrite=True)
        late = _LateManifest(url, {})
        LocalStorage.commit(late, "manifest.json", _LateManifest.held[late.root], durable=True)
        got = _matrix.state(0.0, 0)
        dckpt.load(got, tmp_path / "ck")
        assert torch.equal(got["w"], _matrix.state(_matrix.NEW, 0)["w"])
        assert torch.equal(got["r0"], _matrix.state(_matrix.NEW, 0)["r0"])
    finally:
        dckpt.storage.unregister_backend("late")
