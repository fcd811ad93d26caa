"""Strongly convex FISTA for the lower level (Chambolle & Pock 2016, Alg. 5; docs/solvers.md 1).

The gradient is evaluated at the extrapolated point z_k, the test ||grad g(z_k)||/mu <= tol is
made there, and z_k is returned: it is the only point whose gradient is known (the next
y = z - grad g(z)/L would need another gradient). The a priori bound transfers the rate of y_k
to z_k with (1 + |beta|) (docs/bounds.md 10).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..common import LowerTask, all_finite, call_kernel, norm
from ..fused import LOOP_STATUSES, REASON_KERNEL, FusedLoops, contiguous, count, loops_for
from ..rates import rates
from ..results import LowerResult, Status
from .stopping import first_order_stop

__all__ = ["solve_fista", "fista_coefficients"]


def fista_coefficients(q: float, n: int) -> list[tuple[float, float]]:
    """The first n (t_k, beta_k) of strongly convex FISTA with ratio q = mu/L, t_0 = 0. For
    tests: t_k -> 1/sqrt(q), beta_k -> (1 - sqrt q)/(1 + sqrt q)."""
    t, out = 0.0, []
    for _ in range(n):
        t_next, beta = _fista_step(q, t)
        out.append((t, beta))
        t = t_next
    return out


def _fista_step(q: float, t: float) -> tuple[float, float]:
    a = 1.0 - q * t * t
    t_next = (a + math.sqrt(a * a + 4.0 * t * t)) / 2.0
    beta = (t - 1.0) * (1.0 - q * t_next) / (t_next * (1.0 - q)) if q < 1.0 else 0.0
    return t_next, beta


def solve_fista(task: LowerTask) -> LowerResult:
    """FISTA with tau = 1/L and q = mu/L until ||grad g(z)|| / mu <= tol."""
    k, th, tol, x0 = task.k, task.theta, task.tol, task.x0
    mu, L = task.constants["mu"], task.constants["L"]
    step = {"tau": 1.0 / L, "q": mu / L}
    tau, q = step["tau"], step["q"]
    loops = None if task.record else loops_for(k)
    if loops is not None:
        return _fused(task, loops, step)
    y = y_prev = x0
    t = 0.0
    it = n_grad = 0
    x_last = g_last = None
    gn = gn0 = math.inf
    beta_last = 0.0
    hist: list[Any] | None = [] if task.record else None
    msg = ""
    while True:
        t_next, beta = _fista_step(q, t)
        z = y + beta * (y - y_prev) if it > 0 else y
        g, msg = (None, "non-finite iterate") if not all_finite(z) else \
            call_kernel(k.lower_grad, z, th)
        n_grad += 1
        if g is None:
            status = Status.NON_FINITE
            break
        x_last, g_last, gn = z, g, norm(g)
        beta_last = beta if it > 0 else 0.0
        if it == 0:
            gn0 = gn
        if hist is not None:
            hist.append(gn / mu)
        stop, why = first_order_stop(gn, gn0, mu, tol, it, task.max_iter)
        if stop is not None:
            status, msg = stop, why or msg
            break
        y_prev, y = y, z - tau * g
        t = t_next
        it += 1
    return _result(task, step, status, it, n_grad, x_last, g_last, gn, gn0, beta_last, hist,
                   msg)


def _fused(task: LowerTask, loops: FusedLoops, step: dict[str, Any]) -> LowerResult:
    """The loop above in one C call (codegen/hypergrad/fused.py): the same iterates up to the
    rounding of the norms, the same stopping test."""
    mu = task.constants["mu"]
    z, g = np.empty(loops.x_size), np.empty(loops.x_size)
    info = loops.run("loop_fista", contiguous(task.theta), [contiguous(task.x0), z, g],
                     [task.tol, mu, step["tau"], step["q"], count(task.max_iter)])
    status, it, n_grad = LOOP_STATUSES[int(info[0])], int(info[1]), int(info[2])
    gn, gn0, beta_last, have_z = float(info[3]), float(info[4]), float(info[5]), info[6] > 0
    if status is Status.DIVERGED:
        msg = first_order_stop(gn, gn0, mu, task.tol, it, task.max_iter)[1]
    elif status is Status.NON_FINITE:
        msg = "non-finite kernel output" if int(info[7]) == REASON_KERNEL else "non-finite iterate"
    else:
        msg = ""
    return _result(task, step, status, it, n_grad, z if have_z else None,
                   g if have_z else None, gn, gn0, beta_last, None, msg)


def _result(task: LowerTask, step: dict[str, Any], status: Status, it: int, n_grad: int,
            x_last: np.ndarray | None, g_last: np.ndarray | None, gn: float, gn0: float,
            beta_last: float, hist: list[Any] | None, msg: str) -> LowerResult:
    """The LowerResult of a FISTA run that stopped after `it` steps at (x_last, g_last)."""
    tol, mu, L = task.tol, task.constants["mu"], task.constants["L"]
    if x_last is None:  # not even the start had a finite gradient
        return LowerResult(x=task.x0, grad=None, bound=math.inf, iterations=0, status=status,
                           solver="fista", tol=tol, mu=mu, L=L, n_grad=n_grad, step=step,
                           message=msg)
    if status is Status.NON_FINITE:
        # the last finite point is the z of the previous iteration: it - 1 steps were taken
        it = max(it - 1, 0) if it > 0 else 0
    return LowerResult(x=x_last, grad=g_last, bound=gn / mu, iterations=it, status=status,
                       solver="fista", tol=tol, mu=mu, L=L, n_grad=n_grad,
                       initial_bound=gn0 / mu, apriori=_apriori(gn0 / mu, it, mu, L,
                                                                abs(beta_last)),
                       step=step, history=hist, message=msg)


def _apriori(e0: float, K: int, mu: float, L: float, beta: float) -> float:
    """The Chambolle-Pock rate eps_y(K) for y_K, transferred to the returned
    z_K = y_K + beta (y_K - y_{K-1}) as (1 + beta) eps_y(K) + beta eps_y(K - 1) (the rate itself
    is UNVERIFIED against the paper)."""
    if not math.isfinite(e0):
        return math.inf
    kappa, _, _ = rates(mu, L)
    sq = math.sqrt(mu / L)

    def eps_y(j: int) -> float:
        if j <= 0:
            return e0
        return math.sqrt(min((1 + sq) * (1 - sq) ** j, 4.0 / (j + 1) ** 2) * kappa) * e0

    if K == 0:
        return e0
    return (1 + beta) * eps_y(K) + beta * eps_y(K - 1)
