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
import scipy.linalg

#: Largest x for the direct solvers: the Hessian takes n HVPs and 8 n^2 bytes (2000: 32 MB).
DIRECT_MAX_SIZE = 2000


class HessianFactor:
    """The Cholesky factor of a symmetric positive definite Hessian A(x, theta) at one x.

    `factor` returns None (and the reason) when A is not positive definite: mu > 0 says it
    must be, so the caller reports "not SPD" rather than trusting any step.
    """

    def __init__(self, cho, x: np.ndarray):
        self.cho, self.x = cho, x

    @classmethod
    def factor(cls, hessian: np.ndarray, x: np.ndarray):
        symmetric = 0.5 * (hessian + hessian.T)  # HVP columns agree with rows up to rounding
        try:
            cho = scipy.linalg.cho_factor(symmetric, lower=True, check_finite=False)
        except np.linalg.LinAlgError as exc:
            return None, f"Cholesky factorisation failed ({exc}): the Hessian is not SPD"
        if not np.all(np.isfinite(cho[0])):
            return None, "Cholesky factor not finite"
        return cls(cho, x.copy()), ""

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        return scipy.linalg.cho_solve(self.cho, rhs, check_finite=False)

    def holds_at(self, x: np.ndarray, hessian_constant: bool) -> bool:
        """Can this factor serve at x? At its own x always; elsewhere when A does not depend on
        x (L_A = 0)."""
        return hessian_constant or np.array_equal(self.x, x)
