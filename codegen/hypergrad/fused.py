"""Solver loops fused in C: one Python-to-C call per CG segment, FISTA, gradient-descent or
Newton-CG solve on a small problem, instead of a few per iteration (docs/solvers.md 5).

A module generated with the solver-loop templates exports `hg_<name>_loop_cg`, `_loop_fista`,
`_loop_descent` and `_loop_newton` (codegen/compiler/emit/loops.py), which run, step for step,
the Python loops of `krylov.cg`, `lower/fista.py`, `lower/gradient.py` and `lower/newton.py`
through the module's own kernels (a module generated before `_loop_newton` keeps Newton-CG's
steps in Python). Their
arguments are every size, theta and every data array in meta.json's order, the loop's vectors,
a control vector and an info vector (both doubles), and the bound problem's work buffer (its
work_size covers the loops). `loops_for(k)` returns a `FusedLoops` for a bound problem whose
module has them and whose x is small enough (`fused_size_limit`: FUSED_MAX_SIZE unknowns, or
CHEAP_KERNEL_FACTOR times that when its data hold at most CHEAP_DATA_PER_ENTRY numbers per
unknown, a stencil-like kernel), else None: the Python loops then run, as they do for
plain-NumPy kernels, with a history to record, or on a large problem with costly kernels (where
a kernel call costs far more than the Python and vector work around it, and Ctrl-C should reach
the loop between kernel calls).

The same modules export `hg_<name>_closing` (codegen/compiler/emit/closing.py): the kernels the
hypergradient calls after its adjoint solve (cross VJP, theta terms, value) in one call, with the
loops' fixed arguments. `closing_for(k)` returns k's `FusedLoops` when its module has it, at any
size (`FusedLoops.close`); a module generated before it keeps three calls.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import KernelError
from .common import hvp_at
from .krylov import CGResult, cg, energy_estimate
from .results import Status

__all__ = ["FUSED_MAX_SIZE", "CHEAP_KERNEL_FACTOR", "CHEAP_DATA_PER_ENTRY", "data_per_entry",
           "fused_size_limit", "FusedLoops", "loops_for", "fused_cg", "cg_at", "count", "contiguous",
           "LOOP_STATUSES", "NO_DECREASE", "NewtonRun", "fused_newton", "closing_for"]

#: Largest x (entries) for which the solvers take the fused loops (measured: docs/solvers.md 5).
FUSED_MAX_SIZE = 4096

#: A problem whose data hold at most CHEAP_DATA_PER_ENTRY numbers per entry of x (an image and
#: its target for 2-D TV: 2) has kernels that cost a few vector passes per call, so the Python
#: loops' own vector work and round trips still weigh at many more entries: the fused loops run
#: up to CHEAP_KERNEL_FACTOR * FUSED_MAX_SIZE entries there (measured: docs/solvers.md 5).
CHEAP_DATA_PER_ENTRY = 8
CHEAP_KERNEL_FACTOR = 32

#: info[0] of a loop -> Status (codegen/compiler/emit/loops.py LOOP_STATUS).
LOOP_STATUSES = (Status.CONVERGED, Status.CAPPED, Status.DIVERGED, Status.NON_FINITE,
                 Status.NOT_SPD)

#: info[0] of loop_newton when no step along a direction decreased ||grad g|| (the caller
#: tells a capped solve, the rounding floor and divergence apart: `lower/newton.py`).
NO_DECREASE = 5

#: info[reason] of a loop: 1 a kernel output was not finite, 2 an iterate, 3 d^T A d.
REASON_KERNEL, REASON_ITERATE, REASON_CURVATURE = 1, 2, 3

_INFO_SIZE = 10
_CONTROL_SIZE = 8
_LOOPS: weakref.WeakKeyDictionary[Any, FusedLoops | None] = weakref.WeakKeyDictionary()
_DATA_PER_ENTRY: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


class FusedLoops:
    """The fused loops of one bound problem: the fixed arguments (sizes, data, work and its own
    control and info vectors) bound once, theta and the vectors per call; each call fills the
    control and reads the info under the bound problem's kernel lock (the loops use its shared
    work buffer, as every kernel does)."""

    def __init__(self, k: Any) -> None:
        module = k.module
        self.ffi, self.x_size, self.theta_size = module.ffi, int(k.x_size), int(k.theta_size)
        prefix = f"hg_{module.name}"
        self.functions = {name: getattr(module.lib, f"{prefix}_{name}")
                          for name in ("loop_cg", "loop_fista", "loop_descent", "loop_newton",
                                       "closing")
                          if hasattr(module.lib, f"{prefix}_{name}")}
        meta, from_buffer = module.meta, module.ffi.from_buffer
        self.sizes = [int(k.sizes[s]) for s in meta["sizes"]]
        self.data: list[Any] = []
        for array in meta["arrays"]:
            if array["role"] != "data":
                continue
            value = k.data[array["name"]]
            if array.get("sparse"):
                self.data += [from_buffer("double[]", value.data),
                              from_buffer("int64_t[]", value.indices),
                              from_buffer("int64_t[]", value.indptr)]
            elif array["shape"]:
                self.data.append(from_buffer("double[]", value))
            else:
                self.data.append(float(value))
        self.work = from_buffer("double[]", k.work)
        self.keep = (k.data, k.work)
        self.lock = k.kernels["lower_grad"].lock
        self.doubles = module.ffi.typeof("double[]")  # the parsed type: no lookup by its name
        self.control, self.info = np.zeros(_CONTROL_SIZE), np.zeros(_INFO_SIZE)
        self.tail = [from_buffer("double[]", self.control), from_buffer("double[]", self.info),
                     self.work]

    def run(self, name: str, theta: np.ndarray, vectors: list[np.ndarray | None],
            control: list[float]) -> np.ndarray:
        """Call loop `name`; vectors are C-contiguous float64 (outputs written in place), None
        for an optional one the loop may skip (C NULL). Returns the info vector."""
        from_buffer, null = self.ffi.from_buffer, self.ffi.NULL
        args = [*self.sizes, from_buffer("double[]", theta), *self.data,
                *[null if v is None else from_buffer("double[]", v) for v in vectors], *self.tail]
        with self.lock:
            self.control[:len(control)] = control
            self.info.fill(np.nan)  # an entry a loop does not write reads as unknown
            status = self.functions[name](*args)
            info: np.ndarray = self.info.copy()
        if status != 0:
            raise KernelError(f"{name}: invalid size (every size must be at least 1)")
        return info

    def close(self, theta: np.ndarray, x: np.ndarray,
              q: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, bool]:
        """(B^T q, the direct theta terms, f + r, whether all three are finite) at (x, theta)
        from the module's `closing` (one call for cross_vjp, upper_theta_grad and upper_value;
        vectors C-contiguous float64). Non-finite outputs are returned as the kernels return
        them; the flag is the kernels' own finiteness checks, so a caller need not repeat them."""
        from_buffer, doubles = self.ffi.from_buffer, self.doubles
        btq, direct, value = np.empty(self.theta_size), np.empty(self.theta_size), np.empty(1)
        # the arguments as one unpacked call (no list per call); acquire / release: half the
        # cost of a with block (codegen/runtime/kernel_caller.py)
        closing, lock = self.functions["closing"], self.lock
        args = (*self.sizes, from_buffer(doubles, theta), *self.data, from_buffer(doubles, x),
                from_buffer(doubles, q), from_buffer(doubles, btq), from_buffer(doubles, direct),
                from_buffer(doubles, value), self.work)
        lock.acquire()
        try:
            status = closing(*args)
        finally:
            lock.release()
        if status == 2:
            raise KernelError("closing: invalid size (every size must be at least 1)")
        return btq, direct, float(value[0]), status == 0


def data_per_entry(k: Any) -> float:
    """The numbers k's data hold per entry of x (nonzeros for sparse data), computed once per
    bound problem: a measure of what one kernel call costs next to a vector pass. inf for a
    kernel that is not a bound problem (nothing is known of its cost)."""
    try:
        return _DATA_PER_ENTRY[k]
    except KeyError:
        data = getattr(k, "data", None)
        if not isinstance(data, dict):  # a kernel object of its own: its cost is unknown
            return math.inf
        numbers = sum(int(v.nnz) if hasattr(v, "nnz") else int(np.size(v))
                      for v in data.values())
        per_entry = _DATA_PER_ENTRY[k] = numbers / max(int(k.x_size), 1)
        return per_entry
    except TypeError:  # not weakly referenceable: not a bound problem
        return math.inf


def fused_size_limit(k: Any) -> int:
    """The largest x for which bound problem k takes the fused loops: FUSED_MAX_SIZE, times
    CHEAP_KERNEL_FACTOR when its data hold at most CHEAP_DATA_PER_ENTRY numbers per entry of x
    (nonzeros for sparse data). Deterministic (sizes only), so every run of a problem takes the
    same loops."""
    cheap = data_per_entry(k) <= CHEAP_DATA_PER_ENTRY
    return FUSED_MAX_SIZE * (CHEAP_KERNEL_FACTOR if cheap else 1)


def loops_for(k: Any) -> FusedLoops | None:
    """The fused loops of bound problem k when it has them and x has at most
    `fused_size_limit(k)` entries, else None (plain kernels, an older module, a large problem
    with costly kernels)."""
    size = getattr(k, "x_size", None)
    if size is None or size > FUSED_MAX_SIZE and size > fused_size_limit(k):
        return None
    return _fused_of(k)


def closing_for(k: Any) -> FusedLoops | None:
    """The fused functions of bound problem k when its module has `closing` (at any size: it
    runs the same three kernels, one Python-to-C call instead of three), else None."""
    fused = _fused_of(k)
    return fused if fused is not None and "closing" in fused.functions else None


def _fused_of(k: Any) -> FusedLoops | None:
    """k's FusedLoops, built once per bound problem, or None (no loops in its module, or not a
    bound problem)."""
    try:
        return _LOOPS[k]
    except KeyError:
        pass
    except TypeError:  # not weakly referenceable: not a bound problem
        return None
    module = getattr(k, "module", None)
    loops = None
    if module is not None and hasattr(module.lib, f"hg_{module.name}_loop_cg"):
        loops = FusedLoops(k)
    _LOOPS[k] = loops
    return loops


def count(n: int) -> float:
    """An iteration cap for a loop's control vector: a double the loop's int64 cast takes
    exactly (a cap beyond 2^53 is no cap in practice)."""
    return float(min(max(int(n), 0), 2 ** 53))


def contiguous(v: np.ndarray) -> np.ndarray:
    """v as a C-contiguous float64 vector (a copy only when it is not one already)."""
    return np.ascontiguousarray(v, dtype=np.float64).ravel()


@dataclass(frozen=True)
class _CGMessage:
    """Why loop_cg stopped, as `krylov.cg` words it."""

    status: Status
    reason: int
    value: float
    diverge_from: float

    def text(self) -> str:
        if self.status is Status.DIVERGED:
            return f"residual grew from {self.diverge_from:.3g} to {self.value:.3g}"
        if self.status is Status.NOT_SPD:
            return f"d^T A d = {self.value:.3g} <= 0"
        if self.status is Status.NON_FINITE:
            return {REASON_KERNEL: "non-finite kernel output",
                    REASON_ITERATE: "non-finite CG iterate",
                    REASON_CURVATURE: "d^T A d is not finite"}[self.reason]
        return ""


def fused_cg(loops: FusedLoops, x_at: np.ndarray, theta: np.ndarray, b: np.ndarray,
             x0: np.ndarray | None = None, *, residual: np.ndarray | None = None,
             tol: float = 0.0, scale: float = 1.0, max_iter: int = 10_000, min_iter: int = 0,
             diverge_from: float | None = None, mu: float | None = None,
             basis: np.ndarray | None = None) -> CGResult:
    """`krylov.cg` on A(x_at) u = b, A the lower Hessian, in one C call: the same steps and
    stopping tests (x0 = None starts from 0 with residual b; a given x0 needs its residual),
    and with mu the same Gauss-Radau energy-norm estimate. basis, a C-contiguous (cap, 2, n)
    array, receives (d_i, A d_i) of the first cap steps, as `krylov.cg`'s `basis` list does."""
    if x0 is None:
        u, s = np.zeros(loops.x_size), contiguous(b).copy()
    elif residual is None:
        raise ValueError("fused_cg from a given x0 needs its residual b - A x0")
    else:
        u, s = contiguous(x0).copy(), contiguous(residual).copy()
    diverge = -1.0 if diverge_from is None else float(diverge_from)
    node = float(mu) if mu is not None and 0.0 < mu < math.inf else -1.0
    cap = 0 if basis is None else basis.shape[0]
    if basis is not None and not (basis.flags.c_contiguous and basis.shape[1:] == (2, u.size)):
        raise ValueError(f"basis must be C-contiguous of shape (cap, 2, {u.size})")
    info = loops.run("loop_cg", contiguous(theta), [contiguous(x_at), u, s, basis],
                     [tol, scale, count(max_iter), count(min_iter), diverge, node, float(cap)])
    status = LOOP_STATUSES[int(info[0])]
    message = ("" if status in (Status.CONVERGED, Status.CAPPED) else
               _CGMessage(status, int(info[4]), float(info[5]), diverge).text())
    ss = float(info[3])
    energy = energy_estimate((float(info[6]), node) if node > 0 else None, ss)
    return CGResult(u, s, ss, int(info[1]), int(info[2]), status, message, energy)


def cg_at(k: Any, x: np.ndarray, theta: np.ndarray, b: np.ndarray, *, tol: float = 0.0,
          max_iter: int = 10_000, diverge_from: float | None = None) -> CGResult:
    """CG from 0 on A(x) u = b, A the lower Hessian of kernel k at (x, theta): the fused loop
    when k has one (`loops_for`), else `krylov.cg` with the prepared HVP (Newton-CG's
    directions)."""
    loops = loops_for(k)
    if loops is not None:
        return fused_cg(loops, x, theta, b, tol=tol, max_iter=max_iter, diverge_from=diverge_from)
    return cg(hvp_at(k, x, theta), b, tol=tol, max_iter=max_iter, diverge_from=diverge_from)


@dataclass(frozen=True)
class NewtonRun:
    """What loop_newton reports: the last x and its gradient (None if the first gradient failed),
    the counts, ||g|| and ||g0||, the Status (None: no step decreased ||g||, the caller says
    why), the message of a failed direction, and whether the last gradient failed."""

    x: np.ndarray
    grad: np.ndarray | None
    iterations: int
    n_grad: int
    n_hvp: int
    gn: float
    gn0: float
    status: Status | None
    message: str
    last_failed: bool


def fused_newton(loops: FusedLoops, theta: np.ndarray, x0: np.ndarray, *, tol: float, mu: float,
                 L_A: float, max_iter: int, inner_max: int, share: float) -> NewtonRun:
    """`lower/newton.py`'s Newton-CG (directions by loop_cg from 0 to the forcing term, steps
    halved until ||g|| decreases) in one C call."""
    x, g = np.empty(loops.x_size), np.empty(loops.x_size)
    info = loops.run("loop_newton", contiguous(theta), [contiguous(x0), x, g],
                     [tol, mu, L_A, count(max_iter), count(inner_max), share])
    code, gn, have_g = int(info[0]), float(info[4]), info[8] == 1.0
    status = None if code == NO_DECREASE else LOOP_STATUSES[code]
    message = ""
    if not have_g:  # the first gradient
        message = "non-finite kernel output"
    elif status in (Status.NON_FINITE, Status.NOT_SPD):  # a direction's CG
        why = _CGMessage(status, int(info[6]), float(info[7]), gn).text()
        message = f"Newton direction: {why or status}"
    return NewtonRun(x if have_g else contiguous(x0).copy(), g if have_g else None,
                     int(info[1]), int(info[2]), int(info[3]), gn, float(info[5]), status,
                     message, info[9] == 1.0)
