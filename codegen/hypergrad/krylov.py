"""Conjugate gradients: the one CG loop of the package.

The adjoint solve (A q = grad f), Newton-CG's directions (A d = -grad g), the quadratic lower
solve (A x = A x - grad g) and `refined_distance` (A s = grad g) all run `cg`. It works on the
recursive residual s = b - A u and stops on it; whoever needs a certificate recomputes the TRUE
residual and, if that fails the test, calls `cg` again from there (residual replacement, a new
segment; docs/framework.md 8, pitfall 1). Failures are statuses, never exceptions: a non-finite
product or iterate, and d^T A d <= 0 ("not SPD": A is not positive definite, against mu > 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .common import DIVERGENCE_FACTOR, MatVec, all_finite, call_kernel, dot
from .results import Status

__all__ = ["CGResult", "cg", "Companion", "curvature", "gauss_radau_start", "gauss_radau_step",
           "energy_estimate"]


@dataclass(frozen=True, eq=False)
class CGResult:
    """Where `cg` stopped.

    x           the iterate; residual the recursive residual b - A x there (not recomputed);
    rr          residual . residual; iterations steps taken; matvecs products with A;
    status      CONVERGED (||residual|| / scale <= tol), CAPPED, DIVERGED, NON_FINITE, NOT_SPD;
    message     why, for the last three;
    energy_error  the Gauss-Radau estimate of ||x - A^{-1} b||_A (`energy_estimate`; nan without
                a mu). In exact arithmetic an upper bound; in floating point an estimate only.
    """

    x: np.ndarray
    residual: np.ndarray
    rr: float
    iterations: int
    matvecs: int
    status: Status
    message: str = ""
    energy_error: float = math.nan

    @property
    def residual_norm(self) -> float:
        return math.sqrt(self.rr)


def cg(matvec: MatVec, b: np.ndarray, x0: np.ndarray | None = None, *,
       residual: np.ndarray | None = None, tol: float = 0.0, scale: float = 1.0,
       max_iter: int = 10_000, min_iter: int = 0, diverge_from: float | None = None,
       history: list[Any] | None = None, mu: float | None = None,
       basis: list[tuple[np.ndarray, np.ndarray]] | None = None,
       precondition: MatVec | None = None, companion: Companion | None = None) -> CGResult:
    """Conjugate gradients for A x = b, A = matvec symmetric positive definite.

    x0 = None starts from 0 (residual b, no product); a given x0 costs one product for its
    residual unless `residual` (b - A x0) is passed. Before each step the test
    ||s|| / scale <= tol (or s = 0) is made, once `min_iter` steps are done; `max_iter` caps the
    steps; with `diverge_from`, ||s|| > DIVERGENCE_FACTOR * diverge_from is "diverged".
    `history` (a list) receives ||s|| / scale after every step. `mu` (0 < mu <= the smallest
    eigenvalue of A) turns on the Gauss-Radau energy-norm estimate (`CGResult.energy_error`).
    `basis` (a list) receives (d, A d) of every step: A-conjugate directions spanning the
    Krylov space, for a Galerkin solve of another system with the same A (`galerkin`).
    `precondition` (r -> M^{-1} r, M SPD: the deflation of docs/solvers.md 8) makes it
    preconditioned CG; the tests stay on the unpreconditioned residual s, so `tol` means the
    same, and there is no energy estimate (its recurrence is the plain CG's).
    `companion` (a bound `Companion`, unpreconditioned CG only) takes its steps on a second
    system with the same A alongside, each step's two products from one pair kernel call;
    this solve's own steps are the same, and with the companion's goal it also stops when the
    goal is met (`Companion.satisfied`).
    """
    matvecs = 0
    x = np.zeros_like(b) if x0 is None else x0
    if residual is None and x0 is None:
        residual = b.copy()
    elif residual is None:
        Ax, msg = call_kernel(matvec, x)
        matvecs += 1
        if Ax is None:
            return CGResult(x, b.copy(), math.inf, 0, matvecs, Status.NON_FINITE, msg)
        residual = b - Ax
    s = residual
    z = s if precondition is None else precondition(s)
    d = z.copy()
    ss = dot(s, s)
    sz = ss if precondition is None else dot(s, z)
    it = 0
    radau = gauss_radau_start(mu) if precondition is None else None

    def result(status: Status, message: str = "") -> CGResult:
        return CGResult(x, s, ss, it, matvecs, status, message, energy_estimate(radau, ss))

    while True:
        rn = math.sqrt(ss)
        if (rn / scale <= tol or rn == 0.0) and it >= min_iter:
            return result(Status.CONVERGED)
        if it >= max_iter:
            return result(Status.CAPPED)
        if diverge_from is not None and rn > DIVERGENCE_FACTOR * max(diverge_from, 1e-300):
            return result(Status.DIVERGED, f"residual grew from {diverge_from:.3g} to {rn:.3g}")
        if companion is not None and it >= min_iter and companion.satisfied(x, s, rn):
            return result(Status.CONVERGED)
        Ad, msg = (call_kernel(matvec, d) if companion is None or not companion.active
                   else companion.product(matvec, d))
        matvecs += 1
        dAd, status, msg = curvature(Ad, d, msg)
        if status is not None or Ad is None:
            return result(status or Status.NON_FINITE, msg)
        if not sz > 0.0:  # only a preconditioner that is not SPD gets here
            return result(Status.NON_FINITE, "s^T M^{-1} s is not positive")
        alpha = sz / dAd
        x_new, s_new = x + alpha * d, s - alpha * Ad
        if not all_finite(x_new, s_new):
            return result(Status.NON_FINITE, "non-finite CG iterate")
        if basis is not None:
            basis.append((d, Ad))
        ss_new = dot(s_new, s_new)
        x, s = x_new, s_new
        if precondition is None:
            d = s + (ss_new / ss) * d if ss > 0 else s.copy()
            sz_new = ss_new
        else:
            z = precondition(s)
            sz_new = dot(s, z)
            d = z + (sz_new / sz) * d
        if radau is not None:
            radau = gauss_radau_step(radau, alpha, ss_new / ss if ss > 0 else 0.0)
        ss, sz = ss_new, sz_new
        it += 1
        if history is not None:
            history.append(math.sqrt(ss) / scale)


class Companion:
    """A second system A v = b solved alongside `cg` (the same A at the same x), one pair
    kernel call giving both products of a step (docs/solvers.md 9): a pass over the data
    serves both solves. Plain CG from 0; it stops when a step breaks down (curvature or a
    non-finite iterate: v stays at its last finite iterate) or with the solve it rides with.
    v is only a start for a solve of its own, which recomputes the true residual (the
    correction's forward solve, docs/bounds.md 15.6).

    With a goal it also ends the leading solve. For b = B e_1 (one hyperparameter) and the
    leading solve the adjoint A q = grad f, h = direct - b . q, so the leading iterate's error
    in h is v* . s (s its residual, v* = A^{-1} b), at most |v . s| + (R_v / mu) ||s|| with R_v
    this solve's residual: the leading solve stops once that is within goal(q), a share of the
    target the caller computes from h at q. Steering only: the bound recomputes every residual.

    setup(x, theta) -> (b, goal or None) at the leading solve's x, or None (then nothing runs
    alongside); `bind` sets it up there with pair(d, e) -> the (2, n) products, or None.
    start: v to start from (an earlier companion's, at a nearby x); its residual b - A v comes
    from the first pair call, which then makes no step of its own."""

    def __init__(self, setup: Callable[[np.ndarray, np.ndarray], Any],
                 start: np.ndarray | None = None):
        self.setup, self.start = setup, start
        self.pair: Callable[[np.ndarray, np.ndarray], Any] | None = None
        self.goal: Callable[[np.ndarray], float] | None = None
        self.v: np.ndarray | None = None
        self.steps = 0
        self.active = self.met = self.pending = False

    def bind(self, x: np.ndarray, theta: np.ndarray, mu: float,
             pair: Callable[[np.ndarray, np.ndarray], Any] | None) -> None:
        """Start at (x, theta): v = 0, s = d = b. Nothing runs without a pair kernel, a finite b
        or a positive mu."""
        made = self.setup(x, theta) if pair is not None and mu > 0.0 else None
        if made is None or not all_finite(made[0]):
            return
        b, self.goal = made
        self.pair, self.mu, self.b = pair, mu, b
        start = self.start
        self.pending = start is not None and start.shape == b.shape
        self.v = start.copy() if start is not None and self.pending else np.zeros_like(b)
        self.s, self.d = b.copy(), b.copy()
        self.ss = dot(b, b)
        self.active = self.ss > 0.0

    def product(self, matvec: MatVec, d: np.ndarray) -> tuple[np.ndarray | None, str]:
        """A d for the leading solve, and this solve's step from the same call (the leading
        solve's product alone, by matvec, if the pair call fails)."""
        second = self.v if self.pending else self.d
        both, msg = (None, "") if self.pair is None else call_kernel(self.pair, d, second)
        if both is None:
            self.active = False
            return call_kernel(matvec, d)
        if self.pending:  # the start's residual: CG from there
            self.s = self.b - both[1]
            self.d, self.ss, self.pending = self.s.copy(), dot(self.s, self.s), False
        else:
            self._step(both[1])
        return both[0], msg

    def satisfied(self, q: np.ndarray, s: np.ndarray, s_norm: float) -> bool:
        """Whether the leading iterate q, with residual s (of norm s_norm), meets the goal (see
        above)."""
        if self.goal is None or self.v is None or not self.steps:
            return False
        bound = abs(dot(self.v, s)) + math.sqrt(self.ss) * s_norm / self.mu
        self.met = bound <= self.goal(q)
        return self.met

    def _step(self, Ad: np.ndarray) -> None:
        dAd = dot(self.d, Ad)
        if not (math.isfinite(dAd) and dAd > 0.0):
            self.active = False
            return
        alpha = self.ss / dAd
        v, s = self.v + alpha * self.d, self.s - alpha * Ad
        if not all_finite(v, s):
            self.active = False
            return
        ss = dot(s, s)
        self.v, self.s, self.d = v, s, s + (ss / self.ss) * self.d
        self.ss, self.steps = ss, self.steps + 1
        self.active = ss > 0.0


def gauss_radau_start(mu: float | None) -> tuple[float, float] | None:
    """The Gauss-Radau state (alpha_mu, mu) before CG's first step: alpha_mu = 1/mu; None
    without a usable mu (then no estimate)."""
    if mu is None or not (0.0 < mu < math.inf):
        return None
    return 1.0 / mu, mu


def gauss_radau_step(state: tuple[float, float], alpha: float,
                     delta: float) -> tuple[float, float]:
    """The state after a CG step of length alpha with delta = ||s_new||^2 / ||s||^2:
    alpha_mu <- (alpha_mu - alpha) / (mu (alpha_mu - alpha) + delta), the recurrence of Meurant
    and Tichy's CGQ algorithm for the Gauss-Radau rule with its node prescribed at mu."""
    alpha_mu, mu = state
    gap = alpha_mu - alpha
    denominator = mu * gap + delta
    return (gap / denominator if denominator > 0.0 else math.nan), mu


def energy_estimate(state: tuple[float, float] | None, ss: float) -> float:
    """sqrt(alpha_mu ||s||^2): the Gauss-Radau estimate of ||x - x*||_A at the current iterate
    (an upper bound in exact arithmetic when mu <= lambda_min(A)); nan when there is none."""
    if state is None:
        return math.nan
    if ss == 0.0:
        return 0.0  # x solves A x = b (in exact arithmetic)
    value = state[0] * ss
    return math.sqrt(value) if value >= 0.0 and math.isfinite(value) else math.nan


def curvature(Ad: np.ndarray | None, d: np.ndarray,
               msg: str) -> tuple[float, Status | None, str]:
    """(d^T A d, None, "") when A d is finite and d^T A d > 0, else (nan, the status that stops
    CG, why)."""
    if Ad is None:
        return math.nan, Status.NON_FINITE, msg
    dAd = dot(d, Ad)
    if not math.isfinite(dAd):
        return math.nan, Status.NON_FINITE, "d^T A d is not finite"
    if dAd <= 0.0:
        return math.nan, Status.NOT_SPD, f"d^T A d = {dAd:.3g} <= 0"
    return dAd, None, ""

