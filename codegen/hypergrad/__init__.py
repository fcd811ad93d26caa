"""The hypergradient and its certified error bounds: lower and adjoint solvers, bounds, rounds
to a requested accuracy. Works on any object with the kernel methods of a bound problem
(`codegen.hypergrad.common`)."""
from .adjoint.backprop import backprop_adjoint
from .auto import choose_adjoint, choose_lower, choose_solvers
from .bounds import aposteriori_bound, apriori_bound, cross_norm, refined_distance
from .common import DEFAULT_MAX_ITER, SolverError, call_kernel, checked_constants
from .hypergradient import hypergradient, hypergradient_samples
from .krylov import cg
from .options import HypergradientOptions
from .registry import (
    ADJOINT_CHOICES,
    ADJOINT_SOLVERS,
    AUTO,
    LOWER_CHOICES,
    LOWER_SOLVERS,
    check_adjoint_name,
    check_lower_name,
)
from .results import AdjointResult, HypergradientResult, LowerResult, Reason, ReasonKind, Status
from .solve import solve_adjoint, solve_lower

__all__ = [
    "hypergradient", "hypergradient_samples", "solve_lower", "solve_adjoint",
    "backprop_adjoint", "HypergradientOptions", "HypergradientResult", "LowerResult",
    "AdjointResult", "Status", "Reason", "ReasonKind", "SolverError", "cg", "call_kernel",
    "checked_constants", "cross_norm", "refined_distance", "aposteriori_bound", "apriori_bound",
    "LOWER_SOLVERS", "ADJOINT_SOLVERS", "LOWER_CHOICES", "ADJOINT_CHOICES", "AUTO",
    "check_lower_name", "check_adjoint_name", "DEFAULT_MAX_ITER", "choose_lower",
    "choose_adjoint", "choose_solvers",
]
