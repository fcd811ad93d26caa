"""Fixed-step gradient descent on theta, as in E&R's experiments (docs/framework.md 9).

theta <- P(theta - step h), P the projection onto the box `bounds`. eps, delta are fixed at
eps0, delta0, or decreased by a schedule in the style of HOAG (Pedregosa 2016): "exponential"
eps0 0.9^k, "quadratic" eps0/(k+1)^2, "cubic" eps0/(k+1)^3, floored at 1e-12; delta by the same
factor (absolute tolerances with the scale fixed at k = 0). Nothing is certified about the
steps, so the returned point is the last iterate (where a hypergradient was computed), not the
point with the smallest certified upper bound: with loose eps, that is usually theta0.
"""
from __future__ import annotations

import numpy as np

from ..hypergrad.common import grad_norm
from .options import GDOptions
from .result import OptimizeStatus
from .runner import Runner, stops

__all__ = ["run_gd", "schedule_factor"]

#: The smallest eps, delta a schedule reaches.
SCHEDULE_FLOOR = 1e-12


def schedule_factor(schedule: str | None, k: int) -> float:
    """The factor on eps0, delta0 at iteration k."""
    if schedule is None:
        return 1.0
    if schedule == "exponential":
        return 0.9 ** k
    if schedule == "quadratic":
        return 1.0 / (k + 1) ** 2
    return 1.0 / (k + 1) ** 3


def run_gd(run: Runner, theta: np.ndarray, o: GDOptions) -> tuple[OptimizeStatus, str]:
    step = o.step
    for it in range(o.max_iter):
        f = schedule_factor(o.schedule, it)
        eps = max(o.eps0 * f, SCHEDULE_FLOOR) if o.schedule else o.eps0
        delta = max(o.delta0 * f, SCHEDULE_FLOOR) if o.schedule else o.delta0
        hg = run.hypergradient(theta, eps, delta)
        hn = grad_norm(hg.grad)
        value, error = run.certified_value(hg)
        entry = run.record(theta, value, error, hn, hg.bound, eps, delta, step, notify=False)
        run.accept(theta, entry)
        callback = o.callback
        if callback is not None and stops(callback(dict(entry))):
            return OptimizeStatus.CALLBACK, "the callback asked to stop"
        if hn + hg.bound <= o.gtol:
            return OptimizeStatus.CONVERGED, f"||grad F|| <= ||h|| + bound = {hn + hg.bound:.3g}"
        new = run.project(theta - step * hg.grad)
        if not np.all(np.isfinite(new)):
            return OptimizeStatus.FAILED, "theta became non-finite (step too large?)"
        theta = new
        run.iterations = it + 1
    return OptimizeStatus.MAX_ITER, f"{o.max_iter} iterations"
