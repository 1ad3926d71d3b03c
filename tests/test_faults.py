"""Fault injection for real: full disks, I/O errors, dead ranks, hostile checkpoints.

Each test breaks something the way production does (a tmpfs that fills up, an errno from
the OS call, a SIGKILL) and checks the promise in ``docs/reliability.md``: every rank
gets a ``CheckpointError``, nothing hangs, and a committed checkpoint is never damaged.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crc32c
import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

import dckpt
from dckpt._api import open_checkpoint
from dckpt._bytes import dtype_name, torch_dtype
from dckpt._format import ChunkRecord, FileRecord, Manifest, TensorEntry, ValueEntry, align
from dckpt._manifest_text import manifest_to_bytes
from dckpt._values import encode_value
from dckpt.cli._commands import cli
from tests._dist import RankPool, run_fresh

Pools = Callable[[int], RankPool]

try:
    from dckpt._manager import CheckpointManager
except ImportError:  # pragma: no cover - the manager is optional here
    CheckpointManager = None  # type: ignore[assignment,misc]


# ----------------------------------------------------------------------------- 1. disk full


@contextlib.contextmanager
def _tmpfs(where: Path, size: str = "2m") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root/CAP_SYS_ADMIN): {proc.stderr}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _free_blocks(path: Path) -> int:
    return os.statvfs(path).f_bfree


def _w_save_too_big(path: str) -> str:
    state = {"big": torch.full((400_000,), float(dist.get_rank()))}  # 1.6 MB per rank
    with pytest.raises(dckpt.CheckpointError) as info:
        dckpt.save(state, path, timeout=20)
    return f"{type(info.value).__name__}: {info.value}"


def test_disk_full_fails_cleanly_everywhere(rank_pool: Pools, tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "fs") as fs:
        old = fs / "old"
        dckpt.save({"w": torch.full((1000,), 7.0)}, old)
        free = _free_blocks(fs)

        # one process: the error names the file that ran out of space
        with pytest.raises(dckpt.StorageError) as info:
            dckpt.save({"big": torch.ones(1_000_000)}, fs / "new")
        assert info.value.is_disk_full and str(fs / "new") in str(info.value)
        assert "No space left" in str(info.value)
        assert _free_blocks(fs) == free, "partial files were left behind"

        # two ranks: every rank raises, naming the path
        messages = rank_pool(2).run(_w_save_too_big, str(fs / "new2"))
        for m in messages:
            assert "No space left" in m and str(fs / "new2") in m, m
        assert _free_blocks(fs) == free
        assert not (fs / "new2" / "manifest.json").exists()

        # the older checkpoint in the same filesystem still loads
        state = {"w": torch.zeros(1000)}
        dckpt.load(state, old)
        assert torch.equal(state["w"], torch.full((1000,), 7.0))

        if CheckpointManager is not None:
            mgr = CheckpointManager(fs / "run", keep_last=2)
            mgr.save(1, {"w": torch.full((1000,), 1.0)})
            free = _free_blocks(fs)
            with pytest.raises(dckpt.CheckpointError, match="No space left"):
                mgr.save(2, {"w": torch.ones(1_000_000)})
            assert mgr.latest_step() == 1
            assert _free_blocks(fs) == free
            state = {"w": torch.zeros(1000)}
            assert mgr.load(state) == 1
            assert torch.equal(state["w"], torch.full((1000,), 1.0))


# ----------------------------------------------------------------------------- 2. I/O errors


@contextlib.contextmanager
def _failing(name: str, err: int, when: Callable[..., bool] = lambda *a: True) -> Iterator[None]:
    """Make ``os.<name>`` raise ``err`` (while ``when(*args)``) inside the block."""
    real = getattr(os, name)

    def broken(*args: Any, **kwargs: Any) -> Any:
        if when(*args):
            raise OSError(err, os.strerror(err))
        return real(*args, **kwargs)

    setattr(os, name, broken)
    try:
        yield
    finally:
        setattr(os, name, real)


def _manifest_rename(src: Any, dst: Any, *a: Any) -> bool:
    return str(dst).endswith("manifest.json")


IO_SAVE_FAULTS = [
    ("writev", errno.EIO, 1),
    ("writev", errno.EACCES, 0),
    ("fsync", errno.EIO, 1),
    ("replace", errno.EIO, 0),
    ("replace", errno.EACCES, 0),
]


def _w_io_fault_save(path: str, call: str, err: int, victim: int) -> str:
    rank = dist.get_rank()
    state = {"w": torch.full((50_000,), float(rank))}
    dckpt.save({"w": torch.full((50_000,), 9.0)}, path, timeout=20)
    when = _manifest_rename if call == "replace" else (lambda *a: True)
    ctx = _failing(call, err, when) if rank == victim else contextlib.nullcontext()
    with ctx, pytest.raises(dckpt.CheckpointError) as info:
        dckpt.save(state, path, overwrite=True, timeout=20)
    got = {"w": torch.zeros(50_000)}
    dckpt.load(got, path, timeout=20)  # the committed checkpoint survived
    assert torch.equal(got["w"], torch.full((50_000,), 9.0))
    return f"{type(info.value).__name__}: {info.value}"


@pytest.mark.parametrize(("call", "err", "victim"), IO_SAVE_FAULTS)
def test_io_error_on_save_raises_on_every_rank(
    rank_pool: Pools, tmp_path: Path, call: str, err: int, victim: int
) -> None:
    path = str(tmp_path / "ck")
    start = time.monotonic()
    messages = rank_pool(2).run(_w_io_fault_save, path, call, err, victim, timeout=60)
    assert time.monotonic() - start < 30
    for m in messages:
        assert os.strerror(err) in m and path in m, m
    assert not [p for p in Path(path).rglob("*.tmp-*")], "a temporary manifest was left"


def _w_io_fault_load(path: str, err: int) -> str:
    dckpt.save({"w": torch.full((50_000,), 3.0)}, path, timeout=20)
    ctx = _failing("preadv", err) if dist.get_rank() == 1 else contextlib.nullcontext()
    with ctx, pytest.raises(dckpt.CheckpointError) as info:
        dckpt.load({"w": torch.zeros(50_000)}, path, timeout=20)
    return f"{type(info.value).__name__}: {info.value}"


@pytest.mark.parametrize("err", [errno.EIO, errno.EACCES])
def test_io_error_on_read_raises_on_every_rank(rank_pool: Pools, tmp_path: Path, err: int) -> None:
    messages = rank_pool(2).run(_w_io_fault_load, str(tmp_path / "ck"), err, timeout=60)
    for m in messages:
        assert os.strerror(err) in m, m


def test_read_only_directory_is_a_permission_error(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    real_open = os.open

    def no_create(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if flags & os.O_CREAT and str(path).startswith(str(root)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_open(path, flags, *a, **k)

    os.open = no_create
    try:
        with pytest.raises(dckpt.StorageError, match="permissions") as info:
            dckpt.save({"w": torch.ones(10)}, root / "ck")
    finally:
        os.open = real_open
    assert info.value.errno == errno.EACCES
    assert not (root / "ck" / "manifest.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_chmod(tmp_path: Path) -> None:  # pragma: no cover - non-root
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        with pytest.raises(dckpt.StorageError, match="permissions"):
            dckpt.save({"w": torch.ones(10)}, root / "ck")
    finally:
        root.chmod(0o755)


# ----------------------------------------------------------------------------- 3. dead ranks

TIMEOUT = 3.0


def _w_absent_rank(path: str, op: str) -> tuple[str, float, tuple[int, ...]]:
    rank = dist.get_rank()
    state = {"w": torch.full((1000,), float(rank))}
    dckpt.save(state, path, timeout=20)  # warm: imports and plan caches are not timed
    if op != "load":
        path += "-new"
    if rank == 1:
        return "absent", 0.0, ()
    start = time.monotonic()
    with pytest.raises(dckpt.CheckpointTimeoutError) as info:
        if op == "save":
            dckpt.save(state, path, timeout=TIMEOUT)
        elif op == "load":
            dckpt.load(state, path, timeout=TIMEOUT)
        elif op == "async_save":
            dckpt.async_save(state, path, timeout=TIMEOUT).result()
        else:
            assert CheckpointManager is not None
            CheckpointManager(path, timeout=TIMEOUT).save(1, state)
    return str(info.value), time.monotonic() - start, tuple(info.value.missing_ranks)


@pytest.mark.parametrize("op", ["save", "load", "async_save", "manager"])
def test_rank_that_never_calls_is_named_within_the_timeout(
    rank_pool: Pools, tmp_path: Path, op: str
) -> None:
    if op == "manager" and CheckpointManager is None:
        pytest.skip("dckpt._manager is not available")
    (message, elapsed, missing), _ = rank_pool(2).run(
        _w_absent_rank, str(tmp_path / "ck"), op, timeout=30
    )
    assert missing == (1,) and "rank 1" in message, message
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 3, elapsed


OLD, NEW = 1.0, 2.0
N = 20_000


def _w_killed_at(path: str, phase: str) -> str:
    import dckpt._save as save_mod
    import dckpt._write as write_mod

    rank = dist.get_rank()

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    dckpt.save({"w": torch.full((N,), OLD), "r": torch.full((N,), OLD)}, path, timeout=20)
    if phase == "writing" and rank == 1:
        write_mod._write_file = lambda *a, **k: die()  # type: ignore[assignment]
    if phase == "before-report" and rank == 1:
        real_write = save_mod.write_rank

        def write_then_die(*a: Any, **k: Any) -> Any:
            real_write(*a, **k)
            die()

        save_mod.write_rank = write_then_die
    if phase == "leader-commit" and rank == 0:
        save_mod.commit = lambda *a, **k: die()
    if phase == "during-commit" and rank == 0:
        real_replace = os.replace

        def replace(src: Any, dst: Any, *a: Any, **k: Any) -> None:
            if str(dst).endswith("manifest.json"):
                assert Path(src).exists()  # the temporary manifest is written
                die()
            real_replace(src, dst, *a, **k)

        os.replace = replace

    class Planner:
        def state_dict(self) -> dict[str, Any]:
            if phase == "planning" and rank == 1:
                die()
            return {"r": torch.full((N,), NEW)}

        def load_state_dict(self, sd: dict[str, Any]) -> None:
            pass

    try:
        dckpt.save(
            {"w": torch.full((N,), NEW), "p": Planner()}, path, overwrite=True, timeout=TIMEOUT
        )
    except dckpt.CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "committed"


PHASES = {  # phase -> the rank that dies
    "planning": 1,
    "writing": 1,
    "before-report": 1,
    "leader-commit": 0,
    "during-commit": 0,
}


def test_rank_killed_at_any_phase_leaves_old_or_new_checkpoint(tmp_path: Path) -> None:
    """One fresh 2-rank group per phase, all at once (a fresh group costs seconds to start)."""
    from concurrent.futures import ThreadPoolExecutor

    start = time.monotonic()
    with ThreadPoolExecutor(len(PHASES)) as pool:
        futures = {
            phase: pool.submit(run_fresh, 2, _w_killed_at, str(tmp_path / phase), phase, timeout=90)
            for phase in PHASES
        }
        results = {phase: f.result() for phase, f in futures.items()}
    assert time.monotonic() - start < 100
    for phase, outcomes in results.items():
        _check_killed(tmp_path / phase, phase, outcomes)


def _check_killed(path: Path, phase: str, outcomes: list[Any]) -> None:
    victim = PHASES[phase]
    assert outcomes[victim].exitcode == -signal.SIGKILL, (phase, outcomes[victim])
    survivor = outcomes[1 - victim]
    assert not survivor.timed_out, (phase, survivor.error_text)
    assert survivor.ok and "Error" in survivor.value, (phase, survivor)  # raised, no hang
    # whatever is on disk is exactly one whole checkpoint (old here: nothing committed)
    state = {"w": torch.zeros(N)}
    state_r = {"p.r": torch.zeros(N)}
    try:
        dckpt.load(state, path, strict=False)
    except (dckpt.CheckpointNotFoundError, dckpt.CorruptCheckpointError):
        return
    assert torch.equal(state["w"], torch.full((N,), OLD)), phase
    result = dckpt.load(state_r, path, strict=False)
    assert result.missing_keys == ("p.r",), phase  # no piece of the new save became visible


# ----------------------------------------------------------------------------- 4. hostile files


_CLEAN = {"w": torch.arange(3000, dtype=torch.float32).reshape(30, 100), "b": torch.arange(7)}


@pytest.fixture(scope="module")
def clean_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clean") / "ck"
    dckpt.save({**_CLEAN, "step": 5, "name": "x"}, path)
    return path


def _data_files(ck: Path) -> list[Path]:
    return sorted(p for p in (ck / "data").rglob("*") if p.is_file())


def _chunked_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint as sharded saves lay it out, written in one process: "w" in a 2x2 grid
    of chunks, "b" and "v" in equal row chunks, a scalar, tagged values. Hostile manifests
    need several chunks per tensor to overlap, leave holes or share bytes, and tags to
    break."""
    tensors = {
        "w": torch.arange(3000, dtype=torch.float32).reshape(30, 100),
        "b": torch.arange(8),
        "v": torch.arange(12, dtype=torch.int16),
        "s": torch.tensor(2.5, dtype=torch.float64),
    }
    boxes: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {
        "w": [((r, c), (15, 50)) for r in (0, 15) for c in (0, 50)],
        "b": [((0,), (4,)), ((4,), (4,))],
        "v": [((0,), (4,)), ((4,), (4,)), ((8,), (4,))],
        "s": [((), ())],
    }
    name = "data/0fuzz/r0-0.bin"
    blob = bytearray()
    entries = {}
    for key, t in tensors.items():
        chunks = []
        for offsets, sizes in boxes[key]:
            region = t[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))]
            raw = region.contiguous().numpy().tobytes()
            blob += bytes(align(len(blob)) - len(blob))
            crc = (crc32c.crc32c(raw),)
            chunks.append(ChunkRecord(offsets, sizes, name, len(blob), len(raw), crc))
            blob += raw
        entries[key] = TensorEntry((key,), dtype_name(t.dtype), tuple(t.shape), tuple(chunks))
    held = {"step": 5, "pair": (1, b"\x00\xff"), "lr": float("inf"), "dt": torch.bfloat16}
    values = {k: ValueEntry((k,), value=encode_value(v, k)) for k, v in held.items()}
    files = (FileRecord(name, len(blob)),)
    manifest = Manifest("0fuzz", 1, 1.7e9, files, entries, values, library="fuzz")
    (path / "data" / "0fuzz").mkdir(parents=True)
    (path / name).write_bytes(bytes(blob))
    (path / "manifest.json").write_bytes(manifest_to_bytes(manifest))
    return tensors


@pytest.fixture(scope="module")
def fuzz_bases(
    clean_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """The checkpoints the fuzzer damages, each with the tensors it holds."""
    chunked = tmp_path_factory.mktemp("chunked") / "ck"
    tensors = _chunked_checkpoint(chunked)
    assert open_checkpoint(chunked).verify() == []
    got = {k: torch.zeros_like(v) for k, v in tensors.items()}
    dckpt.load(got, chunked, strict=False)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    return {"saved": (clean_checkpoint, _CLEAN), "chunked": (chunked, tensors)}


BASES = ["chunked", "saved"]


def _nodes(node: Any) -> list[Any]:
    """Every part of a JSON document, itself included."""
    parts = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    return [node, *(n for p in parts for n in _nodes(p))]


_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**40, 2**63, 10**30]),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.sampled_from(["../x", "/etc/passwd", "data", "float64", "manifest.json", ""]),
    st.lists(st.integers(-3, 2**40), max_size=4),
    st.just({}),
)


def _kind(node: Any) -> Any:
    if isinstance(node, dict):
        return (dict, *sorted(node))
    return (list, len(node)) if isinstance(node, list) else type(node)


def _slots(node: Any) -> list[tuple[Any, Any]]:
    """(container, key or index) of every part below ``node``."""
    keys = node if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else ()
    return [s for k in keys for s in [(node, k), *_slots(node[k])]]


def _mutate_json(data: st.DataObject, doc: dict[str, Any], parts: list[Any]) -> None:
    """Change one part of the manifest (of its tensors, of its values, or of any of it,
    each part equally likely): to hostile junk or to a copy of another part, often one of
    the same kind (a neighbour chunk's box, another tag name); or drop or repeat a list
    element (a chunk list with a hole or an overlap)."""
    region = data.draw(st.sampled_from(["tensors", "values", "anywhere"]))
    slots = _slots(doc.get(region)) or _slots(doc)
    if not slots:
        return
    container, key = data.draw(st.sampled_from(slots))
    if isinstance(container, list) and data.draw(st.booleans()):
        if data.draw(st.booleans()):
            del container[key]
        else:
            container.insert(key, copy.deepcopy(container[key]))
        return
    source = data.draw(st.sampled_from(["junk", "any part", "same kind"]))
    if source == "same kind":
        parts = [p for p in parts if _kind(p) == _kind(container[key])] or parts
    container[key] = (
        data.draw(_JUNK) if source == "junk" else copy.deepcopy(data.draw(st.sampled_from(parts)))
    )


def _mutate_chunks(data: st.DataObject, doc: dict[str, Any]) -> None:
    """Chunk surgery, as a hostile manifest would do it: a chunk takes one field, or all of
    them, from another chunk (often of the same tensor), or is dropped or repeated. Each
    field stays well-formed, so only the rules across chunks can catch it: tiling, unshared
    bytes, checksums."""
    entry = doc["tensors"][data.draw(st.sampled_from(sorted(doc["tensors"])))]
    if not entry["chunks"]:
        return
    i = data.draw(st.integers(0, len(entry["chunks"]) - 1))
    op = data.draw(st.sampled_from(["field", "chunk", "drop", "repeat"]))
    if op == "drop":
        del entry["chunks"][i]
    elif op == "repeat":
        entry["chunks"].insert(i, copy.deepcopy(entry["chunks"][i]))
    else:
        every = [c for t in doc["tensors"].values() for c in t["chunks"]]
        other = copy.deepcopy(data.draw(st.sampled_from(entry["chunks"] * 3 + every)))
        if op == "chunk":
            entry["chunks"][i] = other
        else:
            field = data.draw(st.sampled_from(sorted(other)))
            entry["chunks"][i][field] = other[field]


FUZZ = {"cases": 0, "errors": 0, "clean": 0, "valid_manifests": 0, "agreed": 0, "huge": 0}


def _untouched_or_saved(got: torch.Tensor, saved: torch.Tensor) -> bool:
    """Zeros (not loaded), or the saved elements: a valid manifest may lay a tensor's chunks
    out in another order, but every byte a load returns passed its checksum."""
    if torch.equal(got, torch.zeros_like(saved)):
        return True
    return torch.equal(got.flatten().sort().values, saved.flatten().sort().values)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _load_everything(ck: Path, infos: list[Any] | None, saved: dict[str, torch.Tensor]) -> Any:
    """Load every key the checkpoint holds into a fresh state built from its own manifest
    (or, when the manifest is invalid, the saved keys): the tensors, or the error."""
    if infos is None:
        state: dict[str, Any] = {k: torch.zeros_like(v) for k, v in saved.items()}
    else:
        state = {}
        for i in infos:
            if len(i.path) != 1 or i.path[0] in state:  # no mutation here makes one
                reject()
            tensor = i.kind == "tensor"
            state[i.path[0]] = torch.zeros(i.shape, dtype=torch_dtype(i.dtype)) if tensor else None
    try:
        dckpt.load(state, ck, strict=infos is not None, timeout=5)
    except dckpt.CheckpointError as exc:
        return exc
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _exercise(ck: Path, saved: dict[str, torch.Tensor]) -> None:
    """Every entry point ends in a CheckpointError or in the saved values; `verify` (the
    library's and the CLI's) finds a problem exactly when loading every key fails, and
    `inspect` works exactly when the manifest is valid."""
    state = {k: torch.zeros_like(v) for k, v in saved.items()}
    try:
        dckpt.load(state, ck, strict=False, timeout=5)
    except dckpt.CheckpointError:
        FUZZ["errors"] += 1
    else:
        for k, v in saved.items():
            assert _untouched_or_saved(state[k], v), k
        FUZZ["clean"] += 1
    reader: Any = None
    try:
        reader = open_checkpoint(ck)
        infos = reader.infos()
    except dckpt.CheckpointError as exc:
        reader, infos, problems = None, None, [str(exc)]
    else:
        problems = reader.verify()
        FUZZ["valid_manifests"] += 1
    if infos is not None and sum(i.nbytes for i in infos) > 64 << 20:
        # More than the data files hold: verify must say so; too big to load here.
        assert problems, "a manifest claiming more bytes than its files passed verify"
        FUZZ["huge"] += 1
    else:
        loaded = _load_everything(ck, infos, saved)
        failed = isinstance(loaded, dckpt.CheckpointError)
        assert failed == bool(problems), f"load: {loaded!r}; verify: {problems}"
        if not failed:
            for key, t in loaded.items():
                assert _same_bytes(reader.read_tensor(key), t), key
                if key in saved and t.dtype == saved[key].dtype and t.shape == saved[key].shape:
                    assert _untouched_or_saved(t, saved[key]), key
    exit_codes = {}
    for command in ("inspect", "verify"):  # the CLI: a clean exit code, never a traceback
        result = CliRunner().invoke(cli, [command, "--json", str(ck)])
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            command,
            result.output,
            result.exception,
        )
        exit_codes[command] = result.exit_code
        if result.exit_code == 0:
            json.loads(result.output)
    assert exit_codes == {"inspect": int(reader is None), "verify": int(bool(problems))}
    FUZZ["agreed"] += 1


@settings(
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    deadline=5000,
)
@given(st.data())
def test_fuzzed_checkpoints_only_raise_checkpoint_errors(
    fuzz_bases: dict[str, tuple[Path, dict[str, torch.Tensor]]], data: st.DataObject
) -> None:
    modes = ["manifest-chunks", "manifest-json", "manifest-bytes", "data", "both"]
    what = data.draw(st.sampled_from(modes))
    if what == "both":  # a changed manifest over changed data
        what = data.draw(st.sampled_from(["manifest-chunks", "manifest-json"])) + "+data"
    # Chunk surgery needs tensors of several chunks.
    name = "chunked" if what.startswith("manifest-chunks") else data.draw(st.sampled_from(BASES))
    base, saved = fuzz_bases[name]
    with tempfile.TemporaryDirectory(prefix="dckpt-fuzz-") as parent:
        ck = Path(parent) / "ck"
        shutil.copytree(base, ck)
        if what.startswith("manifest-json"):
            doc = json.loads((ck / "manifest.json").read_text())
            parts = _nodes(copy.deepcopy(doc))
            for _ in range(data.draw(st.integers(1, 3))):
                _mutate_json(data, doc, parts)
            (ck / "manifest.json").write_text(json.dumps(doc))
        if what.startswith("manifest-chunks"):
            doc = json.loads((ck / "manifest.json").read_text())
            for _ in range(data.draw(st.integers(1, 3))):
                _mutate_chunks(data, doc)
            (ck / "manifest.json").write_text(json.dumps(doc))
        if what == "manifest-bytes":
            raw = bytearray((ck / "manifest.json").read_bytes())
            for _ in range(data.draw(st.integers(1, 6))):
                i = data.draw(st.integers(0, len(raw) - 1))
                raw[i] = data.draw(st.integers(0, 255))
            (ck / "manifest.json").write_bytes(bytes(raw))
        if what.endswith("data"):
            target = data.draw(st.sampled_from(_data_files(ck)))
            raw = bytearray(target.read_bytes())
            op = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
            if op == "flip" and raw:
                i = data.draw(st.integers(0, len(raw) - 1))
                raw[i] ^= 1 << data.draw(st.integers(0, 7))
            elif op == "truncate":
                del raw[data.draw(st.integers(0, len(raw))) :]
            else:
                raw += b"\0" * data.draw(st.integers(1, 64))
            target.write_bytes(bytes(raw))
        before = sorted(os.listdir(parent))
        start = time.monotonic()
        with warnings.catch_warnings():  # a fuzzed dtype may be complex32, which torch warns of
            warnings.filterwarnings("ignore", "ComplexHalf support is experimental")
            _exercise(ck, saved)
        assert time.monotonic() - start < 5
        assert sorted(os.listdir(parent)) == before, "something was written outside"
        FUZZ["cases"] += 1


def test_fuzz_counts_are_reported() -> None:
    # Printed with -s; docs/reliability.md quotes the numbers of a real run.
    print(f"\nfuzz: {FUZZ}")


def test_manifest_claiming_a_terabyte_tensor_is_refused_fast(
    clean_checkpoint: Path, tmp_path: Path
) -> None:
    import resource

    ck = tmp_path / "ck"
    shutil.copytree(clean_checkpoint, ck)
    doc = json.loads((ck / "manifest.json").read_text())
    entry = doc["tensors"]["w"]
    entry["shape"] = [2**38]
    for c in entry["chunks"]:
        c.update(offsets=[0], sizes=[2**38], nbytes=2**40)
    (ck / "manifest.json").write_text(json.dumps(doc))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(dckpt.CorruptCheckpointError):
        dckpt.load({"w": torch.zeros(1)}, ck, strict=False)
    with pytest.raises(dckpt.CorruptCheckpointError):
        open_checkpoint(ck).verify()
    assert time.monotonic() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 64 * 1024  # KiB


def test_symlinked_manifest_is_refused(clean_checkpoint: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(clean_checkpoint, ck)
    outside = tmp_path / "elsewhere.json"
    shutil.move(ck / "manifest.json", outside)
    os.symlink(outside, ck / "manifest.json")
    with pytest.raises(dckpt.UnsafeCheckpointError, match="symbolic link"):
        dckpt.load({"w": torch.zeros(30, 100)}, ck, strict=False)
    with pytest.raises(dckpt.UnsafeCheckpointError):
        open_checkpoint(ck)


def test_symlinked_save_directory_is_refused(clean_checkpoint: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(clean_checkpoint, ck)
    (save_dir,) = [p for p in (ck / "data").iterdir() if p.is_dir()]
    outside = tmp_path / "outside"
    shutil.move(save_dir, outside)
    os.symlink(outside, save_dir)
    with pytest.raises(dckpt.UnsafeCheckpointError, match="outside the checkpoint"):
        dckpt.load({"w": torch.zeros(30, 100)}, ck, strict=False)
    assert open_checkpoint(ck).verify()  # reported as problems, not read


# ----------------------------------------------------------------------------- 5. two writers


def _w_independent_writer(root: str) -> list[str]:
    """Each rank is its own one-process job (a group of one), racing the other to each path."""
    rank = dist.get_rank()
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    job = float(rank + 1)
    state = {f"k{i}": torch.full((200_000,), job) for i in range(8)}
    dist.barrier()
    out = []
    for r in range(4):
        try:
            dckpt.save(state, os.path.join(root, f"ck{r}"), process_group=singles[rank])
            out.append("ok")
        except dckpt.CheckpointExistsError:
            out.append("exists")
    return out


def test_concurrent_writers_one_wins_never_mixed(rank_pool: Pools, tmp_path: Path) -> None:
    outs = rank_pool(2).run(_w_independent_writer, str(tmp_path), timeout=60)
    for r in range(4):
        assert sorted([outs[0][r], outs[1][r]]) == ["exists", "ok"], outs
        winner = 1.0 if outs[0][r] == "ok" else 2.0
        state = {f"k{i}": torch.zeros(200_000) for i in range(8)}
        dckpt.load(state, tmp_path / f"ck{r}")
        for v in state.values():
            assert torch.equal(v, torch.full((200_000,), winner))
        assert len(os.listdir(tmp_path / f"ck{r}" / "data")) == 1  # the loser's data is gone


# ----------------------------------------------------------------------------- 6. memory budget


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise AssertionError(field)


def _w_budget_load(path: str, small: str, budget: int) -> int | None:
    if dist.get_rank() != 0:
        return None
    one = dist.new_group([0])
    warm = torch.empty(64, 64).t()  # same code path, small: imports and caches not measured
    dckpt.load({"w": warm}, small, process_group=one)
    dest = torch.empty(2048, 4096).t()  # (4096, 2048), transposed: the general path
    dest.zero_()
    assert not dest.is_contiguous()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status("VmHWM")
    dckpt.load({"w": dest}, path, memory_budget=budget, process_group=one)
    grew = _status("VmHWM") - base
    assert torch.equal(dest, torch.arange(4096 * 2048, dtype=torch.float32).reshape(4096, 2048))
    return grew


def test_load_under_memory_budget(rank_pool: Pools, tmp_path: Path) -> None:
    w = torch.arange(4096 * 2048, dtype=torch.float32).reshape(4096, 2048)  # 32 MiB
    dckpt.save({"w": w}, tmp_path / "ck")
    dckpt.save({"w": torch.ones(64, 64)}, tmp_path / "small")
    del w
    budget = 1 << 20
    grew, _ = rank_pool(2).run(
        _w_budget_load, str(tmp_path / "ck"), str(tmp_path / "small"), budget, timeout=60
    )
    slack = 4 << 20  # one checksum block of edge scratch, thread stacks, allocator arenas
    print(f"\nbudget load: peak RSS grew {grew / 2**20:.2f} MiB (budget 1 MiB)")
    assert grew < budget + slack, f"peak RSS grew {grew / 2**20:.1f} MiB over the destination"


def test_coverage_guided_fuzzing_of_the_manifest_parser(tmp_path: Path) -> None:
    """libFuzzer (through atheris) mutates manifests for a bounded number of runs; any
    exception other than a CheckpointError would make it exit non-zero with the input."""
    pytest.importorskip("atheris")
    import subprocess
    import sys

    target = Path(__file__).parent / "fuzz" / "manifest_target.py"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    run = subprocess.run(
        [sys.executable, str(target), "-runs=30000", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Done 30000 runs" in run.stderr
