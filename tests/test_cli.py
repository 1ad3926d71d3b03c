"""The dckpt command line, through click's runner and as a real subprocess."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file

import dckpt
from dckpt._manager import CheckpointManager, step_name
from dckpt.cli._commands import cli
from dckpt.cli._output import human, want_progress

REPO = Path(__file__).resolve().parents[1]


def state(scale: float = 1.0) -> dict[str, Any]:
    return {
        "model": {"w": torch.arange(12.0).reshape(3, 4) * scale, "b": torch.ones(5)},
        "ids": torch.arange(6),
        "step": 7,
    }


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good"
    dckpt.save(state(), path)
    return path


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def chunk_of(path: Path, key: str) -> tuple[Path, int, int]:
    m = json.loads((path / "manifest.json").read_text())
    c = m["tensors"][key]["chunks"][0]
    return path / c["file"], c["offset"], c["nbytes"]


def test_inspect_text_and_json(good: Path) -> None:
    r = run("inspect", str(good))
    assert r.exit_code == 0, r.output
    assert "dckpt checkpoint saved by 1 rank" in r.stdout
    assert "model.w" in r.stdout and "float32" in r.stdout and "[3, 4]" in r.stdout
    assert "4 keys: 3 tensors" in r.stdout
    r = run("inspect", str(good), "--json")
    data = json.loads(r.stdout)
    assert data["format"] == "dckpt" and data["world_size"] == 1
    by_key = {k["key"]: k for k in data["keys"]}
    assert by_key["model.w"]["shape"] == [3, 4] and by_key["model.w"]["nbytes"] == 48
    assert by_key["model.w"]["chunks"] == 1 and by_key["step"]["value"] == "7"
    assert data["totals"]["tensors"] == 3 and data["totals"]["files"] == 1


def test_verify_good(good: Path) -> None:
    r = run("verify", str(good))
    assert r.exit_code == 0 and r.stdout.startswith("OK:")
    data = json.loads(run("verify", "--json", str(good)).stdout)
    assert data["ok"] and data["problems"] == [] and data["checked"]["checksums"]


def test_verify_flipped_byte(good: Path) -> None:
    file, offset, _ = chunk_of(good, "model.w")
    raw = bytearray(file.read_bytes())
    raw[offset + 5] ^= 0x10
    file.write_bytes(bytes(raw))
    r = run("verify", str(good))
    assert r.exit_code == 1
    assert "DAMAGED" in r.stdout and "checksum mismatch" in r.stdout
    assert "damaged keys: model.w" in r.stdout
    data = json.loads(run("verify", "--json", str(good)).stdout)
    assert not data["ok"] and data["damaged_keys"] == ["model.w"]


def test_other_commands_on_damaged_checkpoint(good: Path, tmp_path: Path) -> None:
    file, offset, _ = chunk_of(good, "model.w")
    raw = bytearray(file.read_bytes())
    raw[offset] ^= 0x01
    file.write_bytes(bytes(raw))
    assert run("inspect", str(good)).exit_code == 0  # metadata only: still readable
    out = tmp_path / "out.safetensors"
    for args in (("convert", str(good), str(out)), ("diff", str(good), str(good))):
        r = run(*args)
        assert r.exit_code == 1, args
        assert r.stderr.startswith("dckpt: error: checksum mismatch in key 'model.w'")
    assert not list(tmp_path.glob("out*"))  # no half-written output
    root = tmp_path / "root"
    shutil.copytree(good, root / step_name(1))
    (root / step_name(1) / "manifest.json").write_text("{")
    r = run("ls", str(root))
    assert r.exit_code == 0 and "no (corrupt)" in r.stdout


def test_verify_missing_and_truncated_file(good: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(good, other)
    file, _, _ = chunk_of(good, "model.w")
    file.unlink()
    r = run("verify", str(good))
    assert r.exit_code == 1 and "missing" in r.stdout
    assert f"damaged files: {file.relative_to(good)}" in r.stdout
    file, _, _ = chunk_of(other, "model.w")
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size - 8)
    r = run("verify", "--json", str(other))
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert any("truncated" in p for p in data["problems"])
    assert data["damaged_files"] == [str(file.relative_to(other))]


def test_uncommitted_dir_is_a_clear_error(tmp_path: Path) -> None:
    d = tmp_path / "crashed" / "data" / "abc"
    d.mkdir(parents=True)
    (d / "r0-0.bin").write_bytes(b"\0" * 8)
    for cmd in ("inspect", "verify"):
        r = run(cmd, str(tmp_path / "crashed"))
        assert r.exit_code == 1
        assert r.stderr.startswith("dckpt: error: ") and "incomplete" in r.stderr
        assert "Traceback" not in r.output and r.stderr.count("\n") == 1
    r = run("--debug", "verify", str(tmp_path / "crashed"))
    assert isinstance(r.exception, dckpt.CheckpointNotFoundError)  # --debug: the real error


def test_corrupt_manifest(good: Path) -> None:
    (good / "manifest.json").write_text('{"format": "dckpt"')
    r = run("verify", str(good))
    assert r.exit_code == 1 and "not valid JSON" in r.stderr


def test_usage_errors_exit_2(good: Path) -> None:
    assert run("inspect").exit_code == 2
    assert run("frobnicate").exit_code == 2
    r = run("convert", str(good), str(good) + ".x", "--to", "hf", "--shard-size", "lots")
    assert r.exit_code == 2 and "not a size" in r.output


def test_dcp_inspect_and_verify(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state(), checkpoint_id=str(tmp_path / "dcp"))
    data = json.loads(run("inspect", "--json", str(tmp_path / "dcp")).stdout)
    assert data["format"] == "dcp"
    assert {k["key"] for k in data["keys"]} == {"model.w", "model.b", "ids", "step"}
    r = run("verify", str(tmp_path / "dcp"))
    assert r.exit_code == 0 and "no checksums" in r.stdout
    assert not json.loads(run("verify", "--json", str(tmp_path / "dcp")).stdout)["checked"][
        "checksums"
    ]


def test_ls_with_leftover(tmp_path: Path) -> None:
    root = tmp_path / "run"
    m = CheckpointManager(root, keep_last=None)
    m.save(100, state())
    m.save(200, state())
    leftover = root / step_name(300) / "data" / "dead"
    leftover.mkdir(parents=True)
    (leftover / "r0-0.bin").write_bytes(b"\0" * 100)
    r = run("ls", str(root))
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["STEP", "COMMITTED", "SIZE", "CREATED", "DIR"]
    assert lines[1].split()[:2] == ["100", "yes"] and lines[3].split()[:3] == [
        "300",
        "no",
        "(incomplete)",
    ]
    assert "1 uncommitted" in r.stdout
    data = json.loads(run("ls", "--json", str(root)).stdout)
    assert [(e["step"], e["committed"]) for e in data] == [(100, True), (200, True), (300, False)]
    assert data[2]["size"] == 100 and data[0]["created"] > 0
    r = run("ls", str(tmp_path / "nope"))
    assert r.exit_code == 1 and "does not exist" in r.stderr


def test_convert_commands(good: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    r = run("convert", str(good), str(out), "--prefix", "model.")
    assert r.exit_code == 0, r.output
    assert set(load_file(out)) == {"w", "b"}
    r = run(
        "convert", str(good), str(tmp_path / "hf"), "--to", "hf", "--shard-size", "50B", "--json"
    )
    report = json.loads(r.stdout)
    assert report["dst_format"] == "hf" and report["skipped"] == ["step"]
    assert len(report["files"]) == 4  # three shards and the index
    r = run("convert", str(good), str(out))
    assert r.exit_code == 1 and "already exists" in r.stderr


def test_diff(good: Path, tmp_path: Path) -> None:
    same = tmp_path / "same.safetensors"
    run("convert", str(good), str(same))
    r = run("diff", str(good), str(same))
    assert r.exit_code == 1  # the safetensors copy has no "step"
    assert "only in A: step" in r.stdout
    other = tmp_path / "other"
    changed = state(scale=2.0)
    changed["extra"] = torch.zeros(1)
    changed["ids"] = changed["ids"].to(torch.int32)
    dckpt.save(changed, other)
    r = run("diff", str(good), str(other))
    assert r.exit_code == 1
    assert "values differ: model.w: max abs diff 11" in r.stdout
    assert "dtype differs: ids: int64 vs int32" in r.stdout
    assert "only in B: extra" in r.stdout
    data = json.loads(run("diff", "--json", str(good), str(other)).stdout)
    assert not data["identical"] and data["only_in_b"] == ["extra"]
    w = next(d for d in data["different"] if d["key"] == "model.w")
    assert w["max_abs_diff"] == 11.0 and w["elements"] == 11
    copy = tmp_path / "copy"
    shutil.copytree(good, copy)
    r = run("diff", str(good), str(copy))
    assert r.exit_code == 0 and r.stdout.startswith("identical")


def test_helpers() -> None:
    assert human(0) == "0 B" and human(1536) == "1.5 KiB"

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert want_progress(False, Tty()) and not want_progress(True, Tty())
    assert not want_progress(False, io.StringIO())


def test_real_subprocess(good: Path) -> None:
    """``python -m dckpt`` (and the console script, when installed) end to end."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    commands = [[sys.executable, "-m", "dckpt"]]
    script = shutil.which("dckpt")
    if script is not None:
        commands.append([script])
    file, offset, _ = chunk_of(good, "model.b")
    for cmd in commands:
        p = subprocess.run(
            [*cmd, "inspect", "--json", str(good)], capture_output=True, text=True, env=env
        )
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["totals"]["keys"] == 4
    raw = bytearray(file.read_bytes())
    raw[offset] ^= 1
    file.write_bytes(bytes(raw))
    p = subprocess.run([*commands[0], "verify", str(good)], capture_output=True, text=True, env=env)
    assert p.returncode == 1 and "damaged keys: model.b" in p.stdout and p.stderr == ""
