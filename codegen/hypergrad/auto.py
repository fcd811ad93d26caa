"""lower="auto" and adjoint="auto": the solvers chosen from the problem's structure and size
(docs/solvers.md 3).

    x_size <= AUTO_DIRECT_MAX_SIZE  "direct" + "direct": one dense factorisation, certified to
                                    the rounding level in one round;
    g quadratic (k.is_quadratic)    "cg" + "cg";
    an HVP kernel (k.lower_hvp)     "newton" + "cg" (Newton-CG needs no L and converges
                                    quadratically near x*);
    otherwise                       "fista" + "cg" (first order: a finite L is all it needs).

With adjoint="backprop" (a stored trajectory) lower "auto" is "gd". The choice depends on the
problem only, never on theta, so every round and every sample of one call use the same solvers.
"""
from __future__ import annotations

from typing import Any

from .registry import AUTO

__all__ = ["AUTO_DIRECT_MAX_SIZE", "choose_lower", "choose_adjoint"]

#: Largest x for which "auto" factors the dense Hessian (measured: see docs/solvers.md 3).
AUTO_DIRECT_MAX_SIZE = 100


def choose_lower(k: Any, adjoint: str = AUTO) -> tuple[str, str]:
    """(lower solver, why) for kernel k."""
    if adjoint == "backprop":
        return "gd", "adjoint='backprop' differentiates a stored GD trajectory"
    n = getattr(k, "x_size", None)
    if n is not None and n <= AUTO_DIRECT_MAX_SIZE and _has_hvp(k):
        return "direct", f"x has {n} <= {AUTO_DIRECT_MAX_SIZE} entries"
    if getattr(k, "is_quadratic", False) and _has_hvp(k):
        return "cg", "g is quadratic in x"
    if _has_hvp(k):
        return "newton", "g is not quadratic and has an HVP kernel"
    return "fista", "no HVP kernel for a second-order method"


def choose_adjoint(k: Any) -> tuple[str, str]:
    """(adjoint solver, why) for kernel k."""
    n = getattr(k, "x_size", None)
    if n is not None and n <= AUTO_DIRECT_MAX_SIZE:
        return "direct", f"x has {n} <= {AUTO_DIRECT_MAX_SIZE} entries"
    return "cg", "x is large for a dense factorisation"


def _has_hvp(k: Any) -> bool:
    return hasattr(k, "lower_hvp") or hasattr(k, "hvp_at")
