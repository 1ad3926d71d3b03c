"""The benchmarks cannot drift from the engine unnoticed.

Every ``bench/bench_*.py`` imports and answers ``--help``; every stage that
``bench_core.py --profile`` times exists in the engine and is called by a real save or
load there, so a renamed or moved engine function breaks this suite, not a benchmark run
months later.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests._dist import RankPool

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SCRIPTS = sorted(BENCH.glob("bench_*.py"))


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` imported by path, its ``main`` not run; once per process."""
    module_name = f"_dckpt_bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved_path = list(sys.path)
    # Registered first: dataclasses look their module up while it executes.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    finally:
        sys.path[:] = saved_path  # the script adds bench/ and the root for its own imports
    return module


# ----------------------------------------------------------------------------- scripts


def test_the_bench_folder_has_the_scripts_this_file_checks() -> None:
    assert {p.name for p in SCRIPTS} >= {
        "bench_core.py",
        "bench_async.py",
        "bench_s3.py",
        "bench_writer.py",
    }


# Runs each script as ``__main__`` with ``--help`` in ONE fresh interpreter: the scripts'
# own imports run as on the command line (a moved engine name fails there), and the suite
# pays the torch import once instead of once per script.
_HELP_DRIVER = """
import contextlib, io, json, runpy, sys, traceback
out = {}
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            runpy.run_path(path, run_name="__main__")
        out[path] = "ran without stopping at --help"
    except SystemExit as exc:
        usage = text.getvalue().startswith("usage:")
        out[path] = "" if exc.code in (0, None) and usage else f"exit {exc.code!r}: {text.getvalue()}"
    except BaseException:
        out[path] = traceback.format_exc()
print(json.dumps(out))
"""


def test_every_bench_script_imports_and_answers_help() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _HELP_DRIVER, *map(str, SCRIPTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    assert sorted(results) == sorted(map(str, SCRIPTS))
    failed = {Path(k).name: v for k, v in results.items() if v}
    assert not failed, "\n\n".join(f"{k} --help: {v}" for k, v in failed.items())


# ----------------------------------------------------------------------------- profile targets


def test_every_profile_target_of_bench_core_exists() -> None:
    core = load_bench("bench_core")
    checked = core.checked_targets()  # raises ProbeTargetError naming a target that is gone
    assert len(checked) >= 30
    for target, name in checked:
        assert callable(getattr(target.owner, name)), target.label


def test_a_profile_target_not_bound_where_it_points_is_refused() -> None:
    core = load_bench("bench_core")
    ok = core.Target(core, core.probe_targets, "a function of bench_core")
    assert ok.name == "probe_targets"
    gone = core.Target(core, test_every_profile_target_of_bench_core_exists, "moved stage")
    with pytest.raises(core.ProbeTargetError, match="'moved stage'.*no name bound"):
        _ = gone.name


def _w_profile(run_dir: str) -> dict[str, Any]:
    core = load_bench("bench_core")
    opts = {"params_m": 0.1, "small_count": 50, "world_size": 2, "quiet": True}
    out: dict[str, Any] = core.profile_phase(opts, run_dir)
    return out


def test_every_profile_target_of_bench_core_is_called(
    ranks: Callable[[int], RankPool], tmp_path: Path
) -> None:
    """The real ``--profile`` phase on 2 ranks, tiny: a target still defined but no longer
    called through (its stage moved elsewhere) would silently time nothing."""
    prof = ranks(2).run(_w_profile, str(tmp_path), timeout=120)[0]
    assert prof["never_called"] == [], prof["never_called"]
    for what in ("save", "load", "small"):
        assert all(prof[what]["probes"]), what
