"""An independent reference for every generated kernel: the problem unrolled into scalars.

At tiny sizes (<= 5) every `Sum` is expanded with `.doit()`, every read of x and theta becomes a
scalar symbol (x flattened in C order), the data become scalar symbols whose values are passed
numerically, and the derivatives are taken by `sympy.diff`. The results are evaluated with
mpmath at 30 digits, so they are accurate far beyond float64 (the final cast to float is the only
rounding that matters). Nothing here uses the generator: the stable primitives `softplus` and
`sigmoid` are rewritten back into log/exp, and index handling is SymPy's own.

    orc = Oracle(problem, data)           # sizes are read from the data shapes
    orc.lower_grad(x, theta), orc.hessian(x, theta), orc.cross_vjp(x, theta, q), ...

theta is a 1-D float array (length 1 for a scalar theta); a float is accepted too.
"""
from __future__ import annotations

from functools import cached_property

import mpmath
import numpy as np
import sympy as sp

from codegen.primitives import sigmoid, softplus

DPS = 30


class Oracle:
    """Value, gradient, Hessian, cross derivative of g and f + r, unrolled at concrete sizes."""

    def __init__(self, problem, data: dict, dps: int = DPS):
        self.problem = problem
        self.dps = dps
        self.sizes = bind_sizes(problem, data)  # name -> int
        sizes_subs = {s: sp.Integer(self.sizes[s.name]) for s in problem.sizes}
        xs, ts = problem.x_spec, problem.theta_spec
        self.x_shape = _concrete_shape(xs, sizes_subs)
        self.theta_shape = _concrete_shape(ts, sizes_subs)
        self.x_size = int(np.prod(self.x_shape))
        self.theta_size = int(np.prod(self.theta_shape))

        # Scalar unknowns; real=True keeps derivatives of Abs & co. free of re/im parts.
        self._xsym = [sp.Symbol(f"ox{k}", real=True) for k in range(self.x_size)]
        self._tsym = [sp.Symbol(f"ot{k}", real=True) for k in range(self.theta_size)]
        self._dsym: list = []  # data scalars, in the order of self._dval
        self._dval: list = []
        self._dmap: dict = {}  # (name, index tuple) -> Symbol
        self._data = {}
        for spec in problem.data_specs:
            self._data[spec.name] = np.asarray(data[spec.name], dtype=np.float64)

        self.g = self._unroll(problem.g, sizes_subs, "lower")
        self.f = self._unroll(problem.f, sizes_subs, "upper")
        self.fr = self.f + self._unroll(sp.sympify(problem.r), sizes_subs, "regulariser")

    # -- unrolling ---------------------------------------------------------------------------
    def _unroll(self, expr, sizes_subs, label):
        expr = expr.replace(softplus, lambda z: sp.log(1 + sp.exp(z)))
        expr = expr.replace(sigmoid, lambda z: 1 / (1 + sp.exp(-z)))
        # An Idx carries its range; substituting sizes rebuilds it in the limits but not always
        # in the summand, so every Idx first becomes a plain integer symbol (one per label).
        labels = {}
        for idx in expr.atoms(sp.Idx):
            labels.setdefault(str(idx.label), sp.Dummy(str(idx.label), integer=True))
        expr = expr.xreplace({idx: labels[str(idx.label)] for idx in expr.atoms(sp.Idx)})
        expr = expr.xreplace(sizes_subs).doit()
        if expr.atoms(sp.Sum):
            raise ValueError(f"{label}: sums left after unrolling: {expr.atoms(sp.Sum)}")

        arrays = self.problem.arrays
        repl = {}
        for node in expr.atoms(sp.Indexed):
            name = str(node.base.label)
            idx = []
            for e in node.indices:
                if not e.is_Integer:
                    raise ValueError(f"{label}: index {e} of {node} is not a number after "
                                     f"unrolling (a free index?)")
                idx.append(int(e))
            spec = arrays[name]
            shape = _concrete_shape(spec, sizes_subs)
            if len(idx) != len(shape) or any(not 0 <= a < s for a, s in zip(idx, shape)):
                raise ValueError(f"{label}: {node} is out of bounds for shape {shape}")
            if spec.role == "x":
                repl[node] = self._xsym[int(np.ravel_multi_index(idx, shape))]
            elif spec.role == "theta":
                repl[node] = self._tsym[int(np.ravel_multi_index(idx, shape))]
            else:
                repl[node] = self._data_symbol(name, tuple(idx))
        for sym in expr.free_symbols:
            if isinstance(sym, sp.Symbol) and sym.name in arrays and arrays[sym.name].shape == ():
                repl[sym] = self._data_symbol(sym.name, ())
        expr = expr.xreplace(repl)
        known = set(self._xsym) | set(self._tsym) | set(self._dsym)
        extra = expr.free_symbols - known
        if extra:
            raise ValueError(f"{label}: unbound symbols after unrolling: {sorted(map(str, extra))}")
        return expr

    def _data_symbol(self, name, idx):
        key = (name, idx)
        if key not in self._dmap:
            sym = sp.Symbol(f"od{len(self._dsym)}", real=True)  # valid names: no dummify pass
            self._dmap[key] = sym
            self._dsym.append(sym)
            self._dval.append(float(self._data[name][idx]))
        return self._dmap[key]

    # -- symbolic derivatives (built lazily, once) -----------------------------------------
    @cached_property
    def _grad_expr(self):
        return [sp.diff(self.g, s) for s in self._xsym]

    @cached_property
    def _hess_expr(self):
        d, gr = self.x_size, self._grad_expr
        H = [[None] * d for _ in range(d)]
        for a in range(d):
            for b in range(a, d):
                H[a][b] = H[b][a] = sp.diff(gr[a], self._xsym[b])  # symmetric by construction
        return H

    def _fn(self, expr):
        return sp.lambdify([self._xsym, self._tsym, self._dsym], expr, modules="mpmath", cse=True)

    @cached_property
    def _f_lower_value(self):
        return self._fn(self.g)

    @cached_property
    def _f_lower_grad(self):
        return self._fn(self._grad_expr)

    @cached_property
    def _f_hessian(self):
        d = self.x_size
        upper = self._fn([self._hess_expr[a][b] for a in range(d) for b in range(a, d)])

        def full(*args):  # lambdify the upper triangle only (half the printing and cse work)
            flat = iter(upper(*args))
            H = [[None] * d for _ in range(d)]
            for a in range(d):
                for b in range(a, d):
                    H[a][b] = H[b][a] = next(flat)
            return H

        return full

    @cached_property
    def _f_third(self):
        """d^3 g/dx_c dx_a dx_b as nested lists [c][a][b] (each entry differentiated from the
        Hessian entry, not from a symmetry shortcut: the test checks the symmetry too)."""
        H = self._hess_expr
        d = self.x_size
        return self._fn([[[sp.diff(H[a][b], self._xsym[c]) for b in range(d)] for a in range(d)]
                         for c in range(d)])

    @cached_property
    def _f_cross(self):
        return self._fn([[sp.diff(ga, t) for t in self._tsym] for ga in self._grad_expr])

    @cached_property
    def _f_cross_dx(self):
        """d^3 g/dx_c dx_a dtheta_t as nested lists [c][a][t]: each entry of B (the x-gradient
        differentiated in theta) differentiated once more in x_c."""
        cross = [[sp.diff(ga, t) for t in self._tsym] for ga in self._grad_expr]
        return self._fn([[[sp.diff(cross[a][t], xc) for t in range(len(self._tsym))]
                          for a in range(self.x_size)] for xc in self._xsym])

    @cached_property
    def _f_upper_value(self):
        return self._fn(self.fr)

    @cached_property
    def _f_upper_grad(self):
        return self._fn([sp.diff(self.f, s) for s in self._xsym])

    @cached_property
    def _f_upper_hessian(self):
        grad = [sp.diff(self.f, s) for s in self._xsym]
        return self._fn([[sp.diff(ga, s) for s in self._xsym] for ga in grad])

    @cached_property
    def _f_upper_theta_grad(self):
        return self._fn([sp.diff(self.fr, t) for t in self._tsym])

    # -- evaluation --------------------------------------------------------------------------
    def _call(self, fn, x, theta):
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        theta = np.atleast_1d(np.asarray(theta, dtype=np.float64)).reshape(-1)
        if x.size != self.x_size:
            raise ValueError(f"x has {x.size} entries, expected {self.x_size}")
        if theta.size != self.theta_size:
            raise ValueError(f"theta has {theta.size} entries, expected {self.theta_size}")
        with mpmath.workdps(self.dps):
            mx = [mpmath.mpf(float(v)) for v in x]
            mt = [mpmath.mpf(float(v)) for v in theta]
            md = [mpmath.mpf(v) for v in self._dval]
            return fn(mx, mt, md)

    @staticmethod
    def _vec(out, n):
        return np.array([float(v) for v in out], dtype=np.float64).reshape(n)

    @staticmethod
    def _mat(out, n, m):
        return np.array([[float(v) for v in row] for row in out], dtype=np.float64).reshape(n, m)

    def _matvec(self, fn, x, theta, v, transpose=False):
        """(M v) or (M^T v) computed in mpmath before the cast to float."""
        rows = self._call(fn, x, theta)
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        with mpmath.workdps(self.dps):
            mv = [mpmath.mpf(float(a)) for a in v]
            if transpose:
                ncol = len(rows[0])
                if len(rows) != v.size:
                    raise ValueError(f"vector has {v.size} entries, expected {len(rows)}")
                out = [mpmath.fsum(rows[a][b] * mv[a] for a in range(len(rows))) for b in range(ncol)]
            else:
                if len(rows[0]) != v.size:
                    raise ValueError(f"vector has {v.size} entries, expected {len(rows[0])}")
                out = [mpmath.fsum(r * w for r, w in zip(row, mv)) for row in rows]
            return np.array([float(a) for a in out], dtype=np.float64)

    def lower_value(self, x, theta) -> float:
        return float(self._call(self._f_lower_value, x, theta))

    def lower_grad(self, x, theta) -> np.ndarray:
        return self._vec(self._call(self._f_lower_grad, x, theta), self.x_size)

    def lower_hvp(self, x, theta, v) -> np.ndarray:
        return self._matvec(self._f_hessian, x, theta, v)

    def hessian(self, x, theta) -> np.ndarray:
        return self._mat(self._call(self._f_hessian, x, theta), self.x_size, self.x_size)

    def cross(self, x, theta) -> np.ndarray:
        """B (d x p), B[j, k] = d^2 g / dx_j dtheta_k."""
        return self._mat(self._call(self._f_cross, x, theta), self.x_size, self.theta_size)

    def cross_vjp(self, x, theta, q) -> np.ndarray:
        """B^T q."""
        return self._matvec(self._f_cross, x, theta, q, transpose=True)

    def cross_jvp(self, x, theta, t) -> np.ndarray:
        """B t."""
        return self._matvec(self._f_cross, x, theta, np.atleast_1d(t))

    def upper_value(self, x, theta) -> float:
        """f + r."""
        return float(self._call(self._f_upper_value, x, theta))

    def upper_grad(self, x, theta) -> np.ndarray:
        """grad_x f."""
        return self._vec(self._call(self._f_upper_grad, x, theta), self.x_size)

    def upper_hvp(self, x, theta, v) -> np.ndarray:
        """(d2f/dx2) v (r does not read x)."""
        return self._matvec(self._f_upper_hessian, x, theta, v)

    def lower_tvp(self, x, theta, v, w) -> np.ndarray:
        """grad_x (v^T (d2g/dx2) w): the unrolled Hessian differentiated once more by sympy.diff,
        contracted with v and w in mpmath."""
        T = self._call(self._f_third, x, theta)
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        w = np.asarray(w, dtype=np.float64).reshape(-1)
        d = self.x_size
        with mpmath.workdps(self.dps):
            mv = [mpmath.mpf(float(a)) for a in v]
            mw = [mpmath.mpf(float(a)) for a in w]
            out = [mpmath.fsum(T[c][a][b] * mv[a] * mw[b] for a in range(d) for b in range(d))
                   for c in range(d)]
            return np.array([float(a) for a in out], dtype=np.float64)

    def cross_hvp(self, x, theta, t, w) -> np.ndarray:
        """grad_x (w^T B(x) t): the unrolled B differentiated once more in x by sympy.diff,
        contracted with w and t in mpmath."""
        D = self._call(self._f_cross_dx, x, theta)
        t = np.atleast_1d(np.asarray(t, dtype=np.float64)).reshape(-1)
        w = np.asarray(w, dtype=np.float64).reshape(-1)
        with mpmath.workdps(self.dps):
            mt = [mpmath.mpf(float(a)) for a in t]
            mw = [mpmath.mpf(float(a)) for a in w]
            out = [mpmath.fsum(D[c][a][j] * mw[a] * mt[j] for a in range(self.x_size)
                               for j in range(len(mt))) for c in range(self.x_size)]
            return np.array([float(a) for a in out], dtype=np.float64)

    def cross_tvp(self, x, theta, q, w) -> np.ndarray:
        """d/ds B(x + s w)^T q: the same unrolled third derivative as cross_hvp, contracted with
        q and w in x (a theta vector), in mpmath."""
        D = self._call(self._f_cross_dx, x, theta)
        q = np.asarray(q, dtype=np.float64).reshape(-1)
        w = np.asarray(w, dtype=np.float64).reshape(-1)
        with mpmath.workdps(self.dps):
            mq = [mpmath.mpf(float(a)) for a in q]
            mw = [mpmath.mpf(float(a)) for a in w]
            out = [mpmath.fsum(D[c][a][j] * mq[c] * mw[a] for c in range(self.x_size)
                               for a in range(self.x_size)) for j in range(self.theta_size)]
            return np.array([float(a) for a in out], dtype=np.float64)

    def upper_theta_grad(self, x, theta) -> np.ndarray:
        """grad_theta (f + r)."""
        return self._vec(self._call(self._f_upper_theta_grad, x, theta), self.theta_size)


def _concrete_shape(spec, sizes_subs) -> tuple:
    shape = []
    for s in spec.shape:
        v = sp.sympify(s).xreplace(sizes_subs)
        if not v.is_Integer or int(v) <= 0:
            raise ValueError(f"{spec.name}: shape entry {s} evaluates to {v}, not a positive integer")
        shape.append(int(v))
    return tuple(shape)


def bind_sizes(problem, data: dict) -> dict:
    """Read the size symbols from the data arrays' shapes; raise on any inconsistency."""
    names = {spec.name for spec in problem.data_specs}
    missing = sorted(names - set(data))
    unknown = sorted(set(data) - names)
    if missing:
        raise ValueError(f"missing data: {missing}")
    if unknown:
        raise ValueError(f"unknown data (not in problem {problem.name}): {unknown}")
    sizes: dict = {}
    for spec in problem.data_specs:
        arr = np.asarray(data[spec.name])
        if arr.ndim != len(spec.shape):
            raise ValueError(f"{spec.name}: expected {len(spec.shape)} dimensions "
                             f"(shape {spec.shape}), got shape {arr.shape}")
        for s, dim in zip(spec.shape, arr.shape):
            if isinstance(s, sp.Symbol):
                if s.name in sizes and sizes[s.name] != dim:
                    raise ValueError(f"size {s} is {sizes[s.name]} elsewhere but {dim} in "
                                     f"{spec.name} (shape {arr.shape})")
                sizes[s.name] = dim
    subs = {s: sp.Integer(sizes[s.name]) for s in problem.sizes if s.name in sizes}
    for spec in problem.data_specs:  # compound entries (n - 1, 2*m, ...) and fixed numbers
        arr = np.asarray(data[spec.name])
        for s, dim in zip(spec.shape, arr.shape):
            v = sp.sympify(s).xreplace(subs)
            if not v.is_Integer or int(v) != dim:
                raise ValueError(f"{spec.name}: shape entry {s} = {v} but the array has {dim}")
    unbound = [s.name for s in problem.sizes if s.name not in sizes]
    if unbound:
        raise ValueError(f"sizes {unbound} not bound by any data shape")
    return sizes
