"""The adjoint from the dense Hessian's Cholesky factor, with iterative refinement on the TRUE
residual, for small x (docs/solvers.md 2, docs/bounds.md 11).

q = A(x)^{-1} b from the factor (shared with lower="direct" through the task's `dense` cache),
then q -= A^{-1} (A q - b), with A q from the HVP kernel (never the dense matrix), until R <= delta.
A residual that stops halving has reached the rounding level: status "rounding floor", with the
reason (the accuracy rounds accept it as the best R there is, `floors.floor_accepted`).
q0 plays no part: the solve is not iterative.
"""
from __future__ import annotations

import math

import numpy as np

from ..common import AdjointTask, finite, hvp_at, norm, true_residual
from ..dense import dense_factor
from ..results import AdjointResult, Status

__all__ = ["solve_direct", "DIRECT_REFINEMENTS"]

#: Iterative-refinement steps of adjoint="direct" after its first solve (each one HVP).
DIRECT_REFINEMENTS = 3


def solve_direct(task: AdjointTask) -> AdjointResult:
    """Cholesky solve plus at most DIRECT_REFINEMENTS refinement steps."""
    k, x, th, b, delta = task.k, task.x, task.theta, task.b, task.delta
    mu = task.constants["mu"]
    fac, n_hvp, failure = dense_factor(k, x, th, task.constants, task.dense)
    if fac is None:
        status, why = failure or (Status.NON_FINITE, "no factor")
        return AdjointResult(q=np.zeros_like(b), residual=math.inf, iterations=0,
                             status=status, solver="direct", delta=delta, mu=mu,
                             n_hvp=n_hvp, r0=norm(b), message=why)
    hvp = hvp_at(k, x, th)
    q, it, R_prev = fac.solve(b), 0, math.inf
    while True:
        rt, msg = true_residual(hvp, q, b)
        n_hvp += 1
        if rt is None or not finite(q):
            status, R = Status.NON_FINITE, math.inf
            break
        R = norm(rt)
        if R <= delta:
            status = Status.CONVERGED
            break
        if R > 0.5 * R_prev:
            status = Status.ROUNDING_FLOOR
            msg = (f"iterative refinement stalled at R = {R:.3g} (the rounding level of the "
                   "factored Hessian)")
            break
        if it >= min(task.max_iter, DIRECT_REFINEMENTS):
            status, msg = Status.CAPPED, f"R = {R:.3g} after {it} refinement(s)"
            break
        q, R_prev, it = q - fac.solve(rt), R, it + 1
    return AdjointResult(q=q, residual=R, iterations=it, status=status, solver="direct",
                         delta=delta, mu=mu, n_hvp=n_hvp, r0=norm(b), apriori=math.inf,
                         message=msg)
