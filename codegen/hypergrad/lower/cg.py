"""Conjugate gradients for a quadratic lower level (constant Hessian; docs/solvers.md 1).

CG on A (x - x*) = grad g(x), i.e. the residual -grad g. When the recursive residual meets the
test, the true gradient is evaluated; if it fails the test, CG restarts from it (a new segment).
A segment that ends at the rounding floor of ||grad g|| without reducing it stops the solve
with status "rounding floor", as Newton's stagnation does. The returned `grad` is always a
true gradient.
"""
from __future__ import annotations

import math
from functools import partial

from ..common import LowerTask, call_kernel, norm
from ..fused import data_per_entry, fused_cg, loops_for
from ..galerkin import KrylovBasis, basis_steps
from ..krylov import cg
from ..rates import cg_rate_bound, rates
from ..results import LowerResult, Status
from .stopping import rounding_floor

__all__ = ["solve_cg", "STAGNATION"]

#: A CG segment that ends at the rounding floor with its true ||grad g|| above this fraction of
#: the one it started from made no progress: the solve stops there ("rounding floor").
STAGNATION = 0.5


def solve_cg(task: LowerTask) -> LowerResult:
    """CG with residual replacement until ||grad g(x)|| / mu <= tol (true gradient)."""
    k, th, tol, x = task.k, task.theta, task.tol, task.x0
    mu, L = task.constants["mu"], task.constants["L"]
    g, msg = call_kernel(k.lower_grad, x, th)
    if g is None:
        return LowerResult(x=x, grad=None, bound=math.inf, iterations=0,
                           status=Status.NON_FINITE, solver="cg", tol=tol, mu=mu, L=L,
                           n_grad=1, message=msg)
    n_grad, n_hvp, it, segments = 1, 0, 0, 1
    gn = gn0 = norm(g)
    hist = [gn / mu] if task.record else None
    g_true = True  # does g hold the true gradient at x?
    loops = loops_for(k) if hist is None else None
    status, msg = (Status.CONVERGED if gn / mu <= tol else None), ""
    energy = math.nan  # the last segment's Gauss-Radau estimate of ||x - x*||_A
    steps = basis_steps(x.size, data_per_entry(k)) if task.keep_basis else 0
    basis = KrylovBasis(x.size, steps) if steps else None
    while status is None:
        # the Hessian is constant: the segment's first x serves for all its products
        if loops is not None:  # the same CG in one C call
            slots = None if basis is None else basis.slots(task.max_iter - it)
            run = fused_cg(loops, x, th, -g, x, residual=-g, tol=tol, scale=mu,
                           max_iter=task.max_iter - it, mu=mu, basis=slots)
            if basis is not None:
                basis.took(slots, run.iterations)
        else:
            run = cg(partial(k.lower_hvp, x, th), -g, x, residual=-g, tol=tol, scale=mu,
                     max_iter=task.max_iter - it, history=hist, mu=mu,
                     basis=None if basis is None else basis.list_for_python())
        n_hvp += run.matvecs
        it += run.iterations
        x, g_true, energy = run.x, run.iterations == 0 and g_true, run.energy_error
        if run.status is not Status.CONVERGED:
            status, msg = run.status, run.message
            break
        g, msg = call_kernel(k.lower_grad, x, th)
        n_grad += 1
        if g is None:
            status = Status.NON_FINITE
            break
        g_true, gn_start, gn = True, gn, norm(g)
        if gn / mu <= tol:
            status = Status.CONVERGED
            break
        if run.iterations == 0:  # the segment met its test at once (a residual normed to 0 by
            # underflow, or at the rounding level) and the true gradient did not: restarting
            # would repeat that for ever
            status, msg = Status.ROUNDING_FLOOR, (
                f"||grad g|| = {gn:.3g}: the CG segment took no step (its residual met the test "
                f"where the true gradient does not)")
            break
        floor = rounding_floor(L, x)
        if gn <= floor and gn >= STAGNATION * gn_start:
            # the segment's recursive residual met the test, the true gradient did not move:
            # restarting again would only repeat that until max_iter
            status, msg = Status.ROUNDING_FLOOR, (
                f"||grad g|| = {gn:.3g} stagnates at the rounding floor {floor:.3g} "
                f"(eps_machine * the scale of grad g) after {segments} segments")
            break
        segments += 1  # the recursive residual drifted from the true gradient: restart there
    if not g_true:
        g2, msg2 = call_kernel(k.lower_grad, x, th)
        n_grad += 1
        if g2 is None:
            return LowerResult(x=x, grad=None, bound=math.inf, iterations=it,
                               status=Status.NON_FINITE, solver="cg", tol=tol, mu=mu, L=L,
                               n_grad=n_grad, n_hvp=n_hvp, initial_bound=gn0 / mu,
                               apriori=_apriori(gn0 / mu, it, segments, mu, L),
                               segments=segments, history=hist, message=msg2)
        g, gn = g2, norm(g2)
    return LowerResult(x=x, grad=g, bound=gn / mu, iterations=it, status=status, solver="cg",
                       tol=tol, mu=mu, L=L, n_grad=n_grad, n_hvp=n_hvp,
                       initial_bound=gn0 / mu, apriori=_apriori(gn0 / mu, it, segments, mu, L),
                       segments=segments, history=hist, message=msg,
                       energy_error_estimate=energy,
                       krylov=None if basis is None else basis.matrices())


def _apriori(e0: float, K: int, segments: int, mu: float, L: float) -> float:
    """(2 sqrt kappa)^S q_HB^K e0 over S restart segments (rigorous)."""
    if not math.isfinite(e0):
        return math.inf
    kappa, _, q_hb = rates(mu, L)
    return cg_rate_bound(kappa, segments, q_hb, K, e0)

