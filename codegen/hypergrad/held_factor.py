"""A Cholesky factor of the lower Hessian that a learning run holds as CG's preconditioner
(docs/solvers.md 8).

A learning run solves many nearby systems with A(x, theta): Newton-CG's directions and the
adjoint, at a sequence of points. For x of a few hundred entries, A itself is affordable: n
HVPs assemble it and LAPACK factors it in a fraction of their time. With the factor of A at
one point as the preconditioner, CG at that point takes one step and at nearby points a few,
where plain CG takes tens (the learning benchmark's case (b), 2000 x 200: 17 steps per Newton
direction, 38 per adjoint). As x and theta move the factor goes stale; it is assembled again
at the point of the next solve once the steps beyond the first of each solve since the last
assembly add up to n, the assembly's own price. So the stale steps never cost more than the
assemblies, and a factor that stays good is paid for once.

Only a proposal, like the deflation: the preconditioned `krylov.cg` stops on the recursive
unpreconditioned residual, and every certificate recomputes true residuals and gradients with
the kernels, so a stale or wrong factor costs iterations, never correctness. An assembly whose
product fails, or whose matrix is not positive definite, leaves the solves to the fallback (or
unpreconditioned) until the next assembly is due.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..threads import one_blas_thread
from .common import MatVec, call_kernel
from .deflation import Deflation
from .dense import HessianFactor
from .krylov import CGResult, cg

__all__ = ["HeldFactor"]


class HeldFactor:
    """The factor of A at the point of its last assembly, and the CG steps spent since.

    fallback: a `Deflation` that preconditions the solves while no factor is held (before the
    first assembly, or after one failed). A short run whose deflated solves never add up to n
    stale steps then never pays for a factor (the learning benchmark's case (a)); a long one
    switches to the factor once they do."""

    def __init__(self, fallback: Deflation | None = None) -> None:
        self.factor: HessianFactor | None = None
        self.fallback = fallback
        self.stale_steps = 0
        self.assemblies = 0

    def due(self, n: int) -> bool:
        """Whether the next solve assembles first: the steps beyond one per solve since the
        last assembly (or the run's start) add up to n."""
        return self.stale_steps >= n

    def solve(self, hvp: MatVec, theta: np.ndarray, b: np.ndarray, x0: np.ndarray | None = None,
              **kw: Any) -> CGResult:
        """`krylov.cg` preconditioned by the held factor, assembled from hvp first when due
        (its n HVPs are in the result's matvecs), or by the fallback while there is none.
        theta is the fallback's (its products are recomputed at a new theta); the factor
        follows the solves' steps instead."""
        spent = 0
        if self.due(b.size):
            self.factor, spent = _assembled(hvp, b.size)
            self.stale_steps, self.assemblies = 0, self.assemblies + 1
        if self.factor is None and self.fallback is not None:
            run = self.fallback.solve(hvp, theta, b, x0, **kw)
        else:
            run = cg(hvp, b, x0, precondition=None if self.factor is None else self.factor.solve,
                     **kw)
        self.stale_steps += max(run.iterations - 1, 0)
        return CGResult(run.x, run.residual, run.rr, run.iterations, run.matvecs + spent,
                        run.status, run.message)


def _assembled(hvp: MatVec, n: int) -> tuple[HessianFactor | None, int]:
    """(the Cholesky factor of the matrix whose columns are hvp(e_j), HVPs spent); None when a
    product fails or the matrix is not positive definite."""
    columns = []
    for j in range(n):
        column, _ = call_kernel(hvp, np.eye(1, n, j).ravel())
        if column is None:
            return None, j + 1
        columns.append(column)
    with one_blas_thread():  # a small factorisation between kernel calls
        factor, _ = HessianFactor.factor(np.column_stack(columns))
    return factor, n
