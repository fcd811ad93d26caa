"""The bookkeeping every upper-level method shares: the work and time budgets, warm starts of
x (and q), the certified value errors, the history, the returned point, progress and callback.

A method asks the runner for hypergradients and values; the runner counts their work in E&R's
unit (lower gradients + HVPs over all samples; cross products are not counted), caps every
solve at the remaining budget (so a run overshoots by at most one solve), and raises StopRun
when a budget is spent or the callback asks to stop.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any

import numpy as np

from ..errors import HypergenError
from ..hypergrad import (
    call_kernel, checked_constants, hypergradient, hypergradient_samples, solve_lower,
)
from ..hypergrad.bounds import ROUNDING_FLOOR
from ..hypergrad.common import grad_norm
from .options import CommonOptions
from .result import OptimizeStatus

__all__ = ["StopRun", "Runner", "stops", "value_error_bound", "short_theta", "progress_bar",
           "LOOP_CERTIFICATE"]

#: Distinct non-"ok" hypergradient statuses kept in the result's notes.
MAX_NOTES = 20
#: The warm start is extrapolated along the last step when the new step is at most this many
#: times as long (`Runner.predicted`).
MAX_EXTRAPOLATION = 4.0
#: Solutions a scalar theta's warm start interpolates (`Runner.predicted`): a quadratic in theta.
#: Measured on the learning benchmark's case (a) from theta0 = 0, -4, 2, -12 (seeds 0-2): 3.3%
#: fewer units than the secant (2 points) over the twelve runs; 4 points 1.5% fewer again over
#: nine, within the spread of single runs.
TRAIL = 3
#: The certificate every loop asks for, for every size of theta: E&R's (docs/framework.md 9.1,
#: "Certificates in the loop"). With a Newton-CG lower solve, learning one weight of the 10000 x
#: 500 logistic example from theta0 = 0 took 171 units with it, 256 with "dwr" (the loop
#: stepping along h_c with bound(h_c)) and 235 with "tight" (earlier versions: 351, 401 and
#: 541-678); beyond
#: correction.MAX_COMPONENTS entries "dwr" certifies only the component along h and leaves grad
#: and bound E&R's, at one more pair of solves. Not measured in a loop: a first-order lower
#: solve, where a single call's default is the tight bound.
LOOP_CERTIFICATE = "er"


def _lagrange_weights(ts: list[float], t: float) -> list[float]:
    """w with p(t) = sum w_i p(ts_i) for every polynomial p of degree < len(ts) (distinct ts)."""
    weights = []
    for i, ti in enumerate(ts):
        w = 1.0
        for j, tj in enumerate(ts):
            if j != i:
                w *= (t - tj) / (ti - tj)
        weights.append(w)
    return weights


def stops(answer: Any) -> bool:
    """Whether a callback's return value asks the run to stop: True, NumPy's np.True_ included
    (a callback computed with NumPy returns that, and `is True` ignored it)."""
    return isinstance(answer, (bool, np.bool_)) and bool(answer)


class StopRun(Exception):
    """Ends a run with a status and a message (raised by the runner or a method)."""

    def __init__(self, status: OptimizeStatus, message: str = ""):
        super().__init__(status, message)
        self.status, self.message = status, message


def value_error_bound(grad_f_norm: float, e: float, L_f: float, value: float) -> float:
    """Certified bound on |value - F| for value = f(x_eps) (+ r) computed at ||x_eps - x*|| <= e
    (docs/bounds.md 13): ||grad f(x_eps)|| e + L_f/2 e^2, with L_f valid on the ball
    B(x_eps, e), plus the rounding floor ROUNDING_FLOOR |value| of the computed value."""
    if not math.isfinite(e):
        return math.inf
    floor = ROUNDING_FLOOR * abs(value)
    return floor if e == 0 else grad_f_norm * e + (0.5 * L_f * e * e) + floor


def short_theta(theta: np.ndarray) -> str:
    th = np.asarray(theta)
    if th.size <= 4:
        return np.array2string(th, precision=4, separator=", ")
    return f"<{th.size} entries, norm {np.linalg.norm(th):.4g}>"


def progress_bar(progress: Any, budget: float | None) -> Any:
    """A tqdm bar over the work budget, or None (progress=None: only when stderr is a tty)."""
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=int(budget) if budget else None, unit="work", leave=True,
                desc="hypergen optimize", dynamic_ncols=True)


def _score(entry: dict[str, Any]) -> tuple[float, float]:
    """Points ranked by the certified upper bound value + value_error on F(theta) (ties to the
    later point), then by the value when no finite error bound is known."""
    ub = entry["value"] + entry["value_error"]
    return (ub if math.isfinite(ub) else math.inf, entry["value"])


class Runner:
    """The state of one run (see the module docstring).

    select "certified": the returned point is the recorded one with the smallest certified
    upper bound on F; "accepted": the last point a method passed to `accept`.
    warm_adjoint: the adjoint starts from the previous q (else from 0)."""

    def __init__(self, problem: Any, theta_size: int, options: CommonOptions,
                 lo: np.ndarray, hi: np.ndarray, select: str = "certified",
                 warm_adjoint: bool = False):
        self.problem = problem
        self.options = options
        self.multi = hasattr(problem, "samples")
        self.kernels = list(problem.samples) if self.multi else [problem]
        self.theta_size = theta_size
        self.lo, self.hi = lo, hi
        self.select, self.warm_adjoint = select, warm_adjoint
        self.record_theta = options.records_theta(theta_size)
        self.bar = progress_bar(options.progress, options.work_budget)
        self.t0 = time.perf_counter()
        self.work = 0
        self.iterations = 0
        self.x: Any = None             # warm start: an array, or a list per sample
        self.q: Any = None
        self.trail: list[tuple[np.ndarray, Any, Any]] = []   # (theta, x, q) of the last points
        self.history: list[dict[str, Any]] = []
        self.best: tuple[np.ndarray, dict[str, Any]] | None = None
        self.best_score = (math.inf, math.inf)
        self.last_hg: Any = None
        self.notes: list[str] = []
        self.pending: tuple[Any, ...] | None = None   # an accepted point without a hypergradient yet
        self.floor_reason = ""

    # -- accounting ------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def check(self) -> None:
        o = self.options
        if o.work_budget is not None and self.work >= o.work_budget:
            raise StopRun(OptimizeStatus.BUDGET, f"work budget of {o.work_budget:g} units spent")
        if o.seconds_budget is not None and self.elapsed() >= o.seconds_budget:
            raise StopRun(OptimizeStatus.TIME, f"time budget of {o.seconds_budget:g} s spent")

    def cap(self) -> int:
        """Iteration cap of the next solve: the solver cap, or less when the budget is short."""
        budget = self.options.work_budget
        if budget is None:
            return self.options.solver_cap
        return int(max(1, min(self.options.solver_cap, math.ceil(budget - self.work))))

    def budget_capped(self) -> bool:
        """Whether the work budget, not the solver cap, limits the solves now."""
        budget = self.options.work_budget
        return budget is not None and budget - self.work < self.options.solver_cap

    def add_work(self, units: int) -> None:
        self.work += int(units)
        if self.bar is not None:
            self.bar.update(int(units))

    def project(self, theta: np.ndarray) -> np.ndarray:
        projected: np.ndarray = np.clip(theta, self.lo, self.hi)
        return projected

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    # -- oracles ---------------------------------------------------------------------------
    def hypergradient(self, theta: np.ndarray, eps: float, delta: float,
                      rtol: float | None = None, atol: float = 0.0) -> Any:
        """The (sample-averaged) hypergradient at theta, warm-started from the last x (and q
        when warm_adjoint); with rtol (and atol), solved until bound <= atol + rtol ||h||."""
        self.check()
        o = self.options
        x0, q0 = self.predicted(theta)
        q0 = q0 if self.warm_adjoint else None
        kw = dict(lower=o.lower, adjoint=o.adjoint, eps=eps, delta=delta, x0=x0, q0=q0,
                  max_iter=self.cap(), refine_iter=o.refine, rtol=rtol, atol=atol,
                  certificate=LOOP_CERTIFICATE)
        try:
            hg = (self.sample_hypergradient(theta, kw) if self.multi
                  else hypergradient(self.problem, theta, **kw))
        except HypergenError as exc:
            raise StopRun(OptimizeStatus.FAILED,
                          f"hypergradient at theta = {short_theta(theta)}: {exc}") from None
        self.add_work(hg.work["units"])
        self.last_hg = hg
        if hg.status != "ok":
            for reason in hg.status.split("; "):
                if reason not in self.notes and len(self.notes) < MAX_NOTES:
                    self.notes.append(reason)
        if not hg.usable:
            raise StopRun(OptimizeStatus.FAILED, f"no usable hypergradient at theta = "
                                                 f"{short_theta(theta)}: {hg.status}")
        if self._keep_warm(hg):
            self._extend_trail(theta)
        return hg

    def sample_hypergradient(self, theta: np.ndarray, kw: dict[str, Any]) -> Any:
        """The mean over samples: the problem's own `hypergradient` when it has one (a
        BoundSamples runs its samples on its executor's workers), else hypergradient_samples."""
        method = getattr(self.problem, "hypergradient", None)
        if method is not None:
            return method(theta, **kw)
        return hypergradient_samples(self.kernels, theta, **kw)

    def _keep_warm(self, hg: Any) -> bool:
        """Keep hg's x (and q) as the next warm start; whether both were finite and kept."""
        xs = hg.x if self.multi else [hg.x]
        kept = all(x is not None and _all_finite(x) for x in xs)
        if kept:
            self.x = [_kept(x) for x in xs] if self.multi else np.array(hg.x)
        qs = hg.q if self.multi else [hg.q]
        if all(q is not None and _all_finite(q) for q in qs):
            self.q = [_kept(q) for q in qs] if self.multi else np.array(hg.q)
        else:
            kept = False
        return kept

    def _extend_trail(self, theta: np.ndarray) -> None:
        """Keep (theta, x, q) of the last TRAIL thetas solved at (`predicted`), the last two
        distinct."""
        th = np.array(theta, dtype=float)
        if self.trail and np.array_equal(self.trail[-1][0], th):
            self.trail.pop()
        self.trail = (self.trail + [(th, self.x, self.q)])[-TRAIL:]

    def predicted(self, theta: np.ndarray) -> tuple[Any, Any]:
        """Warm starts of x and q at theta: for a scalar theta, the polynomial in theta through
        the last TRAIL solutions (a quadratic; the secant while only two are known), evaluated
        at theta: x(theta) - start = O(step (step + last) (step + last two)) where the secant
        leaves O(step (step + last)) and the last solution alone O(step). Used up to
        MAX_EXTRAPOLATION times the last step. For a vector theta the last solution: L-BFGS
        steps rarely continue the last line, and where they did (hypercleaning) the path
        changed without a cheaper point. Only a starting point: every solve certifies its own
        result from wherever it starts. A method that reset x (a failed trial) gets its own x
        back."""
        if self.theta_size != 1 or len(self.trail) < 2 or self.x is None \
                or self.trail[-1][1] is not self.x:
            return self.x, self.q
        t = float(np.ravel(theta)[0])
        ts = [float(th[0]) for th, _, _ in self.trail]
        if not abs(t - ts[-1]) <= MAX_EXTRAPOLATION * abs(ts[-1] - ts[-2]):
            return self.x, self.q
        if len(set(ts)) < len(ts):                # a theta met twice: the last two only
            ts, trail = ts[-2:], self.trail[-2:]
        else:
            trail = self.trail
        w = _lagrange_weights(ts, t)

        def moved(values: list[Any]) -> Any:
            if self.multi:
                return [sum(wi * v[j] for wi, v in zip(w, values)) for j in range(len(values[0]))]
            return sum(wi * v for wi, v in zip(w, values))
        qs = [q for _, _, q in trail]
        return moved([x for _, x, _ in trail]), (moved(qs) if qs[-1] is self.q else self.q)

    def certified_value(self, hg: Any) -> tuple[float, float]:
        """(value, certified bound on |value - F(theta)|), means over samples; per sample the
        better of f(x_eps) with ||grad f|| e + L_f/2 e^2 (e the certified ||x_eps - x*||, L_f the
        hypergradient's own, ball-local where that is finite) and the adjoint-corrected value
        f(x_eps) - q . grad g(x_eps) with its second-order bound (docs/bounds.md 13)."""
        parts = hg.samples if self.multi else [hg]
        pairs = []
        for r in parts:
            plain = (float(r.value), value_error_bound(r.grad_f_norm, r.e, r.constants["L_f"],
                                                       float(r.value)))
            corrected = (float(r.corrected_value), float(r.corrected_value_error))
            pairs.append(corrected if corrected[1] < plain[1] else plain)
        values, errors = zip(*pairs)
        return float(np.mean(values)), float(np.mean(errors))

    def _lipschitz_f(self, k: Any, x: np.ndarray, theta: np.ndarray, e: float) -> float:
        """L_f valid on B(x, e), which holds the segment [x, x*]: the global one, or the
        ball-local one when the global is infinite (exp links: docs/framework.md 8)."""
        L_f = float(checked_constants(k, theta)["L_f"])
        if math.isfinite(L_f) or not hasattr(k, "local_constants") or not math.isfinite(e):
            return L_f
        try:
            local = k.local_constants(x, theta, e).get("L_f")
        except (HypergenError, FloatingPointError, OverflowError):
            return L_f
        return L_f if local is None else min(L_f, float(local))

    def value_at(self, theta: np.ndarray, eps: float, x0: Any) -> tuple[float, float, Any]:
        """Inexact value f(x_eps(theta)) (mean over samples), its certified error bound and the
        lower solutions; one lower solve per sample, warm-started from x0. (inf, inf, None)
        when a solve or the value fails."""
        self.check()
        cap = self.cap()
        x0s = x0 if self.multi else [x0]
        vals, errs, xs = [], [], []
        for s, k in enumerate(self.kernels):
            try:
                low = solve_lower(k, theta, solver=self.options.lower, tol=eps,
                                  x0=None if x0s is None else x0s[s], max_iter=cap)
            except HypergenError:
                return math.inf, math.inf, None
            self.add_work(low.work)
            if low.grad is None or not np.all(np.isfinite(low.x)):
                return math.inf, math.inf, None
            try:
                v = float(k.upper_value(low.x, theta))
            except (HypergenError, FloatingPointError, OverflowError):
                return math.inf, math.inf, None
            b, _ = call_kernel(k.upper_grad, low.x, theta)
            if b is None or not math.isfinite(v):
                return math.inf, math.inf, None
            vals.append(v)
            errs.append(value_error_bound(grad_norm(b), low.bound,
                                          self._lipschitz_f(k, low.x, theta, low.bound), v))
            xs.append(low.x)
        return float(np.mean(vals)), float(np.mean(errs)), (xs if self.multi else xs[0])

    # -- history ---------------------------------------------------------------------------
    def record(self, theta: np.ndarray, value: float, value_error: float, grad_norm: float,
               bound: float, eps: float, delta: float, step_size: float,
               notify: bool = True) -> dict[str, Any]:
        """Append one history entry; update the returned point ("certified" selection); call
        the callback (StopRun "callback" when it returns True)."""
        entry: dict[str, Any] = {
            "step": len(self.history),
            "theta": [float(v) for v in theta] if self.record_theta else None,
            "value": float(value), "value_error": float(value_error),
            "grad_norm": float(grad_norm), "bound": float(bound),
            "eps": float(eps), "delta": float(delta), "step_size": float(step_size),
            "work": int(self.work), "time": self.elapsed(),
        }
        self.history.append(entry)
        score = _score(entry)
        if self.select == "certified" and math.isfinite(float(value)) \
                and (self.best is None or score <= self.best_score):
            self.best, self.best_score = (np.array(theta, dtype=float), entry), score
        if self.bar is not None:
            self.bar.set_postfix(value=f"{value:.6g}", h=f"{grad_norm:.2g}", bound=f"{bound:.2g}",
                                 eps=f"{eps:.1g}", refresh=False)
        callback = self.options.callback
        if notify and callback is not None and stops(callback(dict(entry))):
            raise StopRun(OptimizeStatus.CALLBACK, "the callback asked to stop")
        return entry

    def accept(self, theta: np.ndarray, entry: dict[str, Any]) -> None:
        """The method's current point ("accepted" selection: the point returned)."""
        self.best = (np.array(theta, dtype=float), entry)

    def flush_pending(self) -> None:
        """Record an accepted point that has no hypergradient yet (its value is certified)."""
        if self.pending is not None:
            args, self.pending = self.pending, None
            theta, value, error, grad_norm, bound, eps, delta, step_size = args
            entry = self.record(theta, value, error, grad_norm, bound, eps, delta, step_size,
                                notify=False)
            if self.select == "accepted":
                self.accept(args[0], entry)


def shrink_to_accuracy(run: Runner, theta: np.ndarray, eps: float, delta: float, frac: float,
                       tau: float, value_tol: Any = None) -> tuple[Any, float, float, bool]:
    """Shrink eps, delta by tau until bound <= frac * ||h|| (and, if value_tol is given, the
    certified value error <= value_tol(||h||)). Returns (hg, eps, delta, ok); ok is False when
    eps would fall below min_eps (the last hg is returned; run.floor_reason says why)."""
    while True:
        hg = run.hypergradient(theta, eps, delta)
        hn = grad_norm(hg.grad)
        grad_ok = hg.bound <= frac * hn
        verr = run.certified_value(hg)[1] if value_tol is not None else 0.0
        if not math.isfinite(verr):
            note = "value error bound not finite (L_f = inf?): values are not certified"
            if note not in run.notes:
                run.notes.append(note)
        value_ok = value_tol is None or not math.isfinite(verr) or verr <= value_tol(hn)
        if grad_ok and value_ok:
            return hg, eps, delta, True
        if not math.isfinite(hg.bound):
            raise StopRun(OptimizeStatus.FAILED, f"the a posteriori bound is not finite "
                                                 f"({hg.status}): the accuracy test cannot pass")
        if eps * tau < run.options.min_eps:
            run.floor_reason = (
                f"the bound ({hg.bound:.3g}) was still above {frac:g} ||h|| = {frac * hn:.3g}"
                if not grad_ok else
                f"the value error bound ({verr:.3g}) was still above {value_tol(hn):.3g}, a "
                f"fraction of the change the line search must see")
            return hg, eps, delta, False
        eps *= tau
        delta *= tau


def floor_stop(run: Runner, hg: Any, eps: float, reason: str = "") -> StopRun:
    """The stop at the accuracy floor: "converged" when the certificate meets gtol anyway."""
    hn = grad_norm(hg.grad)
    cert = hn + hg.bound
    if cert <= run.options.gtol:
        return StopRun(OptimizeStatus.CONVERGED, f"||grad F|| <= ||h|| + bound = {cert:.3g}")
    if run.budget_capped():
        return StopRun(OptimizeStatus.BUDGET, f"work budget of {run.options.work_budget:g} "
                                              f"units spent (the last solves were capped by "
                                              f"it); certified ||grad F|| <= {cert:.3g}")
    why = reason or run.floor_reason or "the tests needed a smaller eps"
    return StopRun(OptimizeStatus.ACCURACY_FLOOR,
                   f"eps = {eps:.3g} reached min_eps = {run.options.min_eps:g}: {why}; "
                   f"certified ||grad F|| <= ||h|| + bound = {cert:.3g}")


def _all_finite(a: Any) -> bool:
    """np.all(np.isfinite(a)); a sample's array left on its worker (a HeldArray,
    docs/distributed.md 3) says so without being fetched."""
    known = getattr(a, "all_finite", None)
    return known if isinstance(known, bool) else bool(np.all(np.isfinite(a)))


def _kept(a: Any) -> Any:
    """A warm start of the runner's own: a copy, or an unread HeldArray as it is (a copy would
    fetch it; passed back unread, it does not travel to its worker)."""
    return a if getattr(a, "fetched", None) is False else np.array(a)
