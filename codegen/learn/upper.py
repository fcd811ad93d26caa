"""The upper level: learn theta by minimising F(theta) = f(x*(theta), theta) + r(theta)
with inexact hypergradients (interface.md 3, notes/framework.md 9 and 10).

    res = optimize(prob, theta0, method="maid", budget=5000)
    res.theta, res.value, res.history, res.status, res.work, res.seconds

Methods
-------
"gd"      fixed-step gradient descent on theta, as in E&R's experiments: theta -= step * h.
          eps, delta fixed (eps0, delta0) or decreased by a HOAG schedule (Pedregosa 2016):
          "exponential" eps0 0.9^k, "quadratic" eps0/(k+1)^2, "cubic" eps0/(k+1)^3, floor 1e-12;
          delta follows the same factor from delta0 (absolute tolerances, scale fixed at k = 0).
"maid"    MAID (Salehi et al. 2025; framework.md 9): per iteration, shrink eps, delta by tau until
          the certified bound w <= (1 - eta)||h|| (a descent direction), then backtrack on the
          inexact value with the certified test
              f(x'_e) + |grad f(x'_e)| e' + L_f/2 e'^2  +  |grad f(x_e)| e + L_f/2 e^2
                  <= f(x_e) - c h.(theta - theta')
          (e, e' each point's own certified G/mu; L_f/2 on both sides, i.e. c_f = L_f, valid for
          any f), which implies F(theta') <= F(theta) - c s rho^i ||h||^2. After success
          s = s rho^i * 10/9 and eps, delta *= nu; when every backtracking step fails eps, delta
          *= tau and the gradient is recomputed (max_bt_loop times, with 10, 11, 12 steps).
          Code defaults: eps0 = delta0 = 0.1, eta = 1e-4, rho = 0.9, tau = 0.5, s0 = 0.1,
          nu = 1.05, growth 10/9, c = eta^2.
"lbfgsb"  scipy.optimize.minimize(method="L-BFGS-B", jac=True) on (f(x_e), h); at every
          evaluation eps, delta are shrunk by tau until bound <= rel_accuracy * ||h|| and the
          certified value error <= rel_accuracy * ||h|| * ||theta - theta_prev|| (a fraction of
          the change the line search compares; theta_prev the previous evaluation); they never
          grow again. `bounds` is the box on theta; SciPy's ftol defaults to 1e-15 here (the
          value accuracy, not round-off, decides). One history entry per function evaluation.

Work is counted in E&R's unit: lower gradients + Hessian-vector products, over all samples
(cross products are not counted). `budget` stops the run once that many units are spent (the
solvers are capped at the remaining budget, so a run overshoots by at most one hypergradient
or value evaluation); `time_budget` stops it after that many seconds (checked between solves).

Warm starts: the lower level starts from the previous x (one x per sample); the adjoint from 0.

The result's theta and value are those of the best recorded point: the smallest certified
upper bound value + value_error on F (ties to the later point). For MAID that is the last
accepted point (its certified decrease makes the accepted chain monotone). A KeyboardInterrupt
(Ctrl-C) inside the loop, also from a callback, ends the run with status "interrupted" and the
best point so far. Runs are deterministic: the same inputs give the same history (apart from
the "time" column).

Statuses: "converged" (certified ||grad F|| <= ||h|| + bound <= gtol, or SciPy's test for
lbfgsb), "accuracy floor" (MAID / L-BFGS-B needed eps below min_eps; ||grad F|| <= ||h|| +
bound is still certified, see `message`), "stalled" (L-BFGS-B line search failure), "budget",
"time", "max_iter", "callback" (the callback returned True), "interrupted", "failed" (a solver
returned no usable number; `message` says why).
"""
from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import HypergenError

__all__ = ["optimize", "OptimizeResult", "OptimizeError", "read_history", "parse_budget",
           "parse_theta0", "METHODS", "SCHEDULES"]

METHODS = ("maid", "gd", "lbfgsb")
SCHEDULES = ("exponential", "quadratic", "cubic")
#: theta is stored in the history when it has at most this many entries (record_theta=None).
RECORD_THETA_MAX = 1000
#: theta gets one CSV column per entry up to this size, else one JSON-encoded "theta" column.
CSV_THETA_COLUMNS_MAX = 50
_INT_KEYS = ("step", "work")
HISTORY_KEYS = ("step", "value", "value_error", "grad_norm", "bound", "eps", "delta",
                "step_size", "work", "time")


class OptimizeError(HypergenError, ValueError):
    """Invalid input to `optimize` (theta0, budget, method, options)."""


# ----------------------------------------------------------------------------------------------
# input parsing


def parse_budget(budget):
    """A budget as (work units or None, seconds or None).

    Numbers are work units (lower gradients + HVPs); a string is a number ("5000", "1e4") or
    seconds with an "s" suffix ("30s", "2.5 s"). Anything else raises OptimizeError.
    """
    if budget is None:
        return None, None
    what = ("the budget must be a positive number of work units (lower gradients + HVPs, "
            "e.g. 5000) or seconds with an 's' suffix (e.g. 30s)")
    if isinstance(budget, bool):
        raise OptimizeError(f"{what}, got {budget!r}")
    if isinstance(budget, str):
        text = budget.strip().lower()
        seconds = text.endswith("s")
        if seconds:
            text = text[:-1].strip()
        try:
            value = float(text)
        except ValueError:
            raise OptimizeError(f"{what}, got {budget!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise OptimizeError(f"{what}, got {budget!r}")
        return (None, value) if seconds else (value, None)
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise OptimizeError(f"{what}, got {budget!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise OptimizeError(f"{what}, got {budget!r}")
    return value, None


def parse_theta0(theta0, size: int) -> np.ndarray:
    """theta0 as a float64 vector of `size` entries: a number means every entry; a sequence (or
    a comma-separated string "1,2") must have exactly `size` entries."""
    if isinstance(theta0, str):
        parts = [s for s in theta0.replace(" ", "").split(",") if s]
        try:
            theta0 = [float(s) for s in parts]
        except ValueError:
            raise OptimizeError(f"theta0 must be a number or comma-separated numbers, "
                                f"got {theta0!r}") from None
        if len(theta0) == 1:
            theta0 = theta0[0]
    try:
        arr = np.array(theta0, dtype=np.float64)
    except (TypeError, ValueError):
        raise OptimizeError(f"theta0 must be a number or a list of {size} numbers, "
                            f"got {theta0!r}") from None
    if arr.ndim == 0:
        arr = np.full(size, float(arr))
    arr = arr.ravel()
    if arr.size != size:
        raise OptimizeError(f"theta0 has {arr.size} entries but the problem has {size} "
                            f"hyperparameter{'s' if size != 1 else ''} (give one number to "
                            f"use it for every entry)")
    if not np.all(np.isfinite(arr)):
        raise OptimizeError(f"theta0 is not finite: {arr}")
    return arr


def _parse_bounds(bounds, size):
    """None, one (lo, hi) pair for every entry, or a list of `size` pairs; None = unbounded.
    Returns (lo, hi) arrays with +-inf for missing bounds."""
    lo, hi = np.full(size, -np.inf), np.full(size, np.inf)
    if bounds is None:
        return lo, hi
    try:
        pairs = list(bounds)
        if len(pairs) == 2 and all(p is None or np.ndim(p) == 0 for p in pairs):
            pairs = [tuple(pairs)] * size
        pairs = [tuple(p) for p in pairs]
    except TypeError:
        raise OptimizeError(f"bounds must be a (lo, hi) pair or a list of {size} pairs, "
                            f"got {bounds!r}") from None
    if len(pairs) != size or any(len(p) != 2 for p in pairs):
        raise OptimizeError(f"bounds must be a (lo, hi) pair or a list of {size} (lo, hi) "
                            f"pairs, got {bounds!r}")
    for j, (a, b) in enumerate(pairs):
        lo[j] = -np.inf if a is None else float(a)
        hi[j] = np.inf if b is None else float(b)
        if lo[j] > hi[j] or math.isnan(lo[j]) or math.isnan(hi[j]):
            raise OptimizeError(f"bounds entry {j}: lower {a} > upper {b}")
    return lo, hi


# ----------------------------------------------------------------------------------------------
# the result


def _clean(v):
    """A JSON-safe float: non-finite values as the strings "nan", "inf", "-inf"."""
    if v is None:
        return None
    v = float(v)
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def _unclean(v):
    if v is None or v == "":
        return math.nan
    return float(v)


@dataclass(repr=False)
class OptimizeResult:
    """The outcome of `optimize`.

    theta, value   the best recorded point and its inexact upper value f(x_eps) (+ r);
    history        one dict per step: step, theta (list; None when theta is too large to
                   record), value, value_error (certified bound on |value - F(theta)|, mean over
                   samples of ||grad f(x_e)|| e + L_f/2 e^2), grad_norm (||h||), bound (a
                   posteriori bound on ||h - grad F||),
                   eps, delta (tolerances used), step_size, work (cumulative units), time (s);
                   grad_norm and bound are nan at a point where no hypergradient was computed;
    status         see the module docstring; message the details;
    work           total work units; seconds the wall time; iterations accepted steps
                   (MAID, gd) or L-BFGS-B iterations;
    grad_norm, bound  at the best point (nan if unknown); hypergradient the last
                   HypergradientResult; notes distinct non-"ok" hypergradient statuses seen.
    """

    theta: np.ndarray
    value: float
    history: list
    status: str
    work: int
    seconds: float
    method: str = ""
    message: str = ""
    iterations: int = 0
    grad_norm: float = math.nan
    bound: float = math.nan
    hypergradient: object = None
    notes: list = field(default_factory=list)

    @property
    def success(self) -> bool:
        return self.status in ("converged", "accuracy floor")

    def __repr__(self):
        th = np.asarray(self.theta)
        th_s = (np.array2string(th, precision=6, separator=", ") if th.size <= 6
                else f"array(shape={th.shape}, norm={np.linalg.norm(th):.4g})")
        return (f"OptimizeResult(method={self.method!r}, status={self.status!r}, theta={th_s}, "
                f"value={self.value:.6g}, grad_norm={self.grad_norm:.3g}, "
                f"bound={self.bound:.3g}, work={self.work}, seconds={self.seconds:.3g}, "
                f"steps={len(self.history)}"
                + (f", message={self.message!r}" if self.message else "") + ")")

    def summary(self) -> str:
        th = np.asarray(self.theta)
        th_s = (", ".join(f"{v:.6g}" for v in th) if th.size <= 10
                else f"{th.size} entries, norm {np.linalg.norm(th):.6g}, "
                     f"min {th.min():.6g}, max {th.max():.6g}")
        lines = [f"method   {self.method}",
                 f"status   {self.status}" + (f" ({self.message})" if self.message else ""),
                 f"theta    {th_s}",
                 f"value    {self.value:.10g}",
                 f"||h||    {self.grad_norm:.3g}",
                 f"bound    {self.bound:.3g}  (a posteriori, on ||h - grad F||)",
                 f"work     {self.work} units (lower gradients + HVPs)",
                 f"time     {self.seconds:.3f} s",
                 f"steps    {len(self.history)}"]
        return "\n".join(lines)

    # -- export ----------------------------------------------------------------------------
    def history_to_json(self, path) -> Path:
        """Write {method, status, message, theta, value, work, seconds, history} as JSON;
        non-finite numbers become the strings "nan", "inf", "-inf" (read back by read_history)."""
        path = Path(path)
        doc = {
            "method": self.method, "status": self.status, "message": self.message,
            "theta": [_clean(v) for v in np.asarray(self.theta, dtype=float)],
            "value": _clean(self.value), "work": int(self.work), "seconds": self.seconds,
            "history": [_entry_json(e) for e in self.history],
        }
        path.write_text(json.dumps(doc, indent=1) + "\n")
        return path

    def history_to_csv(self, path) -> Path:
        """One row per step: the HISTORY_KEYS columns, then theta[0], theta[1], ... (a single
        JSON-encoded "theta" column when theta has more than 50 entries; empty if not recorded)."""
        path = Path(path)
        sizes = [len(e["theta"]) for e in self.history if e.get("theta") is not None]
        p = max(sizes) if sizes else 0
        split = 0 < p <= CSV_THETA_COLUMNS_MAX
        theta_cols = [f"theta[{j}]" for j in range(p)] if split else ["theta"]
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(list(HISTORY_KEYS) + theta_cols)
            for e in self.history:
                row = [repr(int(e[key])) if key in _INT_KEYS else repr(float(e[key]))
                       for key in HISTORY_KEYS]
                th = e.get("theta")
                if split:
                    row += [repr(float(v)) for v in th] if th is not None else [""] * p
                else:
                    row.append(json.dumps([float(v) for v in th]) if th is not None else "")
                w.writerow(row)
        return path

    def plot(self, path=None):
        """Objective against work and the bound against ||h|| (log-log, with the line
        bound = ||h||). Needs matplotlib (pip install hypergen[plot]). Saves to `path` if given;
        returns the figure."""
        return plot_history(self.history, path, title=f"{self.method}: {self.status}")


def _entry_json(e):
    out = {}
    for key, v in e.items():
        if key == "theta":
            out[key] = None if v is None else [_clean(t) for t in v]
        elif key in _INT_KEYS:
            out[key] = int(v)
        else:
            out[key] = _clean(v)
    return out


def read_history(path) -> list:
    """Read a history written by history_to_csv (".csv") or history_to_json (any other suffix)
    back into a list of dicts with float values (theta a list of floats, or None)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        out = []
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                e = {key: int(row[key]) if key in _INT_KEYS else _unclean(row[key])
                     for key in HISTORY_KEYS}
                cols = sorted((k for k in row if k.startswith("theta[")),
                              key=lambda c: int(c[6:-1]))
                if cols:
                    vals = [row[c] for c in cols]
                    e["theta"] = None if all(v == "" for v in vals) else [float(v) for v in vals]
                else:
                    e["theta"] = json.loads(row["theta"]) if row.get("theta") else None
                out.append(e)
        return out
    doc = json.loads(path.read_text())
    hist = doc["history"] if isinstance(doc, dict) else doc
    out = []
    for e in hist:
        d = {}
        for key, v in e.items():
            if key == "theta":
                d[key] = None if v is None else [_unclean(t) for t in v]
            elif key in _INT_KEYS:
                d[key] = int(v)
            else:
                d[key] = _unclean(v)
        out.append(d)
    return out


def plot_history(history, path=None, title=None):
    try:
        import matplotlib
        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install hypergen[plot] "
                          "(or pip install matplotlib)") from None
    work = [e["work"] for e in history]
    value = [e["value"] for e in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(work, value, marker=".")
    a1.set_xlabel("work (lower gradients + HVPs)")
    a1.set_ylabel("upper objective f(x_eps)")
    a1.set_title("objective against work")
    pts = [(e["grad_norm"], e["bound"]) for e in history
           if math.isfinite(e["grad_norm"]) and math.isfinite(e["bound"])
           and e["grad_norm"] > 0 and e["bound"] > 0]
    if pts:
        g, b = zip(*pts)
        a2.loglog(g, b, marker=".", linestyle="-")
        lo, hi = min(min(g), min(b)), max(max(g), max(b))
        a2.loglog([lo, hi], [lo, hi], "k--", linewidth=0.8, label="bound = ||h||")
        a2.legend()
    a2.set_xlabel("||h|| (hypergradient norm)")
    a2.set_ylabel("a posteriori bound on ||h - grad F||")
    a2.set_title("bound against gradient norm")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


# ----------------------------------------------------------------------------------------------
# the loop machinery


class _Stop(Exception):
    def __init__(self, status, message=""):
        super().__init__(status, message)
        self.status, self.message = status, message


def _progress_bar(progress, budget):
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


class _Runner:
    """State shared by the three methods: work and time accounting, warm starts, history,
    best point, progress bar and callback."""

    def __init__(self, k, theta_size, lower, adjoint, budget, time_budget, solver_max_iter,
                 bar, callback, record_theta, lo, hi, refine_iter):
        self.k = k
        self.refine_iter = refine_iter
        self.multi = hasattr(k, "samples")
        self.ks = list(k.samples) if self.multi else [k]
        self.p = theta_size
        self.lower, self.adjoint = lower, adjoint
        self.budget, self.time_budget = budget, time_budget
        self.solver_max_iter = int(solver_max_iter)
        self.bar, self.callback = bar, callback
        self.record_theta = record_theta
        self.lo, self.hi = lo, hi
        self.t0 = time.perf_counter()
        self.work = 0
        self.x = None                  # warm start: an array, or a list per sample
        self.history = []
        self.best = None
        self.last_hg = None
        self.notes = []
        self.pending = None            # an accepted point without a hypergradient yet

    # -- accounting ------------------------------------------------------------------------
    def elapsed(self):
        return time.perf_counter() - self.t0

    def check(self):
        if self.budget is not None and self.work >= self.budget:
            raise _Stop("budget", f"work budget of {self.budget:g} units spent")
        if self.time_budget is not None and self.elapsed() >= self.time_budget:
            raise _Stop("time", f"time budget of {self.time_budget:g} s spent")

    def cap(self):
        if self.budget is None:
            return self.solver_max_iter
        return int(max(1, min(self.solver_max_iter, math.ceil(self.budget - self.work))))

    def add_work(self, units):
        self.work += int(units)
        if self.bar is not None:
            self.bar.update(int(units))

    def project(self, theta):
        return np.clip(theta, self.lo, self.hi)

    # -- oracles ---------------------------------------------------------------------------
    def hypergradient(self, theta, eps, delta):
        """The (sample-averaged) hypergradient at theta, warm-started from the last x."""
        from ..hypergrad.hypergradient import hypergradient, hypergradient_samples

        self.check()
        cap = self.cap()
        try:
            if self.multi:
                hg = hypergradient_samples(self.ks, theta, lower=self.lower,
                                           adjoint=self.adjoint, eps=eps, delta=delta,
                                           x0=self.x, max_iter=cap, refine_iter=self.refine_iter)
            else:
                hg = hypergradient(self.k, theta, lower=self.lower, adjoint=self.adjoint,
                                   eps=eps, delta=delta, x0=self.x, max_iter=cap,
                                   refine_iter=self.refine_iter)
        except HypergenError as exc:
            raise _Stop("failed", f"hypergradient at theta = {_short(theta)}: {exc}") from None
        self.add_work(hg.work["units"])
        self.last_hg = hg
        if hg.status != "ok":
            for reason in hg.status.split("; "):
                if reason not in self.notes and len(self.notes) < 20:
                    self.notes.append(reason)
        if not hg.usable:
            raise _Stop("failed", f"no usable hypergradient at theta = {_short(theta)}: "
                                  f"{hg.status}")
        xs = hg.x if self.multi else [hg.x]
        if all(x is not None and np.all(np.isfinite(x)) for x in xs):
            self.x = [np.array(x) for x in xs] if self.multi else np.array(hg.x)
        return hg

    def value_error(self, hg):
        """Certified bound on |f(x_eps) - f(x*)| (mean over samples):
        ||grad f(x_eps)|| e + L_f/2 e^2 with e = G/mu."""
        parts = hg.samples if self.multi else [hg]
        return float(np.mean([_value_err(r.grad_f_norm, r.e, r.constants["L_f"])
                              for r in parts]))

    def value_at(self, theta, eps, x0):
        """Inexact value f(x_eps(theta)) (mean over samples), its certified error bound and the
        lower solutions; one lower solve per sample, warm-started from x0."""
        from ..hypergrad.solvers import _call, checked_constants, solve_lower

        self.check()
        cap = self.cap()
        x0s = x0 if self.multi else [x0]
        vals, errs, xs = [], [], []
        for s, k in enumerate(self.ks):
            try:
                low = solve_lower(k, theta, solver=self.lower, tol=eps,
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
            b, _ = _call(k.upper_grad, low.x, theta)
            if b is None or not math.isfinite(v):
                return math.inf, math.inf, None
            Lf = checked_constants(k, theta)["L_f"]
            vals.append(v)
            errs.append(_value_err(float(np.linalg.norm(b)), low.bound, Lf))
            xs.append(low.x)
        return float(np.mean(vals)), float(np.mean(errs)), (xs if self.multi else xs[0])

    # -- history ---------------------------------------------------------------------------
    def record(self, theta, value, value_error, grad_norm, bound, eps, delta, step_size,
               notify=True):
        rec = self.record_theta
        entry = {
            "step": len(self.history),
            "theta": [float(v) for v in theta] if rec else None,
            "value": float(value), "value_error": float(value_error),
            "grad_norm": float(grad_norm), "bound": float(bound),
            "eps": float(eps), "delta": float(delta), "step_size": float(step_size),
            "work": int(self.work), "time": self.elapsed(),
        }
        self.history.append(entry)
        score = _score(entry)
        if math.isfinite(entry["value"]) and (self.best is None or score <= self.best[2]):
            self.best = (np.array(theta, dtype=float), entry, score)
        if self.bar is not None:
            self.bar.set_postfix(value=f"{value:.6g}", h=f"{grad_norm:.2g}", bound=f"{bound:.2g}",
                                 eps=f"{eps:.1g}", refresh=False)
        if notify and self.callback is not None:
            if self.callback(dict(entry)) is True:
                raise _Stop("callback", "the callback asked to stop")
        return entry

    def flush_pending(self):
        if self.pending is not None:
            args, self.pending = self.pending, None
            self.record(*args, notify=False)


def _score(entry):
    """Points are ranked by the certified upper bound value + value_error on F(theta) (ties to
    the later point), then by the value when no finite error bound is known."""
    ub = entry["value"] + entry["value_error"]
    return (ub if math.isfinite(ub) else math.inf, entry["value"])


def _value_err(nb, e, Lf):
    if e == 0:
        return 0.0
    if not math.isfinite(e):
        return math.inf
    return nb * e + (0.5 * Lf * e * e)


def _short(theta):
    th = np.asarray(theta)
    if th.size <= 4:
        return np.array2string(th, precision=4, separator=", ")
    return f"<{th.size} entries, norm {np.linalg.norm(th):.4g}>"


def _schedule_factor(schedule, k):
    if schedule is None:
        return 1.0
    if schedule == "exponential":
        return 0.9 ** k
    if schedule == "quadratic":
        return 1.0 / (k + 1) ** 2
    if schedule == "cubic":
        return 1.0 / (k + 1) ** 3
    raise OptimizeError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")


# ----------------------------------------------------------------------------------------------
# the entry point


def optimize(k, theta0, method="maid", budget=None, time_budget=None, max_iter=1000,
             progress=None, bounds=None, step=0.1, eps0=0.1, delta0=0.1, schedule=None,
             lower="fista", adjoint="cg", callback=None, gtol=1e-8, min_eps=1e-12,
             solver_max_iter=None, eta=1e-4, rho=0.9, tau=0.5, nu=1.05, growth=10 / 9,
             armijo=None, max_bt_loop=3, bt_steps=10, rel_accuracy=0.1, scipy_options=None,
             record_theta=None, refine_iter=None) -> OptimizeResult:
    """Minimise the upper objective over theta from theta0 (see the module docstring).

    k              a bound problem (prob = module.bind(...)), a samples object
                   (module.bind_samples(...), anything with `.samples`: the objective and the
                   hypergradient are averaged), or any object with the kernel interface;
    theta0         a float (every entry) or a list of theta_size floats;
    method         "maid" (default), "gd" or "lbfgsb";
    budget         work units (lower gradients + HVPs), or a string "5000" / "30s";
    time_budget    seconds; max_iter: outer iterations (L-BFGS-B: its iterations);
    progress       a tqdm bar; None = only when stderr is a terminal;
    bounds         (lo, hi) for every entry or a list of pairs (None = unbounded): the box of
                   L-BFGS-B; gd and MAID project onto it (theta0 is clipped into it);
    step           gd: the fixed step; MAID: the initial step s0;
    eps0, delta0   initial lower accuracy (certified ||x - x*||) and adjoint residual;
    schedule       gd only: None (fixed eps, delta), "exponential", "quadratic", "cubic";
    lower, adjoint the solvers of `hypergradient`; callback(entry) after every history entry
                   (return True to stop);
    gtol           stop when the certified ||grad F|| <= ||h|| + bound <= gtol (L-BFGS-B:
                   SciPy's projected-gradient tolerance);
    min_eps        MAID / L-BFGS-B do not shrink eps below this ("accuracy floor");
    solver_max_iter  cap on lower and adjoint iterations per solve (default 10,000);
    refine_iter    HVPs spent sharpening each bound (hypergradient's refine_iter): default 0 for
                   "gd", whose steps do not depend on the bound, 10 for "maid" and "lbfgsb";
    eta, rho, tau, nu, growth, armijo (default eta^2), max_bt_loop, bt_steps: MAID's constants;
    rel_accuracy   L-BFGS-B: eps, delta shrink until bound <= rel_accuracy * ||h||;
    scipy_options  extra options for scipy.optimize.minimize (L-BFGS-B);
    record_theta   store theta in the history (default: when theta_size <= 1000).
    """
    from ..hypergrad.solvers import ADJOINT_SOLVERS, DEFAULT_MAX_ITER, LOWER_SOLVERS

    if method not in METHODS:
        raise OptimizeError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if lower not in LOWER_SOLVERS:
        raise OptimizeError(f"unknown lower solver {lower!r}; choose from {LOWER_SOLVERS}")
    if adjoint not in ADJOINT_SOLVERS:
        raise OptimizeError(f"unknown adjoint solver {adjoint!r}; choose from {ADJOINT_SOLVERS}")
    if adjoint == "backprop" and method != "gd":
        raise OptimizeError(f"method {method!r} needs the a posteriori bound, which "
                            "adjoint='backprop' does not have; use adjoint='cg' (or method='gd')")
    if schedule is not None and method != "gd":
        raise OptimizeError("schedule applies to method='gd' only (MAID and L-BFGS-B adapt "
                            "eps and delta themselves)")
    _schedule_factor(schedule, 0)
    work_budget, secs = parse_budget(budget)
    if time_budget is not None:
        _, time_budget = parse_budget(f"{time_budget}s" if not isinstance(time_budget, str)
                                      else time_budget)
    if secs is not None:
        time_budget = secs if time_budget is None else min(time_budget, secs)
    for name, v in (("eps0", eps0), ("delta0", delta0), ("step", step)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise OptimizeError(f"{name} must be a positive number, got {v!r}")
    if int(max_iter) < 1:
        raise OptimizeError(f"max_iter must be at least 1, got {max_iter!r}")
    p = getattr(k, "theta_size", None)
    if p is None:
        raise OptimizeError("the problem object has no theta_size")
    theta = parse_theta0(theta0, int(p))
    lo, hi = _parse_bounds(bounds, theta.size)
    theta = np.clip(theta, lo, hi)
    if record_theta is None:
        record_theta = theta.size <= RECORD_THETA_MAX
    bar = _progress_bar(progress, work_budget)
    run = _Runner(k, theta.size, lower, adjoint, work_budget, time_budget,
                  solver_max_iter or DEFAULT_MAX_ITER, bar, callback, bool(record_theta), lo, hi,
                  (0 if method == "gd" else 10) if refine_iter is None else int(refine_iter))
    opts = dict(max_iter=int(max_iter), step=float(step), eps0=float(eps0), delta0=float(delta0),
                schedule=schedule, gtol=float(gtol), min_eps=float(min_eps), eta=eta, rho=rho,
                tau=tau, nu=nu, growth=growth, armijo=eta ** 2 if armijo is None else armijo,
                max_bt_loop=int(max_bt_loop), bt_steps=int(bt_steps), rel_accuracy=rel_accuracy,
                scipy_options=dict(scipy_options or {}))
    status, message, iterations = "max_iter", "", 0
    try:
        status, message, iterations = {"gd": _gd, "maid": _maid, "lbfgsb": _lbfgsb}[method](
            run, theta, opts)
    except _Stop as stop:
        status, message = stop.status, stop.message
    except KeyboardInterrupt:
        status, message = "interrupted", "KeyboardInterrupt: the best point so far is returned"
    finally:
        if bar is not None:
            bar.close()
    iterations = max(iterations, getattr(run, "iterations", 0))
    run.flush_pending()
    if run.best is None:
        best_theta, entry = theta, {"value": math.nan, "grad_norm": math.nan, "bound": math.nan}
    else:
        best_theta, entry, _ = run.best
    return OptimizeResult(
        theta=best_theta, value=entry["value"], history=run.history, status=status,
        work=run.work, seconds=run.elapsed(), method=method, message=message,
        iterations=iterations, grad_norm=entry["grad_norm"], bound=entry["bound"],
        hypergradient=run.last_hg, notes=run.notes)


# ----------------------------------------------------------------------------------------------
# methods; each returns (status, message, iterations) or raises _Stop


def _gd(run, theta, o):
    step = o["step"]
    run.iterations = 0
    for it in range(o["max_iter"]):
        f = _schedule_factor(o["schedule"], it)
        eps = max(o["eps0"] * f, 1e-12) if o["schedule"] else o["eps0"]
        delta = max(o["delta0"] * f, 1e-12) if o["schedule"] else o["delta0"]
        hg = run.hypergradient(theta, eps, delta)
        hn = float(np.linalg.norm(hg.grad))
        run.record(theta, hg.value, run.value_error(hg), hn, hg.bound, eps, delta, step)
        if hn + hg.bound <= o["gtol"]:
            return "converged", f"||grad F|| <= ||h|| + bound = {hn + hg.bound:.3g}", it
        new = run.project(theta - step * hg.grad)
        if not np.all(np.isfinite(new)):
            return "failed", "theta became non-finite (step too large?)", it
        theta = new
        run.iterations = it + 1
    return "max_iter", f"{o['max_iter']} iterations", o["max_iter"]


def _accurate(run, theta, eps, delta, frac, o, value_tol=None):
    """Shrink eps, delta by tau until bound <= frac * ||h|| (and, if value_tol is given, the
    certified value error <= value_tol(||h||)). Returns (hg, eps, delta, ok); ok is False when
    eps would fall below min_eps (the last hg is returned; run.floor_reason says why)."""
    while True:
        hg = run.hypergradient(theta, eps, delta)
        hn = float(np.linalg.norm(hg.grad))
        grad_ok = hg.bound <= frac * hn
        verr = run.value_error(hg) if value_tol is not None else 0.0
        if not math.isfinite(verr):
            note = "value error bound not finite (L_f = inf?): values are not certified"
            if note not in run.notes:
                run.notes.append(note)
        value_ok = value_tol is None or not math.isfinite(verr) or verr <= value_tol(hn)
        if grad_ok and value_ok:
            return hg, eps, delta, True
        if not math.isfinite(hg.bound):
            raise _Stop("failed", f"the a posteriori bound is not finite ({hg.status}): the "
                                  "accuracy test cannot pass")
        if eps * o["tau"] < o["min_eps"]:
            run.floor_reason = (
                f"the bound ({hg.bound:.3g}) was still above {frac:g} ||h|| = {frac * hn:.3g}"
                if not grad_ok else
                f"the value error bound ({run.value_error(hg):.3g}) was still above "
                f"{value_tol(hn):.3g}, a fraction of the change the line search must see")
            return hg, eps, delta, False
        eps *= o["tau"]
        delta *= o["tau"]


def _floor_stop(run, hg, eps, o):
    hn = float(np.linalg.norm(hg.grad))
    cert = hn + hg.bound
    if cert <= o["gtol"]:
        return _Stop("converged", f"||grad F|| <= ||h|| + bound = {cert:.3g}")
    return _Stop("accuracy floor", f"eps = {eps:.3g} reached min_eps = {o['min_eps']:g} and "
                                   f"{getattr(run, 'floor_reason', '')}; certified "
                                   f"||grad F|| <= ||h|| + bound = {cert:.3g}")


def _maid(run, theta, o):
    s = o["step"]
    eps, delta = o["eps0"], o["delta0"]
    eta, rho, tau, c = o["eta"], o["rho"], o["tau"], o["armijo"]
    run.iterations = 0
    for it in range(o["max_iter"]):
        accepted = False
        for j in range(o["max_bt_loop"]):
            hg, eps, delta, ok = _accurate(run, theta, eps, delta, 1.0 - eta, o)
            run.pending = None
            hn = float(np.linalg.norm(hg.grad))
            fe = run.value_error(hg)
            run.record(theta, hg.value, fe, hn, hg.bound, eps, delta, s)
            if hn + hg.bound <= o["gtol"]:
                return "converged", f"||grad F|| <= ||h|| + bound = {hn + hg.bound:.3g}", \
                    run.iterations
            if not ok:
                raise _floor_stop(run, hg, eps, o)
            if not math.isfinite(fe):
                raise _Stop("failed", "MAID's certified line search needs a finite bound on "
                                      "|f(x_eps) - f(x*)|, i.e. a finite L_f (got value error "
                                      f"{fe}); use method='lbfgsb' or 'gd'")
            x_here = run.x
            for i in range(o["bt_steps"] + j):
                t = s * rho ** i
                new = run.project(theta - t * hg.grad)
                dec = float(hg.grad @ (theta - new))
                if dec <= 0:
                    break                                 # the box stops every move
                v, err, x_new = run.value_at(new, eps, x_here)
                if v + err + fe <= hg.value - c * dec:
                    accepted = True
                    break
            run.x = x_here
            if accepted:
                s = t
                theta = new
                run.x = x_new
                run.iterations += 1
                eps *= o["nu"]
                delta *= o["nu"]
                s *= o["growth"]
                run.pending = (theta, v, err, math.nan, math.nan, eps, delta, s)
                break
            if eps * tau < o["min_eps"]:
                raise _floor_stop(run, hg, eps, o)
            eps *= tau
            delta *= tau
    run.flush_pending()
    return "max_iter", f"{o['max_iter']} iterations", run.iterations


def _lbfgsb(run, theta, o):
    from scipy.optimize import minimize

    state = {"eps": o["eps0"], "delta": o["delta0"], "prev": None}
    run.iterations = 0
    frac = o["rel_accuracy"]

    def fun(th):
        th = np.array(th, dtype=float)
        # The line search compares values: their certified error must be a fraction of the
        # change h.(theta - theta_prev) it is meant to see (no requirement at the first point).
        dist = 0.0 if state["prev"] is None else float(np.linalg.norm(th - state["prev"]))
        value_tol = (lambda hn: frac * hn * dist) if dist > 0 else None
        hg, state["eps"], state["delta"], ok = _accurate(run, th, state["eps"], state["delta"],
                                                         frac, o, value_tol)
        state["prev"] = th
        hn = float(np.linalg.norm(hg.grad))
        run.record(th, hg.value, run.value_error(hg), hn, hg.bound, state["eps"],
                   state["delta"], math.nan)
        if hn + hg.bound <= o["gtol"]:
            raise _Stop("converged", f"||grad F|| <= ||h|| + bound = {hn + hg.bound:.3g}")
        if not ok:
            raise _floor_stop(run, hg, state["eps"], o)
        return float(hg.value), np.array(hg.grad, dtype=float)

    def cb(*args):
        run.iterations += 1

    bounds = [(None if not math.isfinite(a) else float(a), None if not math.isfinite(b)
               else float(b)) for a, b in zip(run.lo, run.hi)]
    # ftol: stop on SciPy's relative-reduction test only at round-off level; the value
    # accuracy above is what keeps the line search meaningful near the optimum.
    options = {"maxiter": o["max_iter"], "gtol": o["gtol"], "ftol": 1e-15,
               "maxfun": 20 * o["max_iter"]}
    options.update(o["scipy_options"])
    res = minimize(fun, theta, jac=True, method="L-BFGS-B", bounds=bounds, options=options,
                   callback=cb)
    msg = str(res.message)
    if res.status == 0:
        return "converged", msg, int(res.nit)
    if res.status == 1:
        return "max_iter", msg, int(res.nit)
    return "stalled", msg, int(res.nit)
