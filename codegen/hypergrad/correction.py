"""The dual-weighted-residual (DWR) corrected hypergradient and its product bound
(docs/bounds.md 15).

The plain hypergradient h = -B^T q + grad_theta f has an error that is first order in the lower
error e = x_eps - x* and in the adjoint residual r = A q - grad f. One forward solve A v = B u
and one dual solve A lambda = m (m ~ the x-gradient of the hypergradient map along u) give

    u . h_c = u . h + v . r - lambda . grad g(x_eps),

whose error is a sum of PRODUCTS of recomputed residuals and e (docs/bounds.md 15, Theorem 15.1).
With g and f quadratic in x (Corollary 15.2):

    |u . (h_c - grad F)| <= R_v R/mu + ||D_u|| R E/mu + L_f R_v E/mu + R_lam E
                            + ||D_u|| L_f E^2/mu  (+ L_ft ||u|| E when f depends on theta),

with D_u = d(B u)/dx, ||D_u|| <= L_B ||u||. With g not quadratic Corollary 15.3 adds L_A
(Lipschitz constant of A on the ball), L_3 (of x -> DA(x), a fourth-derivative bound) and L_Hf
(of H_f; 0 for quadratic f) terms, every one still a product of two small quantities; m then
carries the third-derivative term grad_x (v^T A(x) q) (the `lower_tvp` kernel). When B is not
affine in x either (per-sample weights on a non-quadratic loss, a weight on TV) D_u = D_u(x) is
evaluated at x_eps by the `cross_hvp` kernel and L_DB (Lipschitz constant of x -> D_u(x) per
||u||) adds one more E^2 term. Each residual is recomputed (one HVP), so how
well v and lambda solve their systems changes the bound's size, never its validity. Elsewhere
`dwr_unavailable` says why, and the hypergradient keeps E&R's bound.

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
from .energy import Energy
from .floors import lowest_residual
from .galerkin import galerkin
from .krylov import Companion
from .local_third import LOCAL_Q, higher_constants, local_contractions, worth_local
from .results import HypergradientResult
from .solve import correction_solve

__all__ = ["Correction", "DirectionCorrection", "dwr_unavailable", "correct", "combined",
           "MAX_COMPONENTS", "forward_companion", "companion_starts", "adjoint_residual"]

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
    R_v, R_lam     their true residuals;
    adjoint_part, lower_part  v . r and lam . grad g(x_eps): the correction's estimates of the
                   adjoint's and the lower solve's shares of h's error (steering only);
    local          whether the terms read the third derivative from the data (docs/bounds.md 15.10)."""

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
    adjoint_part: float = 0.0
    lower_part: float = 0.0
    local: bool = False


@dataclass(frozen=True)
class Correction:
    """All directions of one correction, the work it cost, the corollary of docs/bounds.md 15
    whose terms bound it ("15.2": g and f quadratic in x; "15.3": g not quadratic, B affine),
    and whether some direction's terms read the third derivative from the data (15.10)."""

    parts: list[DirectionCorrection]
    residual: float  # R = ||A q - grad f||, recomputed here
    work: dict[str, int] = field(default_factory=dict)
    corollary: str = "15.2"
    local: bool = False
    local_q: float | None = None  # the local bound on ||DA(x_eps)[q]|| where it was computed


def dwr_unavailable(k: Any, theta: Any = None) -> str | None:
    """None if Corollary 15.2 (g, f quadratic in x) or 15.3 (g or f not quadratic) applies to k
    (docs/bounds.md 15.3), else why not. 15.3 needs, when g is not quadratic, the lower_tvp
    kernel and finite L_3, and either B affine in x (`cross_is_affine`, or L_DB = 0 in
    k.constants(theta): the derivation proved every theta-dependent term of g quadratic in x) or
    the cross_hvp kernel and a finite L_DB; when f is not quadratic a finite L_Hf. The constants
    are read from k.constants(theta) when theta is given."""
    quadratic = bool(getattr(k, "is_quadratic", False))
    if quadratic and bool(getattr(k, "upper_is_quadratic", False)):
        return None if hasattr(k, "upper_hvp") else "the problem has no upper HVP"
    th = None if theta is None else np.atleast_1d(np.asarray(theta, dtype=np.float64))
    why = None if quadratic else _lower_missing(k, th)
    if why is not None:
        return why
    if not hasattr(k, "upper_hvp"):
        return "the problem has no upper HVP (the dual right-hand side)"
    if th is not None:
        # a ball rule is finite on every ball or on none: the unit ball at 0 decides
        L3, LH = higher_constants(k, th, np.zeros(int(k.x_size)), 1.0)
        if not math.isfinite(L3):
            return ("the lower Hessian depends on x and the constants give no finite L_3 "
                    "(Lipschitz constant of x -> DA(x), a fourth-derivative bound of g on the "
                    "ball)")
        if not math.isfinite(LH):
            return ("the upper Hessian depends on x and the constants give no finite L_Hf "
                    "(Lipschitz constant of x -> H_f(x) on the ball)")
    return None


def _lower_missing(k: Any, th: np.ndarray | None) -> str | None:
    """What Corollary 15.3 lacks for a non-quadratic g: the lower_tvp kernel, and for B not
    known to be affine in x the cross_hvp kernel and a finite L_DB (None: nothing)."""
    if not hasattr(k, "lower_tvp"):
        return ("the lower Hessian depends on x and the problem has no lower_tvp kernel "
                "(grad_x (v^T A(x) w), the dual right-hand side of Corollary 15.3)")
    if _cross_affine(k, th):
        return None
    if cross_hvp_of(k) is None:
        return ("the lower Hessian depends on x, B = d_theta grad_x g is not known to be affine "
                "in x and the problem has no cross_hvp kernel (D_u(x) q = grad_x (q^T B(x) u), "
                "Corollary 15.3 with B not affine)")
    if th is None:
        return ("the lower Hessian depends on x and B = d_theta grad_x g is not known to be "
                "affine in x (theta not given: L_DB, the Lipschitz constant of x -> d(B u)/dx, "
                "is read from the constants at theta)")
    # a ball rule is finite on every ball or on none: the unit ball at 0 decides
    if not math.isfinite(cross_lipschitz(k, th, np.zeros(int(k.x_size)), 1.0)):
        return ("the lower Hessian depends on x, B = d_theta grad_x g is not known to be affine "
                "in x and the constants give no finite L_DB (Lipschitz constant of "
                "x -> d(B u)/dx per ||u|| on the ball, a bound on d^4 g/dx^3 dtheta)")
    return None


def cross_hvp_of(k: Any) -> Any:
    """k's map (x, theta, t, w) -> grad_x (w^T B(x) t) = d/ds B(x + s w) t (`cross_hvp`: every
    generated module's BoundProblem has it), or None."""
    return getattr(k, "cross_hvp", None)


def cross_lipschitz(k: Any, th: np.ndarray, x: Any = None, radius: float = math.inf) -> float:
    """L_DB: a Lipschitz constant of x -> d(B u)/dx per ||u|| on the ball (docs/bounds.md 15.3).
    0 where B is known to be affine in x (g quadratic, or `cross_is_affine`); else from
    k.constants(theta), or where that is infinite from k.local_constants on B(x, radius) (theta
    in a learned filter's taps: finite on balls only, docs/constants.md 8.3; the ball must hold
    x* and x_eps); inf where missing (the correction then does not apply)."""
    if bool(getattr(k, "is_quadratic", False)) or bool(getattr(k, "cross_is_affine", False)):
        return 0.0
    raw = dict(k.constants(th)).get("L_DB", math.inf)
    local = getattr(k, "local_constants", None)
    if float(raw) == math.inf and x is not None and math.isfinite(radius) and local is not None:
        raw = local(np.asarray(x, dtype=np.float64), th, radius).get("L_DB", math.inf)
    value = float(raw)
    if math.isnan(value) or value < 0:
        raise ValueError(f"constant L_DB = {raw!r} is not >= 0")
    return value


def _cross_affine(k: Any, th: np.ndarray | None) -> bool:
    """Whether B = d_theta grad_x g is known to be affine in x: the kernel says so
    (cross_is_affine) or, at theta, the derived constants give L_DB = 0 (the Lipschitz constant
    of x -> d(B u)/dx)."""
    if bool(getattr(k, "cross_is_affine", False)):
        return True
    return th is not None and float(dict(k.constants(th)).get("L_DB", math.inf)) == 0.0


def uses_general_terms(k: Any) -> bool:
    """Whether k's bound is Corollary 15.3's (g or f not quadratic in x) rather than 15.2's."""
    return not (bool(getattr(k, "is_quadratic", False))
                and bool(getattr(k, "upper_is_quadratic", False)))


def correct(k: Any, hg: HypergradientResult, directions: list[np.ndarray],
            tol_v: list[float | None], tol_lam: list[float | None], v0: list[Any],
            lam0: list[Any], max_iter: int, relative: float = 1e-3,
            energy: Energy | None = None, dense: dict[str, Any] | None = None) -> Correction:
    """Theorem 15.1 at hg's x_eps and q for each direction u, bounded by Corollary 15.2 (g, f
    quadratic in x) or 15.3 (`dwr_unavailable` says which applies).

    tol_v, tol_lam: the CG tolerances of the forward (A v = B u) and dual (A lam = m) solves,
    None for `relative` times the norm of the right-hand side; v0, lam0: warm starts (None: 0);
    energy: the energy-norm quantities at hg's x_eps and q (`energy.energy_at`), which sharpen
    Corollary 15.3's terms for one more pass per direction (docs/bounds.md 15.9); dense: the
    rounds' factor cache, by which the two solves run where the adjoint was direct
    (`solve.correction_solve`). Work: HVPs (the two CGs, the residual r), upper HVPs and cross
    JVPs, in E&R's units as the hypergradient counts them."""
    th = np.asarray(hg.theta, dtype=np.float64)
    x, q = np.asarray(hg.x), np.asarray(hg.q)
    c = dict(hg.constants) if isinstance(hg.constants, dict) else {}
    r, spent = adjoint_residual(k, hg)
    work = {"hvps": spent, "lower_grads": 0, "cross": 0, "upper": 1}
    R = norm(r)
    r_g = np.asarray(hg.lower.grad)  # type: ignore[union-attr]
    c["L_3"], c["L_Hf"] = higher_constants(k, th, x, float(hg.e))  # B(x_eps, e) holds x*
    c["L_DB"] = cross_lipschitz(k, th, x, float(hg.e))
    parts = []
    kept: dict[str, float] = {}
    for j, u in enumerate(directions):
        part, used = _one_direction(k, hg, c, x, th, q, r, R, r_g, u, (tol_v[j], tol_lam[j]),
                                    (v0[j], lam0[j]), max_iter, relative, energy, kept, dense)
        for key, n in used.items():
            work[key] += n
        parts.append(part)
    return Correction(parts, R, work, "15.3" if uses_general_terms(k) else "15.2",
                      any(p.local for p in parts), kept.get(LOCAL_Q))


def adjoint_residual(k: Any, hg: HypergradientResult) -> tuple[np.ndarray, int]:
    """(r = A q - grad f, HVPs spent) at hg's x_eps and q: the adjoint solve's own recomputed
    true residual when it kept it (`AdjointResult.true_residual`: the same kernels at the same
    x and q), else grad f and one HVP. FloatingPointError where it is not finite."""
    kept = getattr(hg.adjoint, "true_residual", None)
    if kept is not None:
        return np.asarray(kept), 0
    th, x = np.asarray(hg.theta, dtype=np.float64), np.asarray(hg.x)
    b, _ = call_kernel(k.upper_grad, x, th)
    Aq, _ = call_kernel(hvp_at(k, x, th), np.asarray(hg.q))
    if b is None or Aq is None:
        raise FloatingPointError("grad_x f or A q not finite at x_eps")
    return Aq - b, 1


def _one_direction(k: Any, hg: HypergradientResult, c: dict[str, Any], x: np.ndarray,
                   th: np.ndarray, q: np.ndarray, r: np.ndarray, R: float, r_g: np.ndarray,
                   u: np.ndarray, tols: tuple[float | None, float | None],
                   starts: tuple[Any, Any], max_iter: int, relative: float,
                   energy: Energy | None, kept: dict[str, float],
                   dense: dict[str, Any] | None = None
                   ) -> tuple[DirectionCorrection, dict[str, int]]:
    """The forward solve, m = -D_u q - H_f v (+ grad_x (v^T A(x) q)), the dual solve and the
    bound along u; kept: what the directions share (the local bound on ||DA(x_eps)[q]||)."""
    used = {"hvps": 0, "cross": 0, "upper": 0}
    Bu, _ = call_kernel(k.cross_jvp, x, th, u)
    used["cross"] += 1
    if Bu is None:
        raise FloatingPointError("the cross JVP B u is not finite")
    Dq, D_parts = _cross_derivative(k, x, th, u, q, float(c["L_DB"]) == 0.0)
    used["cross"] += len(D_parts)
    tol_v, tol_lam = tols
    fwd = correction_solve(k, hg, c, relative * norm(Bu) if tol_v is None else max(tol_v, lowest_residual(Bu)),
                           lambda: _forward_start(hg, starts[0], Bu), max_iter, Bu, dense)
    used["hvps"] += fwd.n_hvp
    Hv, _ = call_kernel(k.upper_hvp, x, th, fwd.q)
    used["upper"] += 1
    if Hv is None:
        raise FloatingPointError("the upper HVP is not finite")
    m = -Dq - Hv
    quadratic = bool(getattr(k, "is_quadratic", False))
    Tvq = np.zeros_like(m)
    if not quadratic:  # the third-derivative term of grad Phi_u (docs/bounds.md 15.3)
        T, _ = call_kernel(k.lower_tvp, x, th, fwd.q, q)
        used["hvps"] += 1
        if T is None:
            raise FloatingPointError("the lower third-derivative product is not finite")
        Tvq = T
        m = m + Tvq
    dual = correction_solve(k, hg, c, relative * norm(m) if tol_lam is None else max(tol_lam, lowest_residual(m)),
                            starts[1], max_iter, m, dense)
    used["hvps"] += dual.n_hvp
    v, lam = fwd.q, dual.q
    mu, E = float(c["mu"]), float(hg.e)
    adjoint_part, lower_part = dot(v, r), dot(lam, r_g)
    delta = adjoint_part - lower_part
    nu = norm(u)
    LB, Lf = float(c["L_B"]), float(c["L_f"])
    terms = product_terms(mu, E, R, fwd.residual, dual.residual, certified_product(LB, nu), Lf,
                          certified_product(float(c.get("L_ft", 0.0)), nu)
                          if bool(getattr(k, "upper_depends_on_theta", False)) else 0.0)
    read_local = False
    if uses_general_terms(k):
        sharper = None
        if energy is not None and not quadratic:  # docs/bounds.md 15.9: one pass for w'[v]
            used["hvps"] += 1
            sharper = (energy.bound(energy.rho_q), energy.bound(energy.rho(v)))
        general = (mu, E, R, fwd.residual, certified_product(LB, nu), Lf, float(c["L_A"]),
                   float(c["L_3"]), float(c["L_Hf"]), norm(v), norm(q), norm(lam))
        terms.update(nonquadratic_terms(*general, sharper))
        if not quadratic and worth_local(terms, delta):
            local, a_lam, passes = local_contractions(k, hg, v, lam, terms, sharper, kept)
            used["hvps"] += passes
            if local is not sharper:  # the local forms are there
                terms.update(nonquadratic_terms(*general, local, a_lam))
                read_local = True
        if float(c["L_DB"]) > 0:  # B not affine in x (docs/bounds.md 15.3)
            terms["crossB"] = cross_term(mu, E, R, certified_product(float(c["L_DB"]), nu),
                                         norm(q))
    plain = float(dot(u, np.asarray(hg.grad)))
    # rounding (docs/bounds.md 6): of the correction's two dot products, of m (the difference
    # B(q) u - B(0) u cancels; its error pairs with e) and of h's component
    terms["rounding"] = (ROUNDING_FLOOR * (norm(v) * R + norm(lam) * norm(r_g)
                                           + (sum(D_parts) + norm(Hv) + norm(Tvq)) * E)
                         + hg.bound_forms.get("rounding", 0.0) * nu)
    bound = math.fsum(terms.values())
    if not math.isfinite(bound):
        bound = math.inf
    part = DirectionCorrection(u, plain + delta, plain, bound, abs(delta) + bound, terms, v, lam,
                               fwd.residual, dual.residual, adjoint_part, lower_part, read_local)
    return part, used


#: The share of the target (atol + rtol |h|) h's adjoint error may take where the forward solve
#: steers the adjoint (`forward_companion`): the plain bound adds the lower part and bound(h_c),
#: planned at TIGHT_PLAN_SHARE.
GOAL_SHARE = 0.4


def forward_companion(k: Any, rtol: float | None, atol: float,
                      start: Companion | None = None) -> Companion:
    """The first component's forward solve A v = B e_1 as a companion of a round's adjoint CG
    (docs/solvers.md 9): where the module has a pair kernel, its steps ride on the adjoint's
    passes over the data, and `correct` goes on from its v (`companion_starts`). With one
    hyperparameter it also stops the adjoint once h's adjoint error, v . s, is within
    GOAL_SHARE of atol + rtol |h| (h = direct - B e_1 . q at the adjoint's iterate). start: the
    companion of a round solved again at a nearby x, whose v it starts from."""
    def setup(x: np.ndarray, th: np.ndarray) -> Any:
        Bu, _ = call_kernel(k.cross_jvp, x, th, np.eye(th.size)[0])
        if Bu is None or th.size != 1 or not (rtol or atol):
            return None if Bu is None else (Bu, None)  # no goal without a target
        direct, _ = call_kernel(k.upper_theta_grad, x, th)
        if direct is None:
            return Bu, None
        d0, r = float(direct[0]), float(rtol or 0.0)
        return Bu, lambda q: GOAL_SHARE * (atol + r * abs(d0 - dot(Bu, q)))
    return Companion(setup, None if start is None or not start.steps else start.v)


def companion_starts(companion: Companion | None, n: int) -> list[Any]:
    """The forward solves' starts of a round whose adjoint had `companion` alongside: its v for
    the first of n directions when it took a step, None (a start of their own) otherwise."""
    v = None if companion is None or not companion.steps else companion.v
    return [v] + [None] * (n - 1)


def _forward_start(hg: HypergradientResult, v0: Any, Bu: np.ndarray) -> Any:
    """The forward solve's start: v0 (the last round's v) when given, else the Galerkin
    solution on the lower CG's kept Krylov basis (docs/bounds.md 15.7) when there is one, else
    None (from 0). A start only: the CG recomputes its true residual."""
    krylov = getattr(hg.lower, "krylov", None)
    if v0 is not None or krylov is None:
        return v0
    return galerkin(krylov[0], krylov[1], Bu)


def _cross_derivative(k: Any, x: np.ndarray, th: np.ndarray, u: np.ndarray, q: np.ndarray,
                      affine: bool) -> tuple[np.ndarray, list[float]]:
    """(D_u(x) q, the norms of the kernel outputs it was formed from, for the rounding floor).
    B u affine in x: D_u q = B(q) u - B(0) u exactly, two cross JVPs. Otherwise one cross_hvp
    call, grad_x (q^T B(x) u) at x_eps (D_u is symmetric either way)."""
    if affine:
        Bq, _ = call_kernel(k.cross_jvp, q, th, u)
        B0, _ = call_kernel(k.cross_jvp, np.zeros_like(x), th, u)
        if Bq is None or B0 is None:
            raise FloatingPointError("a cross JVP is not finite")
        return Bq - B0, [norm(Bq), norm(B0)]
    dhvp = cross_hvp_of(k)
    if dhvp is None:
        raise ValueError("B = d_theta grad_x g is not known to be affine in x and the problem "
                         "has no cross_hvp kernel for D_u(x_eps) q (docs/bounds.md 15.3)")
    Dq, _ = call_kernel(dhvp, x, th, u, q)
    if Dq is None:
        raise FloatingPointError("the cross derivative D_u(x_eps) q (cross_hvp) is not finite")
    return Dq, [norm(Dq)]


def cross_term(mu: float, E: float, R: float, L_DB_u: float, norm_q: float) -> float:
    """crossB >= |q_e^T rho_B| with rho_B = integral_0^1 (D_u(x_eps) - D_u(x_t)) e dt, the part
    of Corollary 15.3 that B not affine in x adds: L_DB ||u|| (||q|| + R/mu) E^2/2
    (L_DB_u = L_DB ||u||; docs/bounds.md 15.3)."""
    return 0.5 * certified_product(L_DB_u, norm_q + R / mu, E, E)


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


def nonquadratic_terms(mu: float, E: float, R: float, R_v: float, norm_D: float, L_f: float,
                       L_A: float, L_3: float, L_Hf: float, norm_v: float, norm_q: float,
                       norm_lam: float, energy: tuple[float, float] | None = None,
                       a_lam: float | None = None) -> dict[str, float]:
    """Corollary 15.3's terms (g not quadratic, B affine in x; docs/bounds.md 15.3), by name:
    they replace RE, vE, EE of `product_terms` and add lamA, third, upperH.

    With nq = ||q|| + R/mu >= ||q_e||, nv = ||v|| + R_v/mu >= ||v_e||, c_v = (||D_u|| + L_A nv)/mu
    (||v* - v_e|| <= c_v E) and J = L_f + L_A nq:
        RE     = (||D_u|| + L_A ||v||) R E/mu
        vE     = J R_v E/mu                  EE     = c_v J E^2
        lamA   = L_A ||lam|| E^2/2           third  = L_3 (nv + c_v E) nq E^2/2
        upperH = L_Hf (nv + c_v E) E^2/2
    With L_A = L_3 = L_Hf = 0 they are Corollary 15.2's. energy = (a_q, a_v), bounds on
    ||DA(x_eps)[e] q|| and ||DA(x_eps)[e] v|| (`energy.Energy`, docs/bounds.md 15.9): then J E and
    c_v E are also bounded by L_f E + a_q + L_A R E/mu and
    (||D_u|| E + a_v + L_A R_v E/mu + L_3 nv E^2/2)/mu, RE by (||D_u|| E + a_v) R/mu, and each
    takes the smaller of its two forms. a_lam >= ||DA(x_eps)[e] lam|| (docs/bounds.md 15.10)
    bounds lamA by a_lam E/2 + L_3 ||lam|| E^3/6 likewise."""
    nq = norm_q + R / mu
    nv = norm_v + R_v / mu
    JE = certified_product(L_f + certified_product(L_A, nq), E)    # >= ||DA[e] q_e - H_f e||
    cvE = certified_product(norm_D + certified_product(L_A, nv), E) / mu   # >= ||v* - v_e||
    RE = certified_product(norm_D + certified_product(L_A, norm_v), R, E) / mu
    if energy is not None:
        a_q, a_v = energy
        JE = min(JE, certified_product(L_f, E) + a_q + certified_product(L_A, R, E) / mu)
        cvE = min(cvE, (certified_product(norm_D, E) + a_v + certified_product(L_A, R_v, E) / mu
                        + 0.5 * certified_product(L_3, nv, E, E)) / mu)
        RE = min(RE, certified_product(certified_product(norm_D, E) + a_v, R) / mu)
    lamA = 0.5 * certified_product(L_A, norm_lam, E, E)
    if a_lam is not None:
        lamA = min(lamA, 0.5 * certified_product(a_lam, E)
                   + certified_product(L_3, norm_lam, E, E, E) / 6)
    nv_star = nv + cvE
    return {
        "RE": RE,
        "vE": certified_product(JE, R_v) / mu,
        "EE": certified_product(cvE, JE),
        "lamA": lamA,
        "third": 0.5 * certified_product(L_3, nv_star, nq, E, E),
        "upperH": 0.5 * certified_product(L_Hf, nv_star, E, E),
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
    dwr = math.hypot(*(p.bound for p in corr.parts))  # no square underflows (1e-180)
    plain = math.hypot(*(p.plain_bound for p in corr.parts))
    return h_c, min(dwr, norm(shift) + hg.bound), min(plain, hg.bound)
