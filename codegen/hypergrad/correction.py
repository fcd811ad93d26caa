"""The dual-weighted-residual (DWR) corrected hypergradient and its product bound
(docs/bounds.md 15).

The plain hypergradient h = -B^T q + grad_theta f has an error that is first order in the lower
error e = x_eps - x* and in the adjoint residual r = A q - grad f. One forward solve A v = B u
and one dual solve A lambda = m (m ~ the x-gradient of the hypergradient map along u) give

    u . h_c = u . h + v . r - lambda . grad g(x_eps),

whose error is a sum of PRODUCTS of recomputed residuals and e (docs/bounds.md 15, Theorem 15.1):

    |u . (h_c - grad F)| <= R_v R/mu + ||D_u|| R E/mu + L_f R_v E/mu + R_lam E
                            + ||D_u|| L_f E^2/mu  (+ L_ft ||u|| E when f depends on theta),

with D_u = d(B u)/dx, ||D_u|| <= L_B ||u||. Each residual is recomputed (one HVP), so how well
v and lambda solve their systems changes the bound's size, never its validity. This module
applies the theorem where its second-order term follows from existing constants: g and f
quadratic in x (the Hessians do not read x), as for ridge and the paper's quadratic problem.
Elsewhere `dwr_unavailable` says why, and the hypergradient keeps E&R's bound.

Plain h: |u . (h - grad F)| <= |u . (h - h_c)| + bound(h_c), usually within a few percent of the
true error once E is small (the correction is an almost exact error estimate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .bounds import ROUNDING_FLOOR, certified_product
from .common import call_kernel, dot, hvp_at, norm
from .results import HypergradientResult
from .solve import run_adjoint

__all__ = ["Correction", "DirectionCorrection", "dwr_unavailable", "correct", "combined",
           "MAX_COMPONENTS"]

#: Up to this many hyperparameters every component gets its own forward and dual solve; above it
#: only the component along h is certified (one pair of solves: docs/bounds.md 15.4).
MAX_COMPONENTS = 8


@dataclass(frozen=True)
class DirectionCorrection:
    """The corrected component u . h_c along one direction u, with its certified bound.

    value, plain   u . h_c and u . h;
    bound          >= |u . (h_c - grad F)| (Theorem 15.1);
    plain_bound    >= |u . (h - grad F)|: |u . (h - h_c)| + bound;
    terms          the bound's terms by name (docs/bounds.md 15.2);
    v, lam         the forward and dual iterates (warm starts of the next round);
    R_v, R_lam     their true residuals."""

    direction: np.ndarray
    value: float
    plain: float
    bound: float
    plain_bound: float
    terms: dict[str, float]
    v: np.ndarray
    lam: np.ndarray
    R_v: float
    R_lam: float


@dataclass(frozen=True)
class Correction:
    """All directions of one correction, and the work it cost."""

    parts: list[DirectionCorrection]
    residual: float  # R = ||A q - grad f||, recomputed here
    work: dict[str, int] = field(default_factory=dict)


def dwr_unavailable(k: Any) -> str | None:
    """None if Theorem 15.1's quadratic case (docs/bounds.md 15.3) applies to k, else why not:
    it needs A and H_f independent of x (then B u and grad f are affine in x) and an upper HVP."""
    if not bool(getattr(k, "is_quadratic", False)):
        return "the lower Hessian depends on x (no second-order constant for the correction)"
    if not bool(getattr(k, "upper_is_quadratic", False)) or not hasattr(k, "upper_hvp"):
        return "the upper Hessian depends on x (no second-order constant for the correction)"
    return None


def correct(k: Any, hg: HypergradientResult, directions: list[np.ndarray],
            tol_v: list[float | None], tol_lam: list[float | None], v0: list[Any],
            lam0: list[Any], max_iter: int, relative: float = 1e-3) -> Correction:
    """Theorem 15.1 at hg's x_eps and q for each direction u (g and f quadratic in x).

    tol_v, tol_lam: the CG tolerances of the forward (A v = B u) and dual (A lam = m) solves,
    None for `relative` times the norm of the right-hand side; v0, lam0: warm starts (None: 0).
    Work: HVPs (the two CGs, the residual r), upper HVPs and cross JVPs, in E&R's units as the
    hypergradient counts them."""
    th = np.asarray(hg.theta, dtype=np.float64)
    x, q = np.asarray(hg.x), np.asarray(hg.q)
    c = dict(hg.constants) if isinstance(hg.constants, dict) else {}
    work = {"hvps": 1, "lower_grads": 0, "cross": 0, "upper": 1}
    hvp = hvp_at(k, x, th)
    b, _ = call_kernel(k.upper_grad, x, th)
    Aq, _ = call_kernel(hvp, q)
    if b is None or Aq is None:
        raise FloatingPointError("grad_x f or A q not finite at x_eps")
    r = Aq - b
    R = norm(r)
    r_g = np.asarray(hg.lower.grad)  # type: ignore[union-attr]
    parts = []
    for j, u in enumerate(directions):
        part, used = _one_direction(k, hg, c, x, th, q, r, R, r_g, u, (tol_v[j], tol_lam[j]),
                                    (v0[j], lam0[j]), max_iter, relative)
        for key, n in used.items():
            work[key] += n
        parts.append(part)
    return Correction(parts, R, work)


def _one_direction(k: Any, hg: HypergradientResult, c: dict[str, Any], x: np.ndarray,
                   th: np.ndarray, q: np.ndarray, r: np.ndarray, R: float, r_g: np.ndarray,
                   u: np.ndarray, tols: tuple[float | None, float | None],
                   starts: tuple[Any, Any], max_iter: int,
                   relative: float) -> tuple[DirectionCorrection, dict[str, int]]:
    """The forward solve, m = -D_u q - H_f v, the dual solve and the bound along u."""
    used = {"hvps": 0, "cross": 0, "upper": 0}
    Bu, _ = call_kernel(k.cross_jvp, x, th, u)
    # B u is affine in x (g quadratic): D_u q = B(q) u - B(0) u exactly (D_u is symmetric).
    Bq, _ = call_kernel(k.cross_jvp, q, th, u)
    B0, _ = call_kernel(k.cross_jvp, np.zeros_like(x), th, u)
    used["cross"] += 3
    if Bu is None or Bq is None or B0 is None:
        raise FloatingPointError("a cross JVP is not finite")
    tol_v, tol_lam = tols
    fwd = run_adjoint(k, x, th, c, "cg", relative * norm(Bu) if tol_v is None else tol_v,
                      starts[0], max_iter, Bu)
    used["hvps"] += fwd.n_hvp
    Hv, _ = call_kernel(k.upper_hvp, x, th, fwd.q)
    used["upper"] += 1
    if Hv is None:
        raise FloatingPointError("the upper HVP is not finite")
    m = -(Bq - B0) - Hv
    dual = run_adjoint(k, x, th, c, "cg", relative * norm(m) if tol_lam is None else tol_lam,
                       starts[1], max_iter, m)
    used["hvps"] += dual.n_hvp
    v, lam = fwd.q, dual.q
    mu, E = float(c["mu"]), float(hg.e)
    nu = norm(u)
    LB, Lf = float(c["L_B"]), float(c["L_f"])
    terms = product_terms(mu, E, R, fwd.residual, dual.residual, certified_product(LB, nu), Lf,
                          certified_product(float(c.get("L_ft", 0.0)), nu)
                          if bool(getattr(k, "upper_depends_on_theta", False)) else 0.0)
    delta = dot(v, r) - dot(lam, r_g)
    plain = float(dot(u, np.asarray(hg.grad)))
    # rounding (docs/bounds.md 6): of the correction's two dot products, of m (the difference
    # B(q) u - B(0) u cancels; its error pairs with e) and of h's component
    terms["rounding"] = (ROUNDING_FLOOR * (norm(v) * R + norm(lam) * norm(r_g)
                                           + (norm(Bq) + norm(B0) + norm(Hv)) * E)
                         + hg.bound_forms.get("rounding", 0.0) * nu)
    bound = math.fsum(terms.values())
    if not math.isfinite(bound):
        bound = math.inf
    part = DirectionCorrection(u, plain + delta, plain, bound, abs(delta) + bound, terms, v, lam,
                               fwd.residual, dual.residual)
    return part, used


def product_terms(mu: float, E: float, R: float, R_v: float, R_lam: float, norm_D: float,
                  L_f: float, theta_lipschitz: float) -> dict[str, float]:
    """The terms of Theorem 15.1 (quadratic g and f; docs/bounds.md 15.2), by name.

    norm_D >= ||d(B u)/dx|| (L_B ||u||); theta_lipschitz >= Lipschitz constant of
    x -> u . grad_theta f (L_ft ||u||; 0 when f does not depend on theta)."""
    return {
        "vR": certified_product(R_v, R) / mu,
        "RE": certified_product(norm_D, R, E) / mu,
        "vE": certified_product(L_f, R_v, E) / mu,
        "lamE": certified_product(R_lam, E),
        "EE": certified_product(norm_D, L_f, E, E) / mu,
        "theta": certified_product(theta_lipschitz, E),
    }


def combined(corr: Correction, hg: HypergradientResult,
             components: bool) -> tuple[np.ndarray, float, float]:
    """(grad, bound on ||grad - grad F||, bound on ||h - grad F||) from the corrections.

    components (directions e_1..e_p): grad = h_c, ||h_c - grad F|| <= sqrt(sum_j bound_j^2);
    each is also bounded by ||h_c - h|| + hg.bound (E&R's bound on h), and the smaller is kept.
    Otherwise (one direction u along h): grad = h, bound = hg.bound; the directional bound is in
    corr.parts[0]."""
    h = np.asarray(hg.grad, dtype=np.float64)
    if not components:
        return h, hg.bound, hg.bound
    shift = np.array([p.value - p.plain for p in corr.parts])
    h_c = h + shift
    dwr = math.sqrt(math.fsum(p.bound ** 2 for p in corr.parts))
    plain = math.sqrt(math.fsum(p.plain_bound ** 2 for p in corr.parts))
    return h_c, min(dwr, norm(shift) + hg.bound), min(plain, hg.bound)
