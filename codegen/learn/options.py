"""The options of `optimize`, one type per method, validated once (docs/interface.md 3.4).

A user passes options as keywords: `prob.optimize(theta0, method="maid", rho=0.5)`. They are
checked here, before any work: an unknown option, or an option of another method (`rho=` with
`method="gd"`), is refused with its name, as SciPy does; a value out of range is refused with the
option's name and the value. The loops then read typed fields instead of a dict.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from ..errors import HypergenError
from ..hypergrad import ADJOINT_CHOICES, AUTO, DEFAULT_MAX_ITER, LOWER_CHOICES

__all__ = ["OptimizeError", "CommonOptions", "GDOptions", "MAIDOptions", "LBFGSBOptions",
           "QuasiNewtonOptions", "OPTIONS", "METHODS", "DEFAULT_METHOD", "SCHEDULES",
           "make_options", "parse_budget", "parse_theta0", "parse_bounds"]

SCHEDULES = ("exponential", "quadratic", "cubic")
#: theta is stored in the history when it has at most this many entries (record_theta=None).
RECORD_THETA_MAX = 1000


class OptimizeError(HypergenError, ValueError):
    """Invalid input to `optimize` (theta0, budget, method, options)."""


def parse_budget(budget: Any) -> tuple[float | None, float | None]:
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
    seconds = False
    text: Any = budget
    if isinstance(budget, str):
        text = budget.strip().lower()
        seconds = text.endswith("s")
        if seconds:
            text = text[:-1].strip()
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise OptimizeError(f"{what}, got {budget!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise OptimizeError(f"{what}, got {budget!r}")
    return (None, value) if seconds else (value, None)


def parse_theta0(theta0: Any, size: int) -> np.ndarray:
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


def parse_bounds(bounds: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
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


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (math.isfinite(value) and value > 0):
        raise OptimizeError(f"{name} must be a positive number, got {value!r}")


def _fraction(name: str, value: Any) -> None:
    """A number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise OptimizeError(f"{name} must be a number in (0, 1), got {value!r}")


def _count(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise OptimizeError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class CommonOptions:
    """Options every method takes (docs/interface.md 3.4).

    budget          work units (lower gradients + HVPs), or a string "5000" / "30s";
    time_budget     seconds; max_iter: outer iterations;
    progress        a tqdm bar; None = only when stderr is a terminal;
    bounds          (lo, hi) for every entry or a list of pairs (None = unbounded);
    eps0, delta0    first lower accuracy (certified ||x - x*||) and adjoint residual;
    lower, adjoint  the solvers of `hypergradient` ("auto": chosen from the problem);
    callback        callback(entry) after every history entry (return True to stop);
    gtol            stop when the certified ||grad F|| <= ||h|| + bound <= gtol;
    min_eps         eps is never shrunk below this ("accuracy floor");
    solver_max_iter cap on lower and adjoint iterations per solve (default 10,000);
    refine_iter     HVPs spent sharpening each bound (hypergradient's refine_iter);
    record_theta    store theta in the history (default: when theta has <= 1000 entries).
    """

    method: ClassVar[str] = ""
    budget: Any = None
    time_budget: Any = None
    max_iter: int = 1000
    progress: Any = None
    bounds: Any = None
    eps0: float = 0.1
    delta0: float = 0.1
    lower: str = AUTO
    adjoint: str = AUTO
    callback: Callable[[dict[str, Any]], Any] | None = None
    gtol: float = 1e-8
    min_eps: float = 1e-12
    solver_max_iter: int | None = None
    refine_iter: int | None = None
    record_theta: bool | None = None
    work_budget: float | None = field(init=False, default=None)
    seconds_budget: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.lower not in LOWER_CHOICES:
            raise OptimizeError(f"unknown lower solver {self.lower!r}; choose from "
                                f"{', '.join(LOWER_CHOICES)}")
        if self.adjoint not in ADJOINT_CHOICES:
            raise OptimizeError(f"unknown adjoint solver {self.adjoint!r}; choose from "
                                f"{', '.join(ADJOINT_CHOICES)}")
        if self.adjoint == "backprop" and self.method != "gd":
            raise OptimizeError(f"method {self.method!r} needs the a posteriori bound, which "
                                "adjoint='backprop' does not have; use adjoint='cg' (or "
                                "method='gd')")
        self.work_budget, secs = parse_budget(self.budget)
        limit = self.time_budget
        if limit is not None:
            _, limit = parse_budget(f"{limit}s" if not isinstance(limit, str) else limit)
        if secs is not None:
            limit = secs if limit is None else min(limit, secs)
        self.seconds_budget = limit
        for name in ("eps0", "delta0"):
            _positive(name, getattr(self, name))
        if isinstance(self.gtol, bool) or not isinstance(self.gtol, (int, float)) \
                or not (math.isfinite(self.gtol) and self.gtol >= 0):
            raise OptimizeError(f"gtol must be a number >= 0, got {self.gtol!r}")
        _positive("min_eps", self.min_eps)
        _count("max_iter", self.max_iter)
        if self.solver_max_iter is not None:
            _count("solver_max_iter", self.solver_max_iter)
        if self.refine_iter is not None:
            _count("refine_iter", self.refine_iter, 0)
        if self.callback is not None and not callable(self.callback):
            raise OptimizeError(f"callback must be callable, got {self.callback!r}")

    @property
    def solver_cap(self) -> int:
        return int(self.solver_max_iter or DEFAULT_MAX_ITER)

    @property
    def refine(self) -> int:
        """HVPs per bound refinement: 0 for gd, whose steps do not read the bound, else 10."""
        if self.refine_iter is not None:
            return int(self.refine_iter)
        return 0 if self.method == "gd" else 10

    def records_theta(self, size: int) -> bool:
        return size <= RECORD_THETA_MAX if self.record_theta is None else bool(self.record_theta)


@dataclass
class GDOptions(CommonOptions):
    """Fixed-step gradient descent (E&R's experiments): `step`, and `schedule` for eps, delta:
    None (fixed), "exponential", "quadratic" or "cubic" (docs/framework.md 9)."""

    method: ClassVar[str] = "gd"
    step: float = 0.1
    schedule: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("step", self.step)
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise OptimizeError(f"unknown schedule {self.schedule!r}; choose from {SCHEDULES}")


@dataclass
class MAIDOptions(CommonOptions):
    """MAID (Salehi et al. 2025; docs/framework.md 9): first step `step`, the accuracy and
    backtracking constants eta, rho, tau, nu, growth, armijo (default eta^2), max_bt_loop,
    bt_steps (the reference code's defaults)."""

    method: ClassVar[str] = "maid"
    step: float = 0.1
    eta: float = 1e-4
    rho: float = 0.9
    tau: float = 0.5
    nu: float = 1.05
    growth: float = 10 / 9
    armijo: float | None = None
    max_bt_loop: int = 3
    bt_steps: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("step", self.step)
        for name in ("eta", "rho", "tau"):
            _fraction(name, getattr(self, name))
        _positive("nu", self.nu)
        _positive("growth", self.growth)
        if self.armijo is None:
            self.armijo = self.eta ** 2
        _fraction("armijo", self.armijo)
        _count("max_bt_loop", self.max_bt_loop)
        _count("bt_steps", self.bt_steps)


@dataclass
class LBFGSBOptions(CommonOptions):
    """SciPy's L-BFGS-B on certified values and hypergradients: eps, delta shrink by `tau`
    until bound <= rel_accuracy ||h|| (docs/framework.md 9); `scipy_options` go to
    scipy.optimize.minimize."""

    method: ClassVar[str] = "lbfgsb"
    rel_accuracy: float = 0.1
    tau: float = 0.5
    scipy_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _fraction("rel_accuracy", self.rel_accuracy)
        _fraction("tau", self.tau)
        if self.scipy_options is not None and not isinstance(self.scipy_options, dict):
            raise OptimizeError(f"scipy_options must be a dict, got {self.scipy_options!r}")


@dataclass
class QuasiNewtonOptions(CommonOptions):
    """The default method "lbfgs" (codegen/learn/lbfgs.py): a certified inexact L-BFGS.

    ftol           stop once F can decrease by at most about ftol |F| more (|F| at least
                   1e-6 |F(theta0)|), estimated from the certified gradient bound and the
                   curvature the steps have met: F to about seven digits by default;
    gtol           or once the certified ||grad F|| <= ||h|| + bound <= gtol;
    memory         curvature pairs kept; armijo the sufficient-decrease constant;
    grad_rtol      every hypergradient is solved until bound <= grad_rtol ||h|| (0.25: -h and
                   the L-BFGS direction stay certified descent directions with a margin);
    value_share    the certified value errors of the two points compared take at most this
                   share of the decrease the line search tests;
    first_step     length of the first trial move in theta (default: 1, or ||h|| if smaller);
    max_backtracks trial points per iteration before the accuracy is tightened.
    """

    method: ClassVar[str] = "lbfgs"
    ftol: float = 1e-7
    gtol: float = 0.0
    memory: int = 10
    armijo: float = 1e-4
    grad_rtol: float = 0.25
    value_share: float = 0.25
    first_step: float | None = None
    max_backtracks: int = 12
    tau: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("ftol", self.ftol)
        _count("memory", self.memory)
        for name in ("armijo", "grad_rtol", "value_share", "tau"):
            _fraction(name, getattr(self, name))
        _positive("first_step", self.first_step, allow_none=True)
        _count("max_backtracks", self.max_backtracks)


#: method name -> its options type; the first is the default method.
OPTIONS: dict[str, type[CommonOptions]] = {
    "lbfgs": QuasiNewtonOptions, "maid": MAIDOptions, "gd": GDOptions, "lbfgsb": LBFGSBOptions,
}
METHODS = tuple(OPTIONS)
DEFAULT_METHOD = METHODS[0]


def _names(cls: type[CommonOptions]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def make_options(method: str | None, options: dict[str, Any]) -> CommonOptions:
    """The validated options of `method` (None: the default) from the user's keywords.

    Refuses an unknown method, an unknown option, an option of another method (naming the
    methods it belongs to) and, through each type's checks, a value out of range."""
    method = DEFAULT_METHOD if method is None else method
    if method not in OPTIONS:
        raise OptimizeError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cls = OPTIONS[method]
    own = _names(cls)
    for name in options:
        if name in own:
            continue
        if name == "schedule":
            raise OptimizeError(f"schedule applies to method='gd' only ({method} adapts eps and "
                                f"delta itself)")
        owners = [m for m, c in OPTIONS.items() if name in _names(c)]
        if owners:
            raise OptimizeError(f"option {name!r} does not apply to method {method!r} (it is an "
                                f"option of {', '.join(repr(m) for m in owners)})")
        raise OptimizeError(f"unknown option {name!r} for method {method!r}; its options are "
                            f"{', '.join(sorted(own))}")
    return cls(**options)
