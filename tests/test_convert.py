"""convert: exact round trips between formats, prefix stripping, bounded memory."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save_file as st_save_file

import dckpt
from dckpt._api import open_checkpoint
from dckpt.interop._convert import convert, parse_size, strip_prefix
from dckpt.interop._outputs import nest, shard

REPO = Path(__file__).resolve().parents[1]


def sample_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            "layers.0.weight": torch.randn(8, 5, generator=g),
            "layers.0.bias": torch.randn(8, generator=g).to(torch.bfloat16),
            "emb": torch.randint(0, 100, (4, 3), generator=g),
            "mask": torch.rand(6, generator=g) > 0.5,
            "half": torch.randn(3, 3, generator=g).half(),
            "empty": torch.empty(0, 4),
            "scalar": torch.tensor(3.5),
            "bytes": torch.arange(7, dtype=torch.uint8),
        },
        "optim": {"lr": 0.1, "moments": [torch.ones(2), torch.zeros(3, dtype=torch.float64)]},
        "step": 12,
    }


def flat_tensors(state: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    items = state.items() if isinstance(state, dict) else enumerate(state)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            out[key] = v
        elif isinstance(v, (dict, list)):
            out.update(flat_tensors(v, key + "."))  # type: ignore[arg-type]
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(got[k], t), k


def assert_same_state(got: Any, want: Any) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype
        assert torch.equal(got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want)
        for k in want:
            assert_same_state(got[k], want[k])
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert_same_state(a, b)
    else:
        assert got == want


def read_dckpt(path: Path) -> dict[str, torch.Tensor]:
    r = open_checkpoint(path)
    assert r.verify() == []
    return dict(r.iter_tensors())


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    dckpt.save(sample_state(), path)
    return path


def test_to_safetensors_exact(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    progress: list[int] = []
    report = convert(ckpt, out, progress=progress.append)
    want = flat_tensors(sample_state())
    assert_same(load_file(out), want)
    assert report.dst_format == "safetensors" and report.tensors == len(want)
    assert report.skipped == ("optim.lr", "step")
    assert sum(progress) == report.nbytes == sum(t.nbytes for t in want.values())
    # The header follows the spec: u64 LE length, JSON padded with spaces to 8 bytes.
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    assert len(raw) == 8 + n + report.nbytes


def test_to_hf_sharded(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    report = convert(ckpt, out, to="hf", prefix="model.", shard_size=200)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    got: dict[str, torch.Tensor] = {}
    for name in shards:
        part = load_file(out / name)
        assert all(index["weight_map"][k] == name for k in part)
        got.update(part)
    assert_same(got, sample_state()["model"])
    assert index["metadata"]["total_size"] == report.nbytes
    assert report.skipped == ()  # the prefix already left the non-tensor values out
    # hf -> dckpt reads the shards back through the index
    back = tmp_path / "back"
    convert(out, back)
    assert_same(read_dckpt(back), sample_state()["model"])


def test_pt_round_trip_keeps_structure_and_values(ckpt: Path, tmp_path: Path) -> None:
    pt = tmp_path / "state.pt"
    report = convert(ckpt, pt)
    assert report.values == 2 and report.skipped == ()
    assert_same_state(torch.load(pt, weights_only=True), sample_state())
    back = tmp_path / "back"
    convert(pt, back)
    state = sample_state()
    for t in flat_tensors(state).values():
        t.zero_()
    state["step"], state["optim"]["lr"] = 0, 0.0
    assert dckpt.load(state, back).unexpected_keys == ()
    assert_same_state(state, sample_state())


def test_safetensors_to_dckpt_and_pt(tmp_path: Path) -> None:
    tensors = flat_tensors(sample_state())
    src = tmp_path / "in.safetensors"
    st_save_file(tensors, src)
    out = tmp_path / "c"
    convert(src, out, to="dckpt")
    assert_same(read_dckpt(out), tensors)
    pt = tmp_path / "flat.bin"
    convert(src, pt)
    got = torch.load(pt, weights_only=True)
    assert_same(got, tensors)  # flat keys stay flat: HF-style .bin


def test_prefix_to_pt_gives_module_state_dict(ckpt: Path, tmp_path: Path) -> None:
    pt = tmp_path / "model.pt"
    convert(ckpt, pt, prefix="model")  # a missing trailing dot is implied
    m = torch.load(pt, weights_only=True)
    assert_same(m, sample_state()["model"])


def test_strip_prefix_and_nest() -> None:
    assert strip_prefix(("model", "layers.0.weight"), "model.") == ("layers.0.weight",)
    assert strip_prefix(("model", "layers.0.weight"), "model.layers.") == ("0.weight",)
    assert strip_prefix(("optim", "state", 0), "optim.state.") == (0,)
    assert strip_prefix(("modelx", "w"), "model.") is None
    assert strip_prefix(("model",), "model.") is None
    assert nest([(("a", 0), 1), (("a", 1), 2), (("b", "c"), 3)]) == {"a": [1, 2], "b": {"c": 3}}


def test_shard_and_sizes() -> None:
    from dckpt.interop._sources import Entry

    es = [Entry(f"k{i}", (f"k{i}",), "tensor", "uint8", (n,)) for i, n in enumerate([5, 5, 20, 1])]
    assert [[e.key for e in s] for s in shard(es, 10)] == [["k0", "k1"], ["k2"], ["k3"]]
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2MiB") == 2 << 20
    assert parse_size("1.5kb") == 1500
    assert parse_size("123") == 123
    with pytest.raises(ValueError):
        parse_size("5 parsecs")


def test_errors(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(dckpt.CheckpointExistsError):
        convert(ckpt, out)
    with pytest.raises(dckpt.CheckpointExistsError):
        convert(ckpt, ckpt)  # a committed dckpt destination is never replaced
    with pytest.raises(ValueError, match="unknown format"):
        convert(ckpt, tmp_path / "x", to="onnx")
    with pytest.raises(dckpt.CheckpointError, match="no keys under prefix"):
        convert(ckpt, tmp_path / "y.safetensors", prefix="nothing.")
    with pytest.raises(dckpt.CheckpointNotFoundError):
        convert(tmp_path / "missing.pt", tmp_path / "z")
    leftover = tmp_path / "crashed" / "data" / "abc"
    leftover.mkdir(parents=True)
    (leftover / "r0-0.bin").write_bytes(b"\0")
    with pytest.raises(dckpt.CheckpointNotFoundError, match="incomplete"):
        convert(tmp_path / "crashed", tmp_path / "z.safetensors")
    assert not (tmp_path / "z.safetensors").exists()


def test_failed_write_leaves_no_file(ckpt: Path, tmp_path: Path) -> None:
    state = {"w": torch.zeros(2, dtype=torch.complex128)}  # safetensors has no C128
    src = tmp_path / "c128"
    dckpt.save(state, src)
    with pytest.raises(dckpt.UnsupportedStateError, match="complex128"):
        convert(src, tmp_path / "o.safetensors")
    file = next((src / "data").rglob("*.bin"))
    file.write_bytes(file.read_bytes()[:-4])  # truncated: fails while writing shard 1
    state2 = {"a": torch.ones(4), "b": torch.ones(4)}
    dckpt.save(state2, tmp_path / "ab")
    next((tmp_path / "ab" / "data").rglob("*.bin")).write_bytes(b"")
    with pytest.raises(dckpt.CorruptCheckpointError):
        convert(tmp_path / "ab", tmp_path / "hf", to="hf", shard_size=16)
    with pytest.raises(dckpt.CorruptCheckpointError):
        convert(tmp_path / "ab", tmp_path / "ab2")
    assert sorted(os.listdir(tmp_path)) == ["ab", "c128", "ckpt"]


def test_dcp_source(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = sample_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))
    out = tmp_path / "dcp.safetensors"
    report = convert(tmp_path / "dcp", out)
    assert report.src_format == "dcp"
    assert_same(load_file(out), flat_tensors(sample_state()))


MEMORY_SCRIPT = textwrap.dedent(
    """
    import gc, json, os, sys, threading, torch
    import dckpt
    from dckpt.interop._convert import convert

    def anon():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024

    root, mb, n = sys.argv[1], int(sys.argv[2]), 8
    src = os.path.join(root, "src")
    dckpt.save({f"model.t{i}": torch.full((mb << 18,), float(i)) for i in range(n)}, src)
    dckpt.save({"x": torch.ones(4)}, os.path.join(root, "tiny"))
    for fmt in ("hf", "safetensors", "dckpt"):  # lazy imports and pools, before measuring
        convert(os.path.join(root, "tiny"), os.path.join(root, "warm-" + fmt), to=fmt)
    growth = {}
    for fmt in ("hf", "safetensors", "dckpt"):
        gc.collect()
        # Sample anonymous memory (not file pages, which others' load may evict and refault).
        before, peak, stop = anon(), [0], threading.Event()
        def sample():
            while not stop.wait(0.002):
                peak[0] = max(peak[0], anon())
        sampler = threading.Thread(target=sample)
        sampler.start()
        dst = os.path.join(root, "out-" + fmt + (".safetensors" if fmt == "safetensors" else ""))
        convert(src, dst, to=fmt, shard_size=2 * mb << 20)
        stop.set()
        sampler.join()
        growth[fmt] = max(peak[0], anon()) - before
    print(json.dumps(growth))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_memory_stays_near_largest_tensor(tmp_path: Path) -> None:
    """64 MB of tensors through a 16 MB shard size: peak growth ~ one tensor, not all."""
    mb = 8
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), str(mb)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    growth = json.loads(proc.stdout.strip().splitlines()[-1])
    largest, shard_buffer = mb << 20, 2 * mb << 20
    for fmt, grew in growth.items():
        assert grew < 2 * largest + shard_buffer, (fmt, grew / 2**20)
    index = json.loads((tmp_path / "out-hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4  # two tensors per shard
