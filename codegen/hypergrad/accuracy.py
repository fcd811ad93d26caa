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
Every round's result is a complete certified hypergradient; only the last is returned, with
the work of all rounds.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, cast

import numpy as np

from .bounds import aposteriori_bound
from .common import SolverError, fmt
from .results import HypergradientResult, Reason, ReasonKind

__all__ = ["to_accuracy", "bound_parts", "MAX_ROUNDS", "SHARE"]

#: Rounds (each a warm-started lower solve, adjoint solve and bound) before giving up.
MAX_ROUNDS = 8

#: Fraction of the target each of the two parts aims at (the rest absorbs the e R cross term,
#: the rounding floor and the change of ||grad|| between rounds).
SHARE = 0.4

_WORK_KEYS = ("lower_grads", "hvps", "cross", "units")


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


#: run(eps, delta, x0, q0, refine_iter) -> one round's result.
Round = Callable[[float, float, Any, Any, int], HypergradientResult]


def to_accuracy(run: Round, rtol: float, atol: float, eps: float, delta: float, x0: Any,
                q0: Any, refine_iter: int, max_rounds: int = MAX_ROUNDS) -> HypergradientResult:
    """Call run(eps, delta, x0, q0, refine_iter) -> HypergradientResult until
    bound <= atol + rtol ||grad||; eps and delta are the first round's tolerances.

    A round whose status is not "ok" (a capped or failed solve, uncertified constants, a zero
    trap) ends the loop: its result is returned as it is. The refinement of ||x - x*||
    (refine_iter HVPs) is skipped in the first round, which only measures the parts, and in a
    later round when the lower solve's own certificate G/mu <= eps keeps the e part within its
    share. The returned result's work sums all rounds; its notes list the rounds' tolerances.
    """
    if not (rtol >= 0 and atol >= 0 and rtol + atol > 0) or not math.isfinite(rtol + atol):
        raise SolverError(f"rtol and atol must be finite and >= 0, not both 0 "
                          f"(got rtol={rtol!r}, atol={atol!r})")
    total = dict.fromkeys(_WORK_KEYS, 0)
    trail: list[str] = []
    refine = 0  # the first round only measures the parts: no refinement yet
    failure: str | None = None
    for _ in range(max_rounds):
        hg = run(eps, delta, x0, q0, refine)
        for key in _WORK_KEYS:
            total[key] += hg.work.get(key, 0)
        trail.append(f"eps={fmt(eps)}, delta={fmt(delta)}: bound {fmt(hg.bound)}")
        target = atol + rtol * float(np.linalg.norm(hg.grad))
        if hg.status != "ok" or hg.bound <= target:
            break
        r_part, e_part, rounding = bound_parts(hg)
        if rounding >= (1 - 2 * SHARE) * target:
            failure = (f"certified accuracy unreachable: the rounding floor {fmt(rounding)} "
                       f"alone exceeds a share of atol + rtol ||grad|| = {fmt(target)}")
            break
        share = SHARE * target
        tightened = False
        if r_part > share:
            delta, tightened = min(delta, hg.R * share / r_part), True
        if e_part > share:
            eps, tightened = min(eps, hg.e * share / e_part), True
        if not tightened:  # both parts within share, the cross term or ||grad|| tipped it
            # (never to 0: a zero e or R is exact already, and a tolerance of 0 is never met)
            eps = 0.5 * min(eps, hg.e) if hg.e > 0 else eps
            delta = 0.5 * min(delta, hg.R) if hg.R > 0 else delta
        # The next lower solve certifies e <= eps by itself; refine only if that is not enough.
        refine = 0 if hg.e == 0 or e_part / hg.e * eps <= share else refine_iter
        x0, q0 = hg.x, hg.q
    else:
        failure = (f"certified accuracy not reached in {max_rounds} rounds: bound "
                   f"{fmt(hg.bound)} > atol + rtol ||grad|| = {fmt(target)}")
    notes = tuple(hg.notes) + (f"accuracy rounds (rtol={fmt(rtol)}, atol={fmt(atol)}): "
                               + "; ".join(trail),)
    reasons = hg.reasons if failure is None else (Reason(ReasonKind.ACCURACY, failure),)
    return replace(hg, work=total, notes=notes, reasons=reasons)

