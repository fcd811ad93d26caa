"""The data read at bind time: sizes, scalar and array data (dense on demand), and a small NumPy
interpreter of the indexed SymPy expressions `derive` records, which rebuilds an operator's
matrix (its Jacobian) and an atom's offsets from the data (docs/constants.md 4).
"""
from __future__ import annotations

import string
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import sympy as sp

from ...errors import ProblemError
from ...primitives import logcosh, sigmoid, softplus

ENTRY_LIMIT = 5e7  # largest dense operator (entries)

_UFUNCS = {sp.exp: np.exp, sp.log: np.log, sp.sin: np.sin, sp.cos: np.cos, sp.tan: np.tan,
           sp.sinh: np.sinh, sp.cosh: np.cosh, sp.tanh: np.tanh, sp.atan: np.arctan,
           sp.asinh: np.arcsinh, sp.Abs: np.abs, sigmoid: lambda z: 0.5 * (1 + np.tanh(z / 2)),
           softplus: lambda z: np.logaddexp(0.0, z), logcosh: lambda z: np.logaddexp(z, -z) - np.log(2.0)}


class Env:
    def __init__(self, sizes, scalars, arrays, var, vshape):
        self.sizes, self.scalars, self.arrays = sizes, scalars, arrays
        self.var, self.vshape = var, vshape
        self.D = int(np.prod(vshape))
        self.size_key = frozenset(sizes.items())  # `as_int`'s cache key


def expand_axes(arr, axes, target, jac):
    perm = [axes.index(a) for a in target if a in axes] + ([len(axes)] if jac else [])
    arr = np.transpose(arr, perm) if arr.ndim else arr
    shape, k = [], 0
    for a in target:
        if a in axes:
            shape.append(arr.shape[k])
            k += 1
        else:
            shape.append(1)
    if jac:
        shape.append(arr.shape[-1])
    return arr.reshape(shape)


def _union(parts):
    out = []
    for axes, _, _ in parts:
        out += [a for a in axes if a not in out]
    return tuple(out)


def _contract(parts, contract, counts):
    """einsum of the parts, summing the axes in `contract`; at most one part may be a Jacobian."""
    if sum(1 for p in parts if p[2]) > 1:
        raise ProblemError("operator is not linear in the variable (product of two reads)")
    letters = {}
    for axes, _, _ in parts:
        for a in axes:
            letters.setdefault(a, string.ascii_letters[len(letters)])
    subs, ops = [], []
    jac = any(p[2] for p in parts)
    for axes, arr, isjac in parts:
        subs.append("".join(letters[a] for a in axes) + ("Z" if isjac else ""))
        ops.append(arr)
    out_axes = tuple(a for a in _union(parts) if a not in contract)
    spec = ",".join(subs) + "->" + "".join(letters[a] for a in out_axes) + ("Z" if jac else "")
    res = np.einsum(spec, *ops, optimize=True)
    scale = 1
    for s in contract:
        if s not in letters:
            scale *= counts[s]
    return out_axes, res * scale if scale != 1 else res, jac


def interpret(expr, env, E: Env):
    if expr in env:
        return (expr,), env[expr], False
    if expr.is_Number:
        return (), np.asarray(float(expr)), False
    if isinstance(expr, sp.Symbol):
        if expr.name in E.sizes:
            return (), np.asarray(float(E.sizes[expr.name])), False
        if expr.name in E.scalars:
            return (), np.asarray(float(E.scalars[expr.name])), False
        raise ProblemError(f"unbound symbol {expr} in an operator")
    if isinstance(expr, sp.Indexed):
        return _indexed(expr, env, E)
    if isinstance(expr, sp.Sum):
        return _sum(expr.function, expr.limits, env, E)
    if expr.is_Mul:
        return _contract([interpret(a, env, E) for a in expr.args], (), {})
    if expr.is_Add:
        return _ev_add([interpret(a, env, E) for a in expr.args])
    if expr.is_Pow:
        b, e = interpret(expr.base, env, E), interpret(expr.exp, env, E)
        if b[2] or e[2]:
            if expr.exp == 1:
                return b
            raise ProblemError(f"operator is not linear: {expr}")
        axes = _union([b, e])
        with np.errstate(all="ignore"):
            return axes, expand_axes(b[1], b[0], axes, False) ** expand_axes(e[1], e[0], axes, False), False
    fn = _UFUNCS.get(type(expr))
    if fn is not None and len(expr.args) == 1:
        a = interpret(expr.args[0], env, E)
        if a[2]:
            raise ProblemError(f"operator is not linear: {expr}")
        return a[0], fn(a[1]), False
    raise ProblemError(f"cannot evaluate {expr} ({type(expr).__name__}) in an operator")


def as_int(expr, E):
    """A loop limit (m - 1, n, 0) at the bound sizes. Cached per expression and sizes: the
    cross-norm bound interprets its terms at every hypergradient of a learning run, and each
    uncached limit is a SymPy subs (hypercleaning on digits, m = 200: 538 per run, which took
    0.57 s with them and 0.50-0.52 s without, one thread)."""
    if isinstance(expr, (int, np.integer)):
        return int(expr)
    return _as_int(sp.sympify(expr), E.size_key)


@lru_cache(maxsize=4096)
def _as_int(expr, size_key):
    sizes = dict(size_key)
    return int(expr.subs({s: sizes[s.name] for s in expr.free_symbols if s.name in sizes}))


def _sum(body, limits, env, E):
    env2 = dict(env)
    counts = {}
    masks = []  # 0/1 factors of triangular ranges
    for s, lo, hi in limits:
        if _reads_indices((lo, hi), env2):
            rng, mask = _triangular(s, lo, hi, env2, E)
            masks.append(mask)
        else:
            rng = np.arange(as_int(lo, E), as_int(hi, E) + 1)
        env2[s] = rng
        counts[s] = rng.size
    if body.is_Add:
        parts = [_sum(a, limits, env, E) for a in body.args]
        return _ev_add(parts)
    factors = list(body.args) if body.is_Mul else [body]
    contract = tuple(s for s, _, _ in limits)
    reads = [a for a in factors if isinstance(a, sp.Indexed) and str(a.base.label) == E.var]
    if len(reads) == 1:  # linear in x: scatter the data into the Jacobian, no dense one-hot
        others = [interpret(a, env2, E) for a in factors if a is not reads[0]]
        if not any(p[2] for p in others):
            position = factors.index(reads[0])
            return _scatter_contract(others + masks, position, reads[0], env2, E, contract,
                                     counts)
    return _contract([interpret(a, env2, E) for a in factors] + masks, contract, counts)


def _reads_indices(limits, env) -> bool:
    """Whether a loop limit reads an enclosing summation index (a triangular range)."""
    return any(s in env for limit in limits for s in sp.sympify(limit).free_symbols)


def _triangular(s, lo, hi, env, E):
    """(s's values over the widest range, the 0/1 factor lo <= s <= hi on the axes of s and of
    the enclosing indices the limits read): Sum(x[j], (j, 0, i)) as a masked full sum."""
    lo_part, hi_part = interpret(lo, env, E), interpret(hi, env, E)
    rng = np.arange(int(np.min(lo_part[1])), int(np.max(hi_part[1])) + 1)
    index = ((s,), rng, False)
    axes = _union([index, lo_part, hi_part])
    grid, low, high = (expand_axes(a, ax, axes, False) for ax, a, _ in (index, lo_part, hi_part))
    return rng, (axes, ((grid >= low) & (grid <= high)).astype(np.float64), False)


def _scatter_contract(others, position, read, env, E, contract, counts):
    """sum over `contract` of (data parts) * x[read]: the Jacobian built by scattering the data
    values into the columns the read addresses. Same result as `_contract` with the dense
    one-hot of `_indexed`, whose size (index space x D) made large operators slow."""
    idx = [interpret(e, env, E) for e in read.indices]
    r_axes = _union(idx)
    arrs = [expand_axes(a.astype(np.int64), ax, r_axes, False) for ax, a, _ in idx]
    shape = np.broadcast_shapes(*[a.shape for a in arrs]) if arrs else ()
    try:
        flat = np.ravel_multi_index(tuple(np.broadcast_to(a, shape) for a in arrs), E.vshape)
    except ValueError:
        raise ProblemError(f"{read} reads outside the variable's shape {E.vshape}") from None
    o_axes, o_arr = ((), np.asarray(1.0)) if not others else _contract(others, (), {})[:2]
    # axes in the order `_contract` would give them (factor order), so callers see no difference
    order = [p[0] for p in others]
    order.insert(position, r_axes)
    axes = _union([(ax, None, False) for ax in order])
    vals, cols = expand_axes(o_arr, o_axes, axes, False), expand_axes(flat, r_axes, axes, False)
    full = np.broadcast_shapes(vals.shape, cols.shape)
    out_axes = tuple(a for a in axes if a not in contract)
    keep = [axes.index(a) for a in out_axes]
    summed = [k for k in range(len(axes)) if k not in keep]
    vals = np.moveaxis(np.broadcast_to(vals, full), keep + summed, range(len(axes)))
    cols = np.moveaxis(np.broadcast_to(cols, full), keep + summed, range(len(axes)))
    out_shape = tuple(full[k] for k in keep)
    rows = int(np.prod(out_shape)) if out_shape else 1
    out = np.zeros((rows, E.D))
    row_ids = np.repeat(np.arange(rows), vals.size // max(rows, 1))
    np.add.at(out, (row_ids, cols.reshape(-1)), vals.reshape(-1).astype(float))
    scale = 1
    for sym in contract:
        if sym not in axes:
            scale *= counts[sym]
    out = out.reshape(out_shape + (E.D,))
    return out_axes, out * scale if scale != 1 else out, True


def _ev_add(parts):
    jparts = [p for p in parts if p[2]]
    use = jparts or parts
    axes = _union(use)
    exp = [expand_axes(arr, ax, axes, j) for ax, arr, j in use]
    shape = np.broadcast_shapes(*[a.shape for a in exp])
    return axes, np.broadcast_to(sum(exp), shape).copy(), bool(jparts)


def _indexed(expr, env, E):
    name = str(expr.base.label)
    idx = [interpret(e, env, E) for e in expr.indices]
    axes = _union(idx)
    arrs = [expand_axes(a.astype(np.int64), ax, axes, False) for ax, a, _ in idx]
    shape = np.broadcast_shapes(*[a.shape for a in arrs]) if arrs else ()
    arrs = [np.broadcast_to(a, shape) for a in arrs]
    if name == E.var:
        try:
            flat = np.ravel_multi_index(tuple(arrs), E.vshape)
        except ValueError:
            raise ProblemError(f"{expr} reads outside the variable's shape {E.vshape}") from None
        jac = np.zeros(shape + (E.D,))
        np.put_along_axis(jac, flat[..., None], 1.0, axis=-1)
        return axes, jac, True
    data = E.arrays.get(name)
    if data is None:
        raise ProblemError(f"operator reads {name}, which is not data")
    for a, n in zip(arrs, data.shape):
        if a.size and (a.min() < 0 or a.max() >= n):
            raise ProblemError(f"{expr} reads outside the shape {data.shape} of {name}")
    return axes, data[tuple(arrs)] if arrs else data, False


def operator_matrix(op, sizes, scalars, arrays, var_name, var_shape):
    """Dense (reduced) matrix of an Operator, and its rows grouped into per-sample blocks."""
    red_axes = set(op.reduce.values())
    vshape = tuple(1 if r in red_axes else n for r, n in enumerate(var_shape))
    E = Env(sizes, scalars, arrays, var_name, vshape)
    env, row_shape = {}, []
    for s, lo, hi in op.limits:
        rng = np.array([0]) if s in op.reduce else np.arange(as_int(lo, E), as_int(hi, E) + 1)
        env[s] = rng
        row_shape.append(rng.size)
    if np.prod(row_shape) * E.D > ENTRY_LIMIT:
        return None, None
    axes, arr, jac = interpret(op.lin, env, E)
    rows = tuple(s for s, _, _ in op.limits)
    if not jac:
        arr = np.zeros(tuple(row_shape) + (E.D,))
    else:
        extra = [a for a in axes if a not in rows]
        if extra:
            raise ProblemError(f"operator {op.name}: free index {extra[0]} is not a row index")
        arr = np.broadcast_to(expand_axes(arr, axes, rows, True), tuple(row_shape) + (E.D,))
    K = np.ascontiguousarray(arr).reshape(-1, E.D)
    nb = int(np.prod(row_shape[:op.block])) if op.block else K.shape[0]
    return K, K.reshape(nb, -1, E.D)


def dense_array(value):
    """NumPy view of a data value; scipy.sparse matrices are densified (norms need dense)."""
    return np.asarray(value.toarray() if hasattr(value, "toarray") else value)


class DenseOnDemand(Mapping):
    """The data arrays as dense float64, each converted on first use only: a large sparse
    matrix that no dense operator needs is never densified (20000 x 100000 would be 16 GB)."""

    def __init__(self, data: dict, names):
        self._data, self._names, self.dense_array = data, [n for n in names if n in data], {}

    def __getitem__(self, name):
        if name not in self.dense_array:
            if name not in self._names:
                raise KeyError(name)
            self.dense_array[name] = dense_array(self._data[name]).astype(np.float64)
        return self.dense_array[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def bind_sizes(der, data) -> dict:
    sizes = {}
    for name, shape in der.data_shapes.items():
        if name not in data:
            raise ProblemError(f"data {name} is missing (needed to bind the constants)")
        got = np.shape(data[name]) if not hasattr(data[name], "toarray") else data[name].shape
        if len(got) != len(shape):
            raise ProblemError(f"{name}: expected {len(shape)} dimensions, got shape {got}")
        for s, dim in zip(shape, got):
            if isinstance(s, sp.Symbol):
                if sizes.setdefault(s.name, dim) != dim:
                    raise ProblemError(f"size {s} is {sizes[s.name]} elsewhere but {dim} in {name}")
    missing = [s for s in der.sizes if s not in sizes]
    if missing:
        raise ProblemError(f"sizes {missing} cannot be read from the data shapes")
    return sizes


def concrete(expr, sizes):
    e = sp.sympify(expr)
    return e.subs({s: sizes[s.name] for s in e.free_symbols if s.name in sizes})


