"""A pool of gloo ranks for integration tests, separate from the suite's shared pools.

Integration tests import heavy trainer packages (torchtitan, transformers) that set
global state of their own (logging, warnings, torch flags); a pool per test module keeps
them out of the pools the rest of the suite shares, and pays their import once.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

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
