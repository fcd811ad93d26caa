"""Build a problem while the test computes its references: the compiler takes the second core.

`build_problem` generates the C (Python, under the GIL) and then compiles it in a child process
(waiting, the GIL free). `build_alongside` generates here first, then writes and compiles in a
thread while `references()` (the unrolled SymPy oracle, say) runs here, and returns both: the
same build and the same references as one after the other.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from codegen import Problem
from codegen.pipeline import build_problem, generate_cached

T = TypeVar("T")


def build_alongside(problem: Problem, out_dir: Path, references: Callable[[], T],
                    allow_uncertified: bool = False) -> tuple[Any, T]:
    """(build_problem(problem, out_dir, allow_uncertified=...), references())."""
    generate_cached(problem, allow_uncertified)  # the thread finds the texts in the cache
    with ThreadPoolExecutor(max_workers=1) as pool:
        building = pool.submit(build_problem, problem, out_dir,
                               allow_uncertified=allow_uncertified)
        values = references()
        return building.result(), values
