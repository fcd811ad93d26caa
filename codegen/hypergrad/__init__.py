"""The hypergradient and its certified error bounds: lower and adjoint solvers, bounds, rounds
to a requested accuracy. Works on any object with the kernel methods of a bound problem."""
from .hypergradient import HypergradientResult, hypergradient, hypergradient_samples
from .solvers import solve_adjoint, solve_lower

__all__ = ["HypergradientResult", "hypergradient", "hypergradient_samples", "solve_adjoint",
           "solve_lower"]
