"""SciPy's L-BFGS-B on certified values and hypergradients (docs/framework.md 9).

scipy.optimize.minimize(method="L-BFGS-B", jac=True) on (f(x_eps), h) with the box `bounds`. At
every evaluation eps, delta shrink by tau until bound <= rel_accuracy ||h|| and the certified
value error <= rel_accuracy ||h|| ||theta - theta_prev|| (a fraction of the change the line
search compares; theta_prev the previous evaluation); they never grow again. This keeps the line
search meaningful but is not a convergence proof. SciPy's ftol is 1e-15 here (the value
accuracy, not round-off, decides). One history entry per function evaluation; the returned point
is the evaluated one with the smallest certified upper bound on F.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..hypergrad.common import grad_norm
from .options import LBFGSBOptions
from .result import OptimizeStatus
from .runner import Runner, StopRun, floor_stop, shrink_to_accuracy

__all__ = ["run_lbfgsb"]


def run_lbfgsb(run: Runner, theta: np.ndarray, o: LBFGSBOptions) -> tuple[OptimizeStatus, str]:
    from scipy.optimize import minimize  # an optional dependency, needed by this method only

    state: dict[str, Any] = {"eps": o.eps0, "delta": o.delta0, "prev": None}
    frac = o.rel_accuracy

    def fun(th: np.ndarray) -> tuple[float, np.ndarray]:
        th = np.array(th, dtype=float)
        # The line search compares values: their certified error must be a fraction of the
        # change h.(theta - theta_prev) it is meant to see (no requirement at the first point).
        dist = 0.0 if state["prev"] is None else grad_norm(th - state["prev"])
        value_tol = (lambda hn: frac * hn * dist) if dist > 0 else None
        hg, state["eps"], state["delta"], ok = shrink_to_accuracy(
            run, th, state["eps"], state["delta"], frac, o.tau, value_tol)
        state["prev"] = th
        hn = grad_norm(hg.grad)
        value, error = run.certified_value(hg)
        run.record(th, value, error, hn, hg.bound, state["eps"], state["delta"], math.nan)
        if hn + hg.bound <= o.gtol:
            raise StopRun(OptimizeStatus.CONVERGED,
                          f"||grad F|| <= ||h|| + bound = {hn + hg.bound:.3g}")
        if not ok:
            raise floor_stop(run, hg, state["eps"])
        return value, np.array(hg.grad, dtype=float)

    def count(*args: Any) -> None:
        run.iterations += 1

    bounds = [(None if not math.isfinite(a) else float(a), None if not math.isfinite(b)
               else float(b)) for a, b in zip(run.lo, run.hi)]
    # ftol: stop on SciPy's relative-reduction test only at round-off level; the value
    # accuracy above is what keeps the line search meaningful near the optimum.
    options = {"maxiter": o.max_iter, "gtol": o.gtol, "ftol": 1e-15, "maxfun": 20 * o.max_iter}
    options.update(o.scipy_options or {})
    res = minimize(fun, theta, jac=True, method="L-BFGS-B", bounds=bounds, options=options,
                   callback=count)
    msg = str(res.message)
    run.iterations = int(res.nit)
    if res.status == 0:
        return OptimizeStatus.CONVERGED, msg
    if res.status == 1:
        return OptimizeStatus.MAX_ITER, msg
    return OptimizeStatus.STALLED, msg
