"""A hypergradient to a requested certified accuracy: bound <= atol + rtol ||grad||.

Fixed tolerances (eps for the lower solve, delta for the adjoint residual) are the wrong dials
for a user who wants "the hypergradient to six digits": which of the two limits the bound, and
how far, depends on ||B||, mu, L_f, L_A, ||q||, known only at run time. But the bound is computable
at run time, so it can steer the solvers. Round after round, warm-started from the previous
round's x and q, each part of the bound that exceeds its share of the target tightens its own
tolerance in proportion:

    R part   (||B|| / mu) R, linear in the adjoint residual R     -> delta := R * share / R part
    e part   the rest, about linear in e >= ||x - x*||            -> eps := e * share / e part

until the bound meets the target or a round fails, stalls at the rounding floor or runs out.
The first round runs at the caller's eps and delta, or, left at their defaults, at 1e-3 rtol
(`first_tolerances`): near where the rounds usually end, so that one round often suffices.
eps is never asked below eps_machine ||x|| (`stopping.solution_floor`); a target that needs
less, or a lower solve that stagnates at its rounding floor, ends the rounds with the status
"accuracy floor" and the best certified bound reached (a valid certificate, not a failure).
Every round's result is a complete certified hypergradient; only the last is returned, with
the work of all rounds.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Protocol, cast

import numpy as np

from .bounds import aposteriori_bound, certified_product
from .common import SolverError, fmt, grad_norm
from .correction import (
    Correction,
    combined,
    companion_starts,
    correct,
    cross_lipschitz,
    forward_companion,
    higher_constants,
    uses_general_terms,
)
from .floors import (
    adjoint_stalled,
    floor_accepted,
    floor_failure,
    lower_stalled,
    lowest_eps,
    next_delta,
    next_eps,
    solve_again,
    uncorrected,
    unrefined_e,
)
from .options import DEFAULTS
from .results import HypergradientResult, Reason, ReasonKind, evolve

__all__ = ["to_accuracy", "check_targets", "bound_parts", "first_tolerances", "Round",
           "corrected_to_accuracy", "dwr_tightened", "dwr_planned", "plain_tightened",
           "tight_planned", "MAX_ROUNDS", "SHARE", "DWR_SHARE", "TIGHT_RELATIVE", "add_work",
           "TIGHT_PLAN_SHARE", "TIGHT_FIRST_ROUND", "add_correction_work"]

#: Rounds (each a warm-started lower solve, adjoint solve and bound) before giving up.
MAX_ROUNDS = 8

#: Fraction of the target each of the two parts aims at (the rest absorbs the e R cross term,
#: the rounding floor and the change of ||grad|| between rounds).
SHARE = 0.4

_WORK_KEYS = ("lower_grads", "hvps", "cross", "units")

#: With rtol and eps, delta left at the options' defaults, the first round runs at
#: eps = delta = FIRST_ROUND * rtol (`first_tolerances`). Over the examples (docs/bounds.md 12)
#: the rounds' final eps / rtol had a median of 5e-4 and the final delta / rtol one of 6e-3, so
#: this first round often ends the rounds; where it does not, the warm starts carry its work
#: over. Like the defaults it is absolute: a problem scaled far from the examples' pays for it
#: (measured in docs/bounds.md 12).
FIRST_ROUND = 1e-3

#: The tightest first round: far enough above the rounding floor eps_machine ||x|| of a lower
#: solve (||x|| up to about 1e5) that the first round, blind to ||x||, does not stall there.
FIRST_FLOOR = 1e-9


def bound_parts(hg: HypergradientResult) -> tuple[float, float, float]:
    """(R part, e part, rounding floor) of hg.bound; averaged over samples for several samples.

    R part = the bound at e = 0 (the adjoint residual's own contribution); e part = the rest
    above the floor (every term with e, including the e R cross term)."""
    if hg.samples is not None:
        r_mean, e_mean, floor_mean = np.array([bound_parts(s) for s in hg.samples]).mean(axis=0)
        return float(r_mean), float(e_mean), float(floor_mean)
    rounding = hg.bound_forms.get("rounding", 0.0)
    r_part, _ = aposteriori_bound(cast(dict[str, Any], hg.constants), 0.0, hg.R, hg.norm_B, hg.grad_f_norm, hg.q_norm)
    return r_part, max(hg.bound - rounding - r_part, 0.0), rounding


class Round(Protocol):
    """run(eps, delta, x0, q0, refine_iter) -> one round's result; with `companion` (a
    krylov.Companion), a system solved alongside the round's adjoint CG."""

    def __call__(self, eps: float, delta: float, x0: Any, q0: Any, refine: int,
                 companion: Any = None) -> HypergradientResult: ...


#: The rounds of E&R's bound: no companion.
PlainRound = Callable[[float, float, Any, Any, int], HypergradientResult]


def first_tolerances(rtol: float, eps: float, delta: float,
                     tight: bool = False) -> tuple[float, float]:
    """The first round's (eps, delta) for a call asking bound <= atol + rtol ||grad||.

    Given eps or delta (anything but the options' defaults) are the caller's plan (the learning
    loops predict them from the previous point) and are kept. At the defaults the first round
    aims near the usual end point: the final tolerances depend on ||h||, which nothing known
    before a solve predicts (docs/bounds.md 12), but they scale with rtol. E&R's rounds start
    at FIRST_ROUND * rtol, never looser than the defaults; the tight rounds (tight=True), whose
    bound is within a few times h's error, at the target itself: TIGHT_FIRST_ROUND * rtol as
    it is. Steering only: every round's bound is certified by itself."""
    if not rtol > 0 or eps != DEFAULTS.eps or delta != DEFAULTS.delta:
        return eps, delta
    if tight:
        first = max(TIGHT_FIRST_ROUND * rtol, FIRST_FLOOR)
        return first, first
    first = max(FIRST_ROUND * rtol, FIRST_FLOOR)
    return min(eps, first), min(delta, first)


def check_targets(rtol: float, atol: float) -> None:
    """SolverError unless rtol and atol are finite, >= 0 and not both 0 (before any work)."""
    if not (rtol >= 0 and atol >= 0 and rtol + atol > 0) or not math.isfinite(rtol + atol):
        raise SolverError(f"rtol and atol must be finite and >= 0, not both 0 "
                          f"(got rtol={rtol!r}, atol={atol!r})")


def to_accuracy(run: PlainRound, rtol: float, atol: float, eps: float, delta: float, x0: Any,
                q0: Any, refine_iter: int, max_rounds: int = MAX_ROUNDS) -> HypergradientResult:
    """Call run(eps, delta, x0, q0, refine_iter) -> HypergradientResult until
    bound <= atol + rtol ||grad||; the first round runs at `first_tolerances(rtol, eps, delta)`
    (eps and delta themselves unless they are the options' defaults).

    A round whose status is not "ok" (a capped or failed solve, a zero trap) ends the loop: its
    result is returned as it is. Stated (uncertified) constants do not: the bound holds under
    them, so rtol/atol steer it like a certified one. The refinement of ||x - x*|| (refine_iter
    HVPs) is skipped in the first round, which only measures the parts, and in a
    later round when the lower solve's own certificate G/mu <= eps keeps the e part within its
    share. The returned result's work sums all rounds; its notes list the rounds' tolerances.
    """
    check_targets(rtol, atol)
    eps, delta = first_tolerances(rtol, eps, delta)
    total = dict.fromkeys(_WORK_KEYS, 0)
    trail: list[str] = []
    refine = 0  # the first round only measures the parts: no refinement yet
    failure: str | None = None
    kind = ReasonKind.ACCURACY
    for _ in range(max_rounds):
        hg = floor_accepted(run(eps, delta, x0, q0, refine))
        add_work(total, hg.work)
        trail.append(f"eps={fmt(eps)}, delta={fmt(delta)}: bound {fmt(hg.bound)}")
        target = atol + rtol * grad_norm(hg.grad)
        if hg.bound <= target or not steerable(hg):  # the target met: no more to steer
            break
        r_part, e_part, rounding = bound_parts(hg)
        share = SHARE * target
        lowest = lowest_eps(hg)
        stalled = lower_stalled(hg) or (e_part > share and eps <= lowest)
        # the adjoint at its rounding floor with its part over its share, and nothing left
        # to tighten in e
        adjoint_floor = adjoint_stalled(hg) and r_part > share and e_part <= share
        if not stalled and rounding >= (1 - 2 * SHARE) * target and not rounding > 0:
            failure = (f"certified accuracy unreachable: atol + rtol ||grad|| = {fmt(target)}")
            break   # a zero target (h = 0 with atol = 0): no floor, the caller tightens
        if stalled or adjoint_floor or rounding >= (1 - 2 * SHARE) * target:
            kind = ReasonKind.ACCURACY_FLOOR
            why = (f"the lower solve reached its rounding floor, e = {fmt(hg.e)}" if stalled
                   else f"the adjoint solve reached its rounding floor, R = {fmt(hg.R)}"
                   if adjoint_floor else f"the rounding floor {fmt(rounding)} of the bound")
            failure = floor_failure(target, why, hg.bound)
            break
        tightened = False
        # the e <= eps that keeps the e part within its share (the e part is about linear in e)
        needed = hg.e * share / e_part if e_part > 0 else math.inf
        if r_part > share and not adjoint_stalled(hg):
            delta, tightened = min(delta, hg.R * share / r_part), True
        if e_part > share:
            eps, tightened = max(min(eps, needed), lowest), True
        if not tightened:  # both parts within share, the cross term or ||grad|| tipped it
            # (never to 0: a zero e or R is exact already, and a tolerance of 0 is never met)
            eps = max(0.5 * min(eps, hg.e), lowest) if hg.e > 0 else eps
            delta = next_delta(delta, 0.5 * min(delta, hg.R), hg) if hg.R > 0 else delta
        # The next lower solve, warm-started at x, certifies e <= min(eps, G/mu at x) by itself
        # (it tests before its first step); refine only where that is not enough (eps held at
        # the floor `lowest`, or a refined e kept the e part small). `needed` is the very float
        # eps was set to, so a rounding tie cannot buy refine_iter HVPs.
        unrefined = unrefined_e(hg)
        refine = refine_iter if (unrefined if unrefined < eps else eps) > needed else 0
        x0, q0 = hg.x, hg.q
    else:
        failure = (f"certified accuracy not reached in {max_rounds} rounds: bound "
                   f"{fmt(hg.bound)} > atol + rtol ||grad|| = {fmt(target)}")
    notes = tuple(hg.notes) + (f"accuracy rounds (rtol={fmt(rtol)}, atol={fmt(atol)}): "
                               + "; ".join(trail),)
    reasons = hg.reasons if failure is None else (
        hg.reasons + (Reason(kind, failure),))
    return evolve(hg, work=total, notes=notes, reasons=reasons)


def steerable(hg: HypergradientResult) -> bool:
    """Whether another accuracy round can tighten hg's bound: it is finite and its only reasons
    (if any) say the constants are stated, not certified."""
    return math.isfinite(hg.bound) and all(r.kind is ReasonKind.UNCERTIFIED for r in hg.reasons)



#: The plan's norms are upper estimates (||v|| <= ||B||/mu, ||lam|| from them): planned rounds
#: ended with the bound at 0.05-0.45 of the target (benchmarks/bench_certificate.py). 1.5 times
#: the equal share puts it at 0.07-0.72 for 1-8% less work; twice the share needed a third round
#: on ridge 2000 x 500 with GD at rtol 1e-6 (17% more work there).
PLAN_SLACK = 1.5

#: The terms of Corollaries 15.2 and 15.3 that are second order in E (docs/bounds.md 15).
SECOND_ORDER = ("EE", "lamA", "third", "upperH", "crossB")

#: Fraction of the target the DWR terms share (each term aims at DWR_SHARE * target / n for the
#: n terms above zero); the rest absorbs the change of the terms between rounds.
DWR_SHARE = 0.9


def dwr_tightened(terms: dict[str, float], target: float, E: float, R: float, R_v: float,
                  R_lam: float) -> tuple[float, float, float, float] | None:
    """New (E, R, R_v, R_lam) targets so that each term of Theorem 15.1 (docs/bounds.md 15.2)
    meets its share of `target`, or None when the rounding floor alone takes a fifth of it.

    The terms scale as EE (lamA, third, upperH of Corollary 15.3) ~ E^2, theta ~ E, RE ~ R E,
    vE ~ R_v E, lamE ~ R_lam E, vR ~ R_v R: E is set first (from the E^2 terms and theta), then
    each residual from its products with the new E, and R, R_v split their product term evenly
    (each by at most the square root of its excess).
    This is steering only: every round's bound is recomputed and certified by itself."""
    if terms.get("rounding", 0.0) >= 0.2 * target:
        return None
    share = _water_filled(terms, DWR_SHARE * (target - terms.get("rounding", 0.0)))

    def factor(term: float, power: float = 1.0) -> float:
        return 1.0 if term <= share else (share / term) ** (1.0 / power)

    f_E = min([factor(terms.get(key, 0.0), 2.0) for key in SECOND_ORDER]
              + [factor(terms["theta"])])
    f_R = min(factor(terms["RE"] * f_E), factor(terms["vR"], 2.0))
    f_v = min(factor(terms["vE"] * f_E), factor(terms["vR"], 2.0))
    f_lam = factor(terms["lamE"] * f_E)
    if min(f_E, f_R, f_v, f_lam) == 1.0:  # every term within its share: halve all
        f_E = f_R = f_v = f_lam = 0.5
    return E * f_E, R * f_R, R_v * f_v, R_lam * f_lam


#: With certificate="tight", the first round runs at eps = delta = TIGHT_FIRST_ROUND * rtol
#: (`first_tolerances`): the plain bound is within a few times h's error, so the rounds aim
#: near the target itself, not at E&R's hundreds of times smaller true error. Half of it: a
#: second round costs a restart of every solve; measured, rtol / 2 takes less work than rtol
#: in every solver class of benchmarks/bench_certificate.py (docs/bounds.md 15.6).
TIGHT_FIRST_ROUND = 0.5

#: With certificate="tight" at the caller's eps and delta (no rtol, atol: one round, nothing to
#: plan from), the forward and dual CGs stop at this fraction of their right-hand sides.
TIGHT_RELATIVE = 1e-3

#: With certificate="tight", the first round's forward and dual solves aim bound(h_c) at this
#: fraction of the target (`tight_planned`): the rounds aim h's own error at about half of it,
#: so the bound stays within 1 + 2 bound(h_c) / err of h's true error.
TIGHT_PLAN_SHARE = 0.25


def tight_planned(hg: HypergradientResult, share: float) -> tuple[float, float]:
    """(tol_v, tol_lam): the forward and dual residuals at which the terms that depend on them,
    vR = R_v R/mu, vE = J R_v E/mu (J = L_f + L_A (||q|| + R/mu)) and lamE = R_lam E, each take a
    third of `share`, given the round's E and R (docs/bounds.md 15.6). A residual that no term
    limits is infinite: that solve makes no step (Newton's tiny E leaves the dual solve free).
    Steering only: the correction recomputes both residuals and bounds with them."""
    c = cast(dict[str, Any], hg.constants)
    mu, E, R = float(c["mu"]), float(hg.e), float(hg.R)
    J = float(c["L_f"]) + certified_product(float(c.get("L_A", 0.0)), hg.q_norm + R / mu)
    third = share / 3.0

    def limit(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator > 0 else math.inf

    return min(limit(third * mu, R), limit(third * mu, J * E)), limit(third, E)


#: h's error estimate |u . (h - h_c)| is linear in E and R: a round that tightens them aims it
#: at this fraction of its share (bound(h_c) takes the rest, through `dwr_tightened`).
PLAIN_SHARE = 0.5


def plain_tightened(part: Any, share: float, E: float,
                    R: float) -> tuple[float, float, float, float] | None:
    """New (E, R, R_v, R_lam) targets for the plain bound |u . (h - h_c)| + bound_u(h_c) of one
    direction to meet `share` (docs/bounds.md 15.6), or None at the rounding floor.

    |u . (h - h_c)| = |v . r - lam . grad g| is about h's true error: its adjoint part v . r is
    linear in R, its lower part lam . grad g in E (`_plain_factors` scales each to its share of
    PLAIN_SHARE share, so a part already small keeps its solve: no new lower solve when only
    the adjoint is off). bound_u(h_c) gets the other part of the share from `dwr_tightened`,
    and only when it exceeds that part (its residuals are then left alone).
    Steering only: every round's bound is recomputed and certified by itself."""
    gap = abs(part.value - part.plain)
    rest = (1.0 - PLAIN_SHARE) * share
    if part.terms.get("rounding", 0.0) >= 0.2 * share:
        return None
    dwr = (E, R, part.R_v, part.R_lam) if part.bound <= rest else dwr_tightened(
        part.terms, rest, E, R, part.R_v, part.R_lam)
    if dwr is None:
        return None
    f_E, f_R = _plain_factors(gap, abs(part.lower_part), abs(part.adjoint_part),
                              PLAIN_SHARE * share)
    if f_E == f_R == 1.0 and part.bound <= rest:  # the sum tipped it: halve E and R
        f_E = f_R = 0.5
    return min(dwr[0], E * f_E), min(dwr[1], R * f_R), dwr[2], dwr[3]


def _plain_factors(gap: float, lower: float, adjoint: float,
                   budget: float) -> tuple[float, float]:
    """(f_E, f_R): the factors on E and R that bring h's error estimate `gap` within `budget`,
    given its lower and adjoint parts. A part within a quarter of the budget keeps its residual
    and the other part takes the rest; otherwise both scale by budget over their sum (the
    triangle inequality: the parts may cancel in gap, not after the next round)."""
    if gap <= budget:
        return 1.0, 1.0
    quarter = 0.25 * budget
    if lower <= quarter < adjoint:
        return 1.0, (budget - lower) / adjoint
    if adjoint <= quarter < lower:
        return (budget - adjoint) / lower, 1.0
    f = min(1.0, budget / max(lower + adjoint, gap))
    return f, f


def _water_filled(terms: dict[str, float], budget: float) -> float:
    """The share of `budget` each term above it may take when the terms already below their
    share keep their own value (water filling): tiny terms (lamA, third, upperH, often 1e-3 of
    the others) do not take an equal share of the target they do not need."""
    values = sorted(val for key, val in terms.items() if key != "rounding" and val > 0)
    while values and values[0] <= budget / len(values):
        budget -= values.pop(0)
    return budget / max(len(values), 1)


def dwr_planned(hg: HypergradientResult, target: float, upper_depends_on_theta: bool,
                higher: tuple[float, float, float] | None = None
                ) -> tuple[float, float, float | None, float | None]:
    """(eps, delta, tol_v, tol_lam) that put each term of Corollary 15.2 (15.3 when `higher` =
    (L_3, L_Hf, L_DB) is given: g not quadratic) at its share of `target` (PLAN_SLACK times an equal
    share: the estimates below are upper bounds), planned from a plain
    hypergradient (its e, ||grad f||, ||B||, ||q|| and constants), with ||v|| ~ ||B||/mu:

        E     from the E^2 terms (EE = c_v J E^2, c_v = (L_B + L_A ||v||)/mu, J = L_f + L_A ||q||,
              + L_A ||lam|| E^2/2 + L_3 ||v|| ||q|| E^2/2 + L_Hf ||v|| E^2/2
              + L_DB ||q|| E^2/2, crossB when B is not affine in x) and theta = L_ft E;
        R     from RE = (L_B + L_A ||v||) R E/mu, and R, R_v balanced in vR = R_v R/mu relative
              to ||grad f|| and ||B|| (R/||grad f|| = R_v/||B||);
        R_v   from vE = J R_v E/mu and vR; R_lam from lamE = R_lam E.
    A tolerance no term limits stays as it was (eps, delta) or None (relative). Steering only."""
    c = cast(dict[str, Any], hg.constants)
    mu, LB, Lf = float(c["mu"]), float(c["L_B"]), float(c["L_f"])
    Lt = float(c.get("L_ft", 0.0)) if upper_depends_on_theta else 0.0
    share = PLAN_SLACK * DWR_SHARE * target / (6 if Lt > 0 else 5)
    nb, nB, nq = hg.grad_f_norm, hg.norm_B, hg.q_norm
    LA, L3, LH, LDB = (0.0, 0.0, 0.0, 0.0) if higher is None else (float(c["L_A"]), *higher)
    nv = nB / mu
    D_eff = LB + certified_product(LA, nv)
    J = Lf + certified_product(LA, nq)
    n_lam = (certified_product(D_eff, nq) + certified_product(J, nv)) / mu
    coef_E2 = (certified_product(D_eff, J) / mu + 0.5 * certified_product(LA, n_lam)
               + 0.5 * certified_product(L3, nv, nq) + 0.5 * certified_product(LH, nv)
               + 0.5 * certified_product(LDB, nq))

    def limit(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator > 0 else math.inf

    E = min(hg.e, math.sqrt(limit(share, coef_E2)), limit(share, Lt))
    R = min(limit(share * mu, D_eff * E), math.sqrt(limit(share * mu * nb, nB)))
    R_v = min(limit(share * mu, J * E), limit(share * mu, R), math.sqrt(limit(share * mu * nB, nb)))
    R_lam = limit(share, E)

    def finite(value: float) -> float | None:
        return value if math.isfinite(value) and value > 0 else None

    return (E if E > 0 else hg.e, R if math.isfinite(R) and R > 0 else hg.R,
            finite(R_v), finite(R_lam))


def corrected_to_accuracy(run: Round, k: Any, rtol: float | None, atol: float, eps: float,
                          delta: float, x0: Any, q0: Any, refine_iter: int,
                          components: bool, max_iter: int, relative: float,
                          spent: dict[str, int] | None = None,
                          max_rounds: int = MAX_ROUNDS, tight: bool = False
                          ) -> HypergradientResult:
    """The DWR-corrected hypergradient (docs/bounds.md 15), in rounds when rtol/atol ask for
    bound <= atol + rtol ||grad|| (one round at eps, delta otherwise).

    Each round: run (a plain hypergradient with E&R's bound at eps, delta, warm-started), then
    the forward and dual solves of `correction.correct` (warm-started too) and the product bound;
    each term over its share tightens its own tolerance (`dwr_tightened`). components: every
    component (grad = h_c, bound on ||h_c - grad F||); else only the component along h is
    certified (grad = h, bound = E&R's, `directional` holds the component's bound and rtol
    steers it). The first round's forward and dual solves stop at `relative` times the norm of
    their right-hand sides. A round whose plain hypergradient is not "ok" is returned as it is.
    spent: work done before the first round (counted in the result).

    tight (every component): the rounds steer the plain h's bound |h - h_c| + bound(h_c)
    instead and return h with it; the first round's forward and dual solves are planned from
    its E and R (`tight_planned`), later rounds tightened by `plain_tightened`; h_c is kept as
    `corrected_grad`."""
    steer = rtol is not None or atol != 0
    if steer:
        check_targets(0.0 if rtol is None else rtol, atol)
    total = dict.fromkeys(_WORK_KEYS, 0)
    add_work(total, spent or {})
    trail: list[str] = []
    tol_v: list[float | None] | None = None
    tol_lam: list[float | None] | None = None
    v0: list[Any] | None = None
    lam0: list[Any] | None = None
    refine = 0 if steer else refine_iter
    failure: str | None = None
    corr: Correction | None = None
    steered = target = math.inf
    replanned, along = False, None
    for _ in range(max_rounds if steer else 1):
        along = forward_companion(k, rtol, atol, along) if tight and tol_v is None else None
        hg = floor_accepted(run(eps, delta, x0, q0, refine, along))
        add_work(total, hg.work)
        restart = solve_again(hg, steer, rtol, atol, (eps, delta, x0, q0), relative, trail)
        if restart is not None:
            eps, delta, x0, q0 = restart
            continue
        if hg.status != "ok":
            return evolve(hg, work=total)
        dirs = _directions(hg, components)
        n = len(dirs)
        if steer and tol_v is None:  # the first round: plan the forward and dual solves
            target = atol + (rtol or 0.0) * float(np.linalg.norm(hg.grad))
            again = None if replanned or not tight else _tight_again(k, hg, target, n)
            replanned = True
            if again is not None:  # E^2 terms first: a warm re-solve costs less
                trail.append(f"eps={fmt(eps)}: E={fmt(hg.e)} over the E^2 terms' plan")
                eps, x0, q0 = next_eps(eps, again, hg), hg.x, hg.q
                continue
            if tight:  # from this round's E and R, in this round
                tol_v, tol_lam = _tight_first(hg, target, n)
            else:  # from this round's measurements, for the next round
                trail.append(f"eps={fmt(eps)}, delta={fmt(delta)}: E&R bound {fmt(hg.bound)}")
                if hg.bound <= target:  # E&R's certifies it already: no correction needed
                    return evolve(hg, work=total, notes=tuple(hg.notes) + (
                        "DWR rounds: E&R's bound met the target in the first round; "
                        + "; ".join(trail),))
                eps, delta, tol_v, tol_lam = _dwr_first(k, hg, target, n, components)
                x0, q0 = hg.x, hg.q  # refine stays 0: the planned eps is on G/mu itself
                continue
        corr = correct(k, hg, dirs, tol_v or [None] * n, tol_lam or [None] * n,
                       v0 or companion_starts(along, n), lam0 or [None] * n, max_iter, relative)
        add_correction_work(total, corr.work)
        grad, bound, plain = combined(corr, hg, components)
        steered = plain if tight else bound if components else corr.parts[0].bound
        target = atol + (rtol or 0.0) * float(np.linalg.norm(hg.grad if tight else grad))
        trail.append(f"eps={fmt(eps)}, delta={fmt(delta)}: "
                     f"{'plain' if tight else 'DWR'} bound {fmt(steered)}")
        if not steer or steered <= target:
            break
        planned = _next_round(corr, hg.e, target / math.sqrt(n) if components else target,
                              tight)
        if planned is None:
            failure = (f"certified accuracy unreachable: the rounding floor takes a fifth of "
                       f"atol + rtol ||grad|| = {fmt(target)}")
            break
        eps, delta = next_eps(eps, planned[0], hg), next_delta(delta, planned[1], hg)
        tol_v, tol_lam = planned[2], planned[3]
        x0, q0, refine = hg.x, hg.q, refine_iter
        v0, lam0 = [p.v for p in corr.parts], [p.lam for p in corr.parts]
    else:
        failure = (f"certified accuracy not reached in {max_rounds} rounds: dwr bound "
                   f"{fmt(steered)} > atol + rtol ||grad|| = {fmt(target)}")
    if corr is None:  # every round was a zero trap or had a target of 0
        return uncorrected(hg, total, failure)
    if tight:
        return _tight_result(hg, corr, grad, bound, plain, total, trail, failure)
    return _corrected_result(hg, corr, grad, bound, plain, components, total, trail, failure)


def _next_round(corr: Correction, E: float, share: float, tight: bool
                ) -> tuple[float, float, list[float | None], list[float | None]] | None:
    """(eps, delta, tol_v, tol_lam per direction) of the next round: each direction's targets
    (`plain_tightened` for the tight rounds, `dwr_tightened` else), the tightest E and R over
    them; None when some direction is at the rounding floor."""
    new = [plain_tightened(p, share, E, corr.residual) if tight else
           dwr_tightened(p.terms, share, E, corr.residual, p.R_v, p.R_lam)
           for p in corr.parts]
    planned = [t for t in new if t is not None]
    if len(planned) < len(new):
        return None
    return (min(t[0] for t in planned), min(t[1] for t in planned),
            [t[2] for t in planned], [t[3] for t in planned])


def _tight_again(k: Any, hg: HypergradientResult, target: float, n: int) -> float | None:
    """The E at which the tight first round is solved again before its correction, or None:
    the E^2 terms' plan (`dwr_planned` at TIGHT_PLAN_SHARE of the target) when it is below half
    the round's E. A warm-started re-solve (a Newton step or two) costs less than a correction
    that could not certify. Steering only."""
    planned = _dwr_first(k, hg, TIGHT_PLAN_SHARE * target, n, True)[0]
    return planned if planned < 0.5 * hg.e else None


def _tight_result(hg: HypergradientResult, corr: Correction, h_c: np.ndarray, bound_c: float,
                  plain: float, total: dict[str, int], trail: list[str],
                  failure: str | None) -> HypergradientResult:
    """hg (the plain h) with the bound |h - h_c| + bound(h_c), h_c and its bound kept."""
    res = _corrected_result(hg, corr, h_c, bound_c, plain, True, total, trail, failure)
    return evolve(res, grad=np.asarray(hg.grad), bound=plain, certificate="tight",
                   uncorrected_grad=None, uncorrected_bound=math.nan,
                   corrected_grad=h_c, corrected_bound=bound_c,
                   certified=bool(hg.certified and math.isfinite(plain)))


def _tight_first(hg: HypergradientResult, target: float,
                 n: int) -> tuple[list[float | None], list[float | None]]:
    """The first tight round's forward and dual tolerances, one pair per direction."""
    tol_v, tol_lam = tight_planned(hg, TIGHT_PLAN_SHARE * target / math.sqrt(n))
    return [tol_v] * n, [tol_lam] * n


def _dwr_first(k: Any, hg: HypergradientResult, target: float, n: int, components: bool
               ) -> tuple[float, float, list[float | None], list[float | None]]:
    """(eps, delta, tol_v, tol_lam per direction) of the planned round (`dwr_planned`)."""
    th = np.asarray(hg.theta, dtype=np.float64)
    eps, delta, tol_v, tol_lam = dwr_planned(
        hg, target / math.sqrt(n) if components else target,
        bool(getattr(k, "upper_depends_on_theta", False)),
        (*higher_constants(k, th), cross_lipschitz(k, th, hg.x, float(hg.e)))
        if uses_general_terms(k) else None)
    return eps, delta, [tol_v] * n, [tol_lam] * n


def add_work(total: dict[str, int], work: dict[str, Any]) -> None:
    """total += work, key by key; "paired" (products that rode on another solve's passes,
    docs/solvers.md 9) only where some round has it."""
    for key in _WORK_KEYS:
        total[key] += int(work.get(key, 0))
    if work.get("paired"):
        total["paired"] = total.get("paired", 0) + int(work["paired"])


def add_correction_work(total: dict[str, int], work: dict[str, int]) -> None:
    """A correction's work (its HVPs, upper ones included, and cross calls) added to total."""
    hvps = work["hvps"] + work["upper"]
    add_work(total, {"hvps": hvps, "cross": work["cross"], "units": hvps})


def _directions(hg: HypergradientResult, components: bool) -> list[np.ndarray]:
    """e_1..e_p, or the unit vector along h (e_1 when h = 0)."""
    p = int(np.asarray(hg.grad).size)
    if components:
        return list(np.eye(p))
    h = np.asarray(hg.grad, dtype=np.float64)
    nh = float(np.linalg.norm(h))
    return [h / nh if nh > 0 else np.eye(p)[0]]


def _corrected_result(hg: HypergradientResult, corr: Correction, grad: np.ndarray,
                      bound: float, plain: float, components: bool, total: dict[str, int],
                      trail: list[str], failure: str | None) -> HypergradientResult:
    """hg with the corrected gradient and bound, the fields naming the certificate, the
    summed work and the rounds' trail."""
    part = corr.parts[0]
    directional = {"direction": part.direction, "value": part.value, "plain": part.plain,
                   "bound": part.bound, "plain_bound": part.plain_bound}
    terms = {key: math.fsum(p.terms[key] for p in corr.parts) for key in part.terms}
    notes = tuple(hg.notes) + (f"DWR certificate (docs/bounds.md 15, Corollary {corr.corollary}) rounds: "
                               + "; ".join(trail),)
    reasons = hg.reasons if failure is None else (Reason(ReasonKind.ACCURACY, failure),)
    return evolve(
        hg, grad=grad, bound=bound, work=total, notes=notes, reasons=reasons,
        certificate="dwr" if components else "dwr-direction",
        uncorrected_grad=np.asarray(hg.grad), uncorrected_bound=plain,
        directional=directional, correction_terms=terms,
        certified=bool(hg.certified and math.isfinite(bound)),
        bound_forms=dict(hg.bound_forms, er=hg.bound, dwr=bound, plain=plain,
                         dwr_parts=[p.bound for p in corr.parts]))
