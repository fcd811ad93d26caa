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
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol, cast

import numpy as np

from .bounds import aposteriori_bound
from .common import SolverError, fmt, grad_norm
from .correction import (
    Correction,
    combined,
    companion_starts,
    correct,
    cross_lipschitz,
    forward_companion,
    uses_general_terms,
)
from .energy import Energy, energy_at
from .floors import (
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
    unrefined_e,
)
from .local_third import LOCAL_Q, higher_constants
from .options import DEFAULTS
from .plans import (
    TIGHT_PLAN_SHARE,
    dwr_planned,
    dwr_tightened,
    plain_tightened,
    sharpen_budget,
    sharpen_factor,
    tight_planned,
)
from .results import HypergradientResult, Reason, ReasonKind, evolve

__all__ = ["to_accuracy", "check_targets", "bound_parts", "first_tolerances", "Round",
           "corrected_to_accuracy", "MAX_ROUNDS", "SHARE", "TIGHT_RELATIVE", "add_work",
           "TIGHT_FIRST_ROUND", "add_correction_work"]

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
        failure = rounds_out(max_rounds, "bound", hg.bound, target)
    notes = tuple(hg.notes) + (f"accuracy rounds (rtol={fmt(rtol)}, atol={fmt(atol)}): "
                               + "; ".join(trail),)
    reasons = hg.reasons if failure is None else (
        hg.reasons + (Reason(kind, failure),))
    return evolve(hg, work=total, notes=notes, reasons=reasons)


def steerable(hg: HypergradientResult) -> bool:
    """Whether another accuracy round can tighten hg's bound: it is finite and its only reasons
    (if any) say the constants are stated, not certified."""
    return math.isfinite(hg.bound) and round_ok(hg)


#: With certificate="tight", the first round runs at eps = delta = TIGHT_FIRST_ROUND * rtol
#: (`first_tolerances`): the plain bound is within a few times h's error, so the rounds aim
#: near the target itself, not at E&R's hundreds of times smaller true error. Half of it: a
#: second round costs a restart of every solve; measured, rtol / 2 takes less work than rtol
#: in every solver class of benchmarks/bench_certificate.py (docs/bounds.md 15.6).
TIGHT_FIRST_ROUND = 0.5

#: With certificate="tight" at the caller's eps and delta (no rtol, atol: one round, nothing to
#: plan from), the forward and dual CGs stop at this fraction of their right-hand sides.
TIGHT_RELATIVE = 1e-3


def corrected_to_accuracy(run: Round, k: Any, rtol: float | None, atol: float, eps: float,
                          delta: float, x0: Any, q0: Any, refine_iter: int,
                          components: bool, max_iter: int, relative: float,
                          spent: dict[str, int] | None = None,
                          max_rounds: int = MAX_ROUNDS, tight: bool = False,
                          dense: dict[str, Any] | None = None) -> HypergradientResult:
    """The DWR-corrected hypergradient (docs/bounds.md 15), in rounds when rtol/atol ask for
    bound <= atol + rtol ||grad|| (one round at eps, delta otherwise).

    Each round: run (a plain hypergradient with E&R's bound at eps, delta, warm-started), then
    the forward and dual solves of `correction.correct` (warm-started too) and the product bound;
    each term over its share tightens its own tolerance (`dwr_tightened`). components: every
    component (grad = h_c, bound on ||h_c - grad F||); else only the component along h is
    certified (grad = h, bound = E&R's, `directional` holds the component's bound and rtol
    steers it). The first round's forward and dual solves stop at `relative` times the norm of
    their right-hand sides. A target below the rounding floor is aimed at ROUNDING_GOAL times
    the correction's rounding terms instead (`floors.rounding_goal`). A round whose plain
    hypergradient is not "ok" is returned as it is, or, after a corrected round, that round
    with the failure named (`floors.round_failed`).
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
    tol_v = tol_lam = v0 = lam0 = cast("list[Any] | None", None)  # per direction, once planned
    refine = 0 if steer else refine_iter
    failure: str | None = None
    last: _Certified | None = None  # the last round with a correction
    steered = target = math.inf
    replanned, along, floor_goal = False, None, 0.0
    for _ in range(max_rounds if steer else 1):
        # the forward solve beside the adjoint's; the energy-norm terms at this round's x_eps
        along, energy = forward_companion(k, rtol, atol, along) if tight and tol_v is None else None, None
        hg = floor_accepted(run(eps, delta, x0, q0, refine, along))
        add_work(total, hg.work)
        restart = solve_again(hg, steer, rtol, atol, (eps, delta, x0, q0), relative, trail)
        if restart is not None:
            eps, delta, x0, q0 = restart
            continue
        capped = tight and steer and capped_only(hg)  # corrected once, then the rounds end
        if (not round_ok(hg) and not capped) or exactly_zero(hg):
            return _failed_round(hg, last, tight, components, total, trail)
        dirs = _directions(hg, components)
        n = len(dirs)
        if steer and tol_v is None:  # the first round: plan the forward and dual solves
            target = atol + (rtol or 0.0) * grad_norm(hg.grad)
            aim = max(target, rounding_goal(hg.bound_forms.get("rounding", 0.0), n))  # no plan below
            again, energy = (None, None) if replanned or not tight or capped else _tight_again(k, hg, aim, n, total)
            replanned = True
            if again is not None:  # E^2 terms first: a warm re-solve costs less
                trail.append(f"eps={fmt(eps)}: E={fmt(hg.e)} over the E^2 terms' plan")
                eps, x0, q0 = next_eps(eps, again, hg), hg.x, hg.q
                continue
            if tight:  # from this round's E and R, in this round
                tol_v, tol_lam = _tight_first(hg, aim, n, energy)
            else:  # from this round's measurements, for the next round
                trail.append(f"eps={fmt(eps)}, delta={fmt(delta)}: E&R bound {fmt(hg.bound)}")
                if hg.bound <= target:  # E&R's certifies it already: no correction needed
                    return _er_met(hg, total, trail)
                eps, delta, tol_v, tol_lam = _dwr_first(k, hg, aim, n, components)
                x0, q0 = hg.x, hg.q  # refine stays 0: the planned eps is on G/mu itself
                continue
        kept, last = last, _correction_round(k, hg, dirs, (tol_v, tol_lam, v0 or companion_starts(along, n), lam0),
                                             (max_iter, relative, capped), energy, dense, components, total)
        corr, steered = last.corr, last.steered(tight, components)
        target = atol + (rtol or 0.0) * grad_norm(hg.grad if tight else last.grad)
        trail.append(f"eps={fmt(eps)}, delta={fmt(delta)}: {'plain' if tight else 'DWR'} bound {fmt(steered)}")
        if capped and steered > target:  # its solve would stop at max_iter again
            return _capped_end(last, kept, total, trail)
        last = replace(last, hg=caps_met(hg)) if capped else last
        floor_goal = max(floor_goal, rounding_goal(max(p.terms["rounding"] for p in corr.parts), n))
        if not steer or steered <= max(target, floor_goal):  # met, or as close as the floor lets it
            failure = None if not steer or steered <= target else _floor_reached(
                target, hg, corr, steered, True)
            break
        planned = _next_round(corr, hg.e, max(target, floor_goal) / math.sqrt(n if components else 1), tight)
        if planned is None or ((lower_stalled(hg) or eps <= lowest_eps(hg, floor_goal > target))  # nothing left
                               and next_delta(delta, planned[1], hg) >= delta):
            failure = _floor_reached(target, hg, corr, steered, planned is None)
            break
        eps, delta = next_eps(eps, planned[0], hg, floor_goal > target), next_delta(delta, planned[1], hg)
        tol_v, tol_lam = planned[2], planned[3]
        x0, q0, refine = hg.x, hg.q, refine_iter
        v0, lam0 = [p.v for p in corr.parts], [p.lam for p in corr.parts]
    else:
        failure = rounds_out(max_rounds, "dwr bound", steered, target)
    if last is None:  # every round was a zero trap or had a target of 0
        return uncorrected(hg, total, failure)
    if tight and steer and failure is None:
        last = _tight_sharpened(k, last, total, trail, relative, energy, dense)
    return last.result(tight, components, total, trail, failure)


def _floor_reached(target: float, hg: HypergradientResult, corr: Correction, bound: float,
                   rounding: bool) -> str:
    """The failure text of correction rounds that cannot ask more: a direction's rounding terms
    over their share of the target (`rounding`), or the lower solve at its rounding floor."""
    if rounding:
        return rounding_failure(target, max(p.terms["rounding"] for p in corr.parts), bound,
                                "dwr bound")
    return floor_failure(target, solve_floor(hg, True), bound, "dwr bound")


def _correction_round(k: Any, hg: HypergradientResult, dirs: list[np.ndarray],
                      plan: tuple[Any, Any, Any, Any], caps: tuple[int, float, bool], energy: Energy | None,
                      dense: dict[str, Any] | None, components: bool,
                      total: dict[str, int]) -> _Certified:
    """hg corrected along dirs (`correction.correct`) with plan = (tol_v, tol_lam, v0, lam0) per
    direction (None: not planned, or no warm start) and caps = (max_iter, relative, capped:
    hg's solves were capped, `floors.correction_iterations`); its work added to total."""
    n = len(dirs)
    tol_v, tol_lam, v0, lam0 = (p or [None] * n for p in plan)
    iterations = correction_iterations(caps[0], total, 2 * n if caps[2] else 0)
    corr = correct(k, hg, dirs, tol_v, tol_lam, v0, lam0, iterations, caps[1], energy, dense)
    add_correction_work(total, corr.work)
    return _Certified(hg, corr, *combined(corr, hg, components))


def _capped_end(last: _Certified, kept: _Certified | None, total: dict[str, int],
                trail: list[str]) -> HypergradientResult:
    """The tight rounds' end at a round whose solves were capped (`floors.capped_only`) and
    whose correction `last` did not meet the target: the smallest bound of that round's own
    (E&R's), its correction's and the corrected round before it (`kept`), the caps named."""
    hg = last.hg
    trail.append(CAPPED_NOTE)
    if kept is not None and kept.plain < min(last.plain, hg.bound):
        return kept.result(True, True, total, trail, round_failed(hg))
    if hg.bound <= last.plain:
        return own_bound(hg, total, "tight")
    return last.result(True, True, total, trail, None)  # hg's reasons: its caps


def _failed_round(hg: HypergradientResult, last: _Certified | None, tight: bool, components: bool,
                  total: dict[str, int], trail: list[str]) -> HypergradientResult:
    """A round whose plain hypergradient is not "ok" (capped, diverged): returned as it is
    (E&R's bound, certified where its solves' residuals are), unless an earlier corrected
    round certified a smaller bound; that round is then returned with the failure named."""
    if last is None or (hg.certified and hg.bound <= (last.plain if tight else last.bound)):
        return own_bound(hg, total, "tight" if tight else "DWR")
    return last.result(tight, components, total, trail, round_failed(hg))


@dataclass(frozen=True)
class _Certified:
    """A correction round: its plain hypergradient, its correction and `combined`'s grad and
    bounds. The rounds return the last one (a later round that fails keeps it: its bound
    certifies its own h, not a later round's)."""

    hg: HypergradientResult
    corr: Correction
    grad: np.ndarray
    bound: float
    plain: float

    def steered(self, tight: bool, components: bool) -> float:
        """The bound the rounds steer: h's (tight), h_c's, or the component along h's."""
        return self.plain if tight else self.bound if components else self.corr.parts[0].bound

    def result(self, tight: bool, components: bool, total: dict[str, int], trail: list[str],
               failure: str | None) -> HypergradientResult:
        """The rounds' result: h with the tight bound, or the corrected gradient."""
        if tight:
            return _tight_result(self.hg, self.corr, self.grad, self.bound, self.plain, total,
                                 trail, failure)
        return _corrected_result(self.hg, self.corr, self.grad, self.bound, self.plain,
                                 components, total, trail, failure)


def _er_met(hg: HypergradientResult, total: dict[str, int], trail: list[str]) -> HypergradientResult:
    """hg, whose E&R bound met the target in the DWR rounds' first round, with their work."""
    return evolve(hg, work=total, notes=tuple(hg.notes) + (
        "DWR rounds: E&R's bound met the target in the first round; " + "; ".join(trail),))


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


def _tight_again(k: Any, hg: HypergradientResult, target: float, n: int,
                 total: dict[str, int]) -> tuple[float | None, Energy | None]:
    """(the E at which the tight first round is solved again before its correction, or None;
    the energy-norm quantities at its x_eps, or None; their passes are added to total): the
    E^2 terms' plan (`dwr_planned` at TIGHT_PLAN_SHARE of the target) when it is below half the round's E.
    A warm-started re-solve (a Newton step or two) costs less than a correction that could not
    certify. Before asking for one, a Gram-form g plans again with the energy-norm terms
    (docs/bounds.md 15.9, two passes over the data), which the correction then uses: on
    l2-logistic regression at 20000 x 2000 their E^2 terms let the first round's E stand.
    Steering only."""
    share = TIGHT_PLAN_SHARE * target
    planned = _dwr_first(k, hg, share, n, True)[0]
    if planned >= 0.5 * hg.e:
        return None, None
    energy, passes = energy_at(k, hg)
    add_work(total, {"hvps": passes, "units": passes})
    if energy is not None:
        planned = _dwr_first(k, hg, share, n, True, energy)[0]
    return (planned if planned < 0.5 * hg.e else None), energy


#: The terms of a direction's bound(h_c) that its forward and dual residuals make (linear in
#: R_v or R_lam; docs/bounds.md 15.2): what a sharpening can shrink without a new lower solve.
SOLVE_TERMS = ("vR", "vE", "lamE")


def _tight_sharpened(k: Any, last: _Certified, total: dict[str, int], trail: list[str],
                     relative: float, energy: Energy | None, dense: dict[str, Any] | None
                     ) -> _Certified:
    """last with the forward and dual solves run on (warm) until their terms leave bound(h_c)
    about 2 ||h - h_c||, or last itself where the plain bound is within SHARPEN_RATIO of that
    estimate, the solves' terms are under half of bound(h_c) (E and R are h's own accuracy, not
    sharpened), the first correction cost more than `sharpen_budget` allows, or the new bound
    is not smaller. Each of the 2 p CGs (p directions) is capped at 1 / (2 p) of that budget;
    each also checks its true residual, and the correction's products are made again, so a
    sharpening can cost up to about twice the budget where the CGs take few steps. Steering
    only: the bound returned is the one computed for the solves returned. Adds the work to
    total and a note to trail."""
    hg, corr = last.hg, last.corr
    gap = math.hypot(*(p.value - p.plain for p in corr.parts))
    solves = math.fsum(p.terms[t] for p in corr.parts for t in SOLVE_TERMS)
    bounds = math.fsum(p.bound for p in corr.parts)
    floor = math.fsum(p.terms.get("rounding", 0.0) for p in corr.parts)
    budget = sharpen_budget(last.plain, gap, total["units"], floor)
    if (solves <= 0.5 * bounds or not budget > 0
            or corr.work["hvps"] + corr.work["upper"] > budget):
        return last
    f = sharpen_factor(gap, bounds - solves, solves)
    try:
        sharp = correct(k, hg, [p.direction for p in corr.parts], [p.R_v * f for p in corr.parts],
                        [p.R_lam * f for p in corr.parts], [p.v for p in corr.parts],
                        [p.lam for p in corr.parts], max(int(budget / (2 * len(corr.parts))), 1),
                        relative, energy, dense)
    except FloatingPointError:  # the first correction's kernels were finite: keep it
        return last
    add_correction_work(total, sharp.work)
    sharper = _Certified(hg, sharp, *combined(sharp, hg, True))
    trail.append(f"forward and dual solved again: plain bound {fmt(sharper.plain)}")
    return sharper if sharper.plain < last.plain else last


def _tight_result(hg: HypergradientResult, corr: Correction, h_c: np.ndarray, bound_c: float,
                  plain: float, total: dict[str, int], trail: list[str],
                  failure: str | None) -> HypergradientResult:
    """hg (the plain h) with the bound |h - h_c| + bound(h_c), h_c and its bound kept."""
    res = _corrected_result(hg, corr, h_c, bound_c, plain, True, total, trail, failure)
    return evolve(res, grad=np.asarray(hg.grad), bound=plain, certificate="tight",
                   uncorrected_grad=None, uncorrected_bound=math.nan,
                   corrected_grad=h_c, corrected_bound=bound_c,
                   certified=bool(hg.certified and math.isfinite(plain)))


def _tight_first(hg: HypergradientResult, target: float, n: int,
                 energy: Energy | None = None) -> tuple[list[float | None], list[float | None]]:
    """The first tight round's forward and dual tolerances, one pair per direction."""
    tol_v, tol_lam = tight_planned(hg, TIGHT_PLAN_SHARE * target / math.sqrt(n), energy)
    return [tol_v] * n, [tol_lam] * n


def _dwr_first(k: Any, hg: HypergradientResult, target: float, n: int, components: bool,
               energy: Energy | None = None
               ) -> tuple[float, float, list[float | None], list[float | None]]:
    """(eps, delta, tol_v, tol_lam per direction) of the planned round (`dwr_planned`)."""
    th = np.asarray(hg.theta, dtype=np.float64)
    eps, delta, tol_v, tol_lam = dwr_planned(
        hg, target / math.sqrt(n) if components else target,
        bool(getattr(k, "upper_depends_on_theta", False)),
        (*higher_constants(k, th, hg.x, float(hg.e)), cross_lipschitz(k, th, hg.x, float(hg.e)))
        if uses_general_terms(k) else None, energy)
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
    nh = grad_norm(h)
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
    local = ", its third derivative from the data (15.10)" if corr.local else ""
    constants = hg.constants
    if corr.local_q is not None and isinstance(constants, dict):  # audited with the others
        constants = dict(constants, **{LOCAL_Q: corr.local_q})
    notes = tuple(hg.notes) + (f"DWR certificate (docs/bounds.md 15, Corollary {corr.corollary}{local}) rounds: "
                               + "; ".join(trail),)
    reasons = hg.reasons + (() if failure is None else (Reason(ReasonKind.ACCURACY, failure),))
    return evolve(
        hg, grad=grad, bound=bound, work=total, notes=notes, reasons=reasons, constants=constants,
        certificate="dwr" if components else "dwr-direction",
        uncorrected_grad=np.asarray(hg.grad), uncorrected_bound=plain,
        directional=directional, correction_terms=terms,
        certified=bool(hg.certified and math.isfinite(bound)),
        bound_forms=dict(hg.bound_forms, er=hg.bound, dwr=bound, plain=plain,
                         dwr_parts=[p.bound for p in corr.parts]))
