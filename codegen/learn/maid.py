"""MAID (Salehi, Mukherjee, Roberts, Ehrhardt, SIAM J. Math. Data Sci. 2025; docs/framework.md
9): adaptive accuracy and a certified inexact line search.

Per outer iteration, with current eps, delta and step s: shrink eps, delta by tau until the
certified bound w <= (1 - eta)||h|| (a descent direction), then backtrack on the inexact value
with the certified test

    f(x'_e) + err' + err <= f(x_e) - c h.(theta - theta'),

err, err' each point's certified value error ||grad f(x_e)|| e + L_f/2 e^2 (L_f valid on the
ball B(x_e, e)), which implies F(theta') <= F(theta) - c h.(theta - theta'). After success
s = s rho^i * growth and eps, delta *= nu; when every backtracking step fails eps, delta *= tau
and the hypergradient is recomputed (max_bt_loop times, with bt_steps, bt_steps + 1, ... steps).
The accepted chain is certified monotone, so the returned point is the last accepted one.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..hypergrad.common import grad_norm
from .options import MAIDOptions
from .result import OptimizeStatus
from .runner import Runner, StopRun, floor_stop, shrink_to_accuracy

__all__ = ["run_maid"]


def _backtrack(run: Runner, theta: np.ndarray, hg: Any, s: float, value: float, fe: float,
               eps: float, tries: int, o: MAIDOptions) -> tuple[Any, ...] | None:
    """The first of `tries` steps s rho^i that passes the certified decrease test against the
    value at theta (error fe): (step, theta', value, error, x'), or None."""
    x_here = run.x
    grad = np.asarray(hg.grad)
    armijo = float(o.armijo or 0.0)  # set from eta in MAIDOptions
    for i in range(tries):
        t = s * o.rho ** i
        new = run.project(theta - t * grad)
        dec = float(grad @ (theta - new))
        if dec <= 0:
            break                                 # the box stops every move
        v, err, x_new = run.value_at(new, eps, x_here)
        if v + err + fe <= value - armijo * dec:
            return t, new, v, err, x_new
    return None


def run_maid(run: Runner, theta: np.ndarray, o: MAIDOptions) -> tuple[OptimizeStatus, str]:
    s = o.step
    eps, delta = o.eps0, o.delta0
    for _ in range(o.max_iter):
        accepted = None
        for j in range(o.max_bt_loop):
            hg, eps, delta, ok = shrink_to_accuracy(run, theta, eps, delta, 1.0 - o.eta, o.tau)
            run.pending = None
            hn = grad_norm(hg.grad)
            value, fe = run.certified_value(hg)
            run.record(theta, value, fe, hn, hg.bound, eps, delta, s)
            if hn + hg.bound <= o.gtol:
                return OptimizeStatus.CONVERGED, f"||grad F|| <= ||h|| + bound = {hn + hg.bound:.3g}"
            if not ok:
                raise floor_stop(run, hg, eps)
            if not math.isfinite(fe):
                raise StopRun(OptimizeStatus.FAILED,
                              "MAID's certified line search needs a finite bound on "
                              "|f(x_eps) - f(x*)|, i.e. a finite L_f (got value error "
                              f"{fe}); use method='lbfgsb' or 'gd'")
            x_here = run.x
            accepted = _backtrack(run, theta, hg, s, value, fe, eps, o.bt_steps + j, o)
            run.x = x_here
            if accepted is not None:
                break
            if eps * o.tau < o.min_eps:
                raise floor_stop(run, hg, eps, f"none of {o.bt_steps + j} steps down to "
                                 f"{s * o.rho ** (o.bt_steps + j - 1):.3g} passed the certified "
                                 "decrease test")
            eps *= o.tau
            delta *= o.tau
        if accepted is None:
            continue
        t, theta, v, err, run.x = accepted
        run.iterations += 1
        eps *= o.nu
        delta *= o.nu
        s = t * o.growth
        run.pending = (theta, v, err, math.nan, math.nan, eps, delta, s)
    run.flush_pending()
    return OptimizeStatus.MAX_ITER, f"{o.max_iter} iterations"
