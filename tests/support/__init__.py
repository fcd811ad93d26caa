"""Shared test support: the example problems, the generated loop trees and the golden files.

Tests import from here (`from support import example, built_example, loop_tree`); conftest.py
holds only the pytest fixtures. tests/ is on sys.path when pytest runs (conftest.py puts it
there for any working directory).
"""
from .examples import (
    EXAMPLES,
    EXAMPLES_DIR,
    GOLDEN_EXAMPLES,
    ROOT,
    TINY,
    built_example,
    example_data,
    load_example,
)
from .loops import LoopInfo, kernel_body, kernel_names, loops_of
from .quotients import largest_B_quotient

__all__ = [
    "EXAMPLES", "EXAMPLES_DIR", "GOLDEN_EXAMPLES", "ROOT", "TINY", "LoopInfo", "built_example",
    "example_data", "kernel_body", "kernel_names", "largest_B_quotient", "load_example", "loops_of",
]
