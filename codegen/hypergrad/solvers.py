"""Deprecated: the names `codegen.hypergrad.solvers` held before the solvers were split into one
module each. Import from `codegen.hypergrad` instead; this module goes once nothing uses it."""
from .adjoint.backprop import backprop_adjoint
from .common import (
    BLAS_FREE_FROM,
    DEFAULT_MAX_ITER,
    SolverError,
    call_kernel,
    checked_constants,
)
from .lower.fista import fista_coefficients
from .registry import ADJOINT_SOLVERS, LOWER_SOLVERS
from .results import AdjointResult, LowerResult
from .solve import solve_adjoint, solve_lower

_call = call_kernel  # learn/upper.py imports it under this name until it moves to call_kernel

__all__ = ["SolverError", "LowerResult", "AdjointResult", "solve_lower", "solve_adjoint",
           "backprop_adjoint", "checked_constants", "fista_coefficients", "LOWER_SOLVERS",
           "ADJOINT_SOLVERS", "DEFAULT_MAX_ITER", "BLAS_FREE_FROM", "call_kernel"]
