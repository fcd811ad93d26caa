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

Where the module has a pair kernel (two HVPs in one pass over the data, `hvp_pair_at`), the
assembly takes its columns two at a time: n / 2 passes (2000 x 200: 19 instead of 27 ms).
Where g's Hessian is a weighted Gram matrix A^T diag(w) A plus its theta terms' (`gram.py`), it
is one BLAS product instead (2000 x 200: 2.1 ms), the assembly priced at n / 20 + 10 HVPs
(`gram.gram_price`), and that price, not n, is the stale steps after which the factor is
assembled again.

Where the module has the Hessian of g's terms with theta apart (`dense.theta_part`: a weight
e^theta_j x_j^2 / 2 per feature), a new theta swaps that part in, A(x_a, theta_a) - V(x_a,
theta_a) + V(x, theta), and factors again (n^3 / 3 flops, no pass over the data), so the
factor follows theta and only goes stale with x.

Only a proposal, like the deflation: the preconditioned `krylov.cg` stops on the recursive
unpreconditioned residual, and every certificate recomputes true residuals and gradients with
the kernels, so a stale or wrong factor costs iterations, never correctness. An assembly whose
product fails, or whose matrix is not positive definite, leaves the solves to the fallback (or
unpreconditioned) until the next assembly is due.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from ..threads import one_blas_thread
from .common import MatVec
from .deflation import Deflation
from .dense import HessianFactor, hvp_columns
from .gram import GramAt, ThetaPart, gram_price
from .krylov import CGResult, cg

__all__ = ["HeldFactor", "SWAP_MAX_SIZE"]

#: Largest x whose factor is made again at every new theta (n^3 / 3 flops: 0.3 ms at 200).
SWAP_MAX_SIZE = 512

#: (x, theta) -> (v, w) -> the (2, n) products A v, A w from one pass, or None (`hvp_pair_at`).
PairAt = Callable[[np.ndarray, np.ndarray], Optional[Callable[[np.ndarray, np.ndarray], Any]]]


class HeldFactor:
    """The factor of A at the point of its last assembly, and the CG steps spent since.

    fallback: a `Deflation` that preconditions the solves while no factor is held (before the
    first assembly, or after one failed). A short run whose deflated solves never add up to the
    assembly's price then never pays for a factor; a long one switches to the factor once they
    do. theta_part: `dense.theta_part` of the kernel, or None; pair_at: the kernel's
    `hvp_pair_at`, or None; gram: `gram.gram_at` of the kernel, or None."""

    def __init__(self, fallback: Deflation | None = None, theta_part: ThetaPart | None = None,
                 pair_at: PairAt | None = None, gram: GramAt | None = None) -> None:
        self.factor: HessianFactor | None = None
        self.fallback = fallback
        self.theta_part = theta_part
        self.pair_at = pair_at
        self.gram = gram
        self.rest: np.ndarray | None = None  # A - V at the assembly: what a swap keeps
        self.theta: np.ndarray | None = None  # the theta the factor is at
        self.stale_steps = 0
        self.assemblies = 0

    def price(self, n: int) -> int:
        """The HVPs an assembly is worth: n, or `gram_price(n)` by the weighted Gram product."""
        return n if self.gram is None else gram_price(n)

    def due(self, n: int) -> bool:
        """Whether the next solve assembles first: the steps beyond one per solve since the
        last assembly (or the run's start) add up to the assembly's price."""
        return self.stale_steps >= self.price(n)

    def solve(self, hvp: MatVec, x: np.ndarray, theta: np.ndarray, b: np.ndarray,
              x0: np.ndarray | None = None, **kw: Any) -> CGResult:
        """`krylov.cg` for A(x, theta) (products by hvp) preconditioned by the held factor,
        assembled at (x, theta) first when due (its price is in the result's matvecs) or
        moved to theta by a swap, or by the fallback while there is none."""
        spent = 0
        if self.due(b.size):
            spent = self._assemble(hvp, x, theta)
        elif self.rest is not None and (self.theta is None
                                        or not np.array_equal(theta, self.theta)):
            self._swap(x, theta)
        if self.factor is None and self.fallback is not None:
            run = self.fallback.solve(hvp, x, theta, b, x0, **kw)
        else:
            run = cg(hvp, b, x0, precondition=None if self.factor is None else self.factor.solve,
                     **kw)
        self.stale_steps += max(run.iterations - 1, 0)
        return CGResult(run.x, run.residual, run.rr, run.iterations, run.matvecs + spent,
                        run.status, run.message)

    def _assemble(self, hvp: MatVec, x: np.ndarray, theta: np.ndarray) -> int:
        """Assemble and factor A at (x, theta), keeping A - V for swaps; the HVPs spent (or
        what the Gram product is worth in them)."""
        n = x.size
        self.stale_steps, self.assemblies = 0, self.assemblies + 1
        self.factor, self.rest, self.theta = None, None, np.array(theta, dtype=float)
        with one_blas_thread() as workers:  # dense algebra between kernel calls
            if self.gram is not None:
                A, spent = self.gram(x, self.theta, workers)
            else:
                pair = None if self.pair_at is None else self.pair_at(x, theta)
                A, spent, _ = hvp_columns(hvp, n, pair)
            if A is None:
                return spent
            self.factor, _ = HessianFactor.factor(A)
        V = None if self.theta_part is None or n > SWAP_MAX_SIZE else self.theta_part(x, theta)
        if self.factor is not None and V is not None:
            self.rest = 0.5 * (A + A.T) - 0.5 * (V + V.T)
        return spent

    def _swap(self, x: np.ndarray, theta: np.ndarray) -> None:
        """The factor of A - V + V(x, theta): the theta terms' Hessian at the new theta. Left
        as it was when V is not finite or the sum is not positive definite (and not tried
        again at this theta)."""
        self.theta = np.array(theta, dtype=float)
        V = None if self.rest is None or self.theta_part is None else self.theta_part(x, theta)
        if V is None or self.rest is None:
            return
        with one_blas_thread():
            factor, _ = HessianFactor.factor(self.rest + V)
        if factor is not None:
            self.factor = factor
