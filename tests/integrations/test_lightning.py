"""dckpt's Lightning plugins in real Trainer runs: 1 process, then 2 CPU processes.

``_lightning_run.py`` trains with Lightning's own launcher (DDP with ``DckptCheckpointIO``,
then ``DckptModelParallelStrategy`` with FSDP2), stops, resumes a model built from another
seed via ``ckpt_path``, and records the losses; they must be bit-identical.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.integrations._ranks import needs, run_script

pytestmark = needs("lightning")

SCRIPT = Path(__file__).with_name("_lightning_run.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("lightning")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    run_script(SCRIPT, out, env, "Lightning")
    results: dict[str, Any] = {"dir": out}
    for name in ("single", "ddp", "model_parallel"):
        with open(out / f"{name}.json") as f:
            results[name] = json.load(f)
    return results


def _manifest(path: Path) -> dict[str, Any]:
    with open(path / "manifest.json") as f:
        return json.load(f)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("name", "world_size"), [("single", 1), ("ddp", 1), ("model_parallel", 2)])
def test_resume_from_ckpt_path_gives_identical_losses(
    runs: dict[str, Any], name: str, world_size: int
) -> None:
    run = runs[name]
    first, resumed = dict(map(tuple, run["first"])), dict(map(tuple, run["resumed"]))
    steps_per_epoch = 8 if name == "single" else 4
    # Resumed from the end of epoch 0: every later step, with the same loss to the bit.
    assert sorted(resumed) == list(range(steps_per_epoch, 3 * steps_per_epoch))
    assert {s: first[s] for s in resumed} == resumed
    # Each .ckpt is a dckpt checkpoint directory; DDP's is written by rank 0 alone,
    # the model-parallel one by both ranks, each with its own shards.
    ckpt = runs["dir"] / name / "all" / run["checkpoints"][0]
    manifest = _manifest(ckpt)
    assert manifest["world_size"] == world_size
    assert any(k.startswith("state_dict.net.0.weight") for k in manifest["tensors"])
    # ModelCheckpoint(save_top_k=1) removed the older checkpoint directories.
    assert run["latest"] == [f"epoch=2-step={3 * steps_per_epoch}.ckpt"]
