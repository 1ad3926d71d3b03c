"""The README's demo: the seed workflow ported to dckpt runs and resumes identically."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent.parent / "examples" / "stateful_example.py"


def test_stateful_example_resumes_with_the_same_loss(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--dir", str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[-1] == "identical", run.stdout
    before = next(line for line in lines if line.startswith("loss without restart"))
    after = next(line for line in lines if line.startswith("loss after restart"))
    assert before.split(":")[1].strip() == after.split(":")[1].strip()
    assert (tmp_path / "ck" / "manifest.json").exists()
