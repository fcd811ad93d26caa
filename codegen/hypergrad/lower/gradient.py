"""Gradient descent and Polyak's heavy ball for the lower level (docs/solvers.md 1).

gd takes the optimal fixed step 2/(L + mu); hb adds momentum tuned for quadratics, which may fail
on a non-quadratic g ("diverged" or "capped"). The gradient norm is tested before each step, so
a good warm start costs one gradient. With store_trajectory every iterate is kept for
adjoint="backprop" (O(K d) memory).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..common import LowerTask, all_finite, call_kernel, norm
from ..fused import LOOP_STATUSES, REASON_KERNEL, FusedLoops, contiguous, count, loops_for
from ..rates import gd_step, hb_step, rates
from ..results import LowerResult, Status
from .stopping import first_order_stop

__all__ = ["solve_gd", "solve_hb"]


def solve_gd(task: LowerTask) -> LowerResult:
    """Gradient descent, a priori bound q_GD^K e0 (rigorous)."""
    c = task.constants
    return _descend(task, "gd", gd_step(c["mu"], c["L"]))


def solve_hb(task: LowerTask) -> LowerResult:
    """Heavy ball, a priori bound q_HB^K e0 (C = 1: not rigorous)."""
    c = task.constants
    return _descend(task, "hb", hb_step(c["mu"], c["L"]))


def _descend(task: LowerTask, solver: str, step: dict[str, Any]) -> LowerResult:
    """x <- x - a grad g + b (x - x_prev) until ||grad g|| / mu <= tol."""
    k, th, tol, x0 = task.k, task.theta, task.tol, task.x0
    mu, L = task.constants["mu"], task.constants["L"]
    a, b = step["a"], step["b"]
    loops = None if task.record or task.store_trajectory else loops_for(k)
    if loops is not None:
        return _fused(task, solver, step, loops)
    g, msg = call_kernel(k.lower_grad, x0, th)
    x = x0
    if g is None:
        return LowerResult(x=x0, grad=None, bound=math.inf, iterations=0,
                           status=Status.NON_FINITE, solver=solver, tol=tol, mu=mu, L=L,
                           n_grad=1, apriori=math.inf, step=step, message=msg)
    n_grad, it = 1, 0
    gn = gn0 = norm(g)
    x_prev = x
    hist = [gn / mu] if task.record else None
    traj = [x.copy()] if task.store_trajectory else None
    msg = ""
    while True:
        stop, why = first_order_stop(gn, gn0, mu, tol, it, task.max_iter)
        if stop is not None:
            status, msg = stop, why or msg
            break
        x_new = x - a * g
        if b:
            x_new += b * (x - x_prev)
        g_new, msg = (None, "non-finite iterate") if not all_finite(x_new) else \
            call_kernel(k.lower_grad, x_new, th)
        n_grad += 1
        if g_new is None:
            status = Status.NON_FINITE
            break
        x_prev, x, g = x, x_new, g_new
        gn = norm(g)
        it += 1
        if hist is not None:
            hist.append(gn / mu)
        if traj is not None:
            traj.append(x.copy())
    return _result(task, solver, step, status, x, g, gn, gn0, it, n_grad, hist, traj, msg)


def _fused(task: LowerTask, solver: str, step: dict[str, Any], loops: FusedLoops
           ) -> LowerResult:
    """The loop above in one C call (codegen/hypergrad/fused.py): the same iterates up to the
    rounding of the norms, the same stopping test."""
    mu = task.constants["mu"]
    x, g = np.empty(loops.x_size), np.empty(loops.x_size)
    info = loops.run("loop_descent", contiguous(task.theta), [contiguous(task.x0), x, g],
                     [task.tol, mu, step["a"], step["b"], count(task.max_iter)])
    status, it, n_grad = LOOP_STATUSES[int(info[0])], int(info[1]), int(info[2])
    gn, gn0 = float(info[3]), float(info[4])
    reason = "non-finite kernel output" if int(info[6]) == REASON_KERNEL else "non-finite iterate"
    if info[5] == 0:  # the start's gradient was not finite
        return LowerResult(x=task.x0, grad=None, bound=math.inf, iterations=0,
                           status=Status.NON_FINITE, solver=solver, tol=task.tol, mu=mu,
                           L=task.constants["L"], n_grad=1, apriori=math.inf, step=step,
                           message=reason)
    if status is Status.DIVERGED:
        msg = first_order_stop(gn, gn0, mu, task.tol, it, task.max_iter)[1]
    else:
        msg = reason if status is Status.NON_FINITE else ""
    return _result(task, solver, step, status, x, g, gn, gn0, it, n_grad, None, None, msg)


def _result(task: LowerTask, solver: str, step: dict[str, Any], status: Status, x: np.ndarray,
            g: np.ndarray, gn: float, gn0: float, it: int, n_grad: int,
            hist: list[Any] | None, traj: list[np.ndarray] | None, msg: str) -> LowerResult:
    """The LowerResult of a gd / hb run stopped after `it` steps at x (gradient g)."""
    mu, L = task.constants["mu"], task.constants["L"]
    _, q_gd, q_hb = rates(mu, L)
    e0 = gn0 / mu
    rate = q_gd if solver == "gd" else q_hb
    apriori = rate ** it * e0 if math.isfinite(e0) else math.inf
    return LowerResult(x=x, grad=g, bound=gn / mu, iterations=it, status=status, solver=solver,
                       tol=task.tol, mu=mu, L=L, n_grad=n_grad, initial_bound=e0,
                       apriori=apriori, apriori_rigorous=solver == "gd" or not math.isfinite(e0),
                       step=step, history=hist, trajectory=traj, message=msg)
