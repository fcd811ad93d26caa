"""What every solver shares: argument checks, the constants at theta, kernel calls that turn
failures into a status, and norms that stay off BLAS threads.

Everything in `codegen.hypergrad` programs against an abstract kernel object `k` (a bound
problem, or a plain-NumPy test kernel) with the methods

    lower_grad(x, theta), lower_hvp(x, theta, v), cross_vjp(x, theta, q), cross_jvp(x, theta, t),
    upper_grad(x, theta), upper_theta_grad(x, theta), upper_value(x, theta), constants(theta),

the attributes x_size, theta_size, is_quadratic, upper_depends_on_theta, and optionally hvp_at,
lower_hessian, cross_matrix, cross_norm_bound, local_constants, fixed_memo (docs/solvers.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import HypergenError, KernelError
from ..floats import from_squares

__all__ = [
    "SolverError", "DEFAULT_MAX_ITER", "DIVERGENCE_FACTOR", "BLAS_FREE_FROM", "dot", "norm",
    "all_finite", "finite", "grad_norm", "call_kernel", "fixed_memo", "hvp_at", "true_residual",
    "fmt", "summarize",
    "checked_theta", "x_size_of", "checked_constants", "LowerTask", "AdjointTask",
]

#: Iterations (lower solve) or work units (Newton) a solve may spend unless told otherwise.
DEFAULT_MAX_ITER = 10_000

#: An iteration whose residual (gradient norm) grew by this factor over its start is "diverged".
DIVERGENCE_FACTOR = 1e8

#: Vectors at least this long are reduced by NumPy's own loops, not BLAS (see `dot`).
BLAS_FREE_FROM = 8192

Vector = np.ndarray
MatVec = Callable[[np.ndarray], np.ndarray]


class SolverError(HypergenError, ValueError):
    """A request the solvers cannot answer with a certified number (invalid mu, CG lower solver on
    a non-quadratic problem, backprop through a solver without a stored trajectory, an unknown
    solver or option...)."""


def dot(a: Vector, b: Vector) -> float:
    """a . b for the solvers' vectors, never on BLAS threads when they are long.

    OpenBLAS runs a long dot product on its own threads, and between kernel calls the kernels'
    OpenMP workers still spin on the cores: each dot then waits for a core, and the woken BLAS
    threads slow the next kernel. A CSR logistic hypergradient at 100000 features took 400 ms,
    150 ms without BLAS threads (2 cores). einsum's loop is single-threaded; short vectors keep
    the faster BLAS call (OpenBLAS keeps those on one thread).
    """
    if a.size < BLAS_FREE_FROM:
        return float(a.dot(b))  # the BLAS ddot of a @ b, without matmul's ufunc dispatch
    return float(np.einsum("i,i->", a, b))


def norm(v: Any) -> float:
    """The 2-norm of v flattened: what np.linalg.norm computes (bit for bit below
    BLAS_FREE_FROM entries: sqrt(v . v)), without its call overhead and BLAS threads (`dot`)."""
    if not (type(v) is np.ndarray and v.dtype is _FLOAT64 and v.ndim == 1):
        v = np.asarray(v, dtype=np.float64).ravel()
    return from_squares(float(v.dot(v)) if v.size < BLAS_FREE_FROM else dot(v, v), v)


def grad_norm(v: Any) -> float:
    """np.linalg.norm(v) bit for bit at every length while v . v is in floats.SAFE_SQUARES
    (sqrt(v . v) by BLAS, as NumPy computes it; scaled outside, where NumPy's underflows),
    without its dispatch: for decisions that must not move by an ulp (the accuracy rounds'
    target). A contiguous float64 vector (every hypergradient's) is dotted as it is:
    np.asarray and ravel would return it, or a view of the same entries."""
    if not (type(v) is np.ndarray and v.dtype is _FLOAT64 and v.ndim == 1
            and v.flags.c_contiguous):
        v = np.asarray(v, dtype=np.float64).ravel()
    return from_squares(float(v.dot(v)), v)


def finite(a: Any) -> bool:
    """np.isfinite(a).all(): every entry finite. A short float64 vector (the small problems'
    gradients and theta) is tested entry by entry as Python floats, a third of the ufunc and
    reduction's dispatch; both tests read the same values, and neither raises a floating-point
    flag (a sum of squares would warn on an overflow of huge finite entries)."""
    if type(a) is np.ndarray and a.dtype is _FLOAT64 and a.size <= _SHORT:
        return all(map(math.isfinite, (a if a.ndim == 1 else a.ravel()).tolist()))
    return bool(_ALL(np.isfinite(a), axis=None))


_ALL = np.logical_and.reduce

#: Vectors up to this length are tested by `finite` as Python floats (the faster below ~40).
_SHORT = 32
_FLOAT64 = np.dtype(np.float64)


def all_finite(*arrays: Any) -> bool:
    return all(finite(a) for a in arrays)


def call_kernel(fn: Callable[..., Any], *args: Any) -> tuple[np.ndarray | None, str]:
    """Call a kernel; return (float64 array, "") or (None, the reason).

    Kernel failures on non-finite values (KernelError, FloatingPointError, OverflowError) and
    non-finite outputs become None, so that a solver keeps its last finite iterate and reports a
    status instead of raising halfway through a solve."""
    try:
        out = fn(*args)
    except (KernelError, FloatingPointError, OverflowError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if not (type(out) is np.ndarray and out.dtype is _FLOAT64):  # a bound problem's already is
        out = np.asarray(out, dtype=np.float64)
    if not finite(out):
        return None, "non-finite kernel output"
    return out, ""


def fixed_memo(k: Any, base: str) -> dict[str, Any] | None:
    """k.fixed_memo(base) (`BoundProblem.fixed_memo`: a per-bind store for what is derived from
    a matrix fixed by the data) for kernels that have it, else None."""
    memo = getattr(k, "fixed_memo", None)
    return None if memo is None else memo(base)


def hvp_at(k: Any, x: Vector, th: Vector) -> MatVec:
    """v -> A(x) v for the many HVPs of one solve at one x: the kernel's prepared form
    (BoundProblem.hvp_at: x-only work done once) when it has one, else k.lower_hvp."""
    if hasattr(k, "hvp_at"):
        prepared: MatVec = k.hvp_at(x, th)
        return prepared
    return lambda v: k.lower_hvp(x, th, v)


def true_residual(hvp: MatVec, q: Vector, b: Vector) -> tuple[np.ndarray | None, str]:
    """(A q - b, "") from one HVP, or (None, the reason): the residual a certificate may use,
    as opposed to a recursively updated one that drifts (docs/framework.md 8, pitfall 1)."""
    Aq, msg = call_kernel(hvp, q)
    if Aq is None:
        return None, msg
    return Aq - b, ""


def fmt(v: Any) -> str:
    """A number for a status or note: 3 significant digits; anything else as repr."""
    if type(v) is float:
        return f"{v:.3g}"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.3g}"
    return repr(v)


def summarize(a: Any) -> str:
    """Readable summary of an array for __repr__: values when short, shape and norm otherwise."""
    if a is None:
        return "None"
    if isinstance(a, list):
        return f"[{len(a)} arrays]"
    a = np.asarray(a)
    if a.size <= 6:
        return np.array2string(a, precision=4, separator=", ")
    return f"array(shape={a.shape}, norm={norm(a):.4g})"


def checked_theta(k: Any, theta: Any) -> np.ndarray:
    """theta as a finite 1-D float64 array of the kernel's theta_size, else SolverError; always
    a copy: results keep it, and a caller that reused its array made a result report a theta
    it was never computed at."""
    th: np.ndarray
    if type(theta) is np.ndarray and theta.dtype == np.float64 and theta.ndim == 1:
        th = theta.copy()  # what the conversions below return for such a theta, without their calls
    else:
        th = np.array(theta, dtype=np.float64).reshape(-1)
    size = getattr(k, "theta_size", None)
    if size is not None and th.size != size:
        raise SolverError(f"theta has {th.size} entries, the problem has theta_size = {size}")
    if not finite(th):  # the entry named, as the bound problem's own check does
        j = int(np.argmin(np.isfinite(th)))
        raise SolverError(f"theta[{j}] = {float(th[j])!r}: theta must be finite")
    return th


def x_size_of(k: Any, default: int | None = None) -> int:
    """k.x_size, or `default` (the length of a given starting point) for kernels without one."""
    size = getattr(k, "x_size", None)
    if size is None:
        if default is None:
            raise SolverError("kernel has no x_size and no starting point was given")
        return int(default)
    return int(size)


def checked_constants(k: Any, theta: Any) -> dict[str, Any]:
    """k.constants(theta), validated and normalised (called afresh at every theta: pitfall 3).

    mu must be a positive finite float (the certificate G/mu and every bound divide by it); L must
    be >= mu (it may be inf: only CG then works). Missing Lipschitz constants are taken as inf
    (conservative: the bound becomes inf rather than wrong), except L_A = 0 for a quadratic lower
    level. `certified` is False unless the kernel says True; `notes` lists what was assumed.
    """
    raw = k.constants(theta)
    if type(raw) is not dict:
        raw = dict(raw)
    notes: list[str] = []
    mu = _constant(raw, "mu", math.nan, theta, notes) if "mu" in raw else math.nan
    if not (math.isfinite(mu) and mu > 0):
        raise SolverError(
            f"mu(theta) = {raw.get('mu')!r} at theta = {theta} is not a positive finite number: "
            "the lower level is not certified strongly convex there, no bound can be given")
    L = _constant(raw, "L", math.inf, theta, notes)
    if L < mu * (1 - 1e-12):
        raise SolverError(f"L = {L} < mu = {mu} at theta = {theta}: inconsistent constants")
    L = max(L, mu)
    L_A = (0.0 if (getattr(k, "is_quadratic", False) and raw.get("L_A") is None)
           else _constant(raw, "L_A", math.inf, theta, notes))
    L_B = _constant(raw, "L_B", math.inf, theta, notes)
    L_f = _constant(raw, "L_f", math.inf, theta, notes)
    L_ft = (_constant(raw, "L_ft", math.inf, theta, notes)
            if getattr(k, "upper_depends_on_theta", False) else float(raw.get("L_ft") or 0.0))
    if L < 0 or L_A < 0 or L_B < 0 or L_f < 0 or L_ft < 0:
        raise SolverError(f"negative Lipschitz constant in {raw}")
    return {"mu": mu, "L": L, "L_A": L_A, "L_B": L_B, "L_f": L_f, "L_ft": L_ft,
            "certified": bool(raw.get("certified", False)),
            "source": str(raw.get("source", "unknown")), "notes": notes}


def _constant(raw: dict[str, Any], key: str, default: float, theta: Any,
              notes: list[str]) -> float:
    """raw[key] as a float; `default` with a note when missing; SolverError when NaN."""
    v = raw.get(key, None)
    if v is None:
        notes.append(f"{key} missing, taken as {default}")
        return float(default)
    v = float(v)
    if math.isnan(v):
        raise SolverError(f"constant {key} is NaN at theta = {theta}")
    return v


@dataclass
class LowerTask:
    """One lower solve as every lower solver receives it: the arguments checked, the constants
    at theta (`constants`, possibly with a ball L), a starting point, and `dense`, the Hessian
    factor cache that lower="direct" shares with adjoint="direct" within one hypergradient."""

    k: Any
    theta: np.ndarray
    constants: dict[str, Any]
    tol: float
    x0: np.ndarray
    max_iter: int
    record: bool = False
    store_trajectory: bool = False
    dense: dict[str, Any] = field(default_factory=dict)
    keep_basis: bool = False  # cg: keep the Krylov directions (`galerkin.KrylovBasis`)


@dataclass
class AdjointTask:
    """One adjoint solve A(x) q = b (b = grad_x f(x)) as every adjoint solver receives it:
    q0 = None is a cold start; `dense` as in LowerTask."""

    k: Any
    x: np.ndarray
    theta: np.ndarray
    constants: dict[str, Any]
    delta: float
    b: np.ndarray
    q0: np.ndarray | None = None
    max_iter: int = DEFAULT_MAX_ITER
    record: bool = False
    dense: dict[str, Any] = field(default_factory=dict)
    companion: Any = None  # a krylov.Companion the CG takes its steps alongside (bound at x)
