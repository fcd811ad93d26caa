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

Only a proposal: `pcg` stops on the recursive unpreconditioned residual as `krylov.cg` does,
and every certificate recomputes true residuals and gradients with the kernels, so a stale or
wrong V costs iterations, never correctness. Held only inside `holding` (the learning loops),
so a single hypergradient call is the same with or without a run before it.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .common import DIVERGENCE_FACTOR, MatVec, all_finite, call_kernel, dot
from .krylov import CGResult, curvature
from .results import Status

__all__ = ["DEFLATION_MIN_SIZE", "DEFLATION_MAX_SIZE", "MAX_DEFLATED", "RITZ_GAP",
           "Deflation", "holding", "held_for", "pcg"]

#: Smallest x for which a run holds a deflation: below it the fused C loops' speed outweighs
#: the products saved (the preconditioned solves run in Python).
DEFLATION_MIN_SIZE = 256
#: Largest x: a solve keeps its search directions (up to 100 vectors of x's size).
DEFLATION_MAX_SIZE = 20_000
#: Ritz vectors kept at most.
MAX_DEFLATED = 4
#: A Ritz value is deflated when the next one is at least this many times larger.
RITZ_GAP = 2.0

_HELD: weakref.WeakKeyDictionary[Any, Deflation] = weakref.WeakKeyDictionary()


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

    def solve(self, hvp: MatVec, theta: np.ndarray, b: np.ndarray, x0: np.ndarray | None = None,
              **kw: Any) -> CGResult:
        """`pcg` with this preconditioner, refreshed at theta first and taught by the run after
        (the refresh's HVPs are in the result's matvecs)."""
        spent = self.refresh(hvp, theta)
        P: list[np.ndarray] = []
        AP: list[np.ndarray] = []
        run = pcg(hvp, b, x0, precondition=self.apply, keep=(P, AP), **kw)
        self.learn(P, AP, theta)
        return CGResult(run.x, run.residual, run.rr, run.iterations, run.matvecs + spent,
                        run.status, run.message)


@contextmanager
def holding(kernels: list[Any]) -> Iterator[None]:
    """Hold a Deflation for each kernel of a learning run whose x has DEFLATION_MIN_SIZE to
    DEFLATION_MAX_SIZE entries, for the duration of the block."""
    added = []
    for k in kernels:
        n = getattr(k, "x_size", None)
        if isinstance(n, int) and DEFLATION_MIN_SIZE <= n <= DEFLATION_MAX_SIZE:
            try:
                if k not in _HELD:
                    _HELD[k] = Deflation()
                    added.append(k)
            except TypeError:  # not weakly referenceable: nothing is held for it
                continue
    try:
        yield
    finally:
        for k in added:
            _HELD.pop(k, None)


def held_for(k: Any) -> Deflation | None:
    """The Deflation a run holds for kernel k, else None."""
    try:
        return _HELD.get(k)
    except TypeError:
        return None


def pcg(matvec: MatVec, b: np.ndarray, x0: np.ndarray | None = None, *,
        residual: np.ndarray | None = None, tol: float = 0.0, max_iter: int = 10_000,
        min_iter: int = 0, diverge_from: float | None = None,
        precondition: MatVec = lambda r: r,
        keep: tuple[list[np.ndarray], list[np.ndarray]] | None = None) -> CGResult:
    """Preconditioned CG for A x = b with the tests of `krylov.cg` on the unpreconditioned
    recursive residual s = b - A x (so `tol` means what it means there; scale 1), and no energy
    estimate. keep = (P, AP) receives the search directions and their products."""
    matvecs = 0
    x = np.zeros_like(b) if x0 is None else x0
    if residual is None and x0 is not None:
        Ax, msg = call_kernel(matvec, x)
        matvecs += 1
        if Ax is None:
            return CGResult(x, b.copy(), math.inf, 0, matvecs, Status.NON_FINITE, msg)
        residual = b - Ax
    s = b.copy() if residual is None else residual
    z = precondition(s)
    d, sz, ss, it = z.copy(), dot(s, z), dot(s, s), 0
    while True:
        rn = math.sqrt(ss)
        if (rn <= tol or rn == 0.0) and it >= min_iter:
            return CGResult(x, s, ss, it, matvecs, Status.CONVERGED)
        if it >= max_iter:
            return CGResult(x, s, ss, it, matvecs, Status.CAPPED)
        if diverge_from is not None and rn > DIVERGENCE_FACTOR * max(diverge_from, 1e-300):
            return CGResult(x, s, ss, it, matvecs, Status.DIVERGED,
                            f"residual grew from {diverge_from:.3g} to {rn:.3g}")
        Ad, msg = call_kernel(matvec, d)
        matvecs += 1
        dAd, status, msg = curvature(Ad, d, msg)
        if status is not None or Ad is None or not sz > 0.0:
            return CGResult(x, s, ss, it, matvecs, status or Status.NON_FINITE,
                            msg or "s^T M^{-1} s is not positive")
        if keep is not None:
            keep[0].append(d)
            keep[1].append(Ad)
        alpha = sz / dAd
        x, s = x + alpha * d, s - alpha * Ad
        if not all_finite(x, s):
            return CGResult(x, s, math.inf, it, matvecs, Status.NON_FINITE,
                            "non-finite CG iterate")
        z = precondition(s)
        sz_new = dot(s, z)
        d = z + (sz_new / sz) * d
        sz, ss = sz_new, dot(s, s)
        it += 1
