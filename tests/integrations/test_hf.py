"""DckptTrainer (transformers.Trainer) and save_state/load_state (Accelerate) on the CPU.

``_hf_run.py`` trains a tiny Llama built from a config (nothing downloaded) with the
Trainer, resumes a model built from another seed mid-epoch from a dckpt checkpoint, turns
the last checkpoint into Hugging Face weights with ``dckpt convert --to hf`` and loads
them with ``from_pretrained``; then the same save/resume with Accelerate. Losses include
noise drawn from the global RNG, so they match only if the RNG states were restored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.integrations._ranks import needs, run_script

pytestmark = needs("transformers", "accelerate")

SCRIPT = Path(__file__).with_name("_hf_run.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("hf")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run_script(SCRIPT, out, env, "Hugging Face")
    with open(out / "result.json") as f:
        return json.load(f)  # type: ignore[no-any-return]


def test_trainer_resumes_mid_epoch_with_identical_losses(result: dict[str, Any]) -> None:
    t = result["trainer"]
    assert t["resumed"] == {k: t["first"][k] for k in ("6", "7")}
    # save_total_limit=2 rotated the dckpt checkpoints like the Trainer's own.
    assert t["kept"] == ["checkpoint-6", "checkpoint-8"]
    # The weights, optimizer, scheduler and RNG states are in the dckpt checkpoint only.
    assert {"manifest.json", "trainer_state.json", "config.json"} <= set(t["files6"])
    assert not {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} & set(
        t["files6"]
    )


def test_converted_checkpoint_loads_with_from_pretrained(result: dict[str, Any]) -> None:
    t = result["trainer"]
    assert t["same_weights"]
    assert "model.safetensors.index.json" in t["hf_files"]


def test_accelerate_save_state_load_state(result: dict[str, Any]) -> None:
    a = result["accelerate"]
    assert a["got"] == a["expected"]
    assert a["counter"] == 6  # the registered object came back (3 saved + 3 after)
