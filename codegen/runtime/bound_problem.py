"""A problem bound to data: the kernels as NumPy functions, and the solvers on top of them.

`BoundProblem` is the object of docs/interface.md section 3 (`prob = ridge.bind(...)`). Its kernel
methods validate their vector arguments (length, dtype, theta's length) and return fresh arrays;
non-finite results are returned as they are (the solvers turn them into a status), while an
invalid size raises. The solver methods delegate to `solvers` and `hypergradient`.
"""
from __future__ import annotations

import math
import threading
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constants.evaluation.runtime import (
    constants_cost,
    cross_norm_structure,
    evaluate_constants,
    evaluate_local_constants,
    prepare_constants,
    third_contraction,
    tighten_constants,
)
from ..errors import BindError
from ..floats import norm2
from ..hypergrad import (
    HypergradientOptions,
    HypergradientResult,
    hypergradient,
    hypergradient_samples,
    solve_lower,
)
from ..hypergrad.common import finite
from ..hypergrad.dense import DIRECT_MAX_SIZE
from ..hypergrad.results import evolve
from ..learn import optimize
from .kernel_caller import KernelCaller
from .validation import as_float64

if TYPE_CHECKING:  # annotations only: the module creates bound problems
    from .module import GeneratedModule

_FLOAT64 = np.dtype(np.float64)


class BoundProblem:
    def __init__(self, module: GeneratedModule, bound: dict):
        self.module = module
        self.data = bound["arrays"]
        self.sizes = bound["sizes"]
        meta = module.meta
        self.x_name, self.theta_name = meta["x"], meta["theta"]
        self.x_shape = module.extent(self.x_name, self.sizes)
        self.x_size = int(np.prod(self.x_shape))
        self.theta_size = int(np.prod(module.extent(self.theta_name, self.sizes)))
        self.is_quadratic = meta["is_quadratic"]
        self.upper_depends_on_theta = meta["upper_depends_on_theta"]
        self.upper_is_quadratic = bool(meta.get("upper_is_quadratic", False))
        # every term of g with a third derivative has a row kernel (docs/bounds.md 15.10)
        self.has_third_contraction = bool(meta.get("third_rows"))
        work_fn = getattr(module.lib, f"hg_{module.name}_work_size")
        self.work = np.zeros(max(1, int(work_fn(*[self.sizes[s] for s in meta["sizes"]]))))
        lock = threading.Lock()
        self.kernels = {k["name"]: KernelCaller(module, k, self.data, self.sizes, self.work, lock)
                        for k in meta["kernels"]}
        self._constants = None
        self._fixed = {}  # the dense matrices of data-only kernels (_matrix)
        self._derived = {}  # what the solvers derive from those matrices (fixed_memo)
        # a least-squares g's data matrix: its Gram matrix where the data constants form it, at
        # sizes the direct solvers take (at most 32 MB)
        gram = meta.get("gram")
        self._grams = ({gram["data"]: None} if gram and self.is_quadratic
                       and self.x_size <= DIRECT_MAX_SIZE else {})
        self._cache_size = sum(int(np.prod(module.extent(a["name"], self.sizes)))
                               for a in meta.get("hvp_cache", []))

    def __repr__(self):
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        return f"<{self.module.name} bound: {sizes}; x has {self.x_size} entries, theta {self.theta_size}>"

    # -- argument checks -------------------------------------------------------------------
    def _vector(self, name: str, value, length: int, what: str) -> np.ndarray:
        if (type(value) is np.ndarray and value.dtype == _FLOAT64 and value.ndim == 1
                and value.size == length and value.flags.c_contiguous):
            return value  # the solvers' own vectors, thousands of times per solve
        arr = as_float64(what, value)
        if arr.ndim == 1 and arr.size == length:
            return arr
        if arr.size != length or (arr.ndim > 1 and arr.shape != self.x_shape):
            shape = self.x_shape if length == self.x_size else (length,)
            raise BindError(f"{what} must have {length} entries (shape {shape}), got shape {arr.shape}")
        return arr.reshape(-1)

    def checked_theta(self, theta) -> np.ndarray:
        """theta as a float64 1-D array of theta_size entries, else BindError."""
        if (type(theta) is np.ndarray and theta.dtype == _FLOAT64 and theta.ndim == 1
                and theta.size == self.theta_size and theta.flags.c_contiguous):
            return theta  # what the checks below return for it, as in _vector
        arr = as_float64("theta", theta if isinstance(theta, np.ndarray) else np.atleast_1d(theta))
        if arr.ndim != 1 or arr.size != self.theta_size:
            size = self.theta_size
            expected = "a float or a 1-D array of 1 entry" if size == 1 else (
                f"a 1-D array of {size} values (theta has {size} entries; np.full({size}, v) "
                f"puts one value v in each)")
            raise BindError(f"theta must be {expected}, got shape {np.shape(theta)}")
        return arr

    def _call(self, kernel: str, x, theta, extra=None, out_size=None):
        # _vector's and checked_theta's own first test, here without their calls: the solvers'
        # vectors pass it on every kernel call
        if not (type(x) is np.ndarray and x.dtype is _FLOAT64 and x.ndim == 1
                and x.size == self.x_size and x.flags.c_contiguous):
            x = self._vector(self.x_name, x, self.x_size, "x")
        if not (type(theta) is np.ndarray and theta.dtype is _FLOAT64 and theta.ndim == 1
                and theta.size == self.theta_size and theta.flags.c_contiguous):
            theta = self.checked_theta(theta)
        vectors = {self.x_name: x, self.theta_name: theta}
        if extra is not None:
            name, value, length = extra
            vectors[name] = self._vector(name, value, length, name)
        out = np.empty(1 if out_size is None else out_size)
        self.kernels[kernel](vectors, out)
        return float(out[0]) if out_size is None else out

    # -- kernels (docs/interface.md section 3) --------------------------------------------------
    def lower_value(self, x, theta) -> float:
        return self._call("lower_value", x, theta)

    def lower_grad(self, x, theta) -> np.ndarray:
        return self._call("lower_grad", x, theta, out_size=self.x_size)

    def lower_hvp(self, x, theta, v) -> np.ndarray:
        return self._call("lower_hvp", x, theta, ("v", v, self.x_size), self.x_size)

    def cross_vjp(self, x, theta, q) -> np.ndarray:
        return self._call("cross_vjp", x, theta, ("q", q, self.x_size), self.theta_size)

    def cross_jvp(self, x, theta, t) -> np.ndarray:
        return self._call("cross_jvp", x, theta, ("t", np.atleast_1d(t), self.theta_size),
                          self.x_size)

    def lower_hessian(self, x, theta) -> np.ndarray:
        """d2g/dx2 at (x, theta) as a dense (x_size, x_size) array, column c the HVP with e_c:
        x_size HVPs in one kernel call (the direct solvers; 8 x_size^2 bytes)."""
        return self._matrix("lower_hessian", "lower_hvp", x, theta, self.x_size)

    def cross_matrix(self, x, theta) -> np.ndarray:
        """B = d2g/dx dtheta at (x, theta) as a dense (x_size, theta_size) array, column c the
        cross JVP with e_c: theta_size JVPs in one kernel call (the certified ||B||)."""
        return self._matrix("cross_matrix", "cross_jvp", x, theta, self.theta_size)

    def _matrix(self, kernel: str, base: str, x, theta, columns: int) -> np.ndarray:
        """A dense-matrix kernel's result as (x_size, columns). When `base` reads neither x nor
        theta (meta "data_only": the Hessian or B of g = ||C theta + D x - e||^2) the matrix
        is fixed by the data, which bind copied read-only: computed on first use, then
        returned (read-only) at every x and theta, whose arguments are still checked."""
        fixed = base in self.module.meta["data_only"]
        if fixed and kernel in self._fixed:
            self._vector(self.x_name, x, self.x_size, "x")  # the checks of a kernel call
            self.checked_theta(theta)
            return self._fixed[kernel]
        out = self._call(kernel, x, theta, out_size=self.x_size * columns)
        matrix = out.reshape(columns, self.x_size).T
        if fixed and np.all(np.isfinite(matrix)):
            matrix.flags.writeable = False
            self._fixed[kernel] = matrix
        return matrix

    def fixed_memo(self, base: str) -> dict | None:
        """A per-bind dict for what the solvers derive from the matrix of the data-only kernel
        `base` (the Hessian's Cholesky factor, ||B||), or None when `base` reads x or theta.
        Such a matrix is fixed by bind's read-only copy of the data, so what is derived from it
        holds at every x and theta of this bind."""
        memo = self._derived.get(base)
        if memo is not None:
            return memo
        if base not in self.module.meta["data_only"]:
            return None
        return self._derived.setdefault(base, {})

    def hvp_at(self, x, theta):
        """v -> (d2g/dx2)(x, theta) v for many v at one x (a solver's CG at x_eps).

        With a prepared HVP (lower_hvp_prepare / lower_hvp_apply: the HVP has temporaries that
        depend on x alone, like z = A x) those are computed here once into a private cache and
        each call runs only the v-dependent part; otherwise every call is lower_hvp. The same
        values either way up to rounding (the same operations; a sum may be ordered otherwise).
        x and theta are copied: the cache holds their values, and a caller that reused its
        buffers got products at neither point."""
        xv, th = self._held(x, theta)
        if "lower_hvp_apply" not in self.kernels:
            return partial(self.lower_hvp, xv, th)
        cache = np.empty(max(1, self._cache_size))
        self.kernels["lower_hvp_prepare"]({self.x_name: xv, self.theta_name: th}, cache)
        apply = self.kernels["lower_hvp_apply"]

        def hvp(v):
            out = np.empty(self.x_size)
            apply({self.x_name: xv, self.theta_name: th, "cache": cache,
                   "v": self._vector("v", v, self.x_size, "v")}, out)
            return out
        return hvp

    def _held(self, x, theta) -> tuple[np.ndarray, np.ndarray]:
        """Checked private copies of x and theta for a function that keeps them (`hvp_at`)."""
        return (self._vector(self.x_name, x, self.x_size, "x").copy(),
                self.checked_theta(theta).copy())

    def hvp_pair_at(self, x, theta):
        """(v, w) -> the (2, x_size) array of rows (d2g/dx2) v and (d2g/dx2) w at one x, from
        one call of `lower_hvp_pair` (one pass over the data for both), or None when the module
        has no such kernel (its HVP makes no pass over a data matrix, or it has a prepared HVP).
        Two CG solves at one x run in lock step on it (docs/solvers.md 9)."""
        if "lower_hvp_pair" not in self.kernels:
            return None
        xv, th = self._held(x, theta)
        kernel = self.kernels["lower_hvp_pair"]

        def pair(v, w):
            out = np.empty((2, self.x_size))
            kernel({self.x_name: xv, self.theta_name: th,
                    "v": self._vector("v", v, self.x_size, "v"),
                    "hg_w": self._vector("w", w, self.x_size, "w")}, out)
            return out
        return pair

    def upper_value(self, x, theta) -> float:
        return self._call("upper_value", x, theta)

    def upper_grad(self, x, theta) -> np.ndarray:
        return self._call("upper_grad", x, theta, out_size=self.x_size)

    def upper_theta_grad(self, x, theta) -> np.ndarray:
        return self._call("upper_theta_grad", x, theta, out_size=self.theta_size)

    def upper_hvp(self, x, theta, v) -> np.ndarray:
        """(d2f/dx2)(x, theta) v: the DWR correction's dual right-hand side (docs/bounds.md 15)."""
        return self._call("upper_hvp", x, theta, ("v", v, self.x_size), self.x_size)

    def lower_tvp(self, x, theta, v, w) -> np.ndarray:
        """grad_x (v^T (d2g/dx2)(x, theta) w): the third derivative of g contracted with v and w
        (the non-quadratic DWR correction, docs/bounds.md 15.3)."""
        vectors = {self.x_name: self._vector(self.x_name, x, self.x_size, "x"),
                   self.theta_name: self.checked_theta(theta),
                   "v": self._vector("v", v, self.x_size, "v"),
                   "hg_w": self._vector("w", w, self.x_size, "w")}
        out = np.empty(self.x_size)
        self.kernels["lower_tvp"](vectors, out)
        return out

    def cross_hvp(self, x, theta, t, w) -> np.ndarray:
        """grad_x (w^T B(x, theta) t) = d/ds B(x + s w, theta) t: the cross derivative once more
        in x (the DWR correction when B is not affine in x, docs/bounds.md 15.3)."""
        vectors = {self.x_name: self._vector(self.x_name, x, self.x_size, "x"),
                   self.theta_name: self.checked_theta(theta),
                   "t": self._vector("t", np.atleast_1d(t), self.theta_size, "t"),
                   "hg_w": self._vector("w", w, self.x_size, "w")}
        out = np.empty(self.x_size)
        self.kernels["cross_hvp"](vectors, out)
        return out

    def cross_tvp(self, x, theta, q, w) -> np.ndarray:
        """d/ds B(x + s w, theta)^T q = (q^T D_j(x) w)_j: the cross derivative once more in x,
        as a theta vector (the block correction's G_w when B is not affine in x,
        docs/bounds.md 15.8)."""
        vectors = {self.x_name: self._vector(self.x_name, x, self.x_size, "x"),
                   self.theta_name: self.checked_theta(theta),
                   "q": self._vector("q", q, self.x_size, "q"),
                   "hg_w": self._vector("w", w, self.x_size, "w")}
        out = np.empty(self.theta_size)
        self.kernels["cross_tvp"](vectors, out)
        return out

    # -- constants and solvers -------------------------------------------------------------
    def _prepared_constants(self) -> dict:
        """The constants' derivation and data quantities, computed once per bind."""
        if self._constants is None:
            self._constants = prepare_constants(self.module, self.data, self._grams)
        return self._constants

    def data_gram(self, name: str) -> np.ndarray | None:
        """M^T M (float64, read-only) of the bound data matrix `name` where the data constants
        formed it (for lambda_min or ||M||^2), else None: the direct solvers' least-squares
        Hessian is a multiple of it (hypergrad/gram.py), and a fresh bind's first call would
        otherwise form it twice."""
        return self._grams.get(name)

    def finite_theta(self, theta) -> np.ndarray:
        """checked_theta, and every entry finite (the constants at theta; the kernels' calls
        skip this test, their results' finiteness is checked where it matters)."""
        th = self.checked_theta(theta)
        if not finite(th):
            k = int(np.argmin(np.isfinite(th)))
            raise BindError(f"theta[{k}] = {float(th[k])!r}: theta must be finite")
        return th

    def constants(self, theta) -> dict:
        """mu, L, L_A, L_B, L_f at theta (derived and certified, or stated by the problem)."""
        return evaluate_constants(self._prepared_constants(), self.finite_theta(theta))

    def tighten_constants(self) -> bool:
        """||K||^2 by the Gram matrix where block sums bounded it (once per bind; for the step
        sizes of first-order solvers, docs/constants.md 4). True if the constants changed."""
        return tighten_constants(self._prepared_constants())

    def solve_lower(self, theta, solver="fista", tol=1e-8, x0=None, **options):
        """Solve the lower level to ||x - x*|| <= tol (certified by ||grad g|| / mu)."""
        return solve_lower(self, self.checked_theta(theta), solver=solver, tol=tol,
                           x0=None if x0 is None else self._vector("x0", x0, self.x_size, "x0"),
                           **options)

    def hypergradient(self, theta, options: HypergradientOptions | None = None, *, x0=None,
                      q0=None, **overrides) -> HypergradientResult:
        """The hypergradient with its a posteriori and a priori error bounds; options as for
        codegen.hypergrad.hypergradient (lower="auto", adjoint="auto", eps, delta, rtol, ...).
        The call that computes data constants (the first of a bind, or one that tightens them)
        reports their flops in work["constants_flops"], apart from units (a BLAS-3 Gram's flops
        run many times faster than a kernel pass's); their seconds are in constants_cost(), not
        in work, which is deterministic."""
        spent = self.constants_cost()
        res = hypergradient(self, self.checked_theta(theta), options,
                            x0=None if x0 is None else self._vector("x0", x0, self.x_size, "x0"),
                            q0=None if q0 is None else self._vector("q0", q0, self.x_size, "q0"),
                            **overrides)
        flops = self.constants_cost()["flops"] - spent["flops"]
        return evolve(res, work=dict(res.work, constants_flops=flops)) if flops else res

    def constants_cost(self) -> dict:
        """{"flops", "seconds"} this bind has spent on data constants so far (none before the
        first call that reads them: they are computed lazily; docs/constants.md 4)."""
        if self._constants is None:
            return {"flops": 0, "seconds": 0.0}
        return constants_cost(self._constants)

    def optimize(self, theta0, method=None, **options):
        """Learn theta from theta0 (codegen.learn.optimize): method None (the default,
        "lbfgs"), "maid", "gd" or "lbfgsb"."""
        return optimize(self, theta0, method=method, **options)

    def local_constants(self, x, theta, radius) -> dict:
        """constants(theta) with L, L_A, L_B, L_f valid only on the ball B(x, radius) (finite for
        exp / polynomial atoms; min(global, ball) otherwise). mu stays global (docs/framework.md 8.4)."""
        r = float(radius)
        if not r >= 0:  # nan fails too
            raise BindError(f"radius = {radius!r}: the ball's radius must be a number >= 0")
        return evaluate_local_constants(self._prepared_constants(), self.finite_theta(theta),
                                        self._vector("x", x, self.x_size, "x"), r, self.data)

    def third_contraction(self, x, theta, u) -> float:
        """An upper bound on ||DA(x)[u]||, the derivative of g's Hessian at x along u (a
        symmetric matrix), from the data at x row by row: one pass of each term's
        `lower_third_rows_*` kernel (docs/bounds.md 15.10). inf where g has a term with no local
        rule (log-sum-exp), a kernel's output is not finite, or the constants are stated."""
        th = self.checked_theta(theta)
        direction = self._vector("u", u, self.x_size, "u")
        vectors = {self.x_name: self._vector("x", x, self.x_size, "x"), self.theta_name: th,
                   "v": direction}
        rows = {}
        for r in self.module.meta.get("third_rows", []):
            out = np.empty(self.module.extent(r["kernel"], self.sizes))
            status = self.kernels[r["kernel"]](vectors, out) if out.size else 0
            rows[r["term"]] = out if status == 0 else None
        return third_contraction(self._prepared_constants(), th, rows,
                                 norm2(direction))

    def cross_norm_bound(self, x, theta) -> float:
        """A certified upper bound on ||B(x, theta)||_2 in one pass over the data, or math.inf
        when g is not of the per-sample-weight form sum_I v(theta_I) core_I(x) + (theta-free)
        (constants/cross.py; hypergradient.cross_norm then falls back to cross JVPs).

        The bound is ||B||_F from per-sample column norms with outward margins. On first use per
        bind, two of its columns are checked against exact cross JVPs (not counted as work); a
        mismatch disables the bound for this bind."""
        cn = cross_norm_structure(self._prepared_constants(), self.data)
        if cn is None:
            return math.inf
        th = self.checked_theta(theta)
        xv = self._vector("x", x, self.x_size, "x")
        try:
            if not cn.checked:
                comp = cn.column_norms(xv, th, margins=False)
                marg = cn.column_norms(xv, th)
                for r in sorted({int(np.argmax(comp)), cn.m // 2}):
                    t = np.zeros(self.theta_size)
                    t[cn.lo + r] = 1.0
                    exact = float(np.linalg.norm(self.cross_jvp(xv, th, t)))
                    if not (exact <= marg[r] and abs(exact - comp[r]) <= 1e-6 * marg[r] + 1e-300):
                        self._constants["cross"] = (f"structural ||B|| check failed at column "
                                                    f"{cn.lo + r}: {exact} vs {comp[r]}")
                        return math.inf
                cn.checked = True
            return float(cn.bound(xv, th))
        except Exception:  # noqa: BLE001 - no structural bound: the caller uses cross JVPs
            return math.inf


class BoundSamples:
    """Several samples of one problem: the upper objective and hypergradient are their means.

    executor: None (each sample in turn, here) or the SampleExecutor of
    codegen/runtime/executors.py, which runs each sample's hypergradient on its home worker;
    the mean is formed here in sample order either way, so the numbers are the same.
    `samples` are the bound problems in this process (validation, constants, the solves of
    `solve_lower` and of MAID's value tests, which stay here)."""

    def __init__(self, samples: list, executor: Any = None):
        self.samples = samples
        self.executor = executor
        self.module = samples[0].module
        self.theta_size = samples[0].theta_size

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        where = "" if self.executor is None else f" on {self.executor.description}"
        return f"<{self.module.name}: {len(self.samples)} bound samples{where}>"

    def __enter__(self) -> BoundSamples:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the executor's worker processes (a Client passed in is left open)."""
        if self.executor is not None:
            self.executor.close()

    # -- kernels, sample by sample (docs/interface.md 4) ------------------------------------
    def _each(self, kernel: str, x, theta, second: tuple[str, Any] | None = None,
              shared: Any = None) -> list:
        """kernel on every sample, in sample order: x (and `second`, (name, vectors): v or q)
        one vector per sample; theta and `shared` (cross_jvp's t) the same for all."""
        S = len(self.samples)
        for name, seq in [("x", x)] + ([second] if second is not None else []):
            if (isinstance(seq, np.ndarray) and seq.ndim < 2) or not hasattr(seq, "__len__") \
                    or len(seq) != S:
                raise BindError(f"{kernel} over {S} samples takes {name} as one vector per "
                                f"sample (a list of {S}), got {type(seq).__name__}"
                                f"{f' of length {len(seq)}' if hasattr(seq, '__len__') else ''}")
        out = []
        for s, k in enumerate(self.samples):
            args = [x[s], theta] + ([second[1][s]] if second is not None else [])
            out.append(getattr(k, kernel)(*args, *(() if shared is None else (shared,))))
        return out

    def lower_value(self, x, theta) -> list:
        return self._each("lower_value", x, theta)

    def lower_grad(self, x, theta) -> list:
        return self._each("lower_grad", x, theta)

    def lower_hvp(self, x, theta, v) -> list:
        return self._each("lower_hvp", x, theta, ("v", v))

    def lower_hessian(self, x, theta) -> list:
        return self._each("lower_hessian", x, theta)

    def cross_vjp(self, x, theta, q) -> list:
        return self._each("cross_vjp", x, theta, ("q", q))

    def cross_jvp(self, x, theta, t) -> list:
        return self._each("cross_jvp", x, theta, shared=t)

    def upper_value(self, x, theta) -> list:
        return self._each("upper_value", x, theta)

    def upper_grad(self, x, theta) -> list:
        return self._each("upper_grad", x, theta)

    def constants(self, theta) -> list:
        return [s.constants(theta) for s in self.samples]

    def tighten_constants(self) -> bool:
        return any([s.tighten_constants() for s in self.samples])

    def solve_lower(self, theta, solver="fista", tol=1e-8, x0=None, **options) -> list:
        x0s = x0 if x0 is not None else [None] * len(self.samples)
        return [s.solve_lower(theta, solver, tol, x, **options) for s, x in zip(self.samples, x0s)]

    def hypergradient(self, theta, options: HypergradientOptions | None = None, *, x0=None,
                      q0=None, **overrides) -> HypergradientResult:
        """The mean hypergradient over the samples (codegen.hypergrad.hypergradient_samples),
        each sample's part on its worker when there is an executor."""
        per_sample = None if self.executor is None else self.executor.per_sample
        return hypergradient_samples(self.samples, self.samples[0].checked_theta(theta), options,
                                     x0=x0, q0=q0, per_sample=per_sample, **overrides)

    def optimize(self, theta0, method=None, **options):
        """Learn theta from theta0 on the mean upper objective (codegen.learn.optimize)."""
        return optimize(self, theta0, method=method, **options)
