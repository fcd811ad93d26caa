"""The computable error bounds of the hypergradient (docs/bounds.md; docs/framework.md 6-7):
the a posteriori and a priori bounds, a certified ||B||, and the refined ||x_eps - x*||.

Every function here returns an upper bound or inf, never an estimate that could fall below the
true value: a product whose certified factor is exactly zero vanishes (0 * inf = 0,
`certified_product`), and ||B|| is never taken by power iteration, which approaches it from
below (pitfall 8).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.linalg import lapack

from .common import call_kernel, fixed_memo, norm
from .lower.stopping import rounding_floor
from .solve import run_adjoint

__all__ = ["aposteriori_bound", "apriori_bound", "cross_norm", "refined_distance",
           "distance_from_step", "corrected_value",
           "certified_product", "FROBENIUS_MAX_P", "ROUNDING_FLOOR", "SVD_MARGIN"]

#: ||B|| is taken as the Frobenius norm from p cross JVPs up to this p (exact for p = 1).
FROBENIUS_MAX_P = 64

#: Relative size of the rounding errors in computing h = -B^T q + direct (a generous multiple of
#: machine epsilon: reductions over the data run in the kernels and in NumPy).
ROUNDING_FLOOR = 64 * np.finfo(float).eps

#: Relative margin on a LAPACK singular value (its backward error is a small multiple of
#: d * machine epsilon * ||B||; 1e-10 covers d up to ~1e5 with room to spare).
SVD_MARGIN = 1e-10


def certified_product(*xs: float) -> float:
    """Product with 0 * inf = 0: a term whose certified factor (an error bound, a norm) is exactly
    zero vanishes whatever the (possibly infinite) Lipschitz constant multiplying it. A partial
    product that leaves the normal range (1e-200 * 1e-200 * 1e300 is 1e-100, not 0) is redone on
    the factors' mantissas and exponents, and a positive result below the normal range is
    rounded up by a subnormal step per factor: an upper bound never comes out 0."""
    if 0.0 in xs:
        return 0.0
    if math.inf in xs:  # no zero among them: an infinite (unknown) factor
        return math.inf
    if len(xs) <= _FAST_FACTORS and _FAST_LOW <= min(xs) and max(xs) <= _FAST_HIGH:
        return float(math.prod(xs))  # every partial product within 2^+-900: normal
    return _scaled_product(xs)


#: Up to this many factors, each within [_FAST_LOW, _FAST_HIGH], `certified_product` multiplies
#: as it is: no partial product leaves the normal range.
_FAST_FACTORS, _FAST_LOW, _FAST_HIGH = 6, 2.0 ** -150, 2.0 ** 150
_TINY = 2.0 ** -1074  # the smallest subnormal


def _scaled_product(xs: tuple[float, ...]) -> float:
    mant, expo = 1.0, 0
    for x in xs:
        m, e = math.frexp(float(x))  # inf and nan come back as they are, e = 0
        mant, e2 = math.frexp(mant * m)
        expo += e + e2
    if not math.isfinite(mant):
        return mant
    try:
        out = math.ldexp(mant, expo)
    except OverflowError:
        return math.copysign(math.inf, mant)
    if abs(out) < 2.0 ** -1022:  # subnormal or 0: each rounding lost at most a step
        out += math.copysign(len(xs) * _TINY, mant)
    return out


def _inverse(mu: float) -> float:
    """1/mu for the bounds (inf for a mu too small to invert; mu > 0 is checked upstream)."""
    return 1.0 / mu if mu > 0 else math.inf


def cross_norm(k: Any, x: np.ndarray, theta: Any) -> tuple[float, int]:
    """A certified upper bound on ||B(x, theta)||_2 and the number of cross products it cost.

    p = 1: exactly ||B e_1|| (one JVP). p <= 64: B is assembled from p JVPs (in one kernel call,
    k.cross_matrix, when the kernel has it) and its spectral norm taken by SVD with a relative
    margin for LAPACK's backward error (never above the Frobenius norm, also computed). Larger p:
    k.cross_norm_bound(x, theta) if the kernel has a structural bound, else the Frobenius norm
    anyway (p JVPs; the cost shows in work["cross"]). Never power iteration: it approaches the
    norm from below and would void the certificate (pitfall 8). A B fixed by the data
    (k.fixed_memo) is normed once per bind, at no cross products after that.
    """
    memo = fixed_memo(k, "cross_jvp")
    if memo is not None and "norm" in memo:
        return memo["norm"], 0
    value, used = _cross_norm(k, x, theta)
    if memo is not None and math.isfinite(value):
        memo["norm"] = value
    return value, used


def _cross_norm(k: Any, x: np.ndarray, theta: Any) -> tuple[float, int]:
    th = np.atleast_1d(theta)
    p = th.size
    if p > FROBENIUS_MAX_P and hasattr(k, "cross_norm_bound"):
        v = float(k.cross_norm_bound(x, th))
        if math.isfinite(v):
            return v, 0  # inf: no structural bound, use the JVPs below
    if hasattr(k, "cross_matrix"):  # the p JVPs in one kernel call
        B, _ = call_kernel(k.cross_matrix, x, th)
        if B is None:
            return math.inf, p
    else:
        columns = []
        for j in range(p):
            col, _ = call_kernel(k.cross_jvp, x, th, np.eye(1, p, j).ravel())
            if col is None:
                return math.inf, j + 1
            columns.append(col)
        B = np.column_stack(columns)
    frobenius = norm(B)  # not np.linalg.norm: no BLAS threads on a long column (common.dot)
    if p == 1 or p > FROBENIUS_MAX_P:
        return frobenius, p
    # LAPACK's dgesdd directly (np.linalg.norm(B, 2) costs twice as much on a 10 x 10 B)
    _, singular, _, info = lapack.dgesdd(B, compute_uv=0)
    if info != 0 or not np.isfinite(singular).all():
        return frobenius, p  # no converged SVD: the Frobenius norm is a bound by itself
    spectral = float(singular[0]) * (1 + SVD_MARGIN) + np.finfo(float).tiny
    return min(frobenius, spectral), p


def refined_distance(k: Any, x: np.ndarray, theta: np.ndarray, c: dict[str, Any], grad: np.ndarray,
                     e0: float, iterations: int) -> tuple[float, int]:
    """A certified ||x - x*|| usually far below e0 = G/mu, from a few CG steps on A(x) s = grad g.

    grad g(x) = A_avg (x - x*) with A_avg the Hessian averaged over [x*, x], and
    ||A_avg - A(x)|| <= L_A e / 2, so e = ||x - x*|| satisfies e <= a + (L_A / (2 mu)) e^2 with
    a = ||s|| + ||A(x) s - grad g|| / mu >= ||A(x)^{-1} grad g|| for ANY s (the residual is
    recomputed, so CG's accuracy affects tightness, never validity). With e <= e0 < the larger
    root, e lies below the smaller root 2a / (1 + sqrt(1 - 2 L_A a / mu)). Returns (e, HVPs used).
    """
    mu, L_A = c["mu"], c["L_A"]
    if iterations <= 0 or e0 == 0.0 or not math.isfinite(L_A):
        return e0, 0
    # The adjoint CG solves A(x) s = grad g and recomputes its true residual at the end.
    sol = run_adjoint(k, x, theta, c, "cg", 1e-3 * e0 * mu, None, iterations, grad)
    if sol.q is None:
        return e0, sol.n_hvp
    return distance_from_step(e0, norm(sol.q), sol.residual, mu, L_A), sol.n_hvp


def distance_from_step(e0: float, step: float, residual: float, mu: float, L_A: float) -> float:
    """min(e0, the certified ||x - x*|| of `refined_distance`) from ANY s with ||s|| = step and
    its recomputed residual ||A(x) s - grad g(x)|| = residual (docs/bounds.md 5): a Newton step
    some other solve took already (the block correction's w) gives it for free. e0 when L_A is
    infinite or the quadratic in e has no root above e0's side."""
    if e0 == 0.0 or not (math.isfinite(L_A) and math.isfinite(step) and math.isfinite(residual)):
        return e0
    a = (step + residual / mu) * (1 + 1e-12)
    if L_A == 0.0:
        return min(e0, a)
    cq = L_A / (2 * mu)
    disc = 1 - 4 * a * cq
    if disc < 0 or e0 >= (1 + math.sqrt(disc)) / (2 * cq):
        return e0
    return min(e0, 2 * a / (1 + math.sqrt(disc)))


def corrected_value(c: dict[str, Any], value: float, x: np.ndarray, grad: np.ndarray,
                    q: np.ndarray, e: float, R: float, norm_q: float,
                    norm_grad: float) -> tuple[float, float]:
    """(f_c, a certified bound on |f_c - F|) for f_c = value - q . grad g(x_eps), value = f(x_eps)
    (+ r(theta)), q the adjoint with ||A(x_eps) q - grad_x f(x_eps)|| <= R, e >= ||x_eps - x*||,
    L_A and L_f in c valid on B(x_eps, e) (docs/bounds.md 13):

        |F - f_c| <= R e + (L_f + L_A ||q||) e^2 / 2 + ||q|| (floor of grad g + ROUNDING_FLOOR ||grad g||)
                     + ROUNDING_FLOOR (|value| + |q . grad g|)   (the values' own rounding).

    Second order in e where the plain value's ||grad f|| e is first order: a line search's value
    test needs a far looser lower solve. (nan, inf) when value is not finite. norm_q, norm_grad:
    ||q||, ||grad g(x_eps)||, which the caller has."""
    if not math.isfinite(value):
        return math.nan, math.inf
    mul, nq = certified_product, norm_q
    correction = float(q.dot(grad))
    floor = (mul(nq, rounding_floor(float(c["L"]), x) + ROUNDING_FLOOR * norm_grad)
             + ROUNDING_FLOOR * (abs(value) + abs(correction)))
    err = (mul(R, e) + 0.5 * (mul(c["L_f"], e, e) + mul(c["L_A"], nq, e, e)) + floor)
    return value - correction, (err if not math.isnan(err) else math.inf)


def aposteriori_bound(c: dict[str, Any], e: float, R: float, norm_B: float, norm_b: float,
                      norm_q: float, upper_depends_on_theta: bool = False,
                      q_curvature: float | None = None) -> tuple[float, dict[str, float]]:
    """The computable bound of docs/framework.md 7; returns (min, {"grad_f": ..., "q": ...}).

    With e >= ||x_eps - x*|| certified (G/mu), mu, and L_A, L_B, L_f valid on the ball
    B(x_eps, e) (which contains x*):
      grad_f form: (|B|/mu) R + [(L_f |B| + L_B |b|)/mu + L_A |B| |b|/mu^2] e + (L_B L_f/mu) e^2
      q form:      (|B|/mu) R + [(|B| L_f + |B| |q| L_A)/mu + |q| L_B] e
                   + L_B e (R/mu + e (L_f + |q| L_A)/mu)
    The q form follows from A*(q - q*) = (A* - A_e) q + r + (b_e - b*), i.e.
    ||q - q*|| <= (R + L_f e + L_A e |q|)/mu, and h - grad F = -B_e^T (q - q*) - (B_e - B*)^T q*.
    Both are valid upper bounds, so the smaller one is. + L_ft e if f depends on theta.
    q_curvature: a bound a with ||(A* - A_e) q|| <= a e that the q form reads in place of
    |q| L_A (`local_third.ball_q_curvature`: the third derivative along q from the data).
    """
    LA, LB, Lf = c["L_A"], c["L_B"], c["L_f"]
    mul, inv = certified_product, _inverse(float(c["mu"]))
    nB, nb, nq = norm_B, norm_b, norm_q
    LAq = mul(nq, LA) if q_curvature is None else q_curvature
    first = mul(nB, R, inv)
    f1 = (first + mul(Lf, nB, e, inv) + mul(LB, nb, e, inv) + mul(LA, nB, nb, e, inv, inv)
          + mul(LB, Lf, e, e, inv))
    f2 = (first + mul(nB, Lf, e, inv) + mul(nB, LAq, e, inv) + mul(nq, LB, e)
          + mul(LB, e, R, inv) + mul(LB, e, e, Lf, inv) + mul(LB, e, e, LAq, inv))
    extra = mul(c.get("L_ft", 0.0), e) if upper_depends_on_theta else 0.0
    forms = {"grad_f": f1 + extra, "q": f2 + extra}
    vals = [v for v in forms.values() if not math.isnan(v)]
    return (min(vals) if vals else math.inf), forms


def apriori_bound(c: dict[str, Any], eps: float, delta: float, norm_B_e: float, norm_b_e: float,
                  upper_depends_on_theta: bool = False) -> float:
    """The a priori bound of docs/framework.md 6 with run-time estimates of the starred
    quantities: ||B*|| <= ||B(x_eps)|| + L_B eps, ||b*|| <= ||grad f(x_eps)|| + L_f eps, eps and
    delta from the solvers' a priori rates (not the a posteriori G/mu, R):
      (|B*|/mu) delta + (L_B/mu) eps delta + [L_B |b*|/mu + L_f |B*|/mu + L_A |B*| |b*|/mu^2] eps
      + (L_f L_B/mu) eps^2   (+ L_ft eps if f depends on theta).
    """
    LA, LB, Lf = c["L_A"], c["L_B"], c["L_f"]
    mul, inv = certified_product, _inverse(float(c["mu"]))
    nBs = norm_B_e + mul(LB, eps)
    nbs = norm_b_e + mul(Lf, eps)
    v = (mul(nBs, delta, inv) + mul(LB, eps, delta, inv) + mul(LB, nbs, eps, inv)
         + mul(Lf, nBs, eps, inv) + mul(LA, nBs, nbs, eps, inv, inv) + mul(Lf, LB, eps, eps, inv))
    if upper_depends_on_theta:
        v += mul(c.get("L_ft", 0.0), eps)
    return v if not math.isnan(v) else math.inf
