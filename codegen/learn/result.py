"""What `optimize` returns: the learned theta, how close to optimal it is (certified), the
history, and why the run stopped (docs/interface.md 3.4)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from .history import plot_history, write_csv, write_json

__all__ = ["OptimizeStatus", "OptimizeResult"]


class OptimizeStatus(str, Enum):
    """Why a run stopped. A str: `res.status == "converged"` keeps working."""

    CONVERGED = "converged"            # the method's own stopping rule holds (see `message`)
    ACCURACY_FLOOR = "accuracy floor"  # eps would fall below min_eps; the certificate holds
    STALLED = "stalled"                # the line search found no certified decrease
    BUDGET = "budget"                  # work budget spent
    TIME = "time"                      # time budget spent
    MAX_ITER = "max_iter"              # max_iter iterations
    CALLBACK = "callback"              # the callback returned True
    INTERRUPTED = "interrupted"        # KeyboardInterrupt (Ctrl-C) or SIGTERM
    FAILED = "failed"                  # a solver returned no usable number; `message` says why

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @property
    def success(self) -> bool:
        return self in (OptimizeStatus.CONVERGED, OptimizeStatus.ACCURACY_FLOOR)


def _fmt(v: float, spec: str = ".3g") -> str:
    return format(v, spec) if math.isfinite(v) else str(v)


@dataclass(frozen=True, repr=False)
class OptimizeResult:
    """The outcome of `optimize`.

    theta, value   the returned point and its inexact upper value f(x_eps) (+ r); which point
                   each method returns is said in its module (the last accepted point for
                   "lbfgs" and "maid", the last iterate for "gd", the best certified one for
                   "lbfgsb");
    value_error    certified bound on |value - F(theta)| (inf when it cannot be certified);
    grad_norm, bound  ||h|| and the a posteriori bound on ||h - grad F|| at theta (nan when no
                   hypergradient was computed there); `stationarity` = grad_norm + bound is a
                   certified upper bound on ||grad F(theta)||;
    history        one dict per step: step, theta (list; None when theta is too large to
                   record), value, value_error, grad_norm, bound, eps, delta, step_size, work
                   (cumulative units), time (s); grad_norm and bound are nan at a point where
                   no hypergradient was computed;
    status, message  why the run stopped (OptimizeStatus) and the details;
    work, seconds  total work units and wall time; nit the iterations (accepted steps for
                   lbfgs, maid and gd; L-BFGS-B's own count for lbfgsb);
    hypergradient  the last HypergradientResult; notes distinct non-"ok" statuses seen.
    """

    theta: np.ndarray
    value: float
    history: list[dict[str, Any]]
    status: OptimizeStatus
    work: int
    seconds: float
    method: str = ""
    message: str = ""
    nit: int = 0
    value_error: float = math.nan
    grad_norm: float = math.nan
    bound: float = math.nan
    hypergradient: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        """SciPy's meaning: the method stopped by its own rule (converged or accuracy floor)."""
        return OptimizeStatus(self.status).success

    @property
    def iterations(self) -> int:
        """The same as nit (the name of earlier versions)."""
        return self.nit

    @property
    def stationarity(self) -> float:
        """A certified upper bound on ||grad F(theta)|| (nan if no hypergradient at theta)."""
        return self.grad_norm + self.bound

    def __repr__(self) -> str:
        th = np.asarray(self.theta)
        th_s = (np.array2string(th, precision=6, separator=", ") if th.size <= 6
                else f"array(shape={th.shape}, norm={np.linalg.norm(th):.4g})")
        return (f"OptimizeResult(method={self.method!r}, status={str(self.status)!r}, "
                f"theta={th_s}, value={self.value:.6g}, grad_norm={self.grad_norm:.3g}, "
                f"bound={self.bound:.3g}, work={self.work}, seconds={self.seconds:.3g}, "
                f"nit={self.nit}, steps={len(self.history)}"
                + (f", message={self.message!r}" if self.message else "") + ")")

    @property
    def certified(self) -> bool:
        """Whether the run's bounds rest on certified constants: False under stated constants
        (or uncertified derived ones, allow_uncertified), where the numbers are the same and the
        word "certified" is not theirs (it was, and a wrong stated mu made the claim false)."""
        hg = self.hypergradient
        return hg is None or bool(getattr(hg, "certified", True))

    def certificate(self) -> str:
        """One line: how close to optimal theta is, as far as it is certified."""
        if math.isnan(self.grad_norm):
            return ("no hypergradient at the returned point (the run stopped right after "
                    "accepting it): its value is certified, its gradient is not known")
        if not math.isfinite(self.bound):
            return f"||h|| = {_fmt(self.grad_norm)}; no certified bound (||grad F|| unknown)"
        return (f"||grad F(theta)|| <= ||h|| + bound = {_fmt(self.grad_norm)} + "
                f"{_fmt(self.bound)} = {_fmt(self.stationarity)} ({self.claim})")

    @property
    def claim(self) -> str:
        """What a bound of this run is: "certified", or what it rests on instead."""
        return "certified" if self.certified else "not certified: the constants are uncertified"

    def summary(self) -> str:
        th = np.asarray(self.theta)
        th_s = (", ".join(f"{v:.6g}" for v in th) if th.size <= 10
                else f"{th.size} entries, norm {np.linalg.norm(th):.6g}, "
                     f"min {th.min():.6g}, max {th.max():.6g}")
        err = (f" +- {_fmt(self.value_error)} ({self.claim} interval for F(theta))"
               if math.isfinite(self.value_error) else "")
        lines = [f"method   {self.method}",
                 f"status   {self.status}" + (f" ({self.message})" if self.message else ""),
                 f"theta    {th_s}",
                 f"value    {self.value:.10g}{err}",
                 f"gradient {self.certificate()}",
                 f"work     {self.work} units (lower gradients + HVPs)",
                 f"time     {self.seconds:.3f} s",
                 f"steps    {len(self.history)} evaluations, {self.nit} iterations"]
        return "\n".join(lines)

    def history_to_json(self, path: str | Path) -> Path:
        """{method, status, message, theta, value, work, seconds, history} as strict JSON."""
        return write_json(path, self.history, method=self.method, status=str(self.status),
                          message=self.message, theta=np.asarray(self.theta, dtype=float),
                          value=self.value, work=int(self.work), seconds=self.seconds)

    def history_to_csv(self, path: str | Path) -> Path:
        """One row per history entry (codegen.learn.history.write_csv)."""
        return write_csv(path, self.history)

    def plot(self, path: str | Path | None = None) -> Any:
        """F with its certified interval, theta, and ||h|| with its bound, against work
        (codegen.learn.history.plot_history). Needs matplotlib."""
        return plot_history(self.history, path, title=f"{self.method}: {self.status}")
