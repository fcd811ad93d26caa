"""The rounding floor of the accuracy rounds (docs/bounds.md 12): the lowest eps a round may
ask of a lower solve (eps_machine ||x||), and a lower solve that stagnated there.

A lower solve at its rounding floor certifies the G it reached; the rounds (E&R's, the tight
and the block ones) accept that as accuracy, not failure, and stop with "accuracy floor" when
the target needs less.
"""
from __future__ import annotations

import math
from typing import Any, cast

from .lower.stopping import solution_floor
from .results import HypergradientResult, Reason, ReasonKind, Status, evolve

__all__ = ["FLOOR_NOTE", "floor_accepted", "lower_stalled", "lowest_eps", "unrefined_e",
           "next_eps", "zero_target_eps", "ZERO_TARGET_SCALE"]

#: The note that keeps a lower solve's "rounding floor" reason once the rounds accepted it.
FLOOR_NOTE = "lower solve at its rounding floor"


def _is_floor_reason(reason: Reason) -> bool:
    return (reason.kind is ReasonKind.LOWER_SOLVE
            and reason.solver_status is Status.ROUNDING_FLOOR)


def lower_stalled(hg: HypergradientResult) -> bool:
    """Whether hg's lower solve stagnated at its rounding floor (seen by `floor_accepted`)."""
    return any(note.startswith(FLOOR_NOTE) for note in hg.notes)


def floor_accepted(hg: HypergradientResult) -> HypergradientResult:
    """hg without its lower solve's "rounding floor" reason when that is its only non-stated
    reason: the bound certifies the G reached (the floor is accuracy, not failure); the
    rounds decide whether it meets the target. A note keeps what the solver said."""
    if not hg.reasons:
        return hg
    floor = [r for r in hg.reasons if _is_floor_reason(r)]
    rest = tuple(r for r in hg.reasons if not _is_floor_reason(r))
    if not floor or not all(r.kind is ReasonKind.UNCERTIFIED for r in rest):
        return hg
    return evolve(hg, reasons=rest, notes=tuple(hg.notes) + tuple(
        f"{FLOOR_NOTE}: {r}" for r in floor))


def unrefined_e(hg: HypergradientResult) -> float:
    """G/mu at hg's x (the worst over samples): the e a lower solve warm-started there certifies
    without a step or a refinement; nan when hg does not say."""
    if hg.samples is not None:
        return max(unrefined_e(s) for s in hg.samples)
    mu = cast(dict[str, Any], hg.constants).get("mu", math.nan)
    return hg.G / mu if mu > 0 else math.nan


def lowest_eps(hg: HypergradientResult) -> float:
    """The lowest eps the next round may ask for: eps_machine ||x|| (the largest over samples)."""
    if hg.samples is not None:
        return max(lowest_eps(s) for s in hg.samples)
    return solution_floor(hg.x) if hg.x is not None else 0.0


def next_eps(eps: float, planned: float, hg: HypergradientResult) -> float:
    """The next round's eps from a plan for E: the current eps when the plan does not tighten
    the lower solve (planned >= e: a round's refined e can be below the G/mu a warm-started
    solve certifies by itself, and asking for it stalls that solve), else the plan, never
    below `lowest_eps`."""
    if planned >= hg.e:
        return eps
    return max(min(eps, planned), lowest_eps(hg))


#: A round whose h is exactly 0 with atol = 0 has the target rtol ||h|| = 0, and nothing to plan
#: a correction's solves from (a CG tolerance of 0 is never met: such a round ran to its cap,
#: about 10^4 units). It happens when a loose first round accepts x_eps = x0 = 0 and B(0) = 0
#: (a weight on ||x||^2). The next round asks the lower solve for this fraction of its e, which
#: moves x off x0 (`zero_target_eps`).
ZERO_TARGET_SCALE = 0.1


def zero_target_eps(eps: float, hg: HypergradientResult) -> float:
    """The next round's eps after a round whose target was 0 (`ZERO_TARGET_SCALE`)."""
    return next_eps(eps, ZERO_TARGET_SCALE * min(eps, float(hg.e)), hg)
