"""Learning theta: the upper-level loop on certified hypergradients (the default certified
L-BFGS, MAID, gradient descent, SciPy's L-BFGS-B), its options, result, history and plots."""
from .driver import optimize
from .history import plot_history, read_history
from .options import DEFAULT_METHOD, METHODS, OptimizeError, parse_budget, parse_theta0
from .result import OptimizeResult, OptimizeStatus

__all__ = ["optimize", "OptimizeResult", "OptimizeStatus", "OptimizeError", "METHODS",
           "DEFAULT_METHOD", "read_history", "plot_history", "parse_budget", "parse_theta0"]
