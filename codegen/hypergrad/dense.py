"""Dense Hessians for small lower levels: assembled once, factored by Cholesky, reused.

For a lower variable of a few dozen entries an iterative solve is all overhead: each CG step
is a kernel call whose Python and cffi cost exceeds its arithmetic, and a certified tolerance
it meets only approximately takes a second warm-started round. A factorisation solves to
rounding level in one go. It changes nothing in the certificates: the solvers recompute
grad g and the adjoint's true residual with the kernels at the returned point, and the factor
only proposes steps (a stale or wrong factor shows as a large residual, never as a wrong
number). Used by lower="direct" (Newton's method with exact steps) and adjoint="direct".
"""
from __future__ import annotations

import numpy as np
from scipy.linalg import lapack

#: Largest x for the direct solvers: the Hessian takes n HVPs and 8 n^2 bytes (2000: 32 MB).
DIRECT_MAX_SIZE = 2000


class HessianFactor:
    """The Cholesky factor of a symmetric positive definite Hessian A(x, theta) at one x.

    `factor` returns None (and the reason) when A is not positive definite: mu > 0 says it
    must be, so the caller reports "not SPD" rather than trusting any step.
    """

    def __init__(self, lower: np.ndarray, x: np.ndarray):
        self.lower, self.x = lower, x

    @classmethod
    def factor(cls, hessian: np.ndarray, x: np.ndarray):
        """LAPACK's dpotrf itself: scipy.linalg.cho_factor costs 5x more on a 10 x 10 matrix,
        which is what a small problem's hypergradient factors."""
        symmetric = 0.5 * (hessian + hessian.T)  # HVP columns agree with rows up to rounding
        lower, info = lapack.dpotrf(symmetric, lower=1, clean=0)
        if info > 0:
            return None, (f"Cholesky factorisation failed (leading minor {info} not positive): "
                          "the Hessian is not SPD")
        if info < 0 or not np.isfinite(lower).all():
            return None, f"Cholesky factorisation failed (dpotrf info {info}, or not finite)"
        return cls(lower, x.copy()), ""

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        out, info = lapack.dpotrs(self.lower, rhs, lower=1)
        if info != 0:  # only an invalid argument, i.e. a bug here
            raise ValueError(f"dpotrs: invalid argument {-info}")
        return out

    def holds_at(self, x: np.ndarray, hessian_constant: bool) -> bool:
        """Can this factor serve at x? At its own x always; elsewhere when A does not depend on
        x (L_A = 0)."""
        return hessian_constant or np.array_equal(self.x, x)
