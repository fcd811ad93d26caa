"""Reverse mode through the stored GD or HB lower trajectory x_0..x_K, with A(x_k), B(x_k) at
every iterate (adjoint="backprop"; docs/framework.md 3, last paragraph).

GD:  lam_K = grad f(x_K); for k = K-1..0: h -= a B(x_k)^T lam_{k+1};
     lam_k = (I - a A(x_k)) lam_{k+1}.
HB:  lam_k = ((1+b) I - a A(x_k)) lam_{k+1} - b lam_{k+2} (x_{-1} = x_0 is fixed).
Memory O(K d) (the trajectory), K HVPs and K cross VJPs. This is a different estimator from the
framework's (Hessians at one point) and E&R's bounds do not cover it: its `bound` is inf. It is
here for comparisons with classical backpropagation.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..common import SolverError, all_finite, call_kernel, checked_theta, norm, true_residual
from ..results import AdjointResult, LowerResult, Status

__all__ = ["backprop_adjoint"]


def backprop_adjoint(k: Any, lower: LowerResult, theta: Any,
                     b: np.ndarray | None = None) -> AdjointResult:
    """The reverse sweep through lower.trajectory (needs solve_lower(..., store_trajectory=True)
    with "gd" or "hb"). The returned q = a sum_k lam_{k+1} equals the GD/HB adjoint iterate when
    the Hessian is constant; its residual is reported for information only; h_cross holds
    -sum_k a B(x_k)^T lam_{k+1}."""
    th = checked_theta(k, theta)
    if lower.trajectory is None or lower.solver not in ("gd", "hb"):
        raise SolverError("adjoint='backprop' needs a GD or HB lower solve with a stored "
                          "trajectory (solve_lower(..., store_trajectory=True))")
    traj = lower.trajectory
    K = len(traj) - 1
    a, bm = lower.step["a"], lower.step["b"]
    xK = traj[-1]
    if b is None:
        b, msg = call_kernel(k.upper_grad, xK, th)
        if b is None:
            raise SolverError(f"grad_x f is not finite at the lower solution ({msg})")
    lam1 = np.asarray(b, dtype=np.float64).copy()  # lam_{k+1}
    lam2 = np.zeros_like(lam1)  # lam_{k+2}
    h = np.zeros(int(getattr(k, "theta_size", th.size)))
    qsum = np.zeros_like(lam1)
    n_hvp = n_cross = 0
    status, msg = Status.CONVERGED, ""
    for j in range(K - 1, -1, -1):
        xj = traj[j]
        Bt, msg = call_kernel(k.cross_vjp, xj, th, lam1)
        n_cross += 1
        if Bt is None:
            status = Status.NON_FINITE
            break
        h -= a * Bt
        qsum += lam1
        if j == 0:
            break  # lam_0 is not needed: x_0 does not depend on theta
        Al, msg = call_kernel(k.lower_hvp, xj, th, lam1)
        n_hvp += 1
        if Al is None:
            status = Status.NON_FINITE
            break
        lam = (1.0 + bm) * lam1 - a * Al - bm * lam2
        if not all_finite(lam):
            status, msg = Status.NON_FINITE, "non-finite reverse-sweep adjoint"
            break
        lam2, lam1 = lam1, lam
    q = a * qsum
    rt, msg2 = true_residual(lambda v: k.lower_hvp(xK, th, v), q, b)  # one HVP: unprepared
    n_hvp += 1
    R = norm(rt) if rt is not None else math.inf
    if K == 0:
        status, msg = Status.ZERO_TRAP, ("0 lower iterations: backprop through an empty "
                                         "trajectory is 0")
    return AdjointResult(q=q, residual=R, iterations=K, status=status, solver="backprop",
                         delta=math.nan, mu=lower.mu, n_hvp=n_hvp, n_cross=n_cross,
                         r0=norm(b), zero_trap=(K == 0), apriori=math.inf,
                         apriori_rigorous=False, h_cross=h, message=msg or msg2)
