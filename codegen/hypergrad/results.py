"""The results of the solvers and of the hypergradient, as declared types.

A solver's outcome is a `Status` (a str enum: `res.status == "converged"` keeps working); a
hypergradient that is short of certified says why in typed `Reason`s, and its `status` is "ok" or
their texts joined by "; " (docs/interface.md section 3). Results are frozen: what a solver
reports is what it computed, and no caller changes it afterwards.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from typing import Any, TypeVar

import numpy as np

from .common import fmt, norm, summarize

_T = TypeVar("_T")

__all__ = ["Status", "HARD_STATUSES", "ReasonKind", "Reason", "LowerResult", "AdjointResult",
           "HypergradientResult", "evolve"]


class _Factory:
    """The default of a field with a default factory in a generated __init__'s signature."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()


def _filled_at_once(cls: type[_T]) -> type[_T]:
    """cls, a frozen dataclass, with an __init__ that sets all fields in one __dict__.update.

    The dataclass's own frozen __init__ sets each field through object.__setattr__: 14 us for
    HypergradientResult's 36 fields, 10 us for LowerResult's 20, on every accuracy round of a
    hypergradient that itself takes 100-200 us at x = 10-50. This one has the same signature,
    defaults and default factories (generated the way dataclasses generates its own), and the
    instances stay frozen (the dataclass's __setattr__ still refuses assignment)."""
    if hasattr(cls, "__post_init__") or not all(f.init for f in fields(cls)):  # type: ignore[arg-type]
        raise TypeError(f"{cls.__name__}: a __post_init__ or a non-init field would be skipped")
    namespace: dict[str, Any] = {"MISSING": MISSING, "FACTORY": _FACTORY}
    params, body = [], []
    for f in fields(cls):  # type: ignore[arg-type]
        if f.default is not MISSING:
            namespace[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        elif f.default_factory is not MISSING:
            namespace[f"_factory_{f.name}"] = f.default_factory
            params.append(f"{f.name}=FACTORY")
            body.append(f"    if {f.name} is FACTORY:\n        {f.name} = _factory_{f.name}()\n")
        else:
            params.append(f.name)
    names = ", ".join(f"{f.name}={f.name}" for f in fields(cls))  # type: ignore[arg-type]
    source = (f"def __init__(self, {', '.join(params)}):\n" + "".join(body)
              + f"    self.__dict__.update({names})\n")
    exec(source, namespace)  # generated from the class's own fields, as dataclasses does
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


class Status(str, Enum):
    """How a lower or adjoint solve ended."""

    CONVERGED = "converged"
    CAPPED = "capped"          # max_iter reached (direct: after its refinement steps)
    DIVERGED = "diverged"      # the residual grew by DIVERGENCE_FACTOR, or no Newton decrease
    NON_FINITE = "non-finite"  # a kernel or an iterate was not finite: the last finite one kept
    NOT_SPD = "not SPD"        # d^T A d <= 0 or Cholesky failed: contradicts mu > 0
    ZERO_TRAP = "zero trap"    # ||grad f|| <= delta from q0 = 0: an iteration was forced
    ROUNDING_FLOOR = "rounding floor"  # no decrease at eps_machine's scale (||grad g||, or the
    #                                    direct adjoint's refinement stalled)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


#: Statuses after which a returned number is a failure, not a loose estimate.
HARD_STATUSES = frozenset({Status.NON_FINITE, Status.DIVERGED, Status.NOT_SPD})


class ReasonKind(Enum):
    """Why a hypergradient is not "ok"."""

    LOWER_SOLVE = "lower solve"        # the lower solver did not converge
    ADJOINT_SOLVE = "adjoint solve"    # the adjoint solver did not converge
    ZERO_TRAP = "zero trap"            # h may be mostly error
    NON_FINITE = "non-finite"          # grad_x f, B^T q, the theta-gradient, h or the value
    NO_BOUND = "no bound"              # the a posteriori bound is inf (or backprop has none)
    UNCERTIFIED = "uncertified"        # the constants were stated, not derived
    ACCURACY = "accuracy"              # rtol / atol not met
    ACCURACY_FLOOR = "accuracy floor"  # rtol / atol below what rounding lets the solvers reach


@dataclass(frozen=True)
class Reason:
    """One reason a hypergradient is not "ok": its kind, the solver status behind it (if any),
    the samples it affects (several samples only) and the text shown in `status`."""

    kind: ReasonKind
    text: str
    solver_status: Status | None = None
    samples: tuple[int, ...] = ()

    @property
    def hard(self) -> bool:
        """A failed solve (non-finite, diverged, not SPD), not only an inaccurate one."""
        return self.solver_status in HARD_STATUSES

    def __str__(self) -> str:
        if not self.samples:
            return self.text
        many = "s" if len(self.samples) > 1 else ""
        return f"{self.text} [sample{many} {', '.join(map(str, self.samples))}]"


def _rigour(rigorous: bool) -> str:
    return "" if rigorous else " (not rigorous)"


@_filled_at_once
@dataclass(frozen=True, eq=False, repr=False)
class LowerResult:
    """Result of a lower-level solve.

    x          the returned iterate (a point where grad g was evaluated);
    grad       grad_x g(x, theta) at that x (reused as G by the hypergradient);
    bound      ||grad|| / mu: a certified bound on ||x - x*|| (inf if nothing finite was reached);
    iterations steps taken (0 when the start already met tol);
    status     a Status ("converged", "capped", "diverged", "non-finite", "not SPD");
    work       gradient evaluations + HVPs (n_grad + n_hvp);
    apriori    the a priori bound on ||x - x*|| from the solver's rate, its iteration count and
               e0 = ||grad g(x0)||/mu (docs/framework.md 5); apriori_rigorous False for HB (C = 1);
    segments   CG restart segments (residual replacement);
    step       the step parameters used (gd/hb: a, b; fista: tau, q);
    history    per-iteration G/mu (CG: recursive residual / mu) when record=True;
    trajectory the iterates x_0..x_K when stored for backprop (O(K d) memory);
    energy_error_estimate  cg only: the Gauss-Radau estimate of ||x - x*||_A from the last CG
               segment's coefficients (docs/solvers.md 6). An exact-arithmetic estimate, NOT a
               certificate (that is `bound`); nan when no CG step ran.
    krylov     cg with a kept basis only: (S, A S), its directions and their products as rows
               (`galerkin.KrylovBasis`), for the correction's forward solve.
    """

    x: np.ndarray
    grad: np.ndarray | None
    bound: float
    iterations: int
    status: Status
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
    step: dict[str, Any] = field(default_factory=dict)
    history: list[Any] | None = None
    trajectory: list[Any] | None = None
    message: str = ""
    energy_error_estimate: float = math.nan
    krylov: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def work(self) -> int:
        return self.n_grad + self.n_hvp

    @property
    def nit(self) -> int:
        return self.iterations

    @property
    def G(self) -> float:
        return norm(self.grad) if self.grad is not None else math.inf

    @property
    def converged(self) -> bool:
        return self.status is Status.CONVERGED

    success = converged

    def __repr__(self) -> str:
        s = (f"LowerResult(solver={self.solver!r}, status={self.status.value!r}, "
             f"iterations={self.iterations}, bound={fmt(self.bound)} (tol {fmt(self.tol)}), "
             f"apriori={fmt(self.apriori)}{_rigour(self.apriori_rigorous)}, "
             f"work={self.work}, x={summarize(self.x)}")
        if self.message:
            s += f", message={self.message!r}"
        return s + ")"


@_filled_at_once
@dataclass(frozen=True, eq=False, repr=False)
class AdjointResult:
    """Result of an adjoint solve A(x_eps) q = grad_x f(x_eps).

    q          the adjoint (for "backprop": a * sum of the reverse-sweep adjoints, which is the
               solver's q for the frozen-Hessian version, reported for information);
    residual   R = ||A q - grad f||, the TRUE residual recomputed with one extra HVP at the end;
    bound      R / mu >= ||q - A^{-1} grad f|| (inf for "backprop": not covered by E&R);
    status     a Status; "zero trap": ||grad f|| <= delta with q0 = 0, an iteration was forced;
    work       HVPs (n_hvp); n_cross counts cross VJPs done here ("backprop" only);
    apriori    a priori residual bound delta_k from the rate (docs/framework.md 5) with the
               actual ||r_0||; apriori_rigorous False for HB;
    h_cross    "backprop" only: the accumulated -sum_k a B(x_k)^T xt_{k+1};
    energy_error_estimate  cg only: the Gauss-Radau estimate of ||q - A^{-1} grad f||_A from the
               last CG segment's coefficients (docs/solvers.md 6). An exact-arithmetic
               estimate, NOT a certificate (that is `bound`); nan when no CG step ran.
    true_residual  A q - grad f at the returned q, the vector whose norm is `residual`, where
               the iterative solvers recomputed it (the correction reads it instead of another
               HVP); None otherwise.
    """

    q: np.ndarray
    residual: float
    iterations: int
    status: Status
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
    history: list[Any] | None = None
    h_cross: np.ndarray | None = None
    message: str = ""
    energy_error_estimate: float = math.nan
    true_residual: np.ndarray | None = None

    @property
    def work(self) -> int:
        return self.n_hvp

    @property
    def nit(self) -> int:
        return self.iterations

    @property
    def success(self) -> bool:
        return self.status is Status.CONVERGED

    @property
    def bound(self) -> float:
        if self.solver == "backprop":
            return math.inf
        return self.residual / self.mu if math.isfinite(self.residual) else math.inf

    def __repr__(self) -> str:
        s = (f"AdjointResult(solver={self.solver!r}, status={self.status.value!r}, "
             f"iterations={self.iterations}, residual={fmt(self.residual)} "
             f"(delta {fmt(self.delta)}), apriori={fmt(self.apriori)}"
             f"{_rigour(self.apriori_rigorous)}, hvps={self.n_hvp}, q={summarize(self.q)}")
        if self.message:
            s += f", message={self.message!r}"
        return s + ")"


@_filled_at_once
@dataclass(frozen=True, eq=False, repr=False)
class HypergradientResult:
    """A hypergradient estimate with its error bounds (docs/interface.md section 3).

    grad           h = -B(x_eps)^T q + upper_theta_grad(x_eps) (the latter includes grad r);
    bound          a posteriori bound on ||grad - grad F(theta)|| (docs/framework.md 7; the
                   smaller of the ||grad f|| and the ||q|| forms, both valid); inf when not
                   available;
    apriori_bound  the a priori bound (docs/framework.md 6) from the solvers' rates and iteration
                   counts; apriori_rigorous False when an HB rate (C = 1) was used;
    value          upper objective f(x_eps) + r at the lower solution;
    x, q           lower solution x_eps and adjoint q (lists for several samples);
    work           {"lower_grads", "hvps", "cross", "units"}: units = lower_grads + hvps (E&R's
                   work unit; cross products, one VJP + the JVPs for ||B||, counted separately);
                   "paired" where a solve rode on another's passes over the data (its
                   products, not in units: docs/solvers.md 9);
    status         "ok", or the reasons' texts "; "-joined; reasons: the typed reasons;
    lower_solver, adjoint_solver  the solvers used (what "auto" chose);
    constants      the constants used (k.constants(theta), validated);
    e              the certified ||x_eps - x*|| used, G/mu or refined; G, R, norm_B (certified
                   upper bound of ||B(x_eps)||), grad_f_norm, q_norm: the numbers in the bound;
    bound_forms    both forms, {"grad_f": ..., "q": ...}, and the floating-point floor added to
                   the smaller ("rounding");
    certified      True iff the bound is a certified finite upper bound (constants certified);
    lower, adjoint the solver results (lists for several samples), samples the per-sample results.
    certificate    which bound `bound` is: "er" (E&R's, docs/framework.md 7), "dwr" (grad is the
                   DWR-corrected h_c, bound its product bound, docs/bounds.md 15), "tight"
                   (grad is h, bound |h - h_c| + bound(h_c), docs/bounds.md 15.6), "block"
                   (the same with the block correction's h_c, docs/bounds.md 15.8) or
                   "dwr-direction" (grad, bound as "er"; `directional` certifies the component
                   along h);
    uncorrected_grad, uncorrected_bound  with a DWR certificate: the plain h and the sharpest
                   bound on ||h - grad F|| (min of E&R's and |h - h_c| + bound(h_c));
    corrected_grad, corrected_bound  with certificate "tight" or "block" (grad is the plain h, bound
                   |h - h_c| + bound(h_c), docs/bounds.md 15.6): h_c and bound(h_c);
    directional    with a DWR certificate: the first direction u and u . h_c ("value"), u . h
                   ("plain"), the bounds on |u . (h_c - grad F)| ("bound") and on
                   |u . (h - grad F)| ("plain_bound");
    correction_terms  the DWR bound's terms (summed over directions), docs/bounds.md 15.2;
    corrected_value, corrected_value_error  value - q . grad g(x_eps) and a certified bound on its
                   distance to F(theta) (docs/bounds.md 13; nan, inf without an adjoint q).
    """

    grad: np.ndarray
    bound: float
    apriori_bound: float
    value: float
    x: Any
    q: Any
    work: dict[str, Any]
    reasons: tuple[Reason, ...] = ()
    lower_solver: str = ""
    adjoint_solver: str = ""
    constants: dict[str, Any] | list[Any] = field(default_factory=dict)
    G: float = math.nan
    R: float = math.nan
    e: float = math.nan
    norm_B: float = math.nan
    grad_f_norm: float = math.nan
    q_norm: float = math.nan
    certified: bool = False
    apriori_rigorous: bool = True
    bound_forms: dict[str, Any] = field(default_factory=dict)
    lower: LowerResult | list[Any] | None = None
    adjoint: AdjointResult | list[Any] | None = None
    notes: tuple[str, ...] = ()
    samples: list[Any] | None = None
    theta: np.ndarray | None = None
    certificate: str = "er"
    uncorrected_grad: np.ndarray | None = None
    uncorrected_bound: float = math.nan
    corrected_grad: np.ndarray | None = None
    corrected_bound: float = math.nan
    directional: dict[str, Any] = field(default_factory=dict)
    correction_terms: dict[str, float] = field(default_factory=dict)
    corrected_value: float = math.nan
    corrected_value_error: float = math.inf

    @property
    def status(self) -> str:
        """"ok", or the reasons joined by "; " (what a user reads; code reads `reasons`)."""
        return "ok" if not self.reasons else "; ".join(map(str, self.reasons))

    @property
    def ok(self) -> bool:
        return not self.reasons

    success = ok

    @property
    def message(self) -> str:
        return self.status

    @property
    def at_accuracy_floor(self) -> bool:
        """The requested rtol / atol lies below the accuracy floating point lets the solvers
        reach: `bound` is the best certified bound reached (still a valid certificate)."""
        return any(reason.kind is ReasonKind.ACCURACY_FLOOR for reason in self.reasons)

    @property
    def usable(self) -> bool:
        """grad is finite and no solver failed hard (non-finite, diverged, not SPD): the estimate
        can be used, with `bound` as its (possibly loose or uncertified) error bound."""
        if not np.all(np.isfinite(self.grad)) or math.isnan(self.bound):
            return False
        return not any(reason.hard for reason in self.reasons)

    def __repr__(self) -> str:
        lines = [
            f"HypergradientResult(status={self.status!r},",
            f"  grad={summarize(self.grad)},",
            f"  bound={fmt(self.bound)} ({'certified' if self.certified else 'uncertified'}), "
            f"apriori_bound={fmt(self.apriori_bound)}{_rigour(self.apriori_rigorous)}, "
            f"value={fmt(self.value)},",
            f"  G={fmt(self.G)}, e={fmt(self.e)} (>= ||x - x*||), R={fmt(self.R)}, "
            f"||B||<={fmt(self.norm_B)}, ||grad f||={fmt(self.grad_f_norm)}, "
            f"||q||={fmt(self.q_norm)},",
            f"  work={self.work}",
        ]
        if self.samples is not None:
            lines.append(f"  samples={len(self.samples)}")
        else:
            lines.append(f"  lower={self.lower!r},")
            lines.append(f"  adjoint={self.adjoint!r}")
        return "\n".join(lines) + ")"


_Result = TypeVar("_Result", LowerResult, AdjointResult, HypergradientResult)

_FIELD_NAMES = {cls: frozenset(f.name for f in fields(cls))
                for cls in (LowerResult, AdjointResult, HypergradientResult)}


def evolve(result: _Result, **changes: Any) -> _Result:
    """dataclasses.replace(result, **changes) for these frozen results (no __post_init__, every
    field an init field): the same new object, without __init__'s object.__setattr__ per field
    (8 us for HypergradientResult's 36 fields, on every accuracy round)."""
    if not changes.keys() <= _FIELD_NAMES[type(result)]:
        raise TypeError(f"{type(result).__name__} has no fields "
                        f"{sorted(set(changes) - _FIELD_NAMES[type(result)])}")
    new = object.__new__(type(result))
    new.__dict__.update(result.__dict__)
    new.__dict__.update(changes)
    return new
