"""lower="auto" and adjoint="auto", the defaults: solvers chosen from the problem's structure and
size (docs/solvers.md 3).

    lower   g quadratic (k.is_quadratic), x_size <= QUADRATIC_DIRECT_MAX  "direct"
            g quadratic                                                  "cg"
            g not quadratic, x_size <= NONQUADRATIC_DIRECT_MAX           "direct"
            g not quadratic, an HVP kernel                               "newton"
            no HVP kernel                                                "fista"
    adjoint lower is "direct" (the factor is shared), or
            x_size <= ADJOINT_DIRECT_MAX                                 "direct"
            otherwise                                                    "cg"

With adjoint="backprop" (a stored trajectory) lower "auto" is "gd". The thresholds are measured
(docs/solvers.md 3): one factorisation serves a quadratic g's lower solve and adjoint, so it
pays up to about 150 entries; a non-quadratic g needs a new factor at every Newton step, so
there it pays only for a handful of entries, and Newton-CG (no L needed, quadratic convergence
near x*) takes over. The choice depends on the kernel only, never on theta, so every round and
every sample of one call use the same solvers.
"""
from __future__ import annotations

from typing import Any

from .registry import AUTO

__all__ = ["QUADRATIC_DIRECT_MAX", "NONQUADRATIC_DIRECT_MAX", "ADJOINT_DIRECT_MAX",
           "choose_lower", "choose_adjoint", "choose_solvers"]

#: Largest x for lower="direct" when g is quadratic (one factor for the lower solve and adjoint).
QUADRATIC_DIRECT_MAX = 150

#: Largest x for lower="direct" when g is not quadratic (a factor per Newton step).
NONQUADRATIC_DIRECT_MAX = 16

#: Largest x for adjoint="direct" after an iterative lower solve (a factor of its own).
ADJOINT_DIRECT_MAX = 32


def choose_lower(k: Any, adjoint: str = AUTO) -> str:
    """The lower solver "auto" stands for on kernel k (adjoint: the adjoint solver asked for)."""
    if adjoint == "backprop":
        return "gd"  # reverse mode through a stored GD trajectory
    if not (hasattr(k, "lower_hvp") or hasattr(k, "hvp_at")):
        return "fista"  # first order: a finite L is all it needs
    n = getattr(k, "x_size", None)
    quadratic = bool(getattr(k, "is_quadratic", False))
    limit = QUADRATIC_DIRECT_MAX if quadratic else NONQUADRATIC_DIRECT_MAX
    if n is not None and n <= limit:
        return "direct"
    return "cg" if quadratic else "newton"


def choose_adjoint(k: Any, lower: str = AUTO) -> str:
    """The adjoint solver "auto" stands for on kernel k after the lower solver `lower`."""
    if lower == AUTO:
        lower = choose_lower(k)
    n = getattr(k, "x_size", None)
    if lower == "direct" or (n is not None and n <= ADJOINT_DIRECT_MAX):
        return "direct"
    return "cg"


def choose_solvers(k: Any, lower: str, adjoint: str) -> tuple[str, str]:
    """(lower, adjoint) with each "auto" replaced by its choice on kernel k."""
    if lower == AUTO:
        lower = choose_lower(k, adjoint)
    if adjoint == AUTO:
        adjoint = choose_adjoint(k, lower)
    return lower, adjoint
