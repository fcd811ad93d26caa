"""Where the accuracy rounds cannot plan from a round (docs/bounds.md 12, 15.5): the rounding
floor (the lowest eps a round may ask of a lower solve, eps_machine ||x||, and a lower or a
direct adjoint solve that stagnated at its rounding level), and a round to solve again before
any correction (a zero trap, or h exactly 0: `solve_again`).

A lower solve at its rounding floor certifies the G it reached, a direct adjoint whose
refinement stalled the R it reached; the rounds (E&R's, the tight and the block ones) accept
that as accuracy, not failure, ask that solve for no less (`next_eps`, `next_delta`), and stop
with "accuracy floor" when the target needs less. A solve stopped at max_iter ("capped")
certifies the residual it reached too: the tight and block rounds correct such a round once
and end there (`capped_only`, `caps_met`).
"""
from __future__ import annotations

import math
from typing import Any, cast

import numpy as np

from .common import fmt, grad_norm, norm
from .lower.stopping import rounding_floor, solution_floor
from .results import HypergradientResult, Reason, ReasonKind, Status, evolve

__all__ = ["FIRST_ORDER", "ROUNDING_GOAL", "BLOCK_ROUNDING_GOAL", "rounding_goal", "lowest_residual",
           "FLOOR_NOTE", "ADJOINT_FLOOR_NOTE", "floor_accepted", "lower_stalled",
           "adjoint_stalled", "lowest_eps", "lowest_delta", "DELTA_FLOOR", "exactly_zero",
           "unrefined_e", "next_eps", "next_delta", "zero_target_eps", "ZERO_TARGET_SCALE",
           "solve_again", "uncorrected", "own_bound", "floor_failure", "rounding_failure", "solve_floor",
           "round_failed", "capped_only", "caps_met", "rounds_out", "CAPPED_NOTE",
           "CAPPED_SHARE", "CAPPED_MIN_ITERATIONS", "correction_iterations"]

EPS = float(np.finfo(np.float64).eps)

#: The notes that keep a lower or adjoint solve's "rounding floor" reason once the rounds
#: accepted it.
FLOOR_NOTE = "lower solve at its rounding floor"
ADJOINT_FLOOR_NOTE = "adjoint solve at its rounding floor"
_NOTES = {ReasonKind.LOWER_SOLVE: FLOOR_NOTE, ReasonKind.ADJOINT_SOLVE: ADJOINT_FLOOR_NOTE}


def _is_floor_reason(reason: Reason) -> bool:
    return reason.kind in _NOTES and reason.solver_status is Status.ROUNDING_FLOOR


def lower_stalled(hg: HypergradientResult) -> bool:
    """Whether hg's lower solve stagnated at its rounding floor (seen by `floor_accepted`)."""
    return any(note.startswith(FLOOR_NOTE) for note in hg.notes)


def adjoint_stalled(hg: HypergradientResult) -> bool:
    """Whether hg's adjoint solve stagnated at its rounding floor (seen by `floor_accepted`)."""
    return any(note.startswith(ADJOINT_FLOOR_NOTE) for note in hg.notes)


def round_ok(hg: HypergradientResult) -> bool:
    """Whether a round's plain hypergradient can be corrected and steered: its only reasons,
    if any, say the constants are stated (status "ok" but for that). A correction's rounds
    that asked for status "ok" returned a stated-constants problem's first round as it was,
    bound above the target and nothing in the status to say so."""
    return all(r.kind is ReasonKind.UNCERTIFIED for r in hg.reasons)


def floor_accepted(hg: HypergradientResult) -> HypergradientResult:
    """hg without its solves' "rounding floor" reasons when those are its only non-stated
    reasons: the bound certifies the G and R reached (the floor is accuracy, not failure);
    the rounds decide whether it meets the target. A note keeps what the solver said."""
    if not hg.reasons:
        return hg
    floor = [r for r in hg.reasons if _is_floor_reason(r)]
    rest = tuple(r for r in hg.reasons if not _is_floor_reason(r))
    if not floor or not all(r.kind is ReasonKind.UNCERTIFIED for r in rest):
        return hg
    return evolve(hg, reasons=rest, notes=tuple(hg.notes) + tuple(
        f"{_NOTES[r.kind]}: {r}" for r in floor))


def unrefined_e(hg: HypergradientResult) -> float:
    """G/mu at hg's x (the worst over samples): the e a lower solve warm-started there certifies
    without a step or a refinement; nan when hg does not say."""
    if hg.samples is not None:
        return max(unrefined_e(s) for s in hg.samples)
    mu = cast(dict[str, Any], hg.constants).get("mu", math.nan)
    return hg.G / mu if mu > 0 else math.nan


#: The first-order lower solvers: their e is G/mu, and G stops falling near `rounding_floor`.
FIRST_ORDER = ("gd", "hb", "fista")


def lowest_eps(hg: HypergradientResult, at_floor: bool = False) -> float:
    """The lowest eps the next round may ask for: eps_machine ||x|| (the largest over samples).
    at_floor (the correction rounds with a target below their rounding terms): for a
    first-order lower solve also rounding_floor(L, x) / mu, below which its G/mu does not go in
    practice and which it has no test for: asked for less it ran to its cap (1-D and 2-D TV with
    FISTA or GD at atol 1e-14: 10^4 iterations, 38-61 times the units of the round before)."""
    if hg.samples is not None:
        return max(lowest_eps(s, at_floor) for s in hg.samples)
    if hg.x is None:
        return 0.0
    floor = solution_floor(hg.x)
    c = hg.constants if isinstance(hg.constants, dict) else {}
    if at_floor and hg.lower_solver in FIRST_ORDER and float(c.get("mu", 0.0)) > 0:
        floor = max(floor, rounding_floor(float(c["L"]), np.asarray(hg.x)) / float(c["mu"]))
    return floor


def next_eps(eps: float, planned: float, hg: HypergradientResult, at_floor: bool = False) -> float:
    """The next round's eps from a plan for E: the current eps when the plan does not tighten
    the lower solve (planned >= e: a round's refined e can be below the G/mu a warm-started
    solve certifies by itself, and asking for it stalls that solve), else the plan, never
    below `lowest_eps` (with `at_floor`)."""
    if planned >= hg.e:
        return eps
    return max(min(eps, planned), lowest_eps(hg, at_floor))


#: A correction's bound cannot go below its rounding terms: where atol + rtol ||h|| is under
#: this many times them, the tight and DWR rounds aim at this many times them instead, and end
#: there with `floor_failure` (a target below the floor used to end the rounds after their first
#: correction: a 12 x 12 FoE image with GD took a bound of 2.2e-3 at atol 1e-14, where atol
#: 1e-10 reached 4e-11). Just above 10, where those rounds used to give up: the tight rounds give
#: bound(h_c) half of their share, and `plans.dwr_tightened` stops at a fifth of that; a target
#: above it is steered to as before (at 12, targets between 10 and 12 times the floor that the
#: rounds used to meet ended at the floor, up to 10 times above them).
ROUNDING_GOAL = 11.0
#: The same for the block rounds, which gave up where the rounding term took a fifth.
BLOCK_ROUNDING_GOAL = 5.5


def rounding_goal(rounding: float, n: int, factor: float = ROUNDING_GOAL) -> float:
    """What the correction rounds aim at when the target is below the floor: `factor` times the
    largest rounding term of the n directions (`rounding`), times sqrt(n) (the directions'
    bounds combine in quadrature)."""
    return factor * math.sqrt(n) * rounding


def floor_failure(target: float, why: str, bound: float, name: str = "bound") -> str:
    """The failure text of rounds that end at an accuracy floor: the target, what reached its
    floor (`why`), and the best certified bound (E&R's "bound", or the "block bound")."""
    return (f"accuracy floor (certified accuracy unreachable): atol + rtol ||grad|| = "
            f"{fmt(target)} is below the accuracy floating point allows here ({why}); {name} "
            f"{fmt(bound)} is the best certified")


#: The lowest delta the rounds plan: this many eps_machine sqrt(n) ||grad_x f||, about the
#: rounding of a recomputed residual A q - b at convergence (A q is about b). A plan from a
#: residual already there (1.2e-16, or exactly 0 on an x of 4 entries) set delta below what
#: the next round's CG reaches, and it ran to its cap: 10^4-2 10^4 units, "capped".
DELTA_FLOOR = 8.0


def rounding_failure(target: float, rounding: float, bound: float, name: str) -> str:
    """`floor_failure` for correction rounds that ended at their rounding terms (`rounding`)."""
    return floor_failure(target, f"the correction's rounding terms, {fmt(rounding)}", bound, name)


def solve_floor(hg: HypergradientResult, lower: bool) -> str:
    """What reached its rounding floor in hg's round: the lower solve (e) or the adjoint (R)."""
    if lower:
        return f"the lower solve at its rounding floor, e = {fmt(hg.e)}"
    return f"the adjoint solve at its rounding floor, R = {fmt(hg.R)}"


def own_bound(hg: HypergradientResult, total: dict[str, int], name: str) -> HypergradientResult:
    """hg, the round the `name` rounds (tight, DWR, block) ended at because its solve did not
    end "ok" or its h is exactly 0, with E&R's bound, the rounds' work and a note saying so:
    the result's certificate is then "er" where the caller asked for the rounds' own."""
    return evolve(hg, work=total, notes=tuple(hg.notes) + (
        f"{name} rounds ended at a round whose solve did not end ok or whose h is exactly 0, "
        f"before a correction or with a smaller bound than the corrections': its own (E&R's) "
        f"bound is returned",))


def _is_cap(reason: Reason) -> bool:
    return reason.kind in _NOTES and reason.solver_status is Status.CAPPED


#: The share of the work so far a capped round's correction may spend (each of its CGs capped at
#: this share over the number of its solves, or CAPPED_MIN_ITERATIONS, never above max_iter):
#: where its bound cannot beat the round's own E&R bound the work is lost (a learned filter far
#: from its optimum, GD capped at G/mu = 0.99: the block bound's two CGs ran to their 10^4-step
#: caps, 3.5 times the call's work, for nothing). On 400 drawn problems capped at 3-300 steps
#: the floor of 20 steps took the median gain over E&R's bound from 9 to 38.
CAPPED_SHARE = 0.25
CAPPED_MIN_ITERATIONS = 20


def correction_iterations(max_iter: int, total: dict[str, int], solves: int) -> int:
    """The iteration cap of a correction's CGs: max_iter, or for a capped round's `solves` CGs
    (`solves` > 0) CAPPED_SHARE of the work so far over them, at least CAPPED_MIN_ITERATIONS."""
    if solves <= 0:
        return max_iter
    return min(max_iter, max(CAPPED_MIN_ITERATIONS, int(CAPPED_SHARE * total["units"] / solves)))


#: The rounds' last note where a capped round's correction ends them short of the target.
CAPPED_NOTE = "its solves stopped at max_iter: the rounds end at this round"


def capped_only(hg: HypergradientResult) -> bool:
    """Whether hg's only failures are solves stopped at max_iter: its G and R are computed and
    its E&R bound certified all the same, and so is a correction made at them (the correction's
    bound reads the residuals reached, not the tolerances asked). Another round would ask the
    capped solve for more and stop at max_iter again, so the tight and block rounds correct this
    one and end there. A 12 x 12 FoE image with GD capped at rtol 1e-8: E&R's bound 2.3e-3, the
    tight correction's 5.2e-8 for 8% more work (true error 1.7e-9)."""
    failures = [r for r in hg.reasons if r.kind is not ReasonKind.UNCERTIFIED]
    return bool(failures) and math.isfinite(hg.bound) and all(map(_is_cap, failures))


def caps_met(hg: HypergradientResult) -> HypergradientResult:
    """hg without its caps' reasons (`capped_only`) once its correction certified the target at
    the residuals the capped solves reached: what the call asked is met. A note keeps what the
    solves said."""
    caps = [r for r in hg.reasons if _is_cap(r)]
    return evolve(hg, reasons=tuple(r for r in hg.reasons if not _is_cap(r)),
                  notes=tuple(hg.notes) + tuple(f"{r.text}: the correction certifies the target "
                                                f"at the residual reached" for r in caps))


def rounds_out(max_rounds: int, name: str, bound: float, target: float) -> str:
    """The failure text of accuracy rounds that ran out of rounds with `name` above target."""
    return (f"certified accuracy not reached in {max_rounds} rounds: {name} {fmt(bound)} > "
            f"atol + rtol ||grad|| = {fmt(target)}")


def round_failed(hg: HypergradientResult) -> str:
    """The failure text of correction rounds whose next round's solve did not end "ok" (capped,
    diverged, not finite) and whose last corrected round certified a smaller bound than the
    failed round's own: that round is kept (a 12 x 12 FoE image with GD at atol 1e-14: a capped
    round's 3.8e-8 where the round before had certified 4.8e-11)."""
    return (f"certified accuracy not reached: the next round did not end ok ({hg.status}); "
            f"the last certified round is kept")


def lowest_delta(hg: HypergradientResult) -> float:
    """The lowest delta the next round may ask for (`DELTA_FLOOR`; the largest over samples)."""
    if hg.samples is not None:
        return max(lowest_delta(s) for s in hg.samples)
    n = hg.x.size if hg.x is not None else 1
    b = float(hg.grad_f_norm)
    return DELTA_FLOOR * EPS * math.sqrt(n) * b if math.isfinite(b) else 0.0


def lowest_residual(b: np.ndarray) -> float:
    """The lowest residual a correction's CG for A v = b is asked for: DELTA_FLOOR eps_machine
    sqrt(n) ||b|| (`lowest_delta`'s rule for any right-hand side). Near the rounding floor the
    rounds' plans asked the forward and dual CGs for less, and both ran to their caps: 2 x 10^4
    units for a bound the round before had nearly reached."""
    return DELTA_FLOOR * EPS * math.sqrt(b.size) * norm(b)


def next_delta(delta: float, planned: float, hg: HypergradientResult) -> float:
    """The next round's delta from a plan for R: the current delta when hg's adjoint solve
    stalled at its rounding floor (asking it for less only repeats the stall), else the
    smaller of the two, never planned below `lowest_delta`."""
    return delta if adjoint_stalled(hg) else min(delta, max(planned, lowest_delta(hg)))


#: A round whose h is exactly 0 with atol = 0 has the target rtol ||h|| = 0, and nothing to plan
#: a correction's solves from (a CG tolerance of 0 is never met: such a round ran to its cap,
#: about 10^4 units). It happens when a loose first round accepts x_eps = x0 = 0 and B(0) = 0
#: (a weight on ||x||^2). The next round asks the lower solve for this fraction of its e, which
#: moves x off x0 (`zero_target_eps`).
ZERO_TARGET_SCALE = 0.1


def zero_target_eps(eps: float, hg: HypergradientResult) -> float:
    """The next round's eps after a round whose target was 0 (`ZERO_TARGET_SCALE`)."""
    return next_eps(eps, ZERO_TARGET_SCALE * min(eps, float(hg.e)), hg)


def uncorrected(hg: HypergradientResult, total: dict[str, int], failure: str | None,
                kind: ReasonKind = ReasonKind.ACCURACY) -> HypergradientResult:
    """hg (E&R's bound) with the rounds' work and their failure, when no round got as far as
    its correction (each was a zero trap or had a target of 0)."""
    return evolve(hg, work=total, reasons=hg.reasons if failure is None
                  else hg.reasons + (Reason(kind, failure),))


def solve_again(hg: HypergradientResult, steer: bool, rtol: float | None, atol: float,
                start: tuple[float, float, Any, Any], relative: float,
                trail: list[str]) -> tuple[float, float, Any, Any] | None:
    """(eps, delta, x0, q0) of a round of the DWR, tight or block rounds solved again before
    any correction, or None. After a zero trap (delta >= ||grad f(x_eps)||: a loose first
    round for this x_eps), delta shrinks to `relative` ||grad f||; after a round whose h is
    exactly 0 with atol = 0 (its target is 0, and a solve planned from it never stops),
    `zero_target_eps` asks the lower solve for less. start: the round's (eps, delta, x0, q0)."""
    eps, delta, _, q0 = start
    if not steer:
        return None
    if hg.reasons and all(r.kind is ReasonKind.ZERO_TRAP for r in hg.reasons):
        return eps, min(0.5 * delta, relative * hg.grad_f_norm), hg.x, q0
    if (round_ok(hg) and not atol + (rtol or 0.0) * grad_norm(hg.grad) > 0
            and not exactly_zero(hg)):
        trail.append(f"eps={fmt(eps)}, delta={fmt(delta)}: h = 0, a target of 0")
        return zero_target_eps(eps, hg), delta, hg.x, hg.q
    return None


def exactly_zero(hg: HypergradientResult) -> bool:
    """Whether hg is h = 0 with E&R's bound 0: grad F = 0 exactly (B = 0 at every x, say a
    stencil whose sums are all empty at these sizes), which meets any target, 0 included. The
    correction's rounds return it as it is; they had solved again for 8 rounds and ended
    "not reached: dwr bound inf > ... = inf" with the bound 0."""
    return round_ok(hg) and hg.bound == 0.0 and not grad_norm(hg.grad) > 0
