"""Shared fixtures: a per-session compile cache and the examples built once."""
import os
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

EXAMPLES = ["ridge", "logistic", "logistic_sparse", "quadratic", "tv1d", "tv2d", "hypercleaning"]
# Tiny sizes for oracle comparisons (the oracle unrolls every sum). Row counts above the
# generator's JAM (8) run both the unrolled-and-jammed loop and its remainder loop.
TINY = {"ridge": dict(m=11, n=3, p=9), "logistic": dict(m=11, n=3, p=9),
        "logistic_sparse": dict(m=5, n=4, p=3, density=0.5),
        "quadratic": dict(m1=9, m2=11, d=3, p=2), "tv1d": dict(n=5), "tv2d": dict(h=10, w=3),
        "hypercleaning": dict(c=9, n=2, m=10, mv=9)}


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Keep test builds out of the user's cache unless HYPERGEN_CACHE_DIR is set already."""
    if "HYPERGEN_CACHE_DIR" not in os.environ:
        os.environ["HYPERGEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("hypergen-cache"))
    yield


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("generated")


_BUILT = {}


def built_example(name, build_dir):
    """(problem, generated module, example namespace) for examples/<name>.py, built once."""
    if name not in _BUILT:
        from codegen.pipeline import build_problem, load_problem_file

        path = ROOT / "examples" / f"{name}.py"
        problem = load_problem_file(path)[0]
        _BUILT[name] = (problem, build_problem(problem, build_dir), runpy.run_path(str(path)))
    return _BUILT[name]
