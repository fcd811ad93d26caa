"""The stopping tests the lower solvers share: first_order_stop (gd, hb, fista, before each
step) and the rounding floor of ||grad g|| (Newton, and the accuracy rounds' lowest eps)."""
from __future__ import annotations

import math

import numpy as np

from ..common import DIVERGENCE_FACTOR, norm
from ..results import Status

__all__ = ["first_order_stop", "rounding_floor", "solution_floor", "ROUNDING_FACTOR"]

#: ||grad g|| below ROUNDING_FACTOR eps_machine sqrt(n) L ||x|| is rounding noise: the terms of
#: grad g (about ||A x|| <= L ||x||) are summed over n entries, each rounded to eps_machine.
ROUNDING_FACTOR = 8.0


def rounding_floor(L: float, x: np.ndarray) -> float:
    """The ||grad g|| below which a solver cannot be expected to make progress at x: a
    steering level only (no certificate rests on it; the bound uses the ||grad g|| computed).
    0 when L is not finite (no scale known: never claim the floor)."""
    if not math.isfinite(L):
        return 0.0
    arr = np.asarray(x, dtype=np.float64)
    scale = L * norm(arr) * math.sqrt(max(arr.size, 1))
    return ROUNDING_FACTOR * float(np.finfo(np.float64).eps) * scale


def solution_floor(x: np.ndarray) -> float:
    """eps_machine ||x||: the lowest tolerance on ||x - x*|| worth asking a lower solver for
    (x's own entries are rounded to that; the accuracy rounds never ask for less). A sample's
    x left on its worker (a HeldArray, docs/distributed.md 3) gives its norm unfetched."""
    known = getattr(x, "norm", None)
    size = known if isinstance(known, float) else norm(np.asarray(x, dtype=np.float64))
    return float(np.finfo(np.float64).eps) * size


def first_order_stop(gn: float, gn0: float, mu: float, tol: float, iteration: int,
                     max_iter: int) -> tuple[Status | None, str]:
    """(status, message) when the solver must stop at a gradient of norm gn, else (None, "").

    Converged once the certificate ||grad g|| / mu meets tol; capped at max_iter; diverged once
    the gradient grew DIVERGENCE_FACTOR-fold over the first one (a step too long for this g).
    Stagnation at the rounding floor only grows the iteration count (capped, never diverged);
    the accuracy rounds keep eps above `rounding_floor` so that it does not happen."""
    if gn / mu <= tol:
        return Status.CONVERGED, ""
    if iteration >= max_iter:
        return Status.CAPPED, ""
    if gn > DIVERGENCE_FACTOR * gn0:
        return Status.DIVERGED, f"||grad g|| grew from {gn0:.3g} to {gn:.3g}"
    return None, ""
