"""Learning theta: the upper-level loop (gradient descent, MAID, L-BFGS-B) on certified
hypergradients, its history and plots."""
from .upper import OptimizeResult, optimize

__all__ = ["OptimizeResult", "optimize"]
