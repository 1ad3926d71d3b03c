"""A pool of gloo ranks for integration tests, separate from the suite's shared pools.

Integration tests import heavy trainer packages (torchtitan, transformers) that set
global state of their own (logging, warnings, torch flags); a pool per test module keeps
them out of the pools the rest of the suite shares, and pays their import once.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._dist import RankPool


def needs(*packages: str) -> pytest.MarkDecorator:
    """Skip unless every package is installed (found without importing it)."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    return pytest.mark.skipif(
        bool(missing), reason=f"needs {', '.join(missing)} (pip install -e '.[dev]')"
    )


@pytest.fixture(scope="module")
def two_ranks() -> Iterator[RankPool]:
    """Two gloo ranks for this test module only; killed when the module is done."""
    pool = RankPool(2)
    try:
        yield pool
    finally:
        pool.close()


def run_script(script: Path, out: Path, env: dict[str, str], what: str) -> None:
    """Run ``script out`` from the repository root in its own session (so that a timeout
    kills the trainer's child processes too); fail with its output unless it exits 0."""
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the {what} run did not finish in 240 s:\n{log[-6000:]}")
    assert proc.returncode == 0, log[-6000:]
