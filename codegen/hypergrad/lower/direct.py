"""Newton's method with exact steps from the dense Hessian's Cholesky factor, for small x
(docs/solvers.md 1; `codegen.hypergrad.dense`).

The factor is refactored only where A changes with x (L_A > 0) and shared with
adjoint="direct" through the task's `dense` cache; its n HVPs are counted as work, and one
factorisation may take the work past max_iter. Refused above DIRECT_MAX_SIZE entries.
"""
from __future__ import annotations

import numpy as np

from ..common import LowerTask
from ..dense import dense_factor
from ..results import LowerResult, Status
from .newton import newton_descent

__all__ = ["solve_direct"]


def solve_direct(task: LowerTask) -> LowerResult:
    """Newton descent with d = -A(x)^{-1} grad g from the (cached) factor."""

    def direction(x: np.ndarray, g: np.ndarray, gn: float,
                  budget: int) -> tuple[np.ndarray | None, int, tuple[Status, str] | None]:
        fac, used, failure = dense_factor(task.k, x, task.theta, task.constants, task.dense)
        return (None if fac is None else -fac.solve(g)), used, failure

    return newton_descent(task, "direct", direction)
