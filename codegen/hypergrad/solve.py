"""solve_lower and solve_adjoint: one solver by name, its arguments checked, the constants read
at this theta (docs/solvers.md 1-2). run_lower / run_adjoint take constants already checked
(the hypergradient passes local ones) and a shared dense-factor cache.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .auto import choose_adjoint, choose_lower
from .common import (
    DEFAULT_MAX_ITER,
    AdjointTask,
    LowerTask,
    SolverError,
    all_finite,
    call_kernel,
    checked_constants,
    checked_theta,
    x_size_of,
)
from .lower.stopping import rounding_floor, solution_floor
from .rates import require_finite_L
from .registry import AUTO, adjoint_entry, lower_entry
from .results import AdjointResult, LowerResult, evolve

__all__ = ["solve_lower", "solve_adjoint", "run_lower", "run_adjoint", "correction_solve"]


def solve_lower(k: Any, theta: Any, solver: str = "fista", tol: float = 1e-8,
                x0: Any = None, max_iter: int = DEFAULT_MAX_ITER, record: bool = False,
                store_trajectory: bool = False, keep_basis: bool = False) -> LowerResult:
    """Minimise g(., theta) until ||grad g(x)|| / mu <= tol (a certified ||x - x*|| <= tol).

    solver: "gd" (step 2/(L+mu)), "hb" (Polyak heavy ball; may fail on non-quadratic g, then
    status "diverged" or "capped"), "fista" (strongly convex FISTA; returns its extrapolated
    point z, where the gradient is known), "cg" (only if k.is_quadratic), "newton" (Newton-CG),
    "direct" (Newton with exact steps from the dense Hessian's Cholesky factor, small x only),
    "auto" (chosen from the problem, `codegen.hypergrad.auto`; the result's `solver` names it).
    mu and L are re-evaluated from k.constants(theta) on every call. The test is made before the
    first step (a good warm start returns after 0 iterations and 1 gradient). `record=True`
    keeps the per-iteration G/mu; `store_trajectory=True` keeps x_0..x_K (GD/HB, for
    adjoint="backprop"; O(K d) memory); `keep_basis=True` keeps "cg"'s Krylov directions and
    their products (`LowerResult.krylov`, docs/bounds.md 15.7; other solvers keep none).
    """
    th = checked_theta(k, theta)
    if solver == AUTO:
        solver = choose_lower(k, "backprop" if store_trajectory else AUTO, th)
    c = checked_constants(k, th)
    res = run_lower(k, th, c, solver, tol, x0, max_iter, record, store_trajectory,
                    keep_basis=keep_basis)
    # ||grad g|| is the computed gradient's; near the rounding floor its own rounding (about
    # eps sqrt(n) L ||x||) is as large, and G/mu alone fell below ||x - x*|| (or was 0). An
    # infinite L (exp atoms) is taken on the ball B(x, 2 G/mu + the floor of x), which holds x*.
    if res.x is None or not math.isfinite(res.bound):
        return res
    L = float(c["L"])
    local = getattr(k, "local_constants", None)
    if not math.isfinite(L) and local is not None:
        L = float(local(res.x, th, 2 * res.bound + solution_floor(res.x))["L"])
    margin = rounding_floor(L, res.x) / float(c["mu"])
    return evolve(res, bound=res.bound + margin) if margin > 0 else res


def run_lower(k: Any, th: np.ndarray, c: dict[str, Any], solver: str, tol: float, x0: Any,
              max_iter: int, record: bool = False, store_trajectory: bool = False,
              dense: dict[str, Any] | None = None, keep_basis: bool = False) -> LowerResult:
    """solve_lower with theta and the constants `c` already checked; `dense` is the Hessian
    factor cache lower="direct" shares with adjoint="direct"; keep_basis asks lower="cg" for
    its Krylov directions (`LowerResult.krylov`, docs/bounds.md 15.7)."""
    entry = lower_entry(solver)
    if entry.needs_quadratic and not getattr(k, "is_quadratic", False):
        raise SolverError(f"lower solver {solver!r} needs a quadratic lower level (constant "
                          "Hessian); this problem is not quadratic in x: use 'newton', 'fista', 'gd', "
                          "'hb' or, for a small x, 'direct'")
    if store_trajectory and not entry.keeps_trajectory:
        raise SolverError(f"a stored trajectory (adjoint='backprop') needs lower='gd' or 'hb', "
                          f"not {solver!r}")
    if x0 is None:
        x0 = np.zeros(x_size_of(k))  # our own, finite and of the right size
    else:
        x0 = np.array(x0, dtype=np.float64).ravel()  # a private copy of the caller's
        if x0.size != x_size_of(k, x0.size):
            raise SolverError(f"x0 has {x0.size} entries, the problem has x_size = {k.x_size}")
        if not all_finite(x0):
            raise SolverError("x0 is not finite")
    if entry.needs_finite_L:
        require_finite_L(solver, c["L"])
    task = LowerTask(k=k, theta=th, constants=c, tol=float(tol), x0=x0, max_iter=int(max_iter),
                     record=record, store_trajectory=store_trajectory,
                     dense={} if dense is None else dense, keep_basis=keep_basis)
    return entry.solve(task)


def solve_adjoint(k: Any, x: Any, theta: Any, solver: str = "cg", delta: float = 1e-6,
                  q0: Any = None, max_iter: int = DEFAULT_MAX_ITER, b: Any = None,
                  record: bool = False) -> AdjointResult:
    """Solve A(x, theta) q = grad_x f(x, theta) to an absolute TRUE residual <= delta.

    solver: "cg", "gd" (Richardson, step 2/(L+mu): K steps from q0 = 0 are exactly K steps of
    backprop through GD with Hessians frozen at x), "hb" (heavy ball in residual form,
    q_prev = q0: backprop through HB, frozen), "direct" (the dense Hessian's Cholesky factor and
    iterative refinement on the true residual; small x only; q0 is not used), "auto" (chosen
    from the problem, `codegen.hypergrad.auto`). q0 = None starts
    from 0; a nonzero q0 is a legal warm start but no longer "backprop". `b` may pass
    grad_x f(x) if already known. For reverse mode through the stored lower trajectory use
    `backprop_adjoint`.
    """
    th = checked_theta(k, theta)
    if solver == AUTO:
        solver = choose_adjoint(k, theta=th)
    return run_adjoint(k, np.asarray(x, dtype=np.float64), th, checked_constants(k, th),
                       solver, delta, q0, max_iter, b, record)


def correction_solve(k: Any, hg: Any, c: dict[str, Any], delta: float, start: Any,
                     max_iter: int, b: np.ndarray, dense: dict[str, Any] | None) -> AdjointResult:
    """A solve with the adjoint's matrix A(x_eps, theta) for a correction's forward, dual or
    block solve: by the round's own factor (`dense`, held at x_eps) where the round's adjoint
    was direct, so that the solve's residual is at the rounding level for two triangular
    solves and one residual (docs/bounds.md 15.6), else by CG from `start` (a warm start, or
    a callable that makes one: not called for the direct solve)."""
    x, th = np.asarray(hg.x), np.asarray(hg.theta, dtype=np.float64)
    if dense is not None and hg.adjoint_solver == "direct":
        return run_adjoint(k, x, th, c, "direct", delta, None, max_iter, b, dense=dense)
    return run_adjoint(k, x, th, c, "cg", delta, start() if callable(start) else start,
                       max_iter, b)


def run_adjoint(k: Any, x: np.ndarray, th: np.ndarray, c: dict[str, Any], solver: str, delta: float,
                q0: Any, max_iter: int, b: Any = None, record: bool = False,
                dense: dict[str, Any] | None = None, companion: Any = None) -> AdjointResult:
    """solve_adjoint with theta and the constants `c` already checked; `dense` as in
    run_lower; `companion` (a krylov.Companion) rides along a CG adjoint (docs/solvers.md 9)."""
    entry = adjoint_entry(solver)
    if entry.solve is None:
        raise SolverError(f"adjoint solver {solver!r} goes through backprop_adjoint / "
                          "hypergradient (it needs the stored lower trajectory)")
    if entry.needs_finite_L:
        require_finite_L(solver, c["L"])
    if b is None:
        b, msg = call_kernel(k.upper_grad, x, th)
        if b is None:
            raise SolverError(f"grad_x f is not finite at the lower solution ({msg})")
    task = AdjointTask(k=k, x=x, theta=th, constants=c, delta=float(delta),
                       b=np.asarray(b, dtype=np.float64), q0=q0, max_iter=int(max_iter),
                       record=record, dense={} if dense is None else dense,
                       companion=companion)
    return entry.solve(task)
