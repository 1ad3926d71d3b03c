"""Hostile checkpoint directories: what the filesystem holds, not what the files say.

A symbolic link in place of ``data``, ``data/<save_id>`` or ``.dckpt.lock`` must never
lead a save to write or delete outside the checkpoint; a FIFO in place of a file dckpt
opens must give a clean error instead of an endless wait; an enormous (sparse) file must be
refused before it is read; and a DCP ``.metadata`` claiming a tensor far larger than its
files must be refused before anything is allocated. Each scenario that could hang or eat
memory runs in a child process with a generous bound, so a regression fails the test
rather than stalling the suite or the machine.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import dckpt
from dckpt import _faults
from dckpt._api import open_checkpoint
from dckpt.cli._commands import cli
from dckpt.storage import MAX_READ_BYTES, LocalStorage

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **{k: v for k, v in os.environ.items() if k != "DCKPT_FAULT"},
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
}
CHILD_TIMEOUT = 240.0  # whole child process; each scenario in it takes well under a second
GiB = 1 << 30


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every entry below ``root`` with its bytes (None for directories and links)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


def _in_child(fn: Callable[..., Any], *args: str) -> Any:
    """``fn(*args)`` in a fresh Python process; its JSON-able result, or a failed test."""
    code = (
        "import json, sys\n"
        f"from {fn.__module__} import {fn.__name__} as fn\n"
        "print('RESULT ' + json.dumps(fn(*sys.argv[1:])), flush=True)\n"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"{fn.__name__} hung past {CHILD_TIMEOUT} s; it got as far as:\n{out}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    return json.loads(lines[-1][len("RESULT ") :])


# ------------------------------------------------------------------ 1. symlinks: no writes out


def test_save_over_a_symlinked_data_dir_writes_and_deletes_nothing_outside(
    tmp_path: Path,
) -> None:
    ck, outside = tmp_path / "ck", tmp_path / "outside"
    dckpt.save({"w": torch.full((1000,), 7.0)}, ck)
    # The reported scenario: ``data`` leads elsewhere, and the old manifest's save_id names
    # a directory there, which the save used to write beside and then delete.
    shutil.move(ck / "data", outside)
    os.symlink(outside, ck / "data")
    (old_id,) = os.listdir(outside)
    assert json.loads((ck / "manifest.json").read_bytes())["save_id"] == old_id
    before_outside, before_ck = _tree(outside), _tree(ck)
    with pytest.raises(dckpt.UnsafeCheckpointError) as info:
        dckpt.save({"w": torch.zeros(1000)}, ck, overwrite=True)
    message = str(info.value)
    assert str(ck / "data") in message and "symbolic link" in message
    assert "Remove the link" in message
    assert _tree(outside) == before_outside, "the save wrote or deleted outside the checkpoint"
    assert _tree(ck) == before_ck
    # Loading still refuses the link; in its place again, the old checkpoint loads intact.
    with pytest.raises(dckpt.UnsafeCheckpointError):
        dckpt.load({"w": torch.zeros(1000)}, ck)
    os.unlink(ck / "data")
    shutil.move(outside, ck / "data")
    state = {"w": torch.zeros(1000)}
    dckpt.load(state, ck)
    assert torch.equal(state["w"], torch.full((1000,), 7.0))


def test_symlinked_save_directory_is_never_written_or_deleted_through(tmp_path: Path) -> None:
    root, outside = tmp_path / "ck", tmp_path / "outside"
    (root / "data").mkdir(parents=True)
    outside.mkdir()
    (outside / "keep.bin").write_bytes(b"precious")
    os.symlink(outside, root / "data" / "s1")
    before = _tree(outside)
    st = LocalStorage(root)
    steps: list[tuple[str, Callable[[], object]]] = [
        ("create", lambda: st.open_writer("data/s1/r0-0.bin")),
        ("create below", lambda: st.open_writer("data/s1/sub/r0-0.bin")),
        ("commit", lambda: st.commit("data/s1/manifest.json", b"{}", durable=True)),
        ("sync", lambda: st.sync_dir("data/s1")),
        ("delete", lambda: st.delete("data/s1/keep.bin")),
        ("delete_prefix", lambda: st.delete_prefix("data/s1")),
        ("delete_prefix below", lambda: st.delete_prefix("data/s1/sub")),
        ("list", lambda: st.list("data/s1")),
    ]
    for what, step in steps:
        with pytest.raises(dckpt.UnsafeCheckpointError, match="symbolic link") as info:
            step()
        assert str(root / "data" / "s1") in str(info.value), what
        assert _tree(outside) == before, what
    assert os.path.islink(root / "data" / "s1")  # not even the link itself was removed
    # A link where a directory belongs, met by a real save: the previous save's directory.
    ck = tmp_path / "ck2"
    dckpt.save({"w": torch.ones(100)}, ck)
    (old,) = os.listdir(ck / "data")
    shutil.move(ck / "data" / old, tmp_path / "old-data")
    os.symlink(tmp_path / "old-data", ck / "data" / old)
    before = _tree(tmp_path / "old-data")
    dckpt.save({"w": torch.full((100,), 2.0)}, ck, overwrite=True)  # old data: left alone
    assert _tree(tmp_path / "old-data") == before
    state = {"w": torch.zeros(100)}
    dckpt.load(state, ck)
    assert torch.equal(state["w"], torch.full((100,), 2.0))


def test_symlinked_lock_file_is_refused(tmp_path: Path) -> None:
    ck, target = tmp_path / "ck", tmp_path / "somebody-elses-file"
    dckpt.save({"w": torch.full((100,), 3.0)}, ck)
    target.write_bytes(b"not yours")
    os.unlink(ck / ".dckpt.lock")
    os.symlink(target, ck / ".dckpt.lock")
    manifest = (ck / "manifest.json").read_bytes()
    with pytest.raises(dckpt.UnsafeCheckpointError, match="symbolic link") as info:
        dckpt.save({"w": torch.zeros(100)}, ck, overwrite=True)
    assert str(ck / ".dckpt.lock") in str(info.value)
    assert target.read_bytes() == b"not yours"
    assert (ck / "manifest.json").read_bytes() == manifest
    state = {"w": torch.zeros(100)}
    dckpt.load(state, ck)
    assert torch.equal(state["w"], torch.full((100,), 3.0))


# ------------------------------------------------------------------------- 2. FIFOs: no hangs


def _dcp_save(state: dict[str, Any], path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=path)


def _outcome(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except dckpt.CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"
    except Exception as exc:
        return f"NOT A CheckpointError {type(exc).__name__}: {exc}"
    return "no error"


def _cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    return f"exit {result.exit_code}: {result.output.strip()}"


def _fifo_cases(base_dir: str) -> dict[str, str]:
    """Child process: every entry point against a FIFO in place of each file dckpt opens."""
    base = Path(base_dir)
    good, dcp_good = base / "good", base / "dcp-good"
    dckpt.save({"w": torch.ones(10)}, good)
    _dcp_save({"w": torch.ones(10)}, dcp_good)
    out: dict[str, str] = {}

    def fresh(src: Path, name: str, fifo: str) -> Path:
        path = base / name
        shutil.copytree(src, path)
        (path / fifo).unlink(missing_ok=True)
        os.mkfifo(path / fifo)
        return path

    def run(name: str, fn: Callable[[], str]) -> None:
        print(f"running {name}", flush=True)  # the parent shows how far a hang got
        out[name] = fn()

    def cli_all(tag: str, path: Path) -> None:
        for command in ("inspect", "verify"):
            run(f"{tag} cli {command}", lambda c=command: _cli(c, str(path)))  # type: ignore[misc]
        run(f"{tag} cli diff", lambda: _cli("diff", str(path), str(good)))
        run(f"{tag} cli convert", lambda: _cli("convert", str(path), str(base / f"{tag}.st")))

    man = fresh(good, "manifest", "manifest.json")
    run("manifest load", lambda: _outcome(lambda: dckpt.load({"w": torch.zeros(10)}, man)))
    run(
        "manifest save",
        lambda: _outcome(lambda: dckpt.save({"w": torch.zeros(10)}, man, overwrite=True)),
    )
    cli_all("manifest", man)
    runs = base / "runs"
    shutil.copytree(good, runs / "step-1")
    os.unlink(runs / "step-1" / "manifest.json")
    os.mkfifo(runs / "step-1" / "manifest.json")
    run("manifest cli ls", lambda: _cli("ls", "--json", str(runs)))

    meta = fresh(dcp_good, "metadata", ".metadata")
    run("metadata load", lambda: _outcome(lambda: dckpt.load({"w": torch.zeros(10)}, meta)))
    cli_all("metadata", meta)

    lock = fresh(good, "lock", ".dckpt.lock")
    run(
        "lock save",
        lambda: _outcome(lambda: dckpt.save({"w": torch.zeros(10)}, lock, overwrite=True)),
    )
    dst = base / "convert-dst"
    dst.mkdir()
    os.mkfifo(dst / ".dckpt.lock")
    run("lock cli convert", lambda: _cli("convert", str(good), str(dst), "--to", "dckpt"))
    # With a reader holding the FIFO open, opening it to write would succeed: still refused.
    reader = os.open(lock / ".dckpt.lock", os.O_RDONLY | os.O_NONBLOCK)
    try:
        run(
            "lock with reader save",
            lambda: _outcome(lambda: dckpt.save({"w": torch.zeros(10)}, lock, overwrite=True)),
        )
    finally:
        os.close(reader)
    state = {"w": torch.zeros(10)}
    dckpt.load(state, lock)  # the FIFO lock never let the old checkpoint be replaced
    out["lock old checkpoint intact"] = str(torch.equal(state["w"], torch.ones(10)))
    return out


def test_fifos_give_clean_errors_never_hang(tmp_path: Path) -> None:
    out = _in_child(_fifo_cases, str(tmp_path))
    assert out.pop("lock old checkpoint intact") == "True"
    ls = out.pop("manifest cli ls")
    assert ls.startswith("exit 0: "), ls  # listed as a damaged step, not a hang
    (entry,) = json.loads(ls[len("exit 0: ") :])
    assert not entry["committed"] and "FIFO" in entry["error"], entry
    assert len(out) == 14, sorted(out)
    for case, got in out.items():
        if " cli " in case:
            assert got.startswith("exit 1: dckpt: error: "), (case, got)
            assert "--debug" not in got, (case, got)  # a dckpt error, not a crash
        else:
            assert got.startswith("UnsafeCheckpointError: "), (case, got)
        assert "FIFO" in got, (case, got)


# -------------------------------------------------------------- 3. size limits before reading


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def _sparse_cases(base_dir: str) -> dict[str, Any]:
    """Child process: 3 GiB sparse manifest / .metadata through load and the CLI."""
    base = Path(base_dir)
    ck, dcp_ck = base / "ck", base / "dcp"
    dckpt.save({"w": torch.ones(10)}, ck)
    _dcp_save({"w": torch.ones(10)}, dcp_ck)
    _cli("inspect", str(ck))  # warm: lazy imports are not what is measured
    _outcome(lambda: dckpt.load({"w": torch.zeros(10)}, ck))
    for path in (ck / "manifest.json", dcp_ck / ".metadata"):
        path.unlink()
        with open(path, "wb"):
            pass
        os.truncate(path, 3 * GiB)  # sparse: no disk space, nothing in memory
    start = _vm_hwm()
    out: dict[str, Any] = {
        "manifest load": _outcome(lambda: dckpt.load({"w": torch.zeros(10)}, ck)),
        "manifest reader": _outcome(lambda: open_checkpoint(ck)),
        "manifest cli inspect": _cli("inspect", str(ck)),
        "metadata load": _outcome(lambda: dckpt.load({"w": torch.zeros(10)}, dcp_ck)),
        "metadata cli inspect": _cli("inspect", str(dcp_ck)),
        "metadata cli verify": _cli("verify", str(dcp_ck)),
    }
    out["hwm growth"] = _vm_hwm() - start
    return out


def test_oversized_files_are_refused_before_reading(tmp_path: Path) -> None:
    out = _in_child(_sparse_cases, str(tmp_path))
    growth = out.pop("hwm growth")
    assert growth < 300 * (1 << 20), f"peak RSS grew {growth / (1 << 20):.0f} MiB"
    for case, got in out.items():
        if " cli " in case:
            assert got.startswith("exit 1: dckpt: error: "), (case, got)
        else:
            assert got.startswith("CorruptCheckpointError: "), (case, got)
        assert str(3 * GiB) in got and str(MAX_READ_BYTES) in got, (case, got)
        assert "nothing was read" in got, (case, got)


def test_read_file_limit_is_checked_first_and_while_reading(tmp_path: Path) -> None:
    st = LocalStorage(tmp_path)
    (tmp_path / "f").write_bytes(b"x" * 101)
    with pytest.raises(dckpt.CorruptCheckpointError, match=r"f is 101 bytes, over the 100-byte"):
        st.read_file("f", max_bytes=100)
    assert st.read_file("f", max_bytes=101) == b"x" * 101
    # /proc files are regular files whose stat says 0 bytes: they "grow" as they are read.
    proc = LocalStorage("/proc/self")
    assert b"VmHWM" in (proc.read_file("status") or b"")
    with pytest.raises(dckpt.CorruptCheckpointError, match="grew past the 64-byte limit"):
        proc.read_file("status", max_bytes=64)


# ------------------------------------------------------- 4. DCP claims checked before allocating


def _huge_claim_dcp(tmp_path: Path) -> Path:
    """A genuine DCP checkpoint whose metadata then claims ``cfg.big`` is [2**40, 2**20]."""
    path = tmp_path / "dcp"
    _dcp_save({"a": torch.arange(6.0), "cfg": {"big": torch.ones(2, 3), "n": 4}}, path)
    md = pickle.loads((path / ".metadata").read_bytes())
    entry = md.state_dict_metadata["cfg.big"]
    entry.size = torch.Size([2**40, 2**20])
    entry.chunks[0].sizes = torch.Size([2**40, 2**20])
    (path / ".metadata").write_bytes(pickle.dumps(md))
    return path


def test_dcp_metadata_claiming_a_huge_tensor_is_refused_before_allocating(
    tmp_path: Path,
) -> None:
    path = _huge_claim_dcp(tmp_path)
    # Asking for the dict holding it assembles it from the flattened keys: a whole read.
    with pytest.raises(dckpt.CorruptCheckpointError, match="'cfg.big'"):
        dckpt.load({"a": torch.zeros(6), "cfg": {}}, path)
    with pytest.raises(dckpt.StateMismatchError, match="cfg.big"):
        dckpt.load({"a": torch.zeros(6), "cfg": {"big": torch.zeros(2, 3), "n": 0}}, path)
    reader = open_checkpoint(path)
    with pytest.raises(dckpt.CorruptCheckpointError, match="'cfg.big'.*distcp"):
        reader.read_tensor("cfg.big")
    assert torch.equal(reader.read_tensor("a"), torch.arange(6.0))  # the rest still reads
    assert any("'cfg.big'" in p for p in reader.verify())
    for dst in ("out.safetensors", "out-dckpt"):
        with pytest.raises(dckpt.CorruptCheckpointError, match="'cfg.big'"):
            dckpt.convert(path, tmp_path / dst)
    result = CliRunner().invoke(cli, ["convert", str(path), str(tmp_path / "cli.safetensors")])
    assert result.exit_code == 1, result.output
    assert "dckpt: error: " in result.output and "cfg.big" in result.output, result.output
    assert "--debug" not in result.output, result.output  # a dckpt error, not a crash
    # A consistent shape whose chunk claims more bytes than its archive holds.
    path2 = tmp_path / "dcp2"
    _dcp_save({"b": torch.ones(2, 3)}, path2)
    md = pickle.loads((path2 / ".metadata").read_bytes())
    md.state_dict_metadata["b"].size = torch.Size([2, 3 << 20])
    md.state_dict_metadata["b"].chunks[0].sizes = torch.Size([2, 3 << 20])
    (path2 / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(dckpt.CorruptCheckpointError, match=r"'b'.*needs 25165824 bytes"):
        dckpt.load({"b": torch.zeros(2, 3 << 20)}, path2)


# ------------------------------------------------------------------------ 5. fault points


def test_storage_steps_are_fault_points(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    dckpt.save({"w": torch.ones(100)}, ck)
    _faults.record(True)
    try:
        dckpt.save({"w": torch.full((100,), 2.0)}, ck, overwrite=True)
    finally:
        seen = _faults.record(False)
    order = [
        "storage.create",
        "storage.write",
        "storage.fsync",
        "storage.commit.tmp",
        "storage.commit.rename",
        "storage.delete",  # the previous save's data
    ]
    assert all(p in seen for p in order), seen
    firsts = [seen.index(p) for p in order]
    assert firsts == sorted(firsts), seen
    # Armed, each step really is where a fault lands: die before the rename, keep the old.
    manifest = (ck / "manifest.json").read_bytes()
    _faults.arm(_faults.injector("storage.commit.tmp", "raise"))
    try:
        with pytest.raises(_faults.InjectedFault):
            dckpt.save({"w": torch.full((100,), 3.0)}, ck, overwrite=True)
    finally:
        _faults.arm(None)
    assert (ck / "manifest.json").read_bytes() == manifest
    assert not list(ck.glob("*.tmp-*"))
    state = {"w": torch.zeros(100)}
    dckpt.load(state, ck)
    assert torch.equal(state["w"], torch.full((100,), 2.0))
