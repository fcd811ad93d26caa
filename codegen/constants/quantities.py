"""Data quantities, computed once at bind time (constants.md section 4).

Every operator recorded by `derive` is rebuilt as a dense matrix from the data (a small NumPy
interpreter of the indexed SymPy expression gives its Jacobian), Kronecker factors I (x) K
reduced to K. Certified: exact eigenvalues of the smaller Gram matrix plus a rounding margin
(forming the Gram: gamma_R ||K||_F^2; eigvalsh: a backward error of 10 D u ||G||), else the
certified bound min(||K||_F^2, ||K||_1 ||K||_inf); lambda_min = 0 exactly when K is wide. Power
iteration is only ever an estimate, stored under a separate key and never used in a constant.
"""
from __future__ import annotations

import math
import string
from collections.abc import Mapping

import numpy as np
import sympy as sp

from ..errors import ProblemError
from ..primitives import sigmoid, softplus

U = 2.0 ** -53
DENSE_LIMIT = 2000  # largest Gram side for eigvalsh
ENTRY_LIMIT = 5e7  # largest dense operator (entries)

_UFUNCS = {sp.exp: np.exp, sp.log: np.log, sp.sin: np.sin, sp.cos: np.cos, sp.tan: np.tan,
           sp.sinh: np.sinh, sp.cosh: np.cosh, sp.tanh: np.tanh, sp.atan: np.arctan,
           sp.asinh: np.arcsinh, sp.Abs: np.abs, sigmoid: lambda z: 0.5 * (1 + np.tanh(z / 2)),
           softplus: lambda z: np.logaddexp(0.0, z)}


class _Env:
    def __init__(self, sizes, scalars, arrays, var, vshape):
        self.sizes, self.scalars, self.arrays = sizes, scalars, arrays
        self.var, self.vshape = var, vshape
        self.D = int(np.prod(vshape))


def _expand(arr, axes, target, jac):
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


def _ev(expr, env, E: _Env):
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
        return _contract([_ev(a, env, E) for a in expr.args], (), {})
    if expr.is_Add:
        return _ev_add([_ev(a, env, E) for a in expr.args])
    if expr.is_Pow:
        b, e = _ev(expr.base, env, E), _ev(expr.exp, env, E)
        if b[2] or e[2]:
            if expr.exp == 1:
                return b
            raise ProblemError(f"operator is not linear: {expr}")
        axes = _union([b, e])
        with np.errstate(all="ignore"):
            return axes, _expand(b[1], b[0], axes, False) ** _expand(e[1], e[0], axes, False), False
    fn = _UFUNCS.get(type(expr))
    if fn is not None and len(expr.args) == 1:
        a = _ev(expr.args[0], env, E)
        if a[2]:
            raise ProblemError(f"operator is not linear: {expr}")
        return a[0], fn(a[1]), False
    raise ProblemError(f"cannot evaluate {expr} ({type(expr).__name__}) in an operator")


def _int(expr, E):
    v = sp.sympify(expr)
    v = v.subs({s: E.sizes[s.name] for s in v.free_symbols if s.name in E.sizes})
    return int(v)


def _sum(body, limits, env, E):
    env2 = dict(env)
    counts = {}
    for s, lo, hi in limits:
        rng = np.arange(_int(lo, E), _int(hi, E) + 1)
        env2[s] = rng
        counts[s] = rng.size
    if body.is_Add:
        parts = [_sum(a, limits, env, E) for a in body.args]
        return _ev_add(parts)
    factors = list(body.args) if body.is_Mul else [body]
    contract = tuple(s for s, _, _ in limits)
    reads = [a for a in factors if isinstance(a, sp.Indexed) and str(a.base.label) == E.var]
    if len(reads) == 1:  # linear in x: scatter the data into the Jacobian, no dense one-hot
        others = [_ev(a, env2, E) for a in factors if a is not reads[0]]
        if not any(p[2] for p in others):
            position = factors.index(reads[0])
            return _scatter_contract(others, position, reads[0], env2, E, contract, counts)
    return _contract([_ev(a, env2, E) for a in factors], contract, counts)


def _scatter_contract(others, position, read, env, E, contract, counts):
    """sum over `contract` of (data parts) * x[read]: the Jacobian built by scattering the data
    values into the columns the read addresses. Same result as `_contract` with the dense
    one-hot of `_indexed`, whose size (index space x D) made large operators slow."""
    idx = [_ev(e, env, E) for e in read.indices]
    r_axes = _union(idx)
    arrs = [_expand(a.astype(np.int64), ax, r_axes, False) for ax, a, _ in idx]
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
    vals, cols = _expand(o_arr, o_axes, axes, False), _expand(flat, r_axes, axes, False)
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
    exp = [_expand(arr, ax, axes, j) for ax, arr, j in use]
    shape = np.broadcast_shapes(*[a.shape for a in exp])
    return axes, np.broadcast_to(sum(exp), shape).copy(), bool(jparts)


def _indexed(expr, env, E):
    name = str(expr.base.label)
    idx = [_ev(e, env, E) for e in expr.indices]
    axes = _union(idx)
    arrs = [_expand(a.astype(np.int64), ax, axes, False) for ax, a, _ in idx]
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
    E = _Env(sizes, scalars, arrays, var_name, vshape)
    env, row_shape = {}, []
    for s, lo, hi in op.limits:
        rng = np.array([0]) if s in op.reduce else np.arange(_int(lo, E), _int(hi, E) + 1)
        env[s] = rng
        row_shape.append(rng.size)
    if np.prod(row_shape) * E.D > ENTRY_LIMIT:
        return None, None
    axes, arr, jac = _ev(op.lin, env, E)
    rows = tuple(s for s, _, _ in op.limits)
    if not jac:
        arr = np.zeros(tuple(row_shape) + (E.D,))
    else:
        extra = [a for a in axes if a not in rows]
        if extra:
            raise ProblemError(f"operator {op.name}: free index {extra[0]} is not a row index")
        arr = np.broadcast_to(_expand(arr, axes, rows, True), tuple(row_shape) + (E.D,))
    K = np.ascontiguousarray(arr).reshape(-1, E.D)
    nb = int(np.prod(row_shape[:op.block])) if op.block else K.shape[0]
    return K, K.reshape(nb, -1, E.D)


def _rows_of(raw, scale, data, sizes, der):
    """K = diag(scale) M for lin = scale_i * Sum(M[i, j]*x[j], j) over all of x: kept sparse."""
    M = raw
    if not (M.ndim == 2 and M.shape[1] == int(np.prod([int(concrete(s, sizes)) for s in der.x_shape]))):
        return None
    K = M.multiply(scale[:, None]).tocsr() if hasattr(M, "multiply") else M * scale[:, None]
    return K


def simple_operator(op, der, data, sizes, scalars):
    """A sparse-friendly path for the common lin = c_i * Sum(M[i, j]*x[j], (j, 0, n - 1))."""
    if len(op.limits) != 1 or op.var != "x" or len(der.x_shape) != 1 or op.reduce:
        return None
    i, lo, hi = op.limits[0]
    factors = list(op.lin.args) if op.lin.is_Mul else [op.lin]
    sums = [a for a in factors if isinstance(a, sp.Sum)]
    if len(sums) != 1 or len(sums[0].limits) != 1:
        return None
    body, (j, jlo, jhi) = sums[0].function, sums[0].limits[0]
    if jlo != 0 or sp.simplify(jhi - der.x_shape[0] + 1) != 0 or lo != 0:
        return None
    args = list(body.args) if body.is_Mul else [body]
    xs = [a for a in args if isinstance(a, sp.Indexed) and str(a.base.label) == der.x_name]
    ms = [a for a in args if a not in xs]
    if len(xs) != 1 or xs[0].indices != (j,) or len(ms) != 1 or not isinstance(ms[0], sp.Indexed) \
            or ms[0].indices != (i, j) or str(ms[0].base.label) not in data:
        return None
    raw = data[str(ms[0].base.label)]
    rows = int(concrete(hi, sizes)) + 1
    if raw.shape[0] != rows:
        return None
    scale = np.ones(rows)
    for a in factors:
        if a is sums[0]:
            continue
        if a.is_Number:
            scale = scale * float(a)
        elif isinstance(a, sp.Indexed) and a.indices == (i,) and str(a.base.label) in data:
            scale = scale * _dense(data[str(a.base.label)]).astype(float).reshape(-1)
        else:
            return None
    return _rows_of(raw, scale, data, sizes, der)


def operator_quantities(K, K3, estimates=False):
    """Certified normsq, lmin, rowmax of K (+ a power-iteration estimate if asked)."""
    R, D = K.shape
    if hasattr(K, "toarray"):  # sparse K (one row per sample): Gram matrices through sparse products
        return _sparse_quantities(K, estimates)
    fro2 = float(np.sum(K * K))
    res = {}
    if fro2 == 0.0:
        z = {"value": 0.0, "method": "K = 0", "certified": True}
        return {"normsq": dict(z), "lmin": dict(z), "rowmax": dict(z)}
    if min(R, D) <= DENSE_LIMIT:
        G = K.T @ K if R >= D else K @ K.T
        ev = np.linalg.eigvalsh(G)
        margin = (max(R, D) + 10 * min(R, D) + 10) * U * fro2 * 1.01  # Gram rounding + eigvalsh
        res["normsq"] = {"value": float(ev[-1]) + margin, "certified": True,
                         "method": f"eigvalsh of the {G.shape[0]}x{G.shape[0]} Gram matrix "
                                   f"+ margin {margin:.2e}"}
        if R >= D:
            res["lmin"] = {"value": max(0.0, float(ev[0]) - margin), "certified": True,
                           "method": f"eigvalsh of the {D}x{D} Gram matrix - margin {margin:.2e}"}
        else:
            res["lmin"] = {"value": 0.0, "certified": True,
                           "method": f"exact: K is wide ({R} rows < {D} columns)", "wide": True}
    else:
        n1 = float(np.abs(K).sum(axis=0).max())
        ninf = float(np.abs(K).sum(axis=1).max())
        val, how = (fro2, "||K||_F^2") if fro2 <= n1 * ninf else (n1 * ninf, "||K||_1 ||K||_inf")
        res["normsq"] = {"value": val * (1 + 4 * (R + D) * U), "certified": True,
                         "method": f"{how} (too large for eigvalsh) + rounding margin"}
        res["lmin"] = {"value": 0.0, "certified": True, "method": "trivial lower bound 0",
                       "wide": R < D}
    blk = np.sqrt(np.max(np.sum(K3 * K3, axis=(1, 2))))
    res["rowmax"] = {"value": float(blk) * (1 + 2 * (R + D) * U), "certified": True,
                     "method": "max per-sample block Frobenius norm" if K3.shape[1] > 1
                     else "max row norm (exact, + rounding margin)"}
    if estimates:
        rng = np.random.default_rng(0)
        v = rng.standard_normal(D)
        lam = 0.0
        for _ in range(20):
            w = K.T @ (K @ v)
            lam = float(np.linalg.norm(w) / max(np.linalg.norm(v), 1e-300))
            v = w / max(np.linalg.norm(w), 1e-300)
        res["normsq:estimate"] = {"value": lam, "certified": False,
                                  "method": "power iteration, 20 steps (estimate from below)"}
    return res


def _dense(value):
    """NumPy view of a data value; scipy.sparse matrices are densified (norms need dense)."""
    return np.asarray(value.toarray() if hasattr(value, "toarray") else value)


class DenseOnDemand(Mapping):
    """The data arrays as dense float64, each converted on first use only: a large sparse
    matrix that no dense operator needs is never densified (20000 x 100000 would be 16 GB)."""

    def __init__(self, data: dict, names):
        self._data, self._names, self._dense = data, [n for n in names if n in data], {}

    def __getitem__(self, name):
        if name not in self._dense:
            if name not in self._names:
                raise KeyError(name)
            self._dense[name] = _dense(self._data[name]).astype(np.float64)
        return self._dense[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def _sparse_quantities(K, estimates):
    R, D = K.shape
    sq = K.multiply(K)
    fro2 = float(sq.sum())
    if fro2 == 0.0 or min(R, D) > DENSE_LIMIT:
        Kd_rows = np.asarray(sq.sum(axis=1)).reshape(-1)
        n1 = float(abs(K).sum(axis=0).max())
        ninf = float(abs(K).sum(axis=1).max())
        val = min(fro2, n1 * ninf) * (1 + 4 * (R + D) * U)
        return {"normsq": {"value": val, "certified": True,
                           "method": "min(||K||_F^2, ||K||_1 ||K||_inf) (sparse) + margin"},
                "lmin": {"value": 0.0, "certified": True, "method": "trivial lower bound 0",
                         "wide": R < D},
                "rowmax": {"value": float(np.sqrt(Kd_rows.max(initial=0.0))) * (1 + 2 * (R + D) * U),
                           "certified": True, "method": "max row norm (sparse)"}}
    G = (K.T @ K if R >= D else K @ K.T).toarray()
    dense = {}
    ev = np.linalg.eigvalsh(G)
    margin = (max(R, D) + 10 * min(R, D) + 10) * U * fro2 * 1.01
    dense["normsq"] = {"value": float(ev[-1]) + margin, "certified": True,
                       "method": f"eigvalsh of the {G.shape[0]}x{G.shape[0]} Gram matrix (sparse "
                                 f"product) + margin {margin:.2e}"}
    dense["lmin"] = ({"value": max(0.0, float(ev[0]) - margin), "certified": True,
                      "method": "eigvalsh of the Gram matrix - margin"} if R >= D else
                     {"value": 0.0, "certified": True, "wide": True,
                      "method": f"exact: K is wide ({R} rows < {D} columns)"})
    rows = np.asarray(sq.sum(axis=1)).reshape(-1)
    dense["rowmax"] = {"value": float(np.sqrt(rows.max())) * (1 + 2 * (R + D) * U),
                       "certified": True, "method": "max row norm (sparse, + rounding margin)"}
    if estimates:
        dense["normsq:estimate"] = {"value": float(ev[-1]), "certified": False,
                                    "method": "eigvalsh without margin (estimate)"}
    return dense


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


def compute_data_quantities(derivation, data: dict, estimates: bool = False) -> dict:
    """name -> {"value", "method", "certified", ...} for sizes, scalar data and data quantities."""
    der = derivation
    sizes = bind_sizes(der, data)
    out = {k: {"value": v, "method": "array shape", "certified": True} for k, v in sizes.items()}
    scalars = {}
    for name in der.scalars:
        val = float(np.asarray(data[name]))
        scalars[name] = val
        out[name] = {"value": val, "method": "scalar data", "certified": True}
    for sym, msg in der.conditions:
        name = str(sym)
        if not scalars.get(name, 0.0) > 0:
            raise ProblemError(f"{msg}; got {name} = {scalars.get(name)}")
    arrays = DenseOnDemand(data, [k for k, shape in der.data_shapes.items() if shape])
    for name, op in der.operators.items():
        shape, var = (der.x_shape, der.x_name) if op.var == "x" else (der.theta_shape, der.theta_name)
        var_shape = tuple(int(concrete(s, sizes)) for s in shape)
        K = simple_operator(op, der, data, sizes, scalars) if op.block <= 1 else None
        if K is not None:
            K3 = None if hasattr(K, "toarray") else K[:, None, :]
        else:
            K, K3 = operator_matrix(op, sizes, scalars, arrays, var, var_shape)
        if K is None:
            qs = {w: {"value": math.inf if w != "lmin" else 0.0, "certified": True,
                      "method": "operator too large to form densely: trivial bound"}
                  for w in ("normsq", "lmin", "rowmax")}
        else:
            qs = operator_quantities(K, K3, estimates)
        for what, q in qs.items():
            key = f"{what}_{name}" if ":" not in what else f"normsq_{name}:estimate"
            q = dict(q)
            q["description"] = der.quantities.get(f"{what}_{name}", {}).get("description", what)
            out[key] = q
    _check_mu(der, out, sizes)
    return out


def _check_mu(der, quantities, sizes):
    """mu that rests on data (lambda_min of an operator) must be > 0 for this data."""
    if der.mu_check != "data":
        return
    mu = der.constants["mu"].expr
    vals = {s: quantities[s.name]["value"] for s in mu.free_symbols if s.name in quantities}
    val = sp.sympify(mu).subs(vals)
    if not (val.is_number and val <= 0):
        return
    if der.refutation is not None:
        rows = [(t, int(concrete(r, sizes))) for t, r in der.refutation["rows"]]
        dim = int(concrete(der.refutation["dim"], sizes))
        if sum(r for _, r in rows) < dim:
            terms = "; ".join(f"{t} ({r} rows)" for t, r in rows)
            raise ProblemError(
                f"refuted: g is not strongly convex for this data: every x-dependence goes "
                f"through linear maps with {sum(r for _, r in rows)} rows in total < dim x = {dim}, "
                f"so g is constant along their common kernel; terms: {terms}. Add a strongly "
                f"convex term such as (exp(theta)/2)*Sum(x[j]**2, j)")
    msg = (f"strong convexity unknown for this data: mu = {sp.sstr(mu)} evaluates to {val} "
           f"(a rank-deficient operator?). Add a strongly convex term such as "
           f"(exp(theta)/2)*Sum(x[j]**2, j)")
    if not der.allow_uncertified:
        raise ProblemError(msg)
