"""Lower-level and adjoint solvers of the unified hypergradient framework (notes/framework.md 2-5).

Everything here programs against an abstract kernel object `k` (the generated module's bound
problem, or a plain-NumPy test kernel) with the methods

    lower_grad(x, theta), lower_hvp(x, theta, v), cross_vjp(x, theta, q), cross_jvp(x, theta, t),
    upper_grad(x, theta), upper_theta_grad(x, theta), upper_value(x, theta), constants(theta),
    and the attributes x_size, theta_size, is_quadratic, upper_depends_on_theta.

Design rules, each answering a pitfall of framework.md section 8:

* The only certificate of the lower solve is ||x - x*|| <= ||grad g(x)|| / mu, so every lower
  solver returns a point at which it *evaluated* grad g and reports that gradient (`grad`), which
  the hypergradient reuses for G (pitfall 7). FISTA therefore returns its extrapolated point z
  (where the gradient is taken), not y = z - grad g(z) / L whose gradient is unknown.
* The stopping test is checked before the first step, so a good warm start costs one gradient
  and zero iterations (pitfall 3).
* mu and L come from `k.constants(theta)` at *this* theta on every call; nothing is cached across
  theta (pitfall 3). A mu that is not a positive finite number makes certification impossible and
  raises `SolverError` instead of returning a number.
* Adjoint tolerances are absolute, on the true unpreconditioned residual ||A q - grad f||; the
  recursive residual is only a trigger, the true one is recomputed (one extra HVP) before
  reporting and, if it is still above delta, the iteration restarts from it (residual
  replacement; pitfall 1).
* Zero-hypergradient trap: with q0 = 0 and ||grad f|| <= delta at least one iteration is done and
  the result is flagged (pitfall 2).
* Non-finite values stop the iteration, the last finite iterate is kept and the status says so;
  CG stops with status "not SPD" when d^T A d <= 0 (pitfall 6).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .dense import DIRECT_MAX_SIZE, HessianFactor
from ..errors import HypergenError, KernelError

__all__ = [
    "SolverError", "LowerResult", "AdjointResult", "solve_lower", "solve_adjoint",
    "backprop_adjoint", "checked_constants", "fista_coefficients", "LOWER_SOLVERS",
    "ADJOINT_SOLVERS",
]

LOWER_SOLVERS = ("gd", "hb", "fista", "cg", "newton", "direct")
ADJOINT_SOLVERS = ("cg", "gd", "hb", "direct", "backprop")

#: An iteration whose residual (gradient norm) grew by this factor over its start is "diverged".
DIVERGENCE_FACTOR = 1e8
DEFAULT_MAX_ITER = 10_000


class SolverError(HypergenError, ValueError):
    """A request the solvers cannot answer with a certified number (invalid mu, CG lower solver on
    a non-quadratic problem, backprop through a solver without a stored trajectory...)."""


# ----------------------------------------------------------------------------------------------
# small helpers


#: Vectors at least this long are reduced by NumPy's own loops, not BLAS (see `_dot`).
BLAS_FREE_FROM = 8192


def _dot(a, b) -> float:
    """a . b for the solvers' vectors, never on BLAS threads when they are long.

    OpenBLAS runs a long dot product on its own threads, and between kernel calls the kernels'
    OpenMP workers still spin on the cores: each dot then waits for a core, and the woken BLAS
    threads slow the next kernel. A CSR logistic hypergradient at 100000 features took 400 ms,
    150 ms without BLAS threads (2 cores). einsum's loop is single-threaded; short vectors keep
    the faster BLAS call (OpenBLAS keeps those on one thread).
    """
    if a.size < BLAS_FREE_FROM:
        return float(a @ b)
    return float(np.einsum("i,i->", a, b))


def _norm(v) -> float:
    v = np.asarray(v, dtype=np.float64).ravel()
    return math.sqrt(_dot(v, v))  # what np.linalg.norm computes, without its call overhead


def _finite(*arrays) -> bool:
    return all(np.isfinite(a).all() for a in arrays)


def _call(fn, *args):
    """Call a kernel; return (float64 array or None, error message). Kernel failures on
    non-finite values (KernelError, FloatingPointError) become None so the caller can keep its
    last finite iterate instead of raising halfway through a solve."""
    try:
        out = np.asarray(fn(*args), dtype=np.float64)
    except (KernelError, FloatingPointError, OverflowError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if not np.isfinite(out).all():
        return None, "non-finite kernel output"
    return out, ""


def fixed_memo(k, base: str):
    """k.fixed_memo(base) (`BoundProblem.fixed_memo`) for kernels that have it, else None."""
    memo = getattr(k, "fixed_memo", None)
    return None if memo is None else memo(base)


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.3g}"
    return repr(v)


def _arr(a) -> str:
    """Readable summary of an array for __repr__: values when short, shape and norm otherwise."""
    if a is None:
        return "None"
    if isinstance(a, list):
        return f"[{len(a)} arrays]"
    a = np.asarray(a)
    if a.size <= 6:
        return np.array2string(a, precision=4, separator=", ")
    return f"array(shape={a.shape}, norm={_norm(a):.4g})"


def _theta(k, theta) -> np.ndarray:
    th = np.atleast_1d(np.asarray(theta, dtype=np.float64)).ravel()
    size = getattr(k, "theta_size", None)
    if size is not None and th.size != size:
        raise SolverError(f"theta has {th.size} entries, the problem has theta_size = {size}")
    if not np.all(np.isfinite(th)):
        raise SolverError(f"theta is not finite: {th}")
    return th


def _x_size(k, default=None) -> int:
    size = getattr(k, "x_size", None)
    if size is None:
        if default is None:
            raise SolverError("kernel has no x_size and no starting point was given")
        return int(default)
    return int(size)


def checked_constants(k, theta) -> dict:
    """k.constants(theta), validated and normalised (called afresh at every theta: pitfall 3).

    mu must be a positive finite float (the certificate G/mu and every bound divide by it); L must
    be >= mu (it may be inf: only CG then works). Missing Lipschitz constants are taken as inf
    (conservative: the bound becomes inf rather than wrong), except L_A = 0 for a quadratic lower
    level. `certified` is False unless the kernel says True; `notes` lists what was assumed.
    """
    raw = dict(k.constants(theta))
    notes = []

    def num(key, default):
        v = raw.get(key, None)
        if v is None:
            notes.append(f"{key} missing, taken as {default}")
            return float(default)
        v = float(v)
        if math.isnan(v):
            raise SolverError(f"constant {key} is NaN at theta = {theta}")
        return v

    mu = num("mu", math.nan) if "mu" in raw else math.nan
    if not (math.isfinite(mu) and mu > 0):
        raise SolverError(
            f"mu(theta) = {raw.get('mu')!r} at theta = {theta} is not a positive finite number: "
            "the lower level is not certified strongly convex there, no bound can be given")
    L = num("L", math.inf)
    if L < mu * (1 - 1e-12):
        raise SolverError(f"L = {L} < mu = {mu} at theta = {theta}: inconsistent constants")
    L = max(L, mu)
    quadratic = bool(getattr(k, "is_quadratic", False))
    c = {
        "mu": mu,
        "L": L,
        "L_A": 0.0 if (quadratic and raw.get("L_A") is None) else num("L_A", math.inf),
        "L_B": num("L_B", math.inf),
        "L_f": num("L_f", math.inf),
        "L_ft": (num("L_ft", math.inf) if getattr(k, "upper_depends_on_theta", False)
                 else float(raw.get("L_ft") or 0.0)),
        "certified": bool(raw.get("certified", False)),
        "source": str(raw.get("source", "unknown")),
    }
    if any(v < 0 for key, v in c.items() if key.startswith("L")):
        raise SolverError(f"negative Lipschitz constant in {raw}")
    c["notes"] = notes
    return c


def fista_coefficients(q: float, n: int):
    """The first n (t_k, beta_k) of strongly convex FISTA (Chambolle & Pock 2016, Alg. 5) with
    ratio q = mu/L, t_0 = 0. For tests: t_k -> 1/sqrt(q), beta_k -> (1 - sqrt q)/(1 + sqrt q)."""
    t, out = 0.0, []
    for _ in range(n):
        t_next, beta = _fista_step(q, t)
        out.append((t, beta))
        t = t_next
    return out


def _fista_step(q, t):
    a = 1.0 - q * t * t
    t_next = (a + math.sqrt(a * a + 4.0 * t * t)) / 2.0
    beta = (t - 1.0) * (1.0 - q * t_next) / (t_next * (1.0 - q)) if q < 1.0 else 0.0
    return t_next, beta


def _step_params(solver, mu, L):
    if solver in ("gd", "hb", "fista") and not math.isfinite(L):
        raise SolverError(f"solver {solver!r} needs a finite L (got L = {L}); use 'cg' if the "
                          "problem is quadratic or state L")
    if solver == "gd":
        return {"a": 2.0 / (L + mu), "b": 0.0}
    if solver == "hb":
        sL, sm = math.sqrt(L), math.sqrt(mu)
        return {"a": 4.0 / (sL + sm) ** 2, "b": ((sL - sm) / (sL + sm)) ** 2}
    if solver == "fista":
        return {"tau": 1.0 / L, "q": mu / L}
    return {}


def _rates(mu, L):
    kappa = L / mu
    q_gd = (kappa - 1.0) / (kappa + 1.0) if math.isfinite(kappa) else 1.0
    sk = math.sqrt(kappa)
    q_hb = (sk - 1.0) / (sk + 1.0) if math.isfinite(sk) else 1.0
    return kappa, q_gd, q_hb


# ----------------------------------------------------------------------------------------------
# results


@dataclass(repr=False)
class LowerResult:
    """Result of a lower-level solve.

    x          the returned iterate (a point where grad g was evaluated);
    grad       grad_x g(x, theta) at that x (reused as G by the hypergradient);
    bound      ||grad|| / mu: a certified bound on ||x - x*|| (inf if nothing finite was reached);
    iterations steps taken (0 when the start already met tol);
    status     "converged", "capped", "diverged", "non-finite" or "not SPD" (CG);
    work       gradient evaluations + HVPs (n_grad + n_hvp);
    apriori    the a priori bound on ||x - x*|| from the solver's rate, its iteration count and
               e0 = ||grad g(x0)||/mu (framework.md 5); apriori_rigorous False for HB (C = 1);
    history    per-iteration G/mu (CG: recursive residual / mu) when record=True;
    trajectory the iterates x_0..x_K when stored for backprop (O(K d) memory).
    """

    x: np.ndarray
    grad: np.ndarray | None
    bound: float
    iterations: int
    status: str
    solver: str
    tol: float
    mu: float
    L: float
    n_grad: int = 0
    n_hvp: int = 0
    initial_bound: float = math.nan
    apriori: float = math.inf
    apriori_rigorous: bool = True
    segments: int = 1
    step: dict = field(default_factory=dict)
    history: list | None = None
    trajectory: list | None = None
    message: str = ""

    @property
    def work(self) -> int:
        return self.n_grad + self.n_hvp

    @property
    def G(self) -> float:
        return _norm(self.grad) if self.grad is not None else math.inf

    @property
    def converged(self) -> bool:
        return self.status == "converged"

    def __repr__(self):
        s = (f"LowerResult(solver={self.solver!r}, status={self.status!r}, "
             f"iterations={self.iterations}, bound={_fmt(self.bound)} (tol {_fmt(self.tol)}), "
             f"apriori={_fmt(self.apriori)}{'' if self.apriori_rigorous else ' (not rigorous)'}, "
             f"work={self.work}, x={_arr(self.x)}")
        if self.message:
            s += f", message={self.message!r}"
        return s + ")"


@dataclass(repr=False)
class AdjointResult:
    """Result of an adjoint solve A(x_eps) q = grad_x f(x_eps).

    q          the adjoint (for "backprop": a * sum of the reverse-sweep adjoints, which is the
               solver's q for the frozen-Hessian version, reported for information);
    residual   R = ||A q - grad f||, the TRUE residual recomputed with one extra HVP at the end;
    bound      R / mu >= ||q - A^{-1} grad f|| (inf for "backprop": not covered by E&R);
    status     "converged", "capped", "diverged", "non-finite", "not SPD", or "zero trap"
               (||grad f|| <= delta with q0 = 0: at least one iteration was forced);
    work       HVPs (n_hvp); n_cross counts cross VJPs done here ("backprop" only);
    apriori    a priori residual bound delta_k from the rate (framework.md 5) with the actual
               ||r_0||; apriori_rigorous False for HB;
    h_cross    "backprop" only: the accumulated -sum_k a B(x_k)^T xt_{k+1}.
    """

    q: np.ndarray
    residual: float
    iterations: int
    status: str
    solver: str
    delta: float
    mu: float
    n_hvp: int = 0
    n_cross: int = 0
    r0: float = math.nan
    zero_trap: bool = False
    apriori: float = math.inf
    apriori_rigorous: bool = True
    segments: int = 1
    history: list | None = None
    h_cross: np.ndarray | None = None
    message: str = ""

    @property
    def work(self) -> int:
        return self.n_hvp

    @property
    def bound(self) -> float:
        if self.solver == "backprop":
            return math.inf
        return self.residual / self.mu if math.isfinite(self.residual) else math.inf

    def __repr__(self):
        s = (f"AdjointResult(solver={self.solver!r}, status={self.status!r}, "
             f"iterations={self.iterations}, residual={_fmt(self.residual)} "
             f"(delta {_fmt(self.delta)}), apriori={_fmt(self.apriori)}"
             f"{'' if self.apriori_rigorous else ' (not rigorous)'}, hvps={self.n_hvp}, "
             f"q={_arr(self.q)}")
        if self.message:
            s += f", message={self.message!r}"
        return s + ")"


# ----------------------------------------------------------------------------------------------
# lower-level solvers


def solve_lower(k, theta, solver="fista", tol=1e-8, x0=None, max_iter=DEFAULT_MAX_ITER,
                record=False, store_trajectory=False) -> LowerResult:
    """Minimise g(., theta) until ||grad g(x)|| / mu <= tol (a certified ||x - x*|| <= tol).

    solver: "gd" (step 2/(L+mu)), "hb" (Polyak heavy ball; may fail on non-quadratic g, then
    status "diverged" or "capped"), "fista" (strongly convex FISTA, Chambolle & Pock 2016 Alg. 5;
    returns its extrapolated point z, where the gradient is known), "cg" (only if k.is_quadratic;
    the recursive residual triggers a check with the true gradient, restarting from it if needed),
    "newton" (Newton-CG), "direct" (Newton with exact steps from the dense Hessian's Cholesky
    factor, for small x: `codegen.hypergrad.dense`).
    mu and L are re-evaluated from k.constants(theta) on every call. The test is made before the
    first step (a good warm start returns after 0 iterations and 1 gradient). `record=True` keeps
    the per-iteration G/mu; `store_trajectory=True` keeps x_0..x_K (GD/HB, for adjoint="backprop";
    O(K d) memory).
    """
    th = _theta(k, theta)
    return _solve_lower(k, th, checked_constants(k, th), solver, tol, x0, max_iter, record,
                        store_trajectory)


def _solve_lower(k, th, c, solver, tol, x0, max_iter, record, store_trajectory, dense=None):
    if solver not in LOWER_SOLVERS:
        raise SolverError(f"unknown lower solver {solver!r}; choose from {LOWER_SOLVERS}")
    if solver == "cg" and not getattr(k, "is_quadratic", False):
        raise SolverError("lower solver 'cg' needs a quadratic lower level (constant Hessian); "
                          "this problem is not quadratic in x: use 'newton', 'fista', 'gd', "
                          "'hb' or, for a small x, 'direct'")
    if store_trajectory and solver not in ("gd", "hb"):
        raise SolverError(f"a stored trajectory (adjoint='backprop') needs lower='gd' or 'hb', "
                          f"not {solver!r}")
    tol = float(tol)
    max_iter = int(max_iter)
    if x0 is None:
        x0 = np.zeros(_x_size(k))
    x0 = np.array(x0, dtype=np.float64).ravel()
    if x0.size != _x_size(k, x0.size):
        raise SolverError(f"x0 has {x0.size} entries, the problem has x_size = {k.x_size}")
    if not _finite(x0):
        raise SolverError("x0 is not finite")
    mu, L = c["mu"], c["L"]
    step = _step_params(solver, mu, L)
    if solver == "cg":
        res = _lower_cg(k, th, mu, L, tol, x0, max_iter, record)
    elif solver == "newton":
        res = _lower_newton(k, th, c, tol, x0, max_iter, record)
    elif solver == "direct":
        res = _lower_newton(k, th, c, tol, x0, max_iter, record, {} if dense is None else dense)
    elif solver == "fista":
        res = _lower_fista(k, th, mu, L, step, tol, x0, max_iter, record)
    else:
        res = _lower_gd_hb(k, th, mu, L, solver, step, tol, x0, max_iter, record,
                           store_trajectory)
    res.step = step
    res.apriori, res.apriori_rigorous = _lower_apriori(res)
    return res


def _lower_gd_hb(k, th, mu, L, solver, step, tol, x0, max_iter, record, store):
    a, b = step["a"], step["b"]
    g, msg = _call(k.lower_grad, x0, th)
    x = x0
    if g is None:
        return LowerResult(x=x0, grad=None, bound=math.inf, iterations=0, status="non-finite",
                           solver=solver, tol=tol, mu=mu, L=L, n_grad=1, message=msg)
    n_grad, it = 1, 0
    gn = _norm(g)
    gn0 = gn
    x_prev = x
    hist = [gn / mu] if record else None
    traj = [x.copy()] if store else None
    status = msg = ""
    while True:
        if gn / mu <= tol:
            status = "converged"
            break
        if it >= max_iter:
            status = "capped"
            break
        if gn > DIVERGENCE_FACTOR * gn0:
            status, msg = "diverged", f"||grad g|| grew from {gn0:.3g} to {gn:.3g}"
            break
        x_new = x - a * g
        if b:
            x_new += b * (x - x_prev)
        g_new, msg = (None, "non-finite iterate") if not _finite(x_new) else \
            _call(k.lower_grad, x_new, th)
        n_grad += 1
        if g_new is None:
            status = "non-finite"
            break
        x_prev, x, g = x, x_new, g_new
        gn = _norm(g)
        it += 1
        if record:
            hist.append(gn / mu)
        if store:
            traj.append(x.copy())
    return LowerResult(x=x, grad=g, bound=gn / mu, iterations=it, status=status, solver=solver,
                       tol=tol, mu=mu, L=L, n_grad=n_grad, initial_bound=gn0 / mu, history=hist,
                       trajectory=traj, message=msg)


def _lower_fista(k, th, mu, L, step, tol, x0, max_iter, record):
    tau, q = step["tau"], step["q"]
    y = y_prev = x0
    t = 0.0
    it = n_grad = 0
    x_last = g_last = None
    gn = gn0 = math.inf
    beta_last = 0.0
    hist = [] if record else None
    status = msg = ""
    while True:
        t_next, beta = _fista_step(q, t)
        z = y + beta * (y - y_prev) if it > 0 else y
        g, msg = (None, "non-finite iterate") if not _finite(z) else _call(k.lower_grad, z, th)
        n_grad += 1
        if g is None:
            status = "non-finite"
            break
        x_last, g_last, gn = z, g, _norm(g)
        beta_last = beta if it > 0 else 0.0
        if it == 0:
            gn0 = gn
        if record:
            hist.append(gn / mu)
        if gn / mu <= tol:
            status = "converged"
            break
        if it >= max_iter:
            status = "capped"
            break
        if gn > DIVERGENCE_FACTOR * gn0:
            status, msg = "diverged", f"||grad g|| grew from {gn0:.3g} to {gn:.3g}"
            break
        y_prev, y = y, z - tau * g
        t = t_next
        it += 1
    if x_last is None:  # not even the start had a finite gradient
        return LowerResult(x=x0, grad=None, bound=math.inf, iterations=0, status=status,
                           solver="fista", tol=tol, mu=mu, L=L, n_grad=n_grad, message=msg)
    if status == "non-finite":
        # the last finite point is the z of the previous iteration: it - 1 steps were taken
        it = max(it - 1, 0) if it > 0 else 0
    res = LowerResult(x=x_last, grad=g_last, bound=gn / mu, iterations=it, status=status,
                      solver="fista", tol=tol, mu=mu, L=L, n_grad=n_grad,
                      initial_bound=gn0 / mu, history=hist, message=msg)
    res._fista_beta = abs(beta_last)
    return res


#: The Newton system is solved to a residual of at least this fraction of the target ||grad g||.
NEWTON_TARGET_SHARE = 0.25


def _lower_newton(k, th, c, tol, x0, max_iter, record, dense=None):
    """Inexact Newton (Newton-CG) with backtracking on ||grad g||; max_iter caps the WORK.

    The direction solves A(x) d = -grad g by the adjoint CG to a relative residual
    eta = min(1/2, sqrt(||g|| / ||g0||), L_A ||g|| / (2 mu^2)) (superlinear near x*, one exact
    step when g is quadratic), but not below a quarter of the target tol * mu; since
    A d = -g + r with ||r|| <= eta ||g||, d is a descent direction for ||g||^2 / 2, and the step is halved until
    ||g(x + a d)|| <= (1 - 1e-4 a) ||g(x)||. Each step costs a few HVPs and gradients, about one
    pass over the data each, and needs no L. The certificate is ||g||/mu as for every solver.

    With a `dense` cache (lower="direct") the direction is exact instead, from the Cholesky
    factor of the dense Hessian (`_dense_factor`; refactored only where A changes with x). Its
    n HVPs are counted as work, and one factorisation may take the work past max_iter.
    """
    mu, L, L_A = c["mu"], c["L"], c.get("L_A", math.inf)
    name = "newton" if dense is None else "direct"
    x = x0
    g, msg = _call(k.lower_grad, x, th)
    if g is None:
        return LowerResult(x=x0, grad=None, bound=math.inf, iterations=0, status="non-finite",
                           solver=name, tol=tol, mu=mu, L=L, n_grad=1, message=msg)
    n_grad, n_hvp, it = 1, 0, 0
    gn = gn0 = _norm(g)
    hist = [gn / mu] if record else None
    status = msg = ""
    while True:
        if gn / mu <= tol:
            status = "converged"
            break
        budget = max_iter - n_grad - n_hvp
        if budget <= 1:
            status = "capped"
            break
        # Forcing term: no tighter than the Newton model is good, (L_A / 2) (||g|| / mu)^2 after
        # an exact step (and exact for L_A = 0), which also holds after a warm start, where
        # sqrt(||g|| / ||g0||) would start over at 1/2; and no need to solve far below the
        # target: ||g(x + d)|| is about the residual once the quadratic term is small.
        eta = min(0.5, math.sqrt(gn / gn0))
        if math.isfinite(L_A):
            eta = min(eta, L_A * gn / (2 * mu * mu))
        inner_tol = max(eta * gn, NEWTON_TARGET_SHARE * tol * mu)
        if dense is None:
            step = _solve_adjoint(k, x, th, c, "cg", inner_tol, None, min(budget - 1, 100), -g,
                                  False, checked=False)
            n_hvp += step.n_hvp
            direction = step.q
            failed = step.status in ("non-finite", "not SPD")
            failure = (step.status, step.message) if failed else None
        else:
            fac, used, failure = _dense_factor(k, x, th, c, dense)
            n_hvp += used
            direction = None if fac is None else -fac.solve(g)
        if failure:
            status, msg = failure[0], f"Newton direction: {failure[1] or failure[0]}"
            break
        alpha, accepted = 1.0, False
        while n_grad + n_hvp < max_iter and alpha > 1e-10:
            x_new = x + alpha * direction
            g_new, msg = _call(k.lower_grad, x_new, th)
            n_grad += 1
            gn_new = math.inf if g_new is None else _norm(g_new)
            if gn_new <= (1.0 - 1e-4 * alpha) * gn:
                accepted = True
                break
            alpha *= 0.5
        if not accepted:
            status = "capped" if n_grad + n_hvp >= max_iter else "diverged"
            msg = msg or "no decrease of ||grad g|| along the Newton direction"
            break
        x, g, gn = x_new, g_new, gn_new
        it += 1
        if record:
            hist.append(gn / mu)
    return LowerResult(x=x, grad=g, bound=gn / mu, iterations=it, status=status, solver=name,
                       tol=tol, mu=mu, L=L, n_grad=n_grad, n_hvp=n_hvp, initial_bound=gn0 / mu,
                       history=hist, message=msg)


def _lower_cg(k, th, mu, L, tol, x0, max_iter, record):
    x = x0
    g, msg = _call(k.lower_grad, x, th)
    if g is None:
        return LowerResult(x=x0, grad=None, bound=math.inf, iterations=0, status="non-finite",
                           solver="cg", tol=tol, mu=mu, L=L, n_grad=1, message=msg)
    n_grad, n_hvp, it, segments = 1, 0, 0, 1
    gn = gn0 = _norm(g)
    hist = [gn / mu] if record else None
    g_true = True  # does g hold the true gradient at x?
    status = msg = ""
    r = -g
    d = r.copy()
    rr = _dot(r, r)
    if gn / mu <= tol:
        status = "converged"
    while not status:
        if it >= max_iter:
            status = "capped"
            break
        x_new, r_new, status, msg = _cg_step(lambda v: k.lower_hvp(x, th, v), x, r, d, rr)
        n_hvp += 1
        if status:
            break
        x, r, g_true = x_new, r_new, False
        it += 1
        rr_new = _dot(r, r)
        if record:
            hist.append(math.sqrt(rr_new) / mu)
        if math.sqrt(rr_new) / mu <= tol:
            g, msg = _call(k.lower_grad, x, th)
            n_grad += 1
            if g is None:
                status = "non-finite"
                break
            g_true, gn = True, _norm(g)
            if gn / mu <= tol:
                status = "converged"
                break
            # recursive residual drifted from the true gradient: restart from the true one
            r = -g
            d = r.copy()
            rr = _dot(r, r)
            segments += 1
            continue
        d = r + (rr_new / rr) * d
        rr = rr_new
    if not g_true:
        g2, msg2 = _call(k.lower_grad, x, th)
        n_grad += 1
        if g2 is None:
            return LowerResult(x=x, grad=None, bound=math.inf, iterations=it,
                               status="non-finite", solver="cg", tol=tol, mu=mu, L=L,
                               n_grad=n_grad, n_hvp=n_hvp, initial_bound=gn0 / mu,
                               segments=segments, history=hist, message=msg2)
        g, gn = g2, _norm(g2)
    return LowerResult(x=x, grad=g, bound=gn / mu, iterations=it, status=status, solver="cg",
                       tol=tol, mu=mu, L=L, n_grad=n_grad, n_hvp=n_hvp,
                       initial_bound=gn0 / mu, segments=segments, history=hist, message=msg)


def _lower_apriori(res: LowerResult):
    """A priori bound on ||x_K - x*|| from the rate (framework.md 5), e0 = ||grad g(x0)||/mu.

    GD q_GD^K e0 (rigorous); HB q_HB^K e0 (C = 1, gamma = 0: NOT rigorous); CG
    (2 sqrt kappa)^S q_HB^K e0 with S restart segments (rigorous); FISTA: the Chambolle-Pock rate
    eps_y(K) for y_K, transferred to the returned z_K = y_K + beta (y_K - y_{K-1}) as
    (1 + beta) eps_y(K) + beta eps_y(K - 1) (the rate itself is UNVERIFIED against the paper).
    """
    e0, K = res.initial_bound, res.iterations
    if not math.isfinite(e0):
        return math.inf, True
    kappa, q_gd, q_hb = _rates(res.mu, res.L)
    if res.solver == "gd":
        return q_gd ** K * e0, True
    if res.solver == "hb":
        return q_hb ** K * e0, False
    if res.solver == "cg":
        return _cg_rate_bound(kappa, res.segments, q_hb, K, e0), True
    if res.solver in ("newton", "direct"):  # ||g|| never increases: only e0 is rigorous
        return e0, True
    sq = math.sqrt(res.mu / res.L)

    def eps_y(j):
        if j <= 0:
            return e0
        return math.sqrt(min((1 + sq) * (1 - sq) ** j, 4.0 / (j + 1) ** 2) * kappa) * e0

    beta = getattr(res, "_fista_beta", 1.0)
    if K == 0:
        return e0, True
    return (1 + beta) * eps_y(K) + beta * eps_y(K - 1), True


# ----------------------------------------------------------------------------------------------
# adjoint solvers


def solve_adjoint(k, x, theta, solver="cg", delta=1e-6, q0=None, max_iter=DEFAULT_MAX_ITER,
                  b=None, record=False) -> AdjointResult:
    """Solve A(x, theta) q = grad_x f(x, theta) to an absolute TRUE residual <= delta.

    solver: "cg", "gd" (Richardson, step 2/(L+mu): K steps from q0 = 0 are exactly K steps of
    backprop through GD with Hessians frozen at x), "hb" (Polyak heavy ball in residual form,
    q_prev = q0: backprop through HB, frozen), "direct" (the dense Hessian's Cholesky factor and
    iterative refinement on the true residual; small x only; q0 is not used). q0 = None starts
    from 0; a nonzero q0 is a legal warm start but no longer "backprop". `b` may pass
    grad_x f(x) if already known. For reverse mode through the stored lower trajectory use
    `backprop_adjoint`.
    """
    th = _theta(k, theta)
    return _solve_adjoint(k, np.asarray(x, dtype=np.float64), th, checked_constants(k, th),
                          solver, delta, q0, max_iter, b, record)


def _solve_adjoint(k, x, th, c, solver, delta, q0, max_iter, b, record, dense=None,
                   checked=True):
    """solve_adjoint's work. checked=False (a Newton direction, whose quality the gradient at
    the next point decides) stops on the recursive residual and reports it as `residual`,
    without the one-HVP recomputation of the true residual."""
    if solver not in ("cg", "gd", "hb", "direct"):
        raise SolverError(f"unknown adjoint solver {solver!r}; choose from {ADJOINT_SOLVERS} "
                          "('backprop' goes through backprop_adjoint / hypergradient)")
    mu, L = c["mu"], c["L"]
    step = _step_params(solver, mu, L)
    delta = float(delta)
    max_iter = int(max_iter)
    if b is None:
        b, msg = _call(k.upper_grad, x, th)
        if b is None:
            raise SolverError(f"grad_x f is not finite at the lower solution ({msg})")
    b = np.asarray(b, dtype=np.float64)
    if solver == "direct":
        return _adjoint_direct(k, x, th, c, delta, b, max_iter, {} if dense is None else dense)
    hvp = hvp_at(k, x, th)
    n_hvp = 0
    bn = _norm(b)
    cold = q0 is None or not np.any(q0)
    if cold:
        q = np.zeros_like(b)
        r = -b.copy()
    else:
        q = np.array(q0, dtype=np.float64).ravel()
        Aq, msg = _call(hvp, q)
        n_hvp += 1
        if Aq is None:
            return AdjointResult(q=np.zeros_like(b), residual=math.inf, iterations=0,
                                 status="non-finite", solver=solver, delta=delta, mu=mu,
                                 n_hvp=n_hvp, message=msg)
        r = Aq - b
    r0 = _norm(r)
    trap = cold and bn <= delta
    min_iter = 1 if trap else 0
    hist = [r0] if record else None
    it, segments = 0, 1
    status = msg = ""
    R = math.nan  # true residual at the current q, when known
    if trap and bn == 0.0:
        status, R = "zero trap", 0.0  # q = 0 solves A q = 0 exactly
    # residual form, r = A q - grad f (CG uses s = -r internally)
    q_prev, r_prev = q.copy(), r.copy()
    s = -r
    d = s.copy()
    ss = _dot(s, s)
    while not status:
        rn = math.sqrt(ss) if solver == "cg" else _norm(r)
        if (rn <= delta or rn == 0.0) and it >= min_iter:
            if not checked:
                status, R = "converged", rn
                break
            rt, msg = _true_residual(hvp, q, b)
            n_hvp += 1
            if rt is None:
                status = "non-finite"
                break
            R = _norm(rt)
            if R <= delta:
                status = "zero trap" if trap else "converged"
                break
            # residual replacement: restart from the true residual (recursive one drifted)
            r, r_prev, q_prev = rt, rt.copy(), q.copy()
            s = -rt
            d = s.copy()
            ss = _dot(s, s)
            segments += 1
            R = math.nan
            continue
        if it >= max_iter:
            status = "capped"
            break
        if rn > DIVERGENCE_FACTOR * max(r0, 1e-300):
            status, msg = "diverged", f"residual grew from {r0:.3g} to {rn:.3g}"
            break
        if solver == "cg":
            q_new, s_new, status, msg = _cg_step(hvp, q, s, d, ss)
            n_hvp += 1
            if status:
                break
            ss_new = _dot(s_new, s_new)
            q, s = q_new, s_new
            d = s + (ss_new / ss) * d if ss > 0 else s.copy()
            ss = ss_new
            rn_new = math.sqrt(ss)
        else:
            Ar, msg = _call(hvp, r)
            n_hvp += 1
            if Ar is None:
                status = "non-finite"
                break
            a, bm = step["a"], step["b"]
            q_new = q - a * r
            r_new = r - a * Ar
            if bm:
                q_new += bm * (q - q_prev)
                r_new += bm * (r - r_prev)
            if not _finite(q_new, r_new):
                status, msg = "non-finite", "non-finite iterate"
                break
            q_prev, r_prev, q, r = q, r, q_new, r_new
            rn_new = _norm(r)
        it += 1
        R = math.nan
        if record:
            hist.append(rn_new)
    if math.isnan(R) and not checked:
        R = rn  # the recursive residual of the returned q: all a Newton direction needs
    elif math.isnan(R):  # one extra HVP: the TRUE residual of the returned q (pitfall 1)
        rt, msg2 = _true_residual(hvp, q, b)
        n_hvp += 1
        R = _norm(rt) if rt is not None else math.inf
        if rt is None:
            msg = msg or msg2
            if status in ("converged", "capped", "zero trap"):
                status = "non-finite"
    res = AdjointResult(q=q, residual=R, iterations=it, status=status, solver=solver,
                        delta=delta, mu=mu, n_hvp=n_hvp, r0=r0, zero_trap=trap,
                        segments=segments, history=hist, message=msg)
    res.apriori, res.apriori_rigorous = _adjoint_apriori(res, c)
    return res


#: Iterative-refinement steps of adjoint="direct" after its first solve (each one HVP).
DIRECT_REFINEMENTS = 3


def _adjoint_direct(k, x, th, c, delta, b, max_iter, dense):
    """q = A(x)^{-1} b from the dense Cholesky factor, then iterative refinement
    q -= A^{-1} (A q - b) on the TRUE residual (one HVP each, the kernel at x, never the dense
    matrix), until R <= delta. A residual that stops halving has reached the rounding level:
    status "capped", with the reason. q0 plays no part: the solve is not iterative."""
    mu = c["mu"]
    fac, n_hvp, failure = _dense_factor(k, x, th, c, dense)
    if fac is None:
        return AdjointResult(q=np.zeros_like(b), residual=math.inf, iterations=0,
                             status=failure[0], solver="direct", delta=delta, mu=mu,
                             n_hvp=n_hvp, r0=_norm(b), message=failure[1])
    hvp = hvp_at(k, x, th)
    q, it, status, msg, R_prev = fac.solve(b), 0, "", "", math.inf
    while True:
        rt, msg = _true_residual(hvp, q, b)
        n_hvp += 1
        if rt is None or not _finite(q):
            status, R = "non-finite", math.inf
            break
        R = _norm(rt)
        if R <= delta:
            status = "converged"
            break
        if it >= min(max_iter, DIRECT_REFINEMENTS) or R > 0.5 * R_prev:
            status = "capped"
            msg = (f"iterative refinement stalled at R = {R:.3g} (the rounding level of the "
                   "factored Hessian)" if R > 0.5 * R_prev else
                   f"R = {R:.3g} after {it} refinement(s)")
            break
        q, R_prev, it = q - fac.solve(rt), R, it + 1
    return AdjointResult(q=q, residual=R, iterations=it, status=status, solver="direct",
                         delta=delta, mu=mu, n_hvp=n_hvp, r0=_norm(b), apriori=math.inf,
                         message=msg)


def _dense_factor(k, x, th, c, dense: dict):
    """(HessianFactor or None, HVPs spent, None or (status, message)) for A(x, theta).

    The factor cached in `dense` is reused where it holds (at its own x, or anywhere when
    L_A = 0); otherwise the Hessian is assembled, by k.lower_hessian in one kernel call when the
    kernel has it, else column by column from n HVPs (n HVPs of work either way), and factored.
    A Hessian fixed by the data (k.fixed_memo) is factored once per bind instead of per call.
    """
    memo = fixed_memo(k, "lower_hvp")
    if memo is not None:
        dense = memo
    held = dense.get("factor")
    if held is not None and held.holds_at(x, c["L_A"] == 0.0 or memo is not None):
        return held, 0, None
    n = x.size
    if n > DIRECT_MAX_SIZE:
        raise SolverError(
            f"the direct solvers form the dense {n} x {n} Hessian ({n} HVPs, "
            f"{8 * n * n / 1e6:.0f} MB); x has {n} entries, more than DIRECT_MAX_SIZE = "
            f"{DIRECT_MAX_SIZE}: use lower='newton' or 'cg' and adjoint='cg'")
    if hasattr(k, "lower_hessian"):
        H, msg = _call(k.lower_hessian, x, th)
    else:
        hvp, columns, msg = hvp_at(k, x, th), [], ""
        for j in range(n):
            col, msg = _call(hvp, np.eye(1, n, j).ravel())
            if col is None:
                break
            columns.append(col)
        H = np.column_stack(columns) if len(columns) == n else None
    if H is None:
        return None, n, ("non-finite", f"Hessian: {msg}")
    fac, msg = HessianFactor.factor(H.reshape(n, n), x)
    if fac is None:
        return None, n, ("not SPD", msg)
    dense["factor"] = fac
    return fac, n, None


def _cg_step(hvp, u, r, d, rr):
    """One conjugate-gradient step for A u = b with residual r = b - A u, direction d and
    rr = r . r (one HVP): (u_new, r_new, "", "") or (None, None, status, message) when the HVP
    or the iterate is not finite or d^T A d <= 0 (A not SPD). Both CG loops take their steps here."""
    Ad, msg = _call(hvp, d)
    if Ad is None:
        return None, None, "non-finite", msg
    dAd = _dot(d, Ad)
    if not math.isfinite(dAd):
        return None, None, "non-finite", "d^T A d is not finite"
    if dAd <= 0.0:
        return None, None, "not SPD", f"d^T A d = {dAd:.3g} <= 0"
    alpha = rr / dAd
    u_new, r_new = u + alpha * d, r - alpha * Ad
    if not _finite(u_new, r_new):
        return None, None, "non-finite", "non-finite CG iterate"
    return u_new, r_new, "", ""


def hvp_at(k, x, th):
    """v -> A(x) v for the many HVPs of one solve at one x: the kernel's prepared form
    (BoundProblem.hvp_at: x-only work done once) when it has one, else k.lower_hvp."""
    if hasattr(k, "hvp_at"):
        return k.hvp_at(x, th)
    return lambda v: k.lower_hvp(x, th, v)


def _true_residual(hvp, q, b):
    Aq, msg = _call(hvp, q)
    if Aq is None:
        return None, msg
    return Aq - b, ""


def _cg_rate_bound(kappa, segments, q_hb, K, start):
    """(2 sqrt kappa)^segments q_hb^K start, CG's rate over restart segments, in logarithms:
    many residual replacements (a delta near the rounding level) made the first factor overflow
    a float and raise, where the product is only large (then inf) or even small."""
    if start == 0.0 or (q_hb == 0.0 and K > 0):
        return 0.0
    log = (segments * math.log(2.0 * math.sqrt(kappa)) + (K * math.log(q_hb) if K else 0.0)
           + math.log(start))
    return math.exp(log) if log < math.log(np.finfo(float).max) else math.inf


def _adjoint_apriori(res: AdjointResult, c):
    """A priori residual bound (framework.md 5) with the actual ||r_0||: GD q_GD^K ||r0||;
    CG (2 sqrt kappa)^S q_HB^K ||r0|| (S restart segments); HB q_HB^K ||r0|| (not rigorous)."""
    kappa, q_gd, q_hb = _rates(c["mu"], c["L"])
    K, r0 = res.iterations, res.r0
    if not math.isfinite(r0):
        return math.inf, True
    if res.solver == "gd":
        return q_gd ** K * r0, True
    if res.solver == "hb":
        return q_hb ** K * r0, False
    if not math.isfinite(kappa):
        return (r0 if K == 0 else math.inf), True
    return min(r0 if K == 0 else math.inf,
               _cg_rate_bound(kappa, res.segments, q_hb, K, r0)), True


def backprop_adjoint(k, lower: LowerResult, theta, b=None) -> AdjointResult:
    """Reverse mode through the stored GD or HB trajectory x_0..x_K, with A(x_k), B(x_k) at every
    iterate (interface adjoint="backprop"; framework.md 3, last paragraph).

    GD:  lam_K = grad f(x_K); for k = K-1..0: h -= a B(x_k)^T lam_{k+1};
         lam_k = (I - a A(x_k)) lam_{k+1}.
    HB:  lam_k = ((1+b) I - a A(x_k)) lam_{k+1} - b lam_{k+2} (x_{-1} = x_0 is fixed).
    Memory O(K d) (the trajectory), K HVPs and K cross VJPs. This is a different estimator from
    the framework's (Hessians at one point) and E&R's bounds do not cover it: its `bound` is inf.
    The returned q = a sum_k lam_{k+1} equals the GD/HB adjoint iterate when the Hessian is
    constant; its residual is reported for information only.
    """
    th = _theta(k, theta)
    if lower.trajectory is None or lower.solver not in ("gd", "hb"):
        raise SolverError("adjoint='backprop' needs a GD or HB lower solve with a stored "
                          "trajectory (solve_lower(..., store_trajectory=True))")
    traj = lower.trajectory
    K = len(traj) - 1
    a, bm = lower.step["a"], lower.step["b"]
    xK = traj[-1]
    if b is None:
        b, msg = _call(k.upper_grad, xK, th)
        if b is None:
            raise SolverError(f"grad_x f is not finite at the lower solution ({msg})")
    lam1 = np.asarray(b, dtype=np.float64).copy()  # lam_{k+1}
    lam2 = np.zeros_like(lam1)  # lam_{k+2}
    p = int(getattr(k, "theta_size", th.size))
    h = np.zeros(p)
    qsum = np.zeros_like(lam1)
    n_hvp = n_cross = 0
    status, msg = "converged", ""
    for j in range(K - 1, -1, -1):
        xj = traj[j]
        Bt, msg = _call(k.cross_vjp, xj, th, lam1)
        n_cross += 1
        if Bt is None:
            status = "non-finite"
            break
        h -= a * Bt
        qsum += lam1
        if j == 0:
            break  # lam_0 is not needed: x_0 does not depend on theta
        Al, msg = _call(k.lower_hvp, xj, th, lam1)
        n_hvp += 1
        if Al is None:
            status = "non-finite"
            break
        lam = (1.0 + bm) * lam1 - a * Al - bm * lam2
        if not _finite(lam):
            status, msg = "non-finite", "non-finite reverse-sweep adjoint"
            break
        lam2, lam1 = lam1, lam
    q = a * qsum
    rt, msg2 = _true_residual(lambda v: k.lower_hvp(xK, th, v), q, b)  # one HVP: unprepared
    n_hvp += 1
    R = _norm(rt) if rt is not None else math.inf
    if K == 0:
        status, msg = "zero trap", "0 lower iterations: backprop through an empty trajectory is 0"
    res = AdjointResult(q=q, residual=R, iterations=K, status=status, solver="backprop",
                        delta=math.nan, mu=lower.mu, n_hvp=n_hvp, n_cross=n_cross,
                        r0=_norm(b), zero_trap=(K == 0), apriori=math.inf,
                        apriori_rigorous=False, h_cross=h, message=msg or msg2)
    return res
