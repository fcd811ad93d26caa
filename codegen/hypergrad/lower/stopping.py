"""The stopping test the first-order lower solvers (gd, hb, fista) share, made before each step."""
from __future__ import annotations

from ..common import DIVERGENCE_FACTOR
from ..results import Status

__all__ = ["first_order_stop"]


def first_order_stop(gn: float, gn0: float, mu: float, tol: float, iteration: int,
                     max_iter: int) -> tuple[Status | None, str]:
    """(status, message) when the solver must stop at a gradient of norm gn, else (None, "").

    Converged once the certificate ||grad g|| / mu meets tol; capped at max_iter; diverged once
    the gradient grew DIVERGENCE_FACTOR-fold over the first one (a step too long for this g)."""
    if gn / mu <= tol:
        return Status.CONVERGED, ""
    if iteration >= max_iter:
        return Status.CAPPED, ""
    if gn > DIVERGENCE_FACTOR * gn0:
        return Status.DIVERGED, f"||grad g|| grew from {gn0:.3g} to {gn:.3g}"
    return None, ""
