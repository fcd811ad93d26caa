"""Inexact Newton (Newton-CG) for the lower level; the backtracking loop lower="direct" shares.

The direction solves A(x) d = -grad g by CG to a relative residual eta (`Forcing`: Eisenstat and
Walker's choice 1, at most 1/2 and L_A ||g|| / (2 mu^2); superlinear near x*, one exact step
when g is quadratic), but not below a quarter of the target tol * mu; since A d = -g + r with
||r|| <= eta ||g||, d is a descent direction for ||g||^2 / 2, and the step is halved until
||g(x + a d)|| <= (1 - 1e-4 a) ||g(x)||. Each step costs a few HVPs and gradients, about one
pass over the data each, and needs no L; max_iter caps the WORK (gradients + HVPs). The
certificate is ||g||/mu as for every solver (docs/solvers.md 1). When no step decreases ||g||,
the solve "diverged" unless ||g|| is already at the rounding floor (`stopping.rounding_floor`):
then it is "rounding floor", the accuracy floating point allows, not a failure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..common import LowerTask, call_kernel, hvp_at, norm
from ..fused import FusedLoops, cg_at, fused_newton, loops_for
from ..preconditioners import held_for
from ..results import LowerResult, Status
from .stopping import rounding_floor

__all__ = ["solve_newton", "newton_descent", "Direction", "Forcing", "NEWTON_TARGET_SHARE"]

#: The Newton system is solved to a residual of at least this fraction of the target ||grad g||.
NEWTON_TARGET_SHARE = 0.25

#: Inner CG steps per Newton direction at most.
NEWTON_INNER_MAX = 100
#: Eisenstat and Walker's safeguard: eta is kept at least eta_last^SAFEGUARD_POWER while that is
#: above SAFEGUARD_FLOOR, so that one lucky step does not make the next solve needlessly tight.
SAFEGUARD_POWER = (1.0 + math.sqrt(5.0)) / 2.0
SAFEGUARD_FLOOR = 0.1

#: direction(x, g, ||g||, work budget) -> (d or None, HVPs spent, None or the failure).
Direction = Callable[[np.ndarray, np.ndarray, float, int],
                     tuple[Optional[np.ndarray], int, Optional[tuple[Status, str]]]]


@dataclass
class Forcing:
    """Newton-CG's forcing term (docs/solvers.md 1): the direction's CG stops at eta ||g||.

    Eisenstat and Walker's choice 1, eta_k = | ||g_k|| - ||g_{k-1} + A d_{k-1}|| | / ||g_{k-1}||:
    how far the last direction's linear model missed the gradient it reached. Where the model
    predicts poorly (far from x*, after a backtracked step), a tight solve of it buys nothing;
    where it predicts well, a tight solve pays. ||g + A d|| is the last CG's residual (the
    model's prediction for a full step). eta is at most 1/2 (d stays a descent direction) and
    at most L_A ||g|| / (2 mu^2) (the quadratic term after an exact step: quadratic convergence
    near x*, one exact step when g is quadratic); the first is 1/2 unless that bound is below.
    `loop_newton` (templates/solver_loops.c.j2) computes the same numbers in C."""

    mu: float
    L_A: float
    last_eta: float = math.nan
    last_gn: float = math.nan
    predicted: float = math.nan

    def eta(self, gn: float) -> float:
        """The forcing term at ||g|| = gn, after the previous direction's `solved`."""
        if math.isnan(self.predicted):
            eta = 0.5
        else:
            eta = abs(gn - self.predicted) / self.last_gn
            if self.last_eta > 0:  # last_eta ** SAFEGUARD_POWER as the C computes it
                safeguard = math.exp(SAFEGUARD_POWER * math.log(self.last_eta))
                if safeguard > SAFEGUARD_FLOOR:
                    eta = max(eta, safeguard)
            eta = min(eta, 0.5)
        if math.isfinite(self.L_A):
            eta = min(eta, self.L_A * gn / (2 * self.mu * self.mu))
        self.last_eta, self.last_gn = eta, gn
        return eta

    def solved(self, residual_norm: float) -> None:
        """The direction's CG stopped at ||g + A d|| = residual_norm."""
        self.predicted = residual_norm


def solve_newton(task: LowerTask) -> LowerResult:
    """Newton-CG: the whole solve in one C call on a small problem whose module has the loop
    (`fused.fused_newton`), else directions from CG at x (`fused.cg_at`) and steps here; in a
    learning run that holds a preconditioner for k (`preconditioners.held_for`: a deflation or the
    Hessian's factor), directions from its preconditioned CG (the same forcing term: a cap of
    0.1 or 0.02 on it under the deflation changed case (a) of the learning benchmark by -1% to
    +2%)."""
    k, th, c, tol = task.k, task.theta, task.constants, task.tol
    mu, L_A = c["mu"], c.get("L_A", math.inf)
    held = held_for(k)
    loops = None if task.record else loops_for(k)
    if held is None and loops is not None and "loop_newton" in loops.functions:
        return _fused(task, loops)

    forcing = Forcing(mu, L_A)

    def direction(x: np.ndarray, g: np.ndarray, gn: float,
                  budget: int) -> tuple[np.ndarray | None, int, tuple[Status, str] | None]:
        # no need to solve far below the target: ||g(x + d)|| is about the residual once the
        # quadratic term is small
        inner_tol = max(forcing.eta(gn) * gn, NEWTON_TARGET_SHARE * tol * mu)
        cap = min(budget - 1, NEWTON_INNER_MAX)
        run = (cg_at(k, x, th, -g, tol=inner_tol, max_iter=cap, diverge_from=gn)
               if held is None else
               held.solve(hvp_at(k, x, th), x, th, -g, tol=inner_tol, max_iter=cap,
                          diverge_from=gn))
        forcing.solved(math.sqrt(run.rr))
        failed = run.status in (Status.NON_FINITE, Status.NOT_SPD)
        return run.x, run.matvecs, ((run.status, run.message) if failed else None)

    return newton_descent(task, "newton", direction)


def newton_descent(task: LowerTask, name: str, direction: Direction) -> LowerResult:
    """x <- x + a d with d = direction(...) and a halved until ||g|| decreases enough, until
    ||grad g|| / mu <= tol or the work (gradients + HVPs) reaches max_iter. ||g|| never
    increases, so the only rigorous a priori bound is e0."""
    k, th, tol, x0, max_iter = task.k, task.theta, task.tol, task.x0, task.max_iter
    mu, L = task.constants["mu"], task.constants["L"]
    x = x0
    g, msg = call_kernel(k.lower_grad, x, th)
    if g is None:
        return LowerResult(x=x0, grad=None, bound=math.inf, iterations=0,
                           status=Status.NON_FINITE, solver=name, tol=tol, mu=mu, L=L,
                           n_grad=1, message=msg)
    n_grad, n_hvp, it = 1, 0, 0
    gn = gn0 = norm(g)
    hist = [gn / mu] if task.record else None
    msg = ""
    while True:
        if gn / mu <= tol:
            status = Status.CONVERGED
            break
        budget = max_iter - n_grad - n_hvp
        if budget <= 1:
            status = Status.CAPPED
            break
        d, used, failure = direction(x, g, gn, budget)
        n_hvp += used
        if failure is not None or d is None:
            status, why = failure or (Status.NON_FINITE, "")
            msg = f"Newton direction: {why or status}"
            break
        alpha, accepted = 1.0, None  # accepted: the new gradient once a step decreases ||g||
        while n_grad + n_hvp < max_iter and alpha > 1e-10:
            x_new = x + d if alpha == 1.0 else x + alpha * d  # 1.0 * d is d: the same bits
            g_new, msg = call_kernel(k.lower_grad, x_new, th)
            n_grad += 1
            gn_new = math.inf if g_new is None else norm(g_new)
            if gn_new <= (1.0 - 1e-4 * alpha) * gn:
                accepted = g_new
                break
            alpha *= 0.5
        if accepted is None:
            status, msg = _no_decrease(gn, _floor(task, x, gn), n_grad + n_hvp >= max_iter, msg)
            break
        x, g, gn = x_new, accepted, gn_new
        it += 1
        if hist is not None:
            hist.append(gn / mu)
    return LowerResult(x=x, grad=g, bound=gn / mu, iterations=it, status=status, solver=name,
                       tol=tol, mu=mu, L=L, n_grad=n_grad, n_hvp=n_hvp, initial_bound=gn0 / mu,
                       apriori=gn0 / mu, history=hist, message=msg)


def _fused(task: LowerTask, loops: FusedLoops) -> LowerResult:
    """solve_newton through loop_newton: the same steps and stopping tests in one C call."""
    mu, L = task.constants["mu"], task.constants["L"]
    run = fused_newton(loops, task.theta, task.x0, tol=task.tol, mu=mu,
                       L_A=task.constants.get("L_A", math.inf), max_iter=task.max_iter,
                       inner_max=NEWTON_INNER_MAX, share=NEWTON_TARGET_SHARE)
    if run.grad is None:
        return LowerResult(x=run.x, grad=None, bound=math.inf, iterations=0,
                           status=Status.NON_FINITE, solver="newton", tol=task.tol, mu=mu, L=L,
                           n_grad=1, message=run.message)
    status, msg = run.status, run.message
    if status is None:
        status, msg = _no_decrease(run.gn, _floor(task, run.x, run.gn),
                                   run.n_grad + run.n_hvp >= task.max_iter,
                                   "non-finite kernel output" if run.last_failed else "")
    return LowerResult(x=run.x, grad=run.grad, bound=run.gn / mu, iterations=run.iterations,
                       status=status, solver="newton", tol=task.tol, mu=mu, L=L,
                       n_grad=run.n_grad, n_hvp=run.n_hvp, initial_bound=run.gn0 / mu,
                       apriori=run.gn0 / mu, message=msg)


#: The smallest step the backtracking tries is the last 2^-j above 1e-10, 2^-33 = 1.16e-10.
SMALLEST_STEP = 2.0 ** -33


def _floor(task: LowerTask, x: np.ndarray, gn: float) -> float:
    """The ||grad g|| at x below which finding no decrease along a Newton direction is rounding
    noise: `stopping.rounding_floor` (scale L ||x||). Where L is infinite globally (exp and
    polynomial atoms) that scale misses the gradient's terms that do not vanish with x (psi' =
    psi'' for exp), so with L and L_A on the ball B(x, 1.5 ||g||/mu) that holds x* and x + d
    (`local_constants`) it is the larger of that and the level below which exact arithmetic
    would have accepted a step: with A d = -g + r, ||r|| <= ||g||/2 (the forcing term; 0 for
    lower="direct"), ||d|| <= 1.5 ||g||/mu and ||g(x + a d)|| <= (1 - a/2) ||g|| +
    L_A a^2 ||d||^2/2, every a <= (1 - 2e-4) ||g|| / (L_A ||d||^2) passes the test, and the
    halvings try one in [a/2, a] when that is >= 2 SMALLEST_STEP, i.e. when
    ||g|| <= (1 - 2e-4) mu^2 / (4.5 SMALLEST_STEP L_A). With L finite a kernel whose gradient is
    noisy far above rounding still reads as diverged. A steering level for the status only:
    the certificate is ||g||/mu at the returned x either way."""
    c, mu = task.constants, float(task.constants["mu"])
    L = float(c["L"])
    local = getattr(task.k, "local_constants", None)
    if math.isfinite(L) or local is None:
        return rounding_floor(L, x)
    ball = local(x, task.theta, 1.5 * gn / mu)
    L_A = float(ball.get("L_A", math.inf))
    exact = mu * mu * (1 - 2e-4) / (4.5 * SMALLEST_STEP * L_A) if L_A > 0 else math.inf
    return max(rounding_floor(float(ball["L"]), x), exact)


def _no_decrease(gn: float, floor: float, out_of_work: bool, msg: str) -> tuple[Status, str]:
    """Why no step along the direction decreased ||g|| = gn: the work ran out (capped), gn is
    at the rounding floor (stagnation, not failure), or the direction is bad (diverged)."""
    if out_of_work:
        return Status.CAPPED, msg or "no decrease of ||grad g|| along the Newton direction"
    if gn <= floor:
        return Status.ROUNDING_FLOOR, (f"||grad g|| = {gn:.3g} stagnates at the rounding floor: "
                                       f"below {floor:.3g} floating point explains why no halved "
                                       "step decreases it (docs/solvers.md 1)")
    return Status.DIVERGED, msg or "no decrease of ||grad g|| along the Newton direction"
