"""The hypergradient with certified a posteriori and a priori error bounds (framework.md 2, 6, 7).

    1. lower solve, any method, to x_eps with G/mu <= eps (G = ||grad_x g(x_eps)||);
    2. adjoint solve, any method, A(x_eps) q = grad_x f(x_eps) to a TRUE residual R <= delta;
    3. h = -B(x_eps)^T q + grad_theta f(x_eps) + grad r(theta)   (one cross VJP).

All second derivatives are taken at the single point x_eps; that is what makes the bound of
framework.md 7 computable. The kernel interface is abstract (see `codegen.hypergrad.solvers`).

A result never carries a silently wrong number: every returned float is checked with isfinite,
and `status` is "ok" only when (a) both solvers reached their tolerance, (b) the constants are
certified, (c) the a posteriori bound is finite and (d) no zero-hypergradient trap occurred.
Otherwise `status` lists the reasons; `usable` says whether `grad` is still a finite estimate
whose `bound` is valid (e.g. a capped solve or uncertified constants), as opposed to a failure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import lapack

from ..errors import KernelError
from .solvers import (
    ADJOINT_SOLVERS, DEFAULT_MAX_ITER, LOWER_SOLVERS, AdjointResult, LowerResult, SolverError,
    _arr, _call, _fmt, _norm, _solve_adjoint, _solve_lower, _theta, _x_size, backprop_adjoint,
    checked_constants, fixed_memo,
)

__all__ = ["HypergradientResult", "hypergradient", "hypergradient_samples",
           "aposteriori_bound", "apriori_bound", "cross_norm"]

#: ||B|| is taken as the Frobenius norm from p cross JVPs up to this p (exact for p = 1).
FROBENIUS_MAX_P = 64

_HARD = ("non-finite", "diverged", "not SPD")

#: Relative size of the rounding errors in computing h = -B^T q + direct (a generous multiple of
#: machine epsilon: reductions over the data run in the kernels and in NumPy).
ROUNDING_FLOOR = 64 * np.finfo(float).eps

#: Relative margin on a LAPACK singular value (its backward error is a small multiple of
#: d * machine epsilon * ||B||; 1e-10 covers d up to ~1e5 with room to spare).
SVD_MARGIN = 1e-10


def _mul(*xs) -> float:
    """Product with 0 * inf = 0: a term whose certified factor (an error bound, a norm) is exactly
    zero vanishes whatever the (possibly infinite) Lipschitz constant multiplying it."""
    if 0.0 in xs:
        return 0.0
    out = 1.0
    for x in xs:
        out *= float(x)  # Python floats overflow to inf without a warning
    return out


@dataclass(repr=False)
class HypergradientResult:
    """A hypergradient estimate with its error bounds (interface.md 3).

    grad           h = -B(x_eps)^T q + upper_theta_grad(x_eps) (the latter includes grad r);
    bound          a posteriori bound on ||grad - grad F(theta)|| (framework.md 7; the smaller of
                   the ||grad f|| and the ||q|| forms, both valid); inf when not available;
    bound_forms    both forms, {"grad_f": ..., "q": ...}, and the floating-point floor added to
                   the smaller ("rounding");
    apriori_bound  the a priori bound (framework.md 6) from the solvers' rates and iteration
                   counts; apriori_rigorous False when an HB rate (C = 1) was used;
    value          upper objective f(x_eps) + r at the lower solution;
    x, q           lower solution x_eps and adjoint q (lists for several samples);
    work           {"lower_grads", "hvps", "cross", "units"}: units = lower_grads + hvps (E&R's
                   work unit; cross products, one VJP + the JVPs for ||B||, counted separately);
    status         "ok" or the reasons, "; "-joined;
    constants      the constants used (k.constants(theta), validated);
    e              the certified ||x_eps - x*|| used, G/mu; G, R, norm_B (certified upper bound
                   of ||B(x_eps)||), grad_f_norm, q_norm: the run-time numbers in the bound;
    certified      True iff the bound is a certified finite upper bound (constants certified);
    lower, adjoint the solver results (lists for several samples), samples the per-sample results.
    """

    grad: np.ndarray
    bound: float
    apriori_bound: float
    value: float
    x: object
    q: object
    work: dict
    status: str
    constants: dict | list = field(default_factory=dict)
    G: float = math.nan
    R: float = math.nan
    e: float = math.nan
    norm_B: float = math.nan
    grad_f_norm: float = math.nan
    q_norm: float = math.nan
    certified: bool = False
    apriori_rigorous: bool = True
    bound_forms: dict = field(default_factory=dict)
    lower: LowerResult | list | None = None
    adjoint: AdjointResult | list | None = None
    notes: list = field(default_factory=list)
    samples: list | None = None
    theta: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def usable(self) -> bool:
        """grad is finite and no solver failed hard (non-finite, diverged, not SPD): the estimate
        can be used, with `bound` as its (possibly loose or uncertified) error bound."""
        if not np.all(np.isfinite(self.grad)) or math.isnan(self.bound):
            return False
        return not any(h in self.status for h in _HARD)

    def __repr__(self):
        lines = [
            f"HypergradientResult(status={self.status!r},",
            f"  grad={_arr(self.grad)},",
            f"  bound={_fmt(self.bound)} ({'certified' if self.certified else 'uncertified'}), "
            f"apriori_bound={_fmt(self.apriori_bound)}"
            f"{'' if self.apriori_rigorous else ' (not rigorous)'}, value={_fmt(self.value)},",
            f"  G={_fmt(self.G)}, e={_fmt(self.e)} (>= ||x - x*||), R={_fmt(self.R)}, "
            f"||B||<={_fmt(self.norm_B)}, ||grad f||={_fmt(self.grad_f_norm)}, "
            f"||q||={_fmt(self.q_norm)},",
            f"  work={self.work}",
        ]
        if self.samples is not None:
            lines.append(f"  samples={len(self.samples)}")
        else:
            lines.append(f"  lower={self.lower!r},")
            lines.append(f"  adjoint={self.adjoint!r}")
        return "\n".join(lines) + ")"


def cross_norm(k, x, theta) -> tuple:
    """A certified upper bound on ||B(x, theta)||_2 and the number of cross products it cost.

    p = 1: exactly ||B e_1|| (one JVP). p <= 64: B is assembled from p JVPs (in one kernel call,
    k.cross_matrix, when the kernel has it) and its spectral norm taken by SVD with a relative
    margin for LAPACK's backward error (never above the Frobenius norm, also computed). Larger p:
    k.cross_norm_bound(x, theta) if the kernel has a structural bound, else the Frobenius norm
    anyway (p JVPs; the cost shows in work["cross"]). Never power iteration: it approaches the
    norm from below and would void the certificate (pitfall 8). A B fixed by the data
    (k.fixed_memo) is normed once per bind, at no cross products after that.
    """
    memo = fixed_memo(k, "cross_jvp")
    if memo is not None and "norm" in memo:
        return memo["norm"], 0
    norm, used = _cross_norm(k, x, theta)
    if memo is not None and math.isfinite(norm):
        memo["norm"] = norm
    return norm, used


def _cross_norm(k, x, theta) -> tuple:
    th = np.atleast_1d(theta)
    p = th.size
    if p > FROBENIUS_MAX_P and hasattr(k, "cross_norm_bound"):
        v = float(k.cross_norm_bound(x, th))
        if math.isfinite(v): return v, 0  # inf: no structural bound, use the JVPs below
    if hasattr(k, "cross_matrix"):  # the p JVPs in one kernel call
        B, _ = _call(k.cross_matrix, x, th)
        if B is None:
            return math.inf, p
    else:
        columns = []
        for j in range(p):
            col, _ = _call(k.cross_jvp, x, th, np.eye(1, p, j).ravel())
            if col is None:
                return math.inf, j + 1
            columns.append(col)
        B = np.column_stack(columns)
    frobenius = _norm(B)  # not np.linalg.norm: no BLAS threads on a long column (solvers._dot)
    if p == 1 or p > FROBENIUS_MAX_P:
        return frobenius, p
    # LAPACK's dgesdd directly (np.linalg.norm(B, 2) costs twice as much on a 10 x 10 B)
    _, singular, _, info = lapack.dgesdd(B, compute_uv=0)
    if info != 0 or not np.isfinite(singular).all():
        return frobenius, p  # no converged SVD: the Frobenius norm is a bound by itself
    spectral = float(singular[0]) * (1 + SVD_MARGIN) + np.finfo(float).tiny
    return min(frobenius, spectral), p


def refined_distance(k, x, theta, c: dict, grad, e0: float, iterations: int) -> tuple:
    """A certified ||x - x*|| usually far below e0 = G/mu, from a few CG steps on A(x) s = grad g.

    grad g(x) = A_avg (x - x*) with A_avg the Hessian averaged over [x*, x], and
    ||A_avg - A(x)|| <= L_A e / 2, so e = ||x - x*|| satisfies e <= a + (L_A / (2 mu)) e^2 with
    a = ||s|| + ||A(x) s - grad g|| / mu >= ||A(x)^{-1} grad g|| for ANY s (the residual is
    recomputed, so CG's accuracy affects tightness, never validity). With e <= e0 < the larger
    root, e lies below the smaller root 2a / (1 + sqrt(1 - 2 L_A a / mu)). Returns (e, HVPs used).
    """
    mu, L_A = c["mu"], c["L_A"]
    if iterations <= 0 or e0 == 0.0 or not math.isfinite(L_A):
        return e0, 0
    # The adjoint CG solves A(x) s = grad g and recomputes its true residual at the end.
    sol = _solve_adjoint(k, x, theta, c, "cg", 1e-3 * e0 * mu, None, iterations, grad, False)
    if sol.q is None or not math.isfinite(sol.residual):
        return e0, sol.n_hvp
    a = (_norm(sol.q) + sol.residual / mu) * (1 + 1e-12)
    used = sol.n_hvp
    if L_A == 0.0:
        return min(e0, a), used
    cq = L_A / (2 * mu)
    disc = 1 - 4 * a * cq
    if disc < 0 or e0 >= (1 + math.sqrt(disc)) / (2 * cq):
        return e0, used
    return min(e0, 2 * a / (1 + math.sqrt(disc))), used


def aposteriori_bound(c: dict, e, R, norm_B, norm_b, norm_q, upper_depends_on_theta=False):
    """The computable bound of framework.md 7; returns (min, {"grad_f": ..., "q": ...}).

    With e >= ||x_eps - x*|| certified (G/mu), mu, and L_A, L_B, L_f valid on the ball
    B(x_eps, e) (which contains x*):
      grad_f form: (|B|/mu) R + [(L_f |B| + L_B |b|)/mu + L_A |B| |b|/mu^2] e + (L_B L_f/mu) e^2
      q form:      (|B|/mu) R + [(|B| L_f + |B| |q| L_A)/mu + |q| L_B] e
                   + L_B e (R/mu + e (L_f + |q| L_A)/mu)
    The q form follows from A*(q - q*) = (A* - A_e) q + r + (b_e - b*), i.e.
    ||q - q*|| <= (R + L_f e + L_A e |q|)/mu, and h - grad F = -B_e^T (q - q*) - (B_e - B*)^T q*.
    Both are valid upper bounds, so the smaller one is. + L_ft e if f depends on theta.
    """
    mu, LA, LB, Lf = c["mu"], c["L_A"], c["L_B"], c["L_f"]
    nB, nb, nq = norm_B, norm_b, norm_q
    first = _mul(nB, R) / mu
    f1 = (first + (_mul(Lf, nB, e) + _mul(LB, nb, e)) / mu + _mul(LA, nB, nb, e) / mu ** 2
          + _mul(LB, Lf, e, e) / mu)
    f2 = (first + (_mul(nB, Lf, e) + _mul(nB, nq, LA, e)) / mu + _mul(nq, LB, e)
          + _mul(LB, e, R) / mu + (_mul(LB, e, e, Lf) + _mul(LB, e, e, nq, LA)) / mu)
    extra = _mul(c.get("L_ft", 0.0), e) if upper_depends_on_theta else 0.0
    forms = {"grad_f": f1 + extra, "q": f2 + extra}
    vals = [v for v in forms.values() if not math.isnan(v)]
    return (min(vals) if vals else math.inf), forms


def apriori_bound(c: dict, eps, delta, norm_B_e, norm_b_e, upper_depends_on_theta=False):
    """The a priori bound of framework.md 6 with run-time estimates of the starred quantities:
    ||B*|| <= ||B(x_eps)|| + L_B eps, ||b*|| <= ||grad f(x_eps)|| + L_f eps, eps and delta from
    the solvers' a priori rates (not the a posteriori G/mu, R):
      (|B*|/mu) delta + (L_B/mu) eps delta + [L_B |b*|/mu + L_f |B*|/mu + L_A |B*| |b*|/mu^2] eps
      + (L_f L_B/mu) eps^2   (+ L_ft eps if f depends on theta).
    """
    mu, LA, LB, Lf = c["mu"], c["L_A"], c["L_B"], c["L_f"]
    nBs = norm_B_e + _mul(LB, eps)
    nbs = norm_b_e + _mul(Lf, eps)
    v = (_mul(nBs, delta) / mu + _mul(LB, eps, delta) / mu
         + (_mul(LB, nbs, eps) + _mul(Lf, nBs, eps)) / mu + _mul(LA, nBs, nbs, eps) / mu ** 2
         + _mul(Lf, LB, eps, eps) / mu)
    if upper_depends_on_theta:
        v += _mul(c.get("L_ft", 0.0), eps)
    return v if not math.isnan(v) else math.inf


def hypergradient(k, theta, lower="fista", adjoint="cg", eps=1e-6, delta=1e-6, x0=None, q0=None,
                  max_iter=DEFAULT_MAX_ITER, adjoint_max_iter=None, record=False, refine_iter=10,
                  rtol=None, atol=0.0) -> HypergradientResult:
    """The hypergradient of F(theta) = f(x*(theta), theta) + r(theta) with certified bounds.

    lower in ("gd", "hb", "fista", "cg", "newton", "direct"), adjoint in ("cg", "gd", "hb",
    "direct", "backprop"); "direct" factors the dense Hessian (small x only, `codegen.hypergrad.dense`).
    Any pairing is allowed except "backprop", which differentiates a stored GD or HB
    trajectory (so lower must be "gd" or "hb"; its bound is inf: E&R's analysis does not cover
    it). eps is the certified lower accuracy (G/mu <= eps), delta the absolute true adjoint
    residual. x0 warm-starts the lower
    solve (the test is made before the first step), q0 the adjoint (a nonzero q0 is legal but is
    no longer "backprop"). max_iter caps the lower solve, adjoint_max_iter (default max_iter) the
    adjoint. Constants are read from k.constants(theta) at this theta (pitfall 3). refine_iter
    CG steps (HVPs) sharpen the certified ||x_eps - x*|| below G/mu (`refined_distance`); 0
    keeps e = G/mu.

    rtol, atol: ask for a certified accuracy instead, bound <= atol + rtol ||grad||. eps and
    delta are then only the first round's tolerances; the bound's own parts tighten them, round
    after warm-started round (`codegen.hypergrad.accuracy`). status says so if the target is not reached.
    """
    if rtol is not None or atol:
        return _to_accuracy(hypergradient, k, theta, lower, adjoint, eps, delta, x0, q0,
                            max_iter, adjoint_max_iter, record, refine_iter, rtol, atol)
    if lower not in LOWER_SOLVERS:
        raise SolverError(f"unknown lower solver {lower!r}; choose from {LOWER_SOLVERS}")
    if adjoint not in ADJOINT_SOLVERS:
        raise SolverError(f"unknown adjoint solver {adjoint!r}; choose from {ADJOINT_SOLVERS}")
    if adjoint == "backprop":
        if lower not in ("gd", "hb"):
            raise SolverError("adjoint='backprop' needs lower='gd' or 'hb' (reverse mode through "
                              f"the stored trajectory), not lower={lower!r}")
        if q0 is not None:
            raise SolverError("adjoint='backprop' takes no q0 (a warm start is not backprop)")
    th = _theta(k, theta)
    c = checked_constants(k, th)
    mu = c["mu"]
    adjoint_max_iter = max_iter if adjoint_max_iter is None else adjoint_max_iter
    dep_theta = bool(getattr(k, "upper_depends_on_theta", False))
    reasons, notes = [], list(c["notes"])

    # Local (ball) constants, framework.md pitfall 4 (exp / polynomial atoms: infinite globally).
    # L only sets step sizes, so an infinite L is replaced by L on B(x0, 2 G0/mu), which holds
    # x0 and x*; a wrong L can only stall the solver, its G/mu certificate needs mu alone.
    local = hasattr(k, "local_constants")
    c_global = c  # before any local replacement
    pre_grads = 0
    if local and not math.isfinite(c["L"]) and lower in ("gd", "hb", "fista"):
        xs = np.zeros(_x_size(k)) if x0 is None else np.asarray(x0, float).ravel()
        g0, _msg = _call(k.lower_grad, xs, th)
        pre_grads = 1
        if g0 is not None:
            cl = k.local_constants(xs, th, 2 * _norm(g0) / mu)
            if math.isfinite(cl["L"]):
                c = dict(c, L=max(float(cl["L"]), mu))
                notes.append(f"L = inf globally: step sizes use L = {_fmt(c['L'])} on the ball "
                             "B(x0, 2||grad g(x0)||/mu)")

    # 1. lower solve (lower="direct" and adjoint="direct" share one Hessian factor where it holds)
    dense = {}
    low = _solve_lower(k, th, c, lower, eps, x0, max_iter, record, adjoint == "backprop", dense)
    x = low.x
    work = {"lower_grads": low.n_grad + pre_grads, "hvps": low.n_hvp, "cross": 0}
    if low.status != "converged":
        reasons.append(f"lower {low.solver} {low.status} (G/mu = {_fmt(low.bound)}, "
                       f"eps = {_fmt(eps)}{'; ' + low.message if low.message else ''})")
    G = low.G
    e = low.bound

    def _localise(radius):
        """L_A, L_B, L_f, L_ft valid on B(x_eps, radius) (contains [x_eps, x*] when radius >= e);
        mu stays global; certified = AND of the flags (of the global and the local values)."""
        if not (local and math.isfinite(radius)):
            return c
        if all(math.isfinite(c_global.get(key, 0.0)) for key in ("L_A", "L_B", "L_f", "L_ft")):
            return c  # everything finite globally: keep the global constants unchanged
        cl = k.local_constants(x, th, radius)
        out = dict(c)
        for key in ("L_A", "L_B", "L_f", "L_ft"):
            if key in cl and cl[key] is not None and float(cl[key]) < out.get(key, math.inf):
                out[key] = float(cl[key])
        if not math.isfinite(c_global["L"]) and math.isfinite(cl["L"]):
            out["L"] = max(float(cl["L"]), mu)  # adjoint step sizes: A(x_eps) <= L on this ball
        out["certified"] = bool(c["certified"] and cl.get("certified", False))
        return out

    if adjoint != "backprop" and low.grad is not None:
        c = _localise(e)  # valid on B(x_eps, G/mu) for refined_distance (it needs a finite L_A)
        e, used = refined_distance(k, x, th, c, low.grad, e, refine_iter)
        work["hvps"] += used
        c = _localise(e)  # the smaller certified ball: tighter (min with the values above)

    # 2. adjoint solve at x_eps
    b, msg = _call(k.upper_grad, x, th)
    if b is None:
        reasons.append(f"grad_x f not finite at x_eps ({msg})")
        return _failed(th, x, work, reasons, c, low, notes)
    nb = _norm(b)
    if adjoint == "backprop":
        adj = backprop_adjoint(k, low, th, b=b)
        work["cross"] += adj.n_cross
    else:
        adj = _solve_adjoint(k, x, th, c, adjoint, delta, q0, adjoint_max_iter, b, record, dense)
    work["hvps"] += adj.n_hvp
    q, R = adj.q, adj.residual
    if adj.zero_trap:
        reasons.append(f"zero-hypergradient trap: ||grad_x f(x_eps)|| = {_fmt(nb)} <= delta = "
                       f"{_fmt(delta)} with q0 = 0 ({adj.iterations} adjoint iteration(s) forced;"
                       " h may be mostly error: shrink delta or check bound vs ||h||)"
                       if adjoint != "backprop" else
                       "zero-hypergradient trap: 0 lower iterations, backprop gives 0")
    elif adj.status != "converged":
        reasons.append(f"adjoint {adj.solver} {adj.status} (R = {_fmt(R)}, delta = {_fmt(delta)}"
                       f"{'; ' + adj.message if adj.message else ''})")

    # 3. h = -B^T q + direct theta terms
    if adjoint == "backprop":
        h_impl = adj.h_cross
    else:
        Btq, msg = _call(k.cross_vjp, x, th, q)
        work["cross"] += 1
        h_impl = -Btq if Btq is not None else np.full(th.size, np.nan)
        if Btq is None:
            reasons.append(f"cross VJP not finite ({msg})")
    direct, msg = _call(k.upper_theta_grad, x, th)
    if direct is None:
        reasons.append(f"upper theta-gradient not finite ({msg})")
        direct = np.full(th.size, np.nan)
    grad = h_impl + direct

    # bounds
    nB, n_cross = cross_norm(k, x, th)
    work["cross"] += n_cross
    nq = _norm(q)
    if adjoint == "backprop":
        bound, forms = math.inf, {}
        apri, apri_rig = math.inf, False
        reasons.append("no a posteriori bound: adjoint='backprop' is reverse mode through the "
                       "trajectory (Hessians at every iterate), not covered by E&R's analysis")
    else:
        bound, forms = aposteriori_bound(c, e, R, nB, nb, nq, dep_theta)
        # Floating point: h itself is computed with rounding errors the exact-arithmetic bound
        # does not see; without this floor a converged solve could claim 1e-17 on a 1e-16 error.
        forms["rounding"] = ROUNDING_FLOOR * (nB * nq + _norm(direct))
        bound += forms["rounding"]
        apri = apriori_bound(c, low.apriori, adj.apriori, nB, nb, dep_theta)
        apri_rig = low.apriori_rigorous and adj.apriori_rigorous
        if not apri_rig:
            notes.append("a priori bound uses a heavy-ball rate with C = 1: not rigorous")
        if not math.isfinite(bound):
            inf_consts = [key for key in ("L_A", "L_B", "L_f", "L_ft")
                          if not math.isfinite(c.get(key, 0.0))]
            reasons.append("a posteriori bound not finite"
                           + (f" ({', '.join(inf_consts)} = inf)" if inf_consts else ""))
            bound = math.inf
    if not c["certified"]:
        reasons.append(f"uncertified constants (source = {c['source']!r}): the bound is only as "
                       "good as the stated constants")
    value = math.nan
    try:
        value = float(k.upper_value(x, th))
    except (KernelError, FloatingPointError, OverflowError) as exc:
        notes.append(f"upper value failed: {exc}")
    if not math.isfinite(value):
        reasons.append("upper value not finite")
    if not np.all(np.isfinite(grad)):
        reasons.append("non-finite hypergradient")
    work["units"] = work["lower_grads"] + work["hvps"]
    # A bound computed from certified constants stays valid for a capped or diverged solve (it is
    # about the returned point); "not SPD" contradicts mu > 0, so nothing is certified then.
    certified = bool(c["certified"] and math.isfinite(bound)
                     and "not SPD" not in " ".join(reasons))
    return HypergradientResult(
        grad=grad, bound=bound, apriori_bound=apri, value=value, x=x, q=q, work=work,
        status="ok" if not reasons else "; ".join(reasons), constants=c, G=G, R=R, e=e,
        norm_B=nB, grad_f_norm=nb, q_norm=nq, certified=certified, apriori_rigorous=apri_rig,
        bound_forms=forms, lower=low, adjoint=adj, notes=notes, theta=th)


def _to_accuracy(fn, k, theta, lower, adjoint, eps, delta, x0, q0, max_iter, adjoint_max_iter,
                 record, refine_iter, rtol, atol):
    """fn (hypergradient or hypergradient_samples) in rounds until its certified bound meets
    atol + rtol ||grad|| (codegen.hypergrad.accuracy.to_accuracy)."""
    from .accuracy import to_accuracy  # it imports this module

    if adjoint == "backprop":
        raise SolverError("rtol/atol steer the solvers by the certified bound, and "
                          "adjoint='backprop' has none; use adjoint='cg', 'gd' or 'hb'")

    def run(eps, delta, x0, q0, refine):
        return fn(k, theta, lower=lower, adjoint=adjoint, eps=eps, delta=delta, x0=x0, q0=q0,
                  max_iter=max_iter, adjoint_max_iter=adjoint_max_iter, record=record,
                  refine_iter=refine)

    return to_accuracy(run, 0.0 if rtol is None else float(rtol), float(atol), eps, delta, x0,
                       q0, refine_iter)


def _failed(th, x, work, reasons, c, low, notes):
    work["units"] = work["lower_grads"] + work["hvps"]
    return HypergradientResult(
        grad=np.full(th.size, np.nan), bound=math.inf, apriori_bound=math.inf, value=math.nan,
        x=x, q=None, work=work, status="; ".join(reasons), constants=c, G=low.G, e=low.bound,
        certified=False, apriori_rigorous=False, lower=low, notes=notes, theta=th)


def hypergradient_samples(ks, theta, lower="fista", adjoint="cg", eps=1e-6, delta=1e-6, x0=None,
                          q0=None, max_iter=DEFAULT_MAX_ITER, adjoint_max_iter=None,
                          record=False, refine_iter=10, rtol=None, atol=0.0
                          ) -> HypergradientResult:
    """The hypergradient of (1/S) sum_s f_s(x_s*(theta), theta) + r(theta) (pitfall 5).

    Each sample's lower problem and adjoint are solved separately (own mu_s, G_s, R_s, own zero
    trap and NaN guards); grad = mean_s h_s and bound = mean_s bound_s (the error of a mean is at
    most the mean of the errors), apriori_bound likewise, value = mean_s value_s, work summed.
    The regulariser: every kernel's upper_theta_grad is assumed to include grad r(theta), so the
    average counts it exactly once (not S times). x0, q0: None or one entry per sample. G, R,
    e, norm_B, grad_f_norm, q_norm are the worst (largest) over samples; x, q, lower, adjoint,
    constants are per-sample lists. status "ok" iff every sample is "ok"; otherwise the reasons,
    each with the samples it affects. rtol, atol: as for `hypergradient`, on the mean.
    """
    ks = list(ks)
    if rtol is not None or atol:
        return _to_accuracy(hypergradient_samples, ks, theta, lower, adjoint, eps, delta, x0, q0,
                            max_iter, adjoint_max_iter, record, refine_iter, rtol, atol)
    S = len(ks)
    if S == 0:
        raise SolverError("hypergradient_samples needs at least one sample")
    for name, v in (("x0", x0), ("q0", q0)):
        if v is not None and len(v) != S:
            raise SolverError(f"{name} must have one entry per sample ({S}), got {len(v)}")
    res = [hypergradient(k, theta, lower=lower, adjoint=adjoint, eps=eps, delta=delta,
                         x0=None if x0 is None else x0[s], q0=None if q0 is None else q0[s],
                         max_iter=max_iter, adjoint_max_iter=adjoint_max_iter, record=record,
                         refine_iter=refine_iter)
           for s, k in enumerate(ks)]
    grad = np.mean([r.grad for r in res], axis=0)
    work = {key: sum(r.work.get(key, 0) for r in res)
            for key in ("lower_grads", "hvps", "cross", "units")}
    by_reason = {}
    for s, r in enumerate(res):
        if not r.ok:
            for reason in r.status.split("; "):
                by_reason.setdefault(reason, []).append(s)
    status = "ok" if not by_reason else "; ".join(
        f"{reason} [sample{'s' if len(idx) > 1 else ''} {', '.join(map(str, idx))}]"
        for reason, idx in by_reason.items())

    def worst(attr):
        vals = [getattr(r, attr) for r in res]
        return math.nan if any(math.isnan(v) for v in vals) else max(vals)

    notes = sorted({n for r in res for n in r.notes})
    return HypergradientResult(
        grad=grad, bound=float(np.mean([r.bound for r in res])),
        apriori_bound=float(np.mean([r.apriori_bound for r in res])),
        value=float(np.mean([r.value for r in res])), x=[r.x for r in res],
        q=[r.q for r in res], work=work, status=status, constants=[r.constants for r in res],
        G=worst("G"), R=worst("R"), e=worst("e"), norm_B=worst("norm_B"),
        grad_f_norm=worst("grad_f_norm"), q_norm=worst("q_norm"),
        certified=all(r.certified for r in res),
        apriori_rigorous=all(r.apriori_rigorous for r in res),
        lower=[r.lower for r in res], adjoint=[r.adjoint for r in res], notes=notes,
        samples=res, theta=res[0].theta)
