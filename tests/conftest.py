"""pytest fixtures: a per-session compile cache and an output directory for test builds.

Shared helpers live in tests/support/ (the example problems, loop trees); the names below are
re-exported for tests that import them from conftest.
"""
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# The checkout's codegen/ before any installed copy; tests/ for support/ and oracle.
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(0, str(TESTS))

from support import EXAMPLES, ROOT, TINY, built_example  # noqa: E402

__all__ = ["EXAMPLES", "ROOT", "TINY", "built_example"]


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Keep test builds out of the user's cache unless HYPERGEN_CACHE_DIR is set already. The
    workers of `pytest -n N` share one cache (next to their own temporary folders), so an
    example is built once per run: the cache's lock lets one process build and the others wait."""
    if "HYPERGEN_CACHE_DIR" not in os.environ:
        if "PYTEST_XDIST_WORKER" in os.environ:
            shared = tmp_path_factory.getbasetemp().parent / "hypergen-cache"
            shared.mkdir(exist_ok=True)
            os.environ["HYPERGEN_CACHE_DIR"] = str(shared)
        else:
            os.environ["HYPERGEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("hypergen-cache"))
    yield


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("generated")


@pytest.fixture(scope="session")
def sanitized_root(tmp_path_factory):
    """Where support.sanitized keeps the session's sanitized kernel objects (one per example)."""
    return tmp_path_factory.mktemp("sanitized")
