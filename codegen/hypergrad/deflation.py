"""A deflation preconditioner a learning run holds across its solves (docs/solvers.md 8).

Along a learning run the lower Hessians A(x, theta) change slowly, and their hard part is often
a few isolated small eigenvalues: l2-logistic regression at a small weight (the learning
benchmark's case (a), 10000 x 500) has one eigenvalue 13x below the rest of its spectrum (the
direction of x, along which the loss flattens), and CG spends most of its products on it. The
Krylov spaces of the CG runs already hold that direction. After each solve, Rayleigh-Ritz on
the held vectors and that solve's search directions (their products are known: no new HVP)
gives Ritz pairs (v_i, l_i); the smallest ones, when a gap of at least RITZ_GAP separates them
from the next Ritz value s, are kept, and later solves use

    M^{-1} r = (r - V V^T r) / s + V diag(1/l) V^T r,

which maps the kept eigenvalues to about 1 and the rest of the spectrum to [1, L/s]. At a new
theta the kept vectors' products are recomputed (k HVPs, counted as work), so l is current.

Only a proposal: the preconditioned `krylov.cg` stops on the recursive unpreconditioned residual,
and every certificate recomputes true residuals and gradients with the kernels, so a stale or
wrong V costs iterations, never correctness. Held only inside a learning run
(`preconditioners.holding`), so a single hypergradient call is the same with or without a run
before it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..threads import one_blas_thread
from .common import MatVec, all_finite, call_kernel
from .krylov import CGResult, cg

__all__ = ["DEFLATION_MIN_SIZE", "DEFLATION_MAX_SIZE", "MAX_DEFLATED", "RITZ_GAP", "Deflation"]

#: Smallest x for which a run holds a deflation (below it, the Hessian's factor alone:
#: `preconditioners`).
DEFLATION_MIN_SIZE = 256
#: Largest x: a solve keeps its search directions (up to 100 vectors of x's size).
DEFLATION_MAX_SIZE = 20_000
#: Ritz vectors kept at most.
MAX_DEFLATED = 4
#: A Ritz value is deflated when the next one is at least this many times larger.
RITZ_GAP = 2.0


class Deflation:
    """The kept Ritz vectors V (orthonormal columns), A V at `theta`, l = diag(V^T A V) and s."""

    def __init__(self) -> None:
        self.V: np.ndarray | None = None
        self.AV: np.ndarray | None = None
        self.values = np.zeros(0)
        self.scale = 1.0
        self.theta: np.ndarray | None = None

    def apply(self, r: np.ndarray) -> np.ndarray:
        """M^{-1} r (r itself while nothing is kept)."""
        if self.V is None:
            return r
        c = self.V.T @ r
        out: np.ndarray = (r - self.V @ c) / self.scale + self.V @ (c / self.values)
        return out

    def refresh(self, hvp: MatVec, theta: np.ndarray) -> int:
        """Recompute A V and l at a new theta (HVPs spent); drops V when a product fails or an
        l is not positive (A is SPD: a wrong product, not a usable preconditioner)."""
        if self.V is None or (self.theta is not None and np.array_equal(theta, self.theta)):
            return 0
        columns: list[np.ndarray] = []
        for v in self.V.T:
            Av, _ = call_kernel(hvp, v)
            if Av is None:
                self.V = None
                return len(columns) + 1
            columns.append(Av)
        AV = np.column_stack(columns)
        values = np.einsum("ij,ij->j", self.V, AV)
        if not (np.all(values > 0.0) and all_finite(values)):
            self.V = None
        else:
            self.AV, self.values, self.theta = AV, values, np.array(theta, dtype=float)
        return len(columns)

    def learn(self, P: list[np.ndarray], AP: list[np.ndarray], theta: np.ndarray) -> None:
        """Rayleigh-Ritz on span(V, P) with the known products; keep the smallest Ritz pairs
        below a gap of RITZ_GAP (none when there is no such gap)."""
        if not P:
            return
        with one_blas_thread():  # small dense algebra between kernel calls
            self._rayleigh_ritz(P, AP, theta)

    def _rayleigh_ritz(self, P: list[np.ndarray], AP: list[np.ndarray],
                       theta: np.ndarray) -> None:
        """`learn`'s Rayleigh-Ritz step (BLAS already at one thread)."""
        W, AW = np.column_stack(P), np.column_stack(AP)
        if self.V is not None and self.AV is not None:
            W, AW = np.hstack([self.V, W]), np.hstack([self.AV, AW])
        Q, R = np.linalg.qr(W)
        diag = np.abs(np.diag(R))
        ok = diag > 1e-10 * diag.max()
        if ok.sum() < 2:
            return
        Q, R, AW = Q[:, ok], R[np.ix_(ok, ok)], AW[:, ok]
        AQ = np.linalg.solve(R.T, AW.T).T  # A Q = A W R^{-1}
        T = Q.T @ AQ
        values, Y = np.linalg.eigh(0.5 * (T + T.T))
        if not (all_finite(values) and values[0] > 0.0):
            return
        top = min(MAX_DEFLATED, values.size - 1)
        ratios = values[1:top + 1] / values[:top]
        k = int(np.argmax(ratios)) + 1
        if ratios[k - 1] < RITZ_GAP:
            self.V = None
            return
        self.V, self.AV = Q @ Y[:, :k], AQ @ Y[:, :k]
        self.values, self.scale = values[:k], float(values[k])
        self.theta = np.array(theta, dtype=float)

    def solve(self, hvp: MatVec, x: np.ndarray, theta: np.ndarray, b: np.ndarray,
              x0: np.ndarray | None = None, **kw: Any) -> CGResult:
        """`krylov.cg` for A(x, theta) (products by hvp; x itself is not read) with this
        preconditioner, refreshed at theta first and taught by the run after (the refresh's
        HVPs are in the result's matvecs)."""
        spent = self.refresh(hvp, theta)
        pairs: list[tuple[np.ndarray, np.ndarray]] = []
        run = cg(hvp, b, x0, precondition=self.apply, basis=pairs, **kw)
        self.learn([d for d, _ in pairs], [Ad for _, Ad in pairs], theta)
        return CGResult(run.x, run.residual, run.rr, run.iterations, run.matvecs + spent,
                        run.status, run.message)
