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

import numpy as np
import sympy as sp

from ...errors import ProblemError
from .interpreter import DenseOnDemand, bind_sizes, concrete, dense_array, operator_matrix

U = 2.0 ** -53
DENSE_LIMIT = 2000  # largest Gram side for eigvalsh


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
            scale = scale * dense_array(data[str(a.base.label)]).astype(float).reshape(-1)
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
