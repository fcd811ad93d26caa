"""Run time: a built module loaded, data bound and validated, kernels called from NumPy.

`load_directory` loads what `hypergen build` wrote; `GeneratedModule.bind` validates data once and
returns a `BoundProblem`, the object the hypergradient and the upper level work on.
"""
from .bound_problem import BoundProblem, BoundSamples
from .module import GeneratedModule, load_directory

__all__ = ["BoundProblem", "BoundSamples", "GeneratedModule", "load_directory"]
