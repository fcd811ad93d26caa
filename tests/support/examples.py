"""The example problem files (examples/<name>.py), loaded once per test session.

A test that needs one of the examples' problems or data uses them from here rather than
restating the SymPy: the examples are what users copy, so that is what the tests should cover.
"""
from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any, NamedTuple

from codegen import Problem
from codegen.pipeline import build_problem

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = ROOT / "examples"

# The examples every kernel test covers (one Problem each, named after the file).
EXAMPLES = ("ridge", "logistic", "logistic_sparse", "quadratic", "tv1d", "tv2d", "hypercleaning")
# The examples whose generated files are committed under generated/<name>/.
GOLDEN_EXAMPLES = EXAMPLES
# Tiny sizes for oracle comparisons (the oracle unrolls every sum). Row counts above the
# generator's JAM (8) run both the unrolled-and-jammed loop and its remainder loop.
TINY: dict[str, dict[str, Any]] = {
    "ridge": dict(m=11, n=3, p=9), "logistic": dict(m=11, n=3, p=9),
    "logistic_sparse": dict(m=5, n=4, p=3, density=0.5),
    "quadratic": dict(m1=9, m2=11, d=3, p=2), "tv1d": dict(n=5), "tv2d": dict(h=10, w=3),
    "hypercleaning": dict(c=9, n=2, m=10, mv=9),
}


class Example(NamedTuple):
    """One example file: its Problem and its namespace (example_data, THETA0, ...)."""

    problem: Problem
    namespace: dict[str, Any]


_EXAMPLES: dict[str, Example] = {}


def load_example(name: str) -> Example:
    """examples/<name>.py, run once per session (as `codegen.pipeline.load_problem_file`
    runs it: its module-level Problems), with the namespace it defines."""
    if name not in _EXAMPLES:
        path = EXAMPLES_DIR / f"{name}.py"
        namespace = runpy.run_path(str(path), run_name=f"hypergen_problem_{name}")
        problems = [v for v in namespace.values() if isinstance(v, Problem)]
        assert len(problems) == 1, f"{path.name} must define exactly one Problem"
        assert problems[0].name == name, f"{path.name} defines {problems[0].name!r}"
        _EXAMPLES[name] = Example(problems[0], namespace)
    return _EXAMPLES[name]


def example_data(name: str, **kwargs: Any) -> dict[str, Any]:
    """The data of examples/<name>.py: its `example_data(**kwargs)`."""
    data: dict[str, Any] = load_example(name).namespace["example_data"](**kwargs)
    return data


_BUILT: dict[tuple[str, Path], Any] = {}


def built_example(name: str, build_dir: Path) -> tuple[Problem, Any, dict[str, Any]]:
    """(problem, generated module, example namespace) for examples/<name>.py, built once."""
    key = (name, Path(build_dir))
    if key not in _BUILT:
        problem, namespace = load_example(name)
        _BUILT[key] = (problem, build_problem(problem, build_dir), namespace)
    return _BUILT[key]
