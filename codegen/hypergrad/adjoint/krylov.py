"""Adjoint solves by CG, and by gradient descent / heavy ball (= backpropagation through lower
GD / HB with the Hessian frozen at x; docs/framework.md 3 and docs/solvers.md 2).

Tolerances are absolute, on the true unpreconditioned residual ||A q - grad f||: the recursive
residual only triggers a check with the true one (one HVP), and if that is still above delta the
iteration restarts from it (residual replacement; pitfall 1). The true residual of the returned
q is always known. Zero-hypergradient trap: with q0 = 0 and ||grad f|| <= delta at least one
iteration is done and the result is flagged (pitfall 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..common import (
    DIVERGENCE_FACTOR,
    AdjointTask,
    MatVec,
    all_finite,
    call_kernel,
    hvp_at,
    norm,
    true_residual,
)
from ..fused import data_per_entry, fused_cg, loops_for
from ..krylov import Companion, cg
from ..preconditioners import held_for
from ..rates import cg_rate_bound, gd_step, hb_step, rates
from ..results import AdjointResult, Status

__all__ = ["solve_cg", "solve_gd", "solve_hb"]


@dataclass
class _Run:
    """The state an adjoint iteration hands to `_finish`."""

    hvp: MatVec
    q: np.ndarray
    r: np.ndarray    # residual form A q - b (at q once `_check` or `_solve` recomputed it)
    r0: float
    trap: bool
    min_iter: int
    n_hvp: int
    history: list[Any] | None
    energy_error: float = math.nan  # the last CG segment's Gauss-Radau estimate at q


def solve_cg(task: AdjointTask) -> AdjointResult:
    """CG with residual replacement."""
    return _solve(task, "cg", _cg_segments)


def solve_gd(task: AdjointTask) -> AdjointResult:
    """Richardson iteration with step 2/(L + mu): K steps from q0 = 0 are exactly K steps of
    backprop through GD with Hessians frozen at x."""
    step = gd_step(task.constants["mu"], task.constants["L"])
    return _solve(task, "gd", lambda task, run: _richardson(task, run, step))


def solve_hb(task: AdjointTask) -> AdjointResult:
    """Heavy ball in residual form, q_prev = q0: backprop through HB, frozen."""
    step = hb_step(task.constants["mu"], task.constants["L"])
    return _solve(task, "hb", lambda task, run: _richardson(task, run, step))


Iterate = Callable[[AdjointTask, _Run], "tuple[Status, float, str, int, int]"]


def _solve(task: AdjointTask, solver: str, iterate: Iterate) -> AdjointResult:
    """Start (cold or warm), iterate, and report with the true residual and a priori bound."""
    b, delta, mu = task.b, task.delta, task.constants["mu"]
    hvp = hvp_at(task.k, task.x, task.theta)
    n_hvp = 0
    cold = task.q0 is None or not np.any(task.q0)
    if cold:
        q = np.zeros_like(b)
        r = -b.copy()
    else:
        q = np.array(task.q0, dtype=np.float64).ravel()
        Aq, msg = call_kernel(hvp, q)
        n_hvp += 1
        if Aq is None:
            return AdjointResult(q=np.zeros_like(b), residual=math.inf, iterations=0,
                                 status=Status.NON_FINITE, solver=solver, delta=delta, mu=mu,
                                 n_hvp=n_hvp, message=msg)
        r = Aq - b
    r0, bn = norm(r), norm(b)
    trap = cold and bn <= delta
    run = _Run(hvp, q, r, r0, trap, 1 if trap else 0, n_hvp,
               [r0] if task.record else None)
    if trap and bn == 0.0:  # q = 0 solves A q = 0 exactly
        status, R, msg, it, segments = Status.ZERO_TRAP, 0.0, "", 0, 1
    else:
        status, R, msg, it, segments = iterate(task, run)
    if math.isnan(R):  # one extra HVP: the TRUE residual of the returned q (pitfall 1)
        rt, msg2 = true_residual(hvp, run.q, b)
        run.n_hvp += 1
        R = norm(rt) if rt is not None else math.inf
        run.r = run.r if rt is None else rt
        if rt is None:
            msg = msg or msg2
            if status in (Status.CONVERGED, Status.CAPPED, Status.ZERO_TRAP):
                status = Status.NON_FINITE
    apriori, rigorous = _apriori(solver, it, segments, r0, task.constants)
    return AdjointResult(q=run.q, residual=R, iterations=it, status=status, solver=solver,
                         delta=delta, mu=mu, n_hvp=run.n_hvp, r0=r0, zero_trap=trap,
                         apriori=apriori, apriori_rigorous=rigorous, segments=segments,
                         history=run.history, message=msg, energy_error_estimate=run.energy_error,
                         true_residual=run.r if math.isfinite(R) else None)


def _cg_segments(task: AdjointTask, run: _Run) -> tuple[Status, float, str, int, int]:
    """CG segments until the true residual meets delta: (status, R or nan, message,
    iterations, segments). Preconditioned by what a learning run holds for the kernel
    (`preconditioners.held_for`: a deflation or the Hessian's factor), if any."""
    it, segments, s = 0, 1, -run.r
    held = held_for(task.k) if run.history is None else None
    loops = loops_for(task.k) if run.history is None else None
    mu = task.constants["mu"]
    companion = _bound_companion(task, held)
    met = False
    while True:
        if companion is not None:  # the first segment in Python, a pair product per step
            floor = GOAL_FLOOR if companion.goal is not None else 1.0
            out = cg(run.hvp, task.b, run.q, residual=s, tol=task.delta * floor,
                     max_iter=task.max_iter - it, min_iter=max(run.min_iter - it, 0),
                     diverge_from=run.r0, history=run.history, mu=mu, companion=companion)
            met, companion = companion.met, None
        elif held is not None:
            out = held.solve(run.hvp, task.x, task.theta, task.b, run.q, residual=s,
                             tol=task.delta, max_iter=task.max_iter - it,
                             min_iter=max(run.min_iter - it, 0), diverge_from=run.r0)
        elif loops is not None:  # the same CG in one C call
            out = fused_cg(loops, task.x, task.theta, task.b, run.q, residual=s,
                           tol=task.delta, max_iter=task.max_iter - it,
                           min_iter=max(run.min_iter - it, 0), diverge_from=run.r0, mu=mu)
        else:
            out = cg(run.hvp, task.b, run.q, residual=s, tol=task.delta,
                     max_iter=task.max_iter - it, min_iter=max(run.min_iter - it, 0),
                     diverge_from=run.r0, history=run.history, mu=mu)
        run.n_hvp += out.matvecs
        it += out.iterations
        run.q, run.energy_error = out.x, out.energy_error
        if out.status is not Status.CONVERGED:
            return out.status, math.nan, out.message, it, segments
        if out.iterations == 0:  # met delta where it started: s is a true residual there
            return Status.CONVERGED, norm(s), "", it, segments
        status, R, msg, rt = _check(task, run)
        if met and status is None and rt is not None:  # the companion's goal ended it, not delta
            return Status.CONVERGED, R, msg, it, segments
        if status is not None or rt is None:
            return status or Status.NON_FINITE, R, msg, it, segments
        s = -rt  # residual replacement: restart from the true residual
        segments += 1


#: Data (numbers) from which a CG with a companion runs in Python with pair products instead
#: of the fused C loop without: below, an HVP costs little more than the Python loop's own
#: step (docs/solvers.md 9).
PAIR_MIN_DATA = 1 << 18

#: With a goal, the companion's segment may go on to this fraction of delta (a goal of 0, at
#: h = 0, would never be met): delta is the rounds' blind plan, the goal an informed one.
GOAL_FLOOR = 1e-2


def _bound_companion(task: AdjointTask, held: Any) -> Companion | None:
    """task's companion bound at task.x to the module's pair kernel, or None: there is none, a
    learning run's preconditioner acts on the solve (the companion's CG is plain), the data
    are too small for a pass over them to outweigh the Python loop (PAIR_MIN_DATA), or the
    module has no pair kernel or the right-hand side is not finite."""
    companion = task.companion
    pair_at = getattr(task.k, "hvp_pair_at", None)
    if (companion is None or held is not None or pair_at is None
            or data_per_entry(task.k) * task.x.size < PAIR_MIN_DATA):
        return None
    companion.bind(task.x, task.theta, float(task.constants["mu"]), pair_at(task.x, task.theta))
    return companion if companion.active else None


def _check(task: AdjointTask, run: _Run
           ) -> tuple[Status | None, float, str, np.ndarray | None]:
    """The true residual at run.q (one HVP): (a final status or None, R, message, A q - b)."""
    rt, msg = true_residual(run.hvp, run.q, task.b)
    run.n_hvp += 1
    if rt is None:
        return Status.NON_FINITE, math.nan, msg, rt
    run.r = rt  # the true residual at run.q from now on (`_solve` returns it)
    R = norm(rt)
    if R <= task.delta:
        return (Status.ZERO_TRAP if run.trap else Status.CONVERGED), R, msg, rt
    return None, R, msg, rt


def _richardson(task: AdjointTask, run: _Run, step: dict[str, Any]
                ) -> tuple[Status, float, str, int, int]:
    """q <- q - a r + b (q - q_prev) on the residual r = A q - b, with residual replacement."""
    a, bm = step["a"], step["b"]
    q, r = run.q, run.r
    q_prev, r_prev = q.copy(), r.copy()
    it, segments, msg = 0, 1, ""
    while True:
        rn = norm(r)
        if (rn <= task.delta or rn == 0.0) and it >= run.min_iter:
            run.q = q
            status, R, msg, rt = _check(task, run)
            if status is not None or rt is None:
                return status or Status.NON_FINITE, R, msg, it, segments
            r, r_prev, q_prev = rt, rt.copy(), q.copy()
            segments += 1
            continue
        if it >= task.max_iter:
            return Status.CAPPED, math.nan, msg, it, segments
        if rn > DIVERGENCE_FACTOR * max(run.r0, 1e-300):
            return (Status.DIVERGED, math.nan, f"residual grew from {run.r0:.3g} to {rn:.3g}",
                    it, segments)
        Ar, msg = call_kernel(run.hvp, r)
        run.n_hvp += 1
        if Ar is None:
            return Status.NON_FINITE, math.nan, msg, it, segments
        q_new = q - a * r
        r_new = r - a * Ar
        if bm:
            q_new += bm * (q - q_prev)
            r_new += bm * (r - r_prev)
        if not all_finite(q_new, r_new):
            return Status.NON_FINITE, math.nan, "non-finite iterate", it, segments
        q_prev, r_prev, q, r = q, r, q_new, r_new
        run.q = q
        it += 1
        if run.history is not None:
            run.history.append(norm(r))


def _apriori(solver: str, K: int, segments: int, r0: float, c: dict[str, Any]) -> tuple[float, bool]:
    """A priori residual bound (docs/framework.md 5) with the actual ||r_0||: GD q_GD^K ||r0||;
    CG (2 sqrt kappa)^S q_HB^K ||r0|| (S restart segments); HB q_HB^K ||r0|| (not rigorous)."""
    kappa, q_gd, q_hb = rates(c["mu"], c["L"])
    if not math.isfinite(r0):
        return math.inf, True
    if solver == "gd":
        return q_gd ** K * r0, True
    if solver == "hb":
        return q_hb ** K * r0, False
    if not math.isfinite(kappa):
        return (r0 if K == 0 else math.inf), True
    return min(r0 if K == 0 else math.inf, cg_rate_bound(kappa, segments, q_hb, K, r0)), True
