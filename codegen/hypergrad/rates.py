"""Step sizes and contraction rates of the first-order methods and CG (docs/framework.md 5).

The lower and the adjoint solvers share them: adjoint GD/HB with these steps is backpropagation
through lower GD/HB with the Hessian frozen at x (docs/framework.md 3), and the a priori bounds
of both levels use the same rates.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .common import SolverError

__all__ = ["require_finite_L", "gd_step", "hb_step", "rates", "cg_rate_bound"]


def require_finite_L(solver: str, L: float) -> None:
    """Step-size methods (gd, hb, fista) need a finite L; CG and Newton do not."""
    if not math.isfinite(L):
        raise SolverError(f"solver {solver!r} needs a finite L (got L = {L}); use 'cg' if the "
                          "problem is quadratic or state L")


def gd_step(mu: float, L: float) -> dict[str, Any]:
    """Gradient descent's optimal fixed step a = 2/(L + mu) (no momentum, b = 0)."""
    return {"a": 2.0 / (L + mu), "b": 0.0}


def hb_step(mu: float, L: float) -> dict[str, Any]:
    """Polyak's heavy ball tuned for quadratics: a = 4/(sqrt L + sqrt mu)^2, b = q_HB^2."""
    sL, sm = math.sqrt(L), math.sqrt(mu)
    return {"a": 4.0 / (sL + sm) ** 2, "b": ((sL - sm) / (sL + sm)) ** 2}


def rates(mu: float, L: float) -> tuple[float, float, float]:
    """(kappa, q_GD, q_HB): the condition number and the contraction factors of GD and HB."""
    kappa = L / mu
    q_gd = (kappa - 1.0) / (kappa + 1.0) if math.isfinite(kappa) else 1.0
    sk = math.sqrt(kappa)
    q_hb = (sk - 1.0) / (sk + 1.0) if math.isfinite(sk) else 1.0
    return kappa, q_gd, q_hb


def cg_rate_bound(kappa: float, segments: int, q_hb: float, K: int, start: float) -> float:
    """(2 sqrt kappa)^segments q_hb^K start, CG's rate over restart segments, in logarithms:
    many residual replacements (a delta near the rounding level) made the first factor overflow
    a float and raise, where the product is only large (then inf) or even small."""
    if start == 0.0 or (q_hb == 0.0 and K > 0):
        return 0.0
    log = (segments * math.log(2.0 * math.sqrt(kappa)) + (K * math.log(q_hb) if K else 0.0)
           + math.log(start))
    return math.exp(log) if log < math.log(np.finfo(float).max) else math.inf
