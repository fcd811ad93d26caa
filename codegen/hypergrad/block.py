"""The block correction: every component of the DWR-corrected hypergradient from two solves,
whatever the number of hyperparameters (docs/bounds.md 15.8).

The per-direction correction (correction.py) pays a forward and a dual solve for each
component, so with many hyperparameters (a weight per feature or per sample) it certifies only
the component along h. But the correction is linear in the direction u, and its two solves can
be turned around: with w ~ A^{-1} grad g(x_eps) (a Newton direction) and
t ~ A^{-1} (r + H_f w - T[w, q]) (r = A q - grad f, the adjoint residual),

    h_c = h + B(x_eps)^T t + G_w,   G_w = d/ds B(x_eps + s w)^T q,

holds every component at once. Its bound (Theorem 15.8) is Corollary 15.3's with exact forward
and dual solutions, whose norms are bounded by ||B(x_eps)||/mu and ||m||/mu for every unit u,
plus two first-order terms in the recomputed residuals of w and t, which the rounds plan from
the target. G_w is two cross VJPs when B is affine in x, else one `cross_tvp` call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from .accuracy import (
    MAX_ROUNDS,
    TIGHT_RELATIVE,
    Round,
    add_correction_work,
    add_work,
    bound_parts,
    check_targets,
)
from .bounds import ROUNDING_FLOOR, certified_product, distance_from_step
from .common import call_kernel, fmt, grad_norm, norm
from .correction import (
    adjoint_residual,
    cross_lipschitz,
    cross_term,
    nonquadratic_terms,
    product_terms,
    uses_general_terms,
)
from .floors import (
    BLOCK_ROUNDING_GOAL,
    CAPPED_NOTE,
    adjoint_stalled,
    capped_only,
    caps_met,
    correction_iterations,
    exactly_zero,
    floor_accepted,
    floor_failure,
    lower_stalled,
    lowest_eps,
    lowest_residual,
    next_delta,
    next_eps,
    own_bound,
    round_failed,
    round_ok,
    rounding_failure,
    rounding_goal,
    rounds_out,
    solve_again,
    solve_floor,
    uncorrected,
)
from .local_third import LOCAL_Q, higher_constants, q_curvature, with_local_q
from .plans import sharpen_budget, sharpen_factor
from .results import HypergradientResult, Reason, ReasonKind, evolve
from .solve import correction_solve

__all__ = ["BlockCorrection", "block_correct", "block_unavailable", "solve_weights",
           "block_to_accuracy", "block_tightened", "second_order_factors", "SOLVE_SHARE",
           "ERROR_SHARE", "SECOND_SHARE"]


@dataclass(frozen=True)
class BlockCorrection:
    """h_c = h + B^T t + G_w for every component, with bound >= ||h_c - grad F||.

    terms   the bound's terms by name (docs/bounds.md 15.8);
    w, t    the two solves' iterates (warm starts of the next round), R_w, R_t their true
            residuals;
    E       the certified ||x_eps - x*|| the terms read: G/mu, or the refined distance from
            the Newton step w (docs/bounds.md 5) where that is smaller;
    shift   h_c - h: the correction's estimate of h's error (steering and the plain bound)."""

    grad: np.ndarray
    bound: float
    terms: dict[str, float]
    shift: np.ndarray
    w: np.ndarray
    t: np.ndarray
    R: float
    R_w: float
    R_t: float
    E: float
    work: dict[str, int] = field(default_factory=dict)

    @property
    def plain_bound(self) -> float:
        """>= ||h - grad F||: ||h - h_c|| + bound (triangle inequality)."""
        return norm(self.shift) + self.bound


def block_unavailable(k: Any, theta: np.ndarray) -> str | None:
    """None if the block correction applies to k at theta, else why not: beyond what
    `correction.dwr_unavailable` asks, B not affine in x needs the `cross_tvp` kernel for G_w
    (the caller checks dwr_unavailable first)."""
    if cross_lipschitz(k, theta) == 0.0 or hasattr(k, "cross_tvp"):
        return None
    return ("B = d_theta grad_x g is not affine in x and the problem has no cross_tvp kernel "
            "(d/ds B(x + s w)^T q, the block correction's G_w)")


def solve_weights(hg: HypergradientResult) -> tuple[float, float]:
    """(c_t, c_w): the factors of the block bound's two first-order terms, t = c_t R_t and
    w = c_w R_w (docs/bounds.md 15.8): c_t = ||B||/mu, c_w = (||B|| J/mu + L_B ||q||)/mu with
    J = L_f + L_A ||q|| (or L_f + LA_q, the local bound on ||DA(x_eps)[q]||, docs/bounds.md 15.10,
    where it is smaller: y(a) = H_f a - DA[q] a). The rounds plan the two solves' tolerances from them."""
    c = dict(hg.constants) if isinstance(hg.constants, dict) else {}
    mu, nB, nq = float(c["mu"]), float(hg.norm_B), float(hg.q_norm)
    J = float(c["L_f"]) + q_curvature(c, nq)
    return nB / mu, (certified_product(nB, J) / mu + certified_product(float(c["L_B"]), nq)) / mu


def block_correct(k: Any, hg: HypergradientResult, tol_w: float, tol_t: float, w0: Any,
                  t0: Any, max_iter: int, dense: dict[str, Any] | None = None) -> BlockCorrection:
    """Theorem 15.8 at hg's x_eps and q: the solves A w = grad g(x_eps) and
    A t = r + H_f w - T[w, q] (CG to tol_w, tol_t, warm-started from w0, t0), G_w, h_c and the
    bound on ||h_c - grad F||. Work: HVPs (the two CGs, r, T[w, q]), upper HVPs, cross calls."""
    th = np.asarray(hg.theta, dtype=np.float64)
    x, q = np.asarray(hg.x), np.asarray(hg.q)
    c = dict(hg.constants) if isinstance(hg.constants, dict) else {}
    r, used = adjoint_residual(k, hg)
    b, _ = call_kernel(k.upper_grad, x, th)  # for the rounding term
    if b is None:
        raise FloatingPointError("grad_x f not finite at x_eps")
    work = {"hvps": used, "cross": 1, "upper": 1}
    r_g = np.asarray(hg.lower.grad)  # type: ignore[union-attr]
    newton = correction_solve(k, hg, c, max(tol_w, lowest_residual(r_g)), w0, max_iter, r_g, dense)
    work["hvps"] += newton.n_hvp
    w = newton.q
    Hw, _ = call_kernel(k.upper_hvp, x, th, w)
    if Hw is None:
        raise FloatingPointError("the upper HVP H_f w is not finite")
    y = Hw
    Twq = np.zeros_like(w)
    if not bool(getattr(k, "is_quadratic", False)):
        T, _ = call_kernel(k.lower_tvp, x, th, w, q)
        work["hvps"] += 1
        if T is None:
            raise FloatingPointError("the lower third-derivative product T[w, q] is not finite")
        Twq = T
        y = Hw - Twq
    sol = correction_solve(k, hg, c, max(tol_t, lowest_residual(r + y)), t0, max_iter, r + y, dense)
    work["hvps"] += sol.n_hvp
    t = sol.q
    Bt, _ = call_kernel(k.cross_vjp, x, th, t)
    if Bt is None:
        raise FloatingPointError("the cross VJP B^T t is not finite")
    # w is a Newton step at x_eps with its true residual: the refined ||x_eps - x*|| for free
    # (docs/bounds.md 5), often far below G/mu after Newton, and every term in E reads it
    E = distance_from_step(float(hg.e), norm(w), newton.residual, float(c["mu"]),
                           float(c.get("L_A", math.inf)))
    L_DB = cross_lipschitz(k, th, x, E)  # B(x_eps, E) holds x*
    G_w, G_parts = _cross_tangent(k, x, th, q, w, L_DB)
    work["cross"] += len(G_parts)
    shift = Bt + G_w
    terms = _terms(k, hg, c, th, L_DB, norm(r), newton.residual, sol.residual, E)
    # rounding (docs/bounds.md 6): of B^T t and G_w (its two VJPs cancel), and of the right-hand
    # side r + y (its error reaches h_c through B^T A^{-1})
    nB, mu = float(hg.norm_B), float(c["mu"])
    terms["rounding"] = (ROUNDING_FLOOR * (norm(Bt) + sum(G_parts) + nB * (
        norm(r + b) + norm(b) + norm(Hw) + norm(Twq)) / mu) + hg.bound_forms.get("rounding", 0.0))
    bound = math.fsum(terms.values())
    if not math.isfinite(bound):
        bound = math.inf
    return BlockCorrection(np.asarray(hg.grad) + shift, bound, terms, shift, w, t, norm(r),
                           newton.residual, sol.residual, E, work)


def _terms(k: Any, hg: HypergradientResult, c: dict[str, Any], th: np.ndarray, L_DB: float,
           R: float, R_w: float, R_t: float, E: float) -> dict[str, float]:
    """Theorem 15.8's terms: Corollary 15.3's or 15.2's at the exact v and lam of every unit u
    (R_v = R_lam = 0, ||v|| <= ||B||/mu, ||lam|| <= ||m||/mu) and the solves' t, w, with
    E >= ||x_eps - x*|| certified; L_DB from `cross_lipschitz` on B(x_eps, E)."""
    mu, nB, nq = float(c["mu"]), float(hg.norm_B), float(hg.q_norm)
    LB, Lf, LA = float(c["L_B"]), float(c["L_f"]), float(c.get("L_A", 0.0))
    ft = float(c.get("L_ft", 0.0)) if bool(getattr(k, "upper_depends_on_theta", False)) else 0.0
    c_t, c_w = solve_weights(hg)
    terms = product_terms(mu, E, R, 0.0, 0.0, LB, Lf, ft)
    if uses_general_terms(k):
        L3, LHf = higher_constants(k, th, hg.x, E)  # B(x_eps, e) holds x*
        nv = nB / mu
        m_norm = certified_product(LB, nq) + certified_product(Lf + q_curvature(c, nq), nv)
        local = None  # docs/bounds.md 15.10: ||DA[e] q|| <= LA_q E; v is every v_u, no local one
        if LOCAL_Q in c:
            local = (certified_product(float(c[LOCAL_Q]), E), certified_product(LA, nv, E))
        terms.update(nonquadratic_terms(mu, E, R, 0.0, LB, Lf, LA, L3, LHf, nv, nq,
                                        m_norm / mu, local))
        if L_DB > 0:
            terms["crossB"] = cross_term(mu, E, R, L_DB, nq)
    terms["t"] = certified_product(c_t, R_t)
    terms["w"] = certified_product(c_w, R_w)
    return terms


def _cross_tangent(k: Any, x: np.ndarray, th: np.ndarray, q: np.ndarray, w: np.ndarray,
                   L_DB: float) -> tuple[np.ndarray, list[float]]:
    """(G_w = d/ds B(x + s w)^T q at x_eps, the norms of the kernel outputs it came from). B
    affine in x (L_DB = 0): B(w)^T q - B(0)^T q exactly, two cross VJPs; otherwise one
    `cross_tvp` call."""
    if L_DB == 0.0:
        Bw, _ = call_kernel(k.cross_vjp, w, th, q)
        B0, _ = call_kernel(k.cross_vjp, np.zeros_like(x), th, q)
        if Bw is None or B0 is None:
            raise FloatingPointError("a cross VJP is not finite")
        return Bw - B0, [norm(Bw), norm(B0)]
    G, _ = call_kernel(k.cross_tvp, x, th, q, w)
    if G is None:
        raise FloatingPointError("the cross derivative d/ds B(x + s w)^T q (cross_tvp) is not "
                                 "finite")
    return G, [norm(G)]


#: Share of the target each of the block bound's first-order terms (t, w) is planned at: the
#: two solves stop where c_t R_t and c_w R_w are this fraction of atol + rtol ||h||. Newton lands
#: h's error at 0.001-0.1 of the target, so at a tenth t and w made most of the bound (2-D TV,
#: 12 x 12: bound / true error 3-12.6, median 6.95); at 0.03 the median is 2.95 for 4% more work
#: (`bench_certificate.py --quick`'s block rows: 1.2-3.5 -> 1.04-3.2 times the error).
SOLVE_SHARE = 0.03

#: Share of the target h's error estimate ||h - h_c|| is aimed at when a round tightens eps and
#: delta; the second-order terms, planned at SECOND_SHARE, and the solves' take the rest.
ERROR_SHARE = 0.5
SECOND_SHARE = 0.2


def block_to_accuracy(run: Round, k: Any, rtol: float | None, atol: float, eps: float,
                      delta: float, x0: Any, q0: Any, refine_iter: int, max_iter: int,
                      max_rounds: int = MAX_ROUNDS, dense: dict[str, Any] | None = None
                      ) -> HypergradientResult:
    """The plain h with the block bound ||h - h_c|| + bound(h_c) (docs/bounds.md 15.8), in
    rounds until it meets atol + rtol ||h|| (one round at eps, delta without a target).

    Each round: run (a plain hypergradient with E&R's bound at eps, delta, warm-started), then
    `block_correct` with its two solves planned from the target (`SOLVE_SHARE`) and warm-started
    from the last round's. A round that misses the target tightens eps and delta by the factors
    `block_tightened` reads off h's error estimate and the second-order terms; a met bound far
    above that estimate is sharpened where its two solves are cheap (`_sharpened`). A target
    below the rounding floor is aimed at BLOCK_ROUNDING_GOAL times the correction's rounding
    terms instead, and the rounds end there with "accuracy floor" (`floors.rounding_goal`). A round
    whose plain hypergradient is not "ok" is returned as it is, or, after a corrected round,
    that round with the failure named (`floors.round_failed`)."""
    steer = rtol is not None or atol != 0
    if steer:
        check_targets(0.0 if rtol is None else rtol, atol)
    total = {"lower_grads": 0, "hvps": 0, "cross": 0, "units": 0}
    trail: list[str] = []
    starts: tuple[Any, Any] = (None, None)
    refine = 0 if steer else refine_iter
    failure: str | None = None
    kind = ReasonKind.ACCURACY
    corr: BlockCorrection | None = None
    plain = target = math.inf
    replanned, floor_goal = False, 0.0
    done = cast(HypergradientResult, None)  # the round corr was made at, once there is one
    for _ in range(max_rounds if steer else 1):
        hg = floor_accepted(run(eps, delta, x0, q0, refine))
        add_work(total, hg.work)
        if round_ok(hg):
            hg, passes = with_local_q(k, hg)
            add_work(total, {"hvps": passes, "units": passes})
        restart = solve_again(hg, steer, rtol, atol, (eps, delta, x0, q0), TIGHT_RELATIVE, trail)
        if restart is not None:
            eps, delta, x0, q0 = restart
            continue
        capped = steer and capped_only(hg) and _correctable(k, hg)  # corrected once, then the rounds end
        if (not round_ok(hg) and not capped) or exactly_zero(hg):
            if corr is None or (hg.certified and hg.bound <= plain):  # its own bound is better
                return own_bound(hg, total, "block")
            return _block_result(done, corr, plain, total, trail,
                                 Reason(ReasonKind.ACCURACY, round_failed(hg)))
        target = atol + (rtol or 0.0) * grad_norm(hg.grad)
        # the target, or where the rounding floor lets it be (E&R's rounding terms before the
        # correction's are known: no solve is planned below them)
        aim = max(target, floor_goal, rounding_goal(hg.bound_forms.get("rounding", 0.0), 1, BLOCK_ROUNDING_GOAL))
        f_E, f_R = (1.0, 1.0) if replanned or not steer or capped else second_order_factors(
            _second_order_terms(k, hg), aim)
        replanned = True
        if min(f_E, f_R) < 0.5:  # over the second-order plan: a warm re-solve, no correction
            trail.append(f"eps={fmt(eps)}, delta={fmt(delta)}: E={fmt(hg.e)}, R={fmt(hg.R)} "
                         f"over the second-order terms' plan")
            eps, delta, x0, q0 = next_eps(eps, f_E * hg.e, hg), next_delta(delta, f_R * hg.R, hg), hg.x, hg.q
            continue
        kept, corr = (corr, plain, done), block_correct(
            k, hg, *_solve_tolerances(hg, aim if steer else math.nan), *starts,
            correction_iterations(max_iter, total, 2 if capped else 0), dense)
        add_correction_work(total, corr.work)
        plain, done = min(corr.plain_bound, hg.bound), hg
        refined = f", E = {fmt(corr.E)} from w" if corr.E < hg.e else ""
        trail.append(f"eps={fmt(eps)}, delta={fmt(delta)}: plain bound {fmt(plain)}{refined}")
        if capped and plain > target:  # its solve would stop at max_iter again
            return _capped_end(kept, (corr, plain, done), total, trail)
        done = caps_met(hg) if capped else done
        floor_goal = max(floor_goal, rounding_goal(corr.terms["rounding"], 1, BLOCK_ROUNDING_GOAL))
        aim = max(target, floor_goal)
        if steer and target < plain <= aim:  # as close as the rounding floor lets it get
            kind = ReasonKind.ACCURACY_FLOOR
            failure = rounding_failure(target, corr.terms["rounding"], plain, "block bound")
            break
        if not steer or plain <= target:
            if steer:
                corr = _sharpened(k, hg, corr, plain, total, trail, dense)
                plain = min(corr.plain_bound, hg.bound)
            break
        f_E, f_R = block_tightened(hg, corr, aim)
        planned = next_eps(eps, f_E * hg.e, hg, aim > target), next_delta(delta, f_R * hg.R, hg)
        # the lower solve at its floor, or the adjoint with nothing left to tighten
        at_floor = lower_stalled(hg) or eps <= lowest_eps(hg, aim > target)
        if at_floor or (planned == (eps, delta) and adjoint_stalled(hg)):
            kind = ReasonKind.ACCURACY_FLOOR
            failure = floor_failure(target, solve_floor(hg, at_floor), plain, "block bound")
            break
        eps, delta = planned
        x0, q0, refine, starts = hg.x, hg.q, refine_iter, (corr.w, corr.t)
    else:
        failure = rounds_out(max_rounds, "block bound", plain, target)
    if corr is None:  # every round was a zero trap or had a target of 0
        return uncorrected(hg, total, failure, kind)
    return _block_result(done, corr, plain, total, trail,
                         None if failure is None else Reason(kind, failure))


#: A capped round's block correction is skipped where the bound's terms at the round's E and R
#: (t = w = 0) exceed its own E&R bound this many times: w may refine E (a logistic example with
#: fista capped at 20 steps: E 0.019 -> 0.0033, the terms 2.2 times E&R's bound before, the
#: corrected bound 15 times below it after), and E^2 terms fall with its square. A learned filter
#: far from its optimum had them at 5e7 times E&R's bound, and its two CGs ran to their caps.
CORRECTABLE_MARGIN = 100.0


def _correctable(k: Any, hg: HypergradientResult) -> bool:
    """Whether the block bound may come below a capped round's own E&R bound: its terms at the
    round's E and R, before any solve, are within CORRECTABLE_MARGIN of it. Steering only (the
    bound is the one computed)."""
    return math.fsum(_second_order_terms(k, hg).values()) < CORRECTABLE_MARGIN * hg.bound


def _capped_end(kept: tuple[Any, float, Any], last: tuple[BlockCorrection, float, HypergradientResult],
                total: dict[str, int], trail: list[str]) -> HypergradientResult:
    """The block rounds' end at a round whose solves were capped (`floors.capped_only`) and
    whose correction did not meet the target: the smaller plain bound (its correction's or its
    own E&R's, `last`) or the corrected round before it (`kept`), the caps named."""
    corr, plain, hg = last
    trail.append(CAPPED_NOTE)
    if kept[0] is not None and kept[1] < plain:
        return _block_result(kept[2], kept[0], kept[1], total, trail,
                             Reason(ReasonKind.ACCURACY, round_failed(hg)))
    if hg.bound <= plain:
        return own_bound(hg, total, "block")
    return _block_result(hg, corr, plain, total, trail, None)  # hg's reasons: its caps


def _sharpened(k: Any, hg: HypergradientResult, corr: BlockCorrection, plain: float,
               total: dict[str, int], trail: list[str],
               dense: dict[str, Any] | None = None) -> BlockCorrection:
    """corr, or a sharper one from t and w solved again (warm) until their terms leave
    bound(h_c) about 2 ||h - h_c||, when the plain bound (the smaller of the two) is over
    SHARPEN_RATIO times the estimate, t and w make most of bound(h_c) (nothing else is
    sharpened: E and R are h's own accuracy) and their first solves cost at most what
    `sharpen_budget` allows; each CG is capped at half that budget (each also checks its true
    residual, and the correction's products are made again: up to about twice the budget
    where the CGs take few steps). Steering only: the bound returned is the one computed for
    the solves returned. Adds the work to total and a note to trail."""
    gap = norm(corr.shift)
    solves = corr.terms["t"] + corr.terms["w"]
    rest = corr.bound - solves
    budget = sharpen_budget(plain, gap, total["units"], corr.terms["rounding"])
    if (solves <= 0.5 * corr.bound or not budget > 0
            or corr.work["hvps"] + corr.work["upper"] > budget):
        return corr
    f = sharpen_factor(gap, rest, solves)
    c_t, c_w = solve_weights(hg)
    try:
        sharp = block_correct(k, hg, _tolerance(f * corr.terms["w"], c_w),
                              _tolerance(f * corr.terms["t"], c_t), corr.w, corr.t,
                              max(int(budget / 2), 1), dense)
    except FloatingPointError:  # the first correction's kernels were finite: keep it
        return corr
    add_correction_work(total, sharp.work)
    trail.append(f"t and w solved again: plain bound {fmt(sharp.plain_bound)}")
    return sharp if sharp.plain_bound < corr.plain_bound else corr


def _second_order_terms(k: Any, hg: HypergradientResult) -> dict[str, float]:
    """The block bound's terms at hg's E and R before any solve (t = w = 0): what the first
    round's plan reads."""
    th = np.asarray(hg.theta, dtype=np.float64)
    return _terms(k, hg, dict(cast(dict[str, Any], hg.constants)), th,
                  cross_lipschitz(k, th, hg.x, float(hg.e)), float(hg.R), 0.0, 0.0,
                  float(hg.e))


#: The pure E^2 terms of the block bound (the theta term is linear in E, RE is R E).
E_SQUARED = ("EE", "lamA", "third", "upperH", "crossB")


def second_order_factors(terms: dict[str, float], target: float) -> tuple[float, float]:
    """(f_E, f_R): factors on E and R that bring the block bound's terms other than t, w and
    rounding within SECOND_SHARE of the target: half of it for the E^2 terms (f_E^2), a quarter
    for theta (linear in E) and a quarter for RE (f_E f_R). R is only tightened for RE: the
    E^2 terms do not read it, and a needlessly tight adjoint lands h's error far below the
    target. (1, 1) when within. Steering only."""
    share = SECOND_SHARE * target
    squared = math.fsum(terms.get(key, 0.0) for key in E_SQUARED)
    f_E = math.sqrt(0.5 * share / squared) if squared > 0.5 * share else 1.0
    theta = terms.get("theta", 0.0) * f_E
    if theta > 0.25 * share:
        f_E *= 0.25 * share / theta
    re = terms.get("RE", 0.0) * f_E
    f_R = 0.25 * share / re if re > 0.25 * share else 1.0
    return f_E, f_R


def _tolerance(term: float, weight: float) -> float:
    """The residual at which weight * residual = term (any residual when weight is 0)."""
    return term / weight if weight > 0 else math.inf


def _solve_tolerances(hg: HypergradientResult, target: float) -> tuple[float, float]:
    """(tol_w, tol_t): the residuals at which c_w R_w and c_t R_t are SOLVE_SHARE of the target;
    without a target (nan), TIGHT_RELATIVE times each right-hand side's size, ||grad g|| = G
    and ||r + y|| <= R + J G/mu (||y(w)|| <= J ||w||, J = L_f + L_A ||q||)."""
    c_t, c_w = solve_weights(hg)
    if not math.isfinite(target):
        c = cast(dict[str, Any], hg.constants)
        G, mu = float(hg.G), float(c["mu"])
        J = float(c["L_f"]) + q_curvature(c, float(hg.q_norm))
        return TIGHT_RELATIVE * G, TIGHT_RELATIVE * (float(hg.R) + certified_product(J, G) / mu)
    share = SOLVE_SHARE * target
    return _tolerance(share, c_w), _tolerance(share, c_t)


def block_tightened(hg: HypergradientResult, corr: BlockCorrection,
                    target: float) -> tuple[float, float]:
    """(f_E, f_R): factors on the round's E and R for the next round. h's error estimate
    ||h - h_c|| is about linear in E and R and is brought within ERROR_SHARE of the target by
    scaling both: the estimate does not say which solve it comes from (t solves for both
    parts at once; E&R's parts, measured, pointed at the wrong one on hypercleaning), and
    a tighter lower solve costs Newton a step. Only a part that E&R's own bound on it
    (`bound_parts`, an upper bound) does not already put within a quarter of that share is
    tightened: a lower solve at its rounding floor is not asked for more. The second-order
    terms (products of E and R) are brought within SECOND_SHARE of the target by
    `second_order_factors`. Steering only."""
    gap = norm(corr.shift)
    f = min(1.0, ERROR_SHARE * target / gap) if gap > 0 else 1.0
    r_part, e_part, _ = bound_parts(hg)
    small = 0.25 * ERROR_SHARE * target
    f_E, f_R = second_order_factors(corr.terms, target)
    f_E, f_R = min(f_E, 1.0 if e_part <= small else f), min(f_R, 1.0 if r_part <= small else f)
    return (0.5, 0.5) if f_E == f_R == 1.0 else (f_E, f_R)  # the sum tipped it: halve both


def _block_result(hg: HypergradientResult, corr: BlockCorrection, plain: float,
                  total: dict[str, int], trail: list[str],
                  failure: Reason | None) -> HypergradientResult:
    """hg (the plain h) with the bound min(||h - h_c|| + bound(h_c), E&R's), h_c and its bound
    kept, the work of every round and the rounds' trail."""
    local = ("; ||DA[q]|| from the data, 15.10" if isinstance(hg.constants, dict)
             and LOCAL_Q in hg.constants else "")
    notes = tuple(hg.notes) + (f"block DWR certificate (docs/bounds.md 15.8{local}) rounds: "
                               + "; ".join(trail),)
    reasons = hg.reasons if failure is None else hg.reasons + (failure,)
    return evolve(
        hg, bound=plain, work=total, notes=notes, reasons=reasons, certificate="block",
        corrected_grad=corr.grad, corrected_bound=corr.bound, correction_terms=dict(corr.terms),
        certified=bool(hg.certified and math.isfinite(plain)),
        bound_forms=dict(hg.bound_forms, er=hg.bound, dwr=corr.bound, plain=plain))
