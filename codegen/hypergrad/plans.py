"""How the DWR rounds plan their tolerances (docs/bounds.md 15.5-15.6, 15.9): steering only.

Every round's bound is recomputed and certified by itself (`correction.correct`); what lives
here only chooses the next eps, delta and the forward and dual CG tolerances from a round's
measured terms (`dwr_tightened`, `plain_tightened`) or, before any correction, from a plain
round's norms and constants (`dwr_planned`, `tight_planned`), so that few rounds suffice, and
how much a met bound far above h's error may spend on sharpening (`sharpen_budget`).
"""
from __future__ import annotations

import math
from typing import Any, cast

from .bounds import certified_product
from .energy import Energy
from .results import HypergradientResult

__all__ = ["DWR_SHARE", "PLAN_SLACK", "PLAIN_SHARE", "SECOND_ORDER", "TIGHT_DUAL_SHARE",
           "TIGHT_PLAN_SHARE", "dwr_planned", "dwr_tightened", "plain_tightened", "tight_planned",
           "SHARPEN_RATIO", "SHARPEN_BUDGET", "SHARPEN_FACTOR_MAX", "sharpen_budget",
           "sharpen_factor"]

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


#: With certificate="tight", the first round's forward and dual solves aim bound(h_c) at this
#: fraction of the target (`tight_planned`): the rounds aim h's own error at about half of it,
#: so the bound stays within 1 + 2 bound(h_c) / err of h's true error.
TIGHT_PLAN_SHARE = 0.25

#: ... of which vR and vE take a third each and lamE = R_lam E this fraction of a third: the dual
#: solve (A lam = m) runs last, from a right-hand side of its own, and a digit of it costs a few
#: CG steps, while h's error often lands far below the target, and lamE at a third of the share
#: then made most of the bound (the 1-D TV example with FISTA: lamE 3-9 times |h - h_c|, bound /
#: true error 4.5-9, median 5.7; at a tenth 2.97, for 2% more work; `bench_certificate.py
#: --quick`: median bound / error 1.59 -> 1.30 over its cases, work 1.44 -> 1.46 of the oracle's).
TIGHT_DUAL_SHARE = 0.1


def tight_planned(hg: HypergradientResult, share: float,
                  energy: Energy | None = None) -> tuple[float, float]:
    """(tol_v, tol_lam): the forward and dual residuals at which the terms that depend on them,
    vR = R_v R/mu and vE = J R_v E/mu (J = L_f + L_A (||q|| + R/mu)) each take a third of `share`
    and lamE = R_lam E TIGHT_DUAL_SHARE of a third, given the round's E and R (docs/bounds.md
    15.6; with `energy`, J's L_A term is at most a_q / E + L_A R/mu, 15.9). A residual that no
    term limits is infinite: that solve makes no step (Newton's tiny E leaves the dual solve free).
    Steering only: the correction recomputes both residuals and bounds with them."""
    c = cast(dict[str, Any], hg.constants)
    mu, E, R = float(c["mu"]), float(hg.e), float(hg.R)
    L_A = float(c.get("L_A", 0.0))
    LA_q = certified_product(L_A, hg.q_norm + R / mu)
    if energy is not None and E > 0:
        LA_q = min(LA_q, energy.bound(energy.rho_q) / E + certified_product(L_A, R) / mu)
    J = float(c["L_f"]) + LA_q
    third = share / 3.0

    def limit(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator > 0 else math.inf

    return min(limit(third * mu, R), limit(third * mu, J * E)), limit(TIGHT_DUAL_SHARE * third, E)


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
                higher: tuple[float, float, float] | None = None,
                energy: Energy | None = None
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
    With `energy` the L_A factors take their energy-norm forms (`_energy_planned`). A tolerance
    no term limits stays as it was (eps, delta) or None (relative). Steering only."""
    c = cast(dict[str, Any], hg.constants)
    mu, LB, Lf = float(c["mu"]), float(c["L_B"]), float(c["L_f"])
    Lt = float(c.get("L_ft", 0.0)) if upper_depends_on_theta else 0.0
    share = PLAN_SLACK * DWR_SHARE * target / (6 if Lt > 0 else 5)
    nb, nB, nq = hg.grad_f_norm, hg.norm_B, hg.q_norm
    LA, L3, LH, LDB = (0.0, 0.0, 0.0, 0.0) if higher is None else (float(c["L_A"]), *higher)
    nv = nB / mu
    LA_q, LA_v, LA_lam = certified_product(LA, nq), certified_product(LA, nv), LA
    if energy is not None and hg.e > 0 and nq > 0:
        LA_q, LA_v, LA_lam = _energy_planned(energy, hg.e, hg.R, mu, (LA, L3), nv, nq)
    D_eff = LB + LA_v
    J = Lf + LA_q
    n_lam = (certified_product(D_eff, nq) + certified_product(J, nv)) / mu
    coef_E2 = (certified_product(D_eff, J) / mu + 0.5 * certified_product(LA_lam, n_lam)
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


def _energy_planned(energy: Energy, E: float, R: float, mu: float, L: tuple[float, float],
                    nv: float, nq: float) -> tuple[float, float, float]:
    """The plan's L_A ||q||, L_A ||v|| and L_A (of lamA = L_A ||lam|| E^2/2), each at most its
    energy-norm form (docs/bounds.md 15.9), L = (L_A, L_3): ||DA[e] q_e|| <= a_q + L_A R E/mu,
    ||DA[e] v|| <= rho_v sqrt(L) eps_A and |lam^T (A_e - A_bar) e| <= rho_lam eps_A^2/2
    + L_3 ||lam|| E^3/6, with rho_u estimated as rho_q ||u|| / ||q|| (rho is homogeneous in u)
    and eps_A / E taken as it is at this round. Steering only."""
    L_A, L_3 = L
    per_q = energy.bound(energy.rho_q) / E
    per_lam = energy.rho_q / nq * (energy.eps_A / E) ** 2 + certified_product(L_3, E) / 3
    return (min(certified_product(L_A, nq), per_q + certified_product(L_A, R) / mu),
            min(certified_product(L_A, nv), per_q * nv / nq), min(L_A, per_lam))


#: A met target's tight or block bound is sharpened when it is more than SHARPEN_RATIO times h's
#: error estimate ||h - h_c|| (bound(h_c) > 2 ||h - h_c||: the correction's solves were planned
#: from the target, and h's error landed far below it) ...
SHARPEN_RATIO = 3.0
#: ... and when the correction's own solves cost at most this share of the work so far (a warm
#: continuation costs about as much again) ...
SHARPEN_BUDGET = 0.1
#: ... times plain / (SHARPEN_RATIO ||h - h_c||), the factor a sharpening may remove, up to
#: SHARPEN_FACTOR_MAX: a bound 30 times h's error may spend three times what one 3.5 times may.
SHARPEN_FACTOR_MAX = 3.0


def sharpen_budget(plain: float, gap: float, units: int, floor: float = 0.0) -> float:
    """The work (units) a sharpening of a met bound `plain` may cost, h's error estimate being
    `gap`, `floor` the bound's rounding terms and `units` the work so far: SHARPEN_BUDGET units
    per factor of SHARPEN_RATIO over the larger of the two, at most SHARPEN_FACTOR_MAX of them;
    0 when plain is within SHARPEN_RATIO of it (at the rounding level, gap is rounding too: a
    sharpening there halved a bound of 6e-16 for 48% more work)."""
    scale = max(gap, floor)
    if not gap > 0 or plain <= SHARPEN_RATIO * scale:
        return 0.0
    return SHARPEN_BUDGET * min(plain / (SHARPEN_RATIO * scale), SHARPEN_FACTOR_MAX) * units


def sharpen_factor(gap: float, rest: float, solves: float) -> float:
    """The factor on the correction's solve residuals (their terms `solves`, linear in them) that
    brings the bound, `rest` + solves, to about (SHARPEN_RATIO - 1) gap, gap being h's error
    estimate; a quarter of that for the solves' terms where the rest alone is already over it."""
    aim = SHARPEN_RATIO - 1.0
    return max(aim * gap - rest, 0.25 * aim * gap) / solves
