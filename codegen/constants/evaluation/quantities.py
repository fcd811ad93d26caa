"""Data quantities, computed once at bind time (docs/constants.md section 4).

Every operator recorded by `derive` is rebuilt as a matrix from the data (a small NumPy
interpreter of the indexed SymPy expression gives its Jacobian; c_i * Sum(M[i, j] x[j]) keeps M
sparse, and uncopied when |c_i| is constant), Kronecker factors I (x) K reduced to K. ||K||^2 is
certified by the method of `spectral.method_for`: exact Gram eigenvalues plus a rounding margin, a
Cholesky certificate of c I - G, block sums (dense, above the Gram limits) or min(||K||_F^2,
Collatz-Wielandt) (sparse); lambda_min = 0 exactly when K is wide, and 0 above the Gram limits.
Power iteration is only ever an estimate, stored under a separate key and never used in a
constant.
"""
from __future__ import annotations

import math
import time

import numpy as np
import sympy as sp

from ...errors import ProblemError
from ...threads import blas_threads
from . import spectral
from .interpreter import DenseOnDemand, bind_sizes, concrete, dense_array, operator_matrix

U = 2.0 ** -53
UNDERFLOW = 1e-290  # > every absolute error from subnormal results (counts <= 1e10, w >= 1e-8)


def _rows_of(raw, scale, data, sizes, der):
    """(K, f) with K = diag(scale) M / f for lin = scale_i * Sum(M[i, j]*x[j], j) over all of x:
    kept sparse. A row scale of constant modulus (labels +-1, 1/m) is not applied: then K = M and
    f = |scale_i|, since diag(scale) M = f diag(+-1) M has the Gram matrix f^2 M^T M and row norms
    f ||m_i|| (no copy of the data; `scaled_quantities` applies f with its rounding)."""
    M = raw
    if not (M.ndim == 2 and M.shape[1] == int(np.prod([int(concrete(s, sizes)) for s in der.x_shape]))):
        return None
    size = np.abs(scale)
    if size.size and np.all(size == size[0]) and 0 < size[0] < math.inf:
        return (M.astype(np.float64) if hasattr(M, "multiply") else
                np.asarray(M, dtype=np.float64)), float(size[0])
    K = M.multiply(scale[:, None]).tocsr() if hasattr(M, "multiply") else M * scale[:, None]
    return K, 1.0


def scaled_quantities(qs: dict, factor: float) -> dict:
    """The quantities of f K from those of K (f > 0): normsq and lmin times f^2, rowmax times f,
    each rounded outward (a product and a square: 3 roundings, relative 4u covers them)."""
    if factor == 1.0:
        return qs
    out = {}
    for what, q in qs.items():
        q = dict(q)
        power = 1 if what == "rowmax" else 2
        grow = (1 - 4 * U) if what == "lmin" else (1 + 4 * U)
        q["value"] = q["value"] * factor ** power * grow
        if what == "lmin":
            q["value"] = max(0.0, q["value"] - UNDERFLOW)
        elif what != "normsq:estimate" and q["value"] != 0.0:  # K = 0 stays exactly 0
            q["value"] += UNDERFLOW
        q["method"] = f"{q['method']}; times the row scale {factor:.6g} (power {power})"
        out[what] = q
    return out


def simple_operator(op, der, data, sizes, scalars):
    """A sparse-friendly path for the common lin = c_i * Sum(M[i, j]*x[j], (j, 0, n - 1)): (K, f)
    as in `_rows_of`, or None."""
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


QUANTITY_KINDS = ("normsq", "lmin", "rowmax")


def operator_quantities(K, K3, estimates: bool = False, needed=QUANTITY_KINDS,
                        tight: bool = False, workers: int = 1, keep: dict | None = None) -> dict:
    """Certified normsq, lmin, rowmax of K (only the kinds in `needed`; + a power-iteration
    estimate if asked; `tight`: the Gram matrix up to LMIN_FLOP_LIMIT, as for step sizes). Each
    entry says which method certified it and how long it took. `keep`: receives K^T K under
    "gram" where it was formed in float64 from a K with at least as many rows as columns."""
    start = time.perf_counter()
    R, D = K.shape
    spectral_wanted = "normsq" in needed or "lmin" in needed
    sums = _tall_block_sums(K, "lmin" in needed, tight, workers) if spectral_wanted else None
    rowsq = sums.diagonal if sums is not None else _row_squares(K)
    fro2 = float(rowsq.sum()) * (1 + 2 * (R * D + 2) * U)  # a sum of non-negative terms
    if not fro2 > 0 and not (K.count_nonzero() if hasattr(K, "count_nonzero") else np.any(K)):
        return {w: {"value": 0.0, "method": "K = 0", "certified": True} for w in needed}
    res = {}
    if not math.isfinite(fro2):  # overflow or non-finite data: only the trivial bounds hold
        res = {"normsq": {"value": math.inf, "certified": True, "method": "||K||_F overflows"},
               "lmin": {"value": 0.0, "certified": True, "method": "trivial lower bound 0"}}
    elif spectral_wanted:
        res.update(_spectral(K, fro2, "lmin" in needed, tight, workers, sums, keep))
    for what in [w for w in res if w not in needed]:
        del res[what]
    if "rowmax" in needed:
        res["rowmax"] = _rowmax(K, K3, rowsq)
    if estimates:
        res["normsq:estimate"] = _power_estimate(K)
    seconds = time.perf_counter() - start
    for what, q in res.items():
        q["seconds"] = seconds
        if what == "normsq":  # absolute rounding below the normal range (underflow)
            q["value"] += UNDERFLOW
        elif what == "lmin":
            q["value"] = max(0.0, q["value"] - UNDERFLOW)
        if math.isnan(q["value"]):  # never a certified NaN: the trivial bound instead
            q.update(value=0.0 if what == "lmin" else math.inf,
                     certified=what != "normsq:estimate",
                     method=q["method"] + " gave NaN: trivial bound")
    return res


def _tall_block_sums(K, want_lmin: bool, tight: bool, workers: int) -> spectral.BlockSums | None:
    """The block sums of `_spectral` computed first, when ||K||^2 takes them on a dense K with
    at least as many rows as columns: their Grams' diagonals are the squared row norms, so the
    pass over K for ||K||_F^2 and rowmax is saved (16 of 85 ms of a 20000 x 2000 logistic
    bind's constants). None otherwise, or when a Gram overflows (the caller's checks of
    ||K||_F^2 then decide, as without them)."""
    R, D = K.shape
    if hasattr(K, "toarray") or R < D or spectral.method_for(
            R, D, want_lmin=want_lmin, tight=tight) != "blocks":
        return None
    return spectral.block_sums(K, workers=workers)


def _row_squares(K) -> np.ndarray:
    """||k_i||^2 of every row (sparse or dense), without a temporary the size of K."""
    if hasattr(K, "toarray"):
        return np.asarray(K.multiply(K).sum(axis=1), dtype=float).reshape(-1)
    return np.einsum("ij,ij->i", K, K)


def _rowmax(K, K3, rowsq: np.ndarray) -> dict:
    """max_I ||K_I||: the largest row norm, or the largest per-sample block Frobenius norm."""
    R, D = K.shape
    if K3 is not None and K3.shape[1] > 1:
        sq = float(np.max(np.einsum("irj,irj->i", K3, K3)))
        how, width = "max per-sample block Frobenius norm", K3.shape[1] * D
    else:
        sq = float(rowsq.max(initial=0.0))
        how, width = "max row norm (exact, + rounding margin)", D
    if sq < 1e-280:  # the squares may have underflowed: ||k||_2 <= sqrt(width) max |k_j| instead
        top = float(abs(K).max())
        return {"value": top * math.sqrt(width) * (1 + 4 * U), "certified": True,
                "method": "sqrt(entries per block) max |K_ij| (squares underflow)"}
    return {"value": math.sqrt(sq) * (1 + 2 * (R + D) * U), "certified": True, "method": how}


def _spectral(K, fro2: float, want_lmin: bool, tight: bool = False, workers: int = 1,
              sums: spectral.BlockSums | None = None, keep: dict | None = None) -> dict:
    """normsq (and lmin) of K by the method of `spectral.method_for` (eigvalsh where lmin is
    wanted and the Gram matrix is formed anyway); `sums`: the block sums, already computed;
    `keep` as in `operator_quantities`."""
    R, D = K.shape
    method = spectral.method_for(R, D, sparse=hasattr(K, "toarray"), want_lmin=want_lmin,
                                 tight=tight)
    wide = {"value": 0.0, "certified": True, "wide": True,
            "method": f"exact: K is wide ({R} rows < {D} columns)"}
    trivial = {"value": 0.0, "certified": True, "method": "trivial lower bound 0", "wide": R < D}
    if method == "nnz":
        cw, passes = spectral.collatz_wielandt(K)
        val, how = (fro2, "||K||_F^2") if fro2 <= cw else (
            cw, f"Collatz-Wielandt bound of |K|^T |K| ({passes} products |K|^T |K| w)")
        return {"normsq": {"value": val, "certified": True,
                           "method": f"{how}, O(nnz): above the Gram limits (min of "
                                     f"||K||_F^2 = {fro2:.6g} and the Collatz-Wielandt bound "
                                     f"{cw:.6g}) + rounding margin"},
                "lmin": trivial}
    if method == "blocks":
        if sums is None:
            bound, blocks, size = spectral.block_sum_bound(K, fro2, workers=workers)
        else:
            bound, blocks, size = spectral.block_bound(sums, fro2), sums.blocks, sums.size
        how = "||K||_F^2" if fro2 <= bound else (
            f"sum of ||K_b||^2 over {blocks} blocks of {size} "
            f"{'rows' if R >= D else 'columns'} (eigvalsh of each block's Gram)")
        return {"normsq": {"value": min(fro2, bound), "certified": True, "loose": True,
                           "flops": 2 * R * D * size + 4 * blocks * size ** 3 // 3,
                           "method": f"{how}: above the Gram limits (min of ||K||_F^2 = "
                                     f"{fro2:.6g} and the block sum {bound:.6g}) + rounding "
                                     f"margin"},
                "lmin": trivial}
    return _gram_spectral(K, fro2, method, want_lmin and R >= D, wide if R < D else trivial,
                          workers, keep)


def _gram_spectral(K, fro2: float, method: str, lmin_read: bool, no_lmin: dict,
                   workers: int = 1, keep: dict | None = None) -> dict:
    """normsq (and lmin if `lmin_read`) from a Gram matrix G: where lmin is not read and G's side
    is above CERTIFY_SIDE (or method is "cholesky"), the Cholesky certificate of c I - G, G in
    float32 blocks where `spectral.gram32` allows (docs/constants.md 4); else eigvalsh.
    `no_lmin`: the lmin entry when lmin is not read (0, or exactly 0 for a wide K); `keep` as in
    `operator_quantities`."""
    R, D = K.shape
    n = min(R, D)
    certify = (method == "cholesky" or n > spectral.CERTIFY_SIDE) and not lmin_read
    fast = None
    if certify:
        fast = None if hasattr(K, "toarray") else spectral.gram32(K, fro2, workers)
        G = fast[0] if fast else _gram64(K, workers)
        if not fast and keep is not None and R >= D:
            keep["gram"] = G
        estimate = spectral.lanczos_max(G)
        found = spectral.cholesky_certificate(G, estimate)
        if found is not None:
            bound, tries = found
            if fast:
                value = spectral.lift(bound, fast[1], fast[2])
                how = f"float32 Gram by blocks of {spectral.GRAM32_ROWS} rows, margin {fast[1]:.2e}"
            else:
                margin = spectral.gram_margin(R, D, fro2)
                value, how = bound + margin, f"margin {margin:.2e}"
            flops = spectral.gram_flops(R, D) + spectral.certificate_flops(n, tries)
            return {"normsq": {"value": value, "certified": True, "flops": flops,
                               "method": f"Cholesky certificate of c I - G for the {n}x{n} Gram "
                                         f"matrix (c from a Lanczos estimate {estimate:.6g}, "
                                         f"{tries} factorisation(s)); {how}"},
                    "lmin": no_lmin}
    both = method == "cholesky" and lmin_read  # a side above EIGH_SIDE_LIMIT, lmin read
    if both:
        G = _gram64(K, workers)
        if keep is not None:
            keep["gram"] = G
        ends = _certified_ends(G, R, D, fro2, workers)
        if ends is not None:
            return ends
    if fast is not None or not (certify or both):
        G = _gram64(K, workers)  # no certificate tried, or it failed on the float32 Gram
        if keep is not None and R >= D:
            keep["gram"] = G
    margin = spectral.gram_margin(R, D, fro2)
    with blas_threads(workers if n >= spectral.THREADED_SIDE else 1):
        ev = np.linalg.eigvalsh(G)
    flops = spectral.gram_flops(R, D) * (2 if fast else 1) + 4 * n ** 3 // 3
    out = {"normsq": {"value": float(ev[-1]) + margin, "certified": True, "flops": flops,
                      "method": f"eigvalsh of the {n}x{n} Gram matrix + margin {margin:.2e}"}}
    out["lmin"] = no_lmin if not lmin_read else {
        "value": max(0.0, float(ev[0]) - margin), "certified": True,
        "method": f"eigvalsh of the {D}x{D} Gram matrix - margin {margin:.2e}"}
    return out


def _certified_ends(G: np.ndarray, R: int, D: int, fro2: float, workers: int) -> dict | None:
    """normsq and lmin of K from its float64 Gram matrix G by two Cholesky certificates,
    c I - G and G - s I, c and s from one Lanczos run's two ends (docs/constants.md 4): two
    factorisations instead of an eigensolve (at 2000 x 2000 about 0.15 s against 0.4). None if
    either certificate fails (the caller's eigvalsh then gives both)."""
    n = G.shape[0]
    with blas_threads(workers if n >= spectral.THREADED_SIDE else 1):
        low, high = spectral.lanczos_ends(G)
        top = spectral.cholesky_certificate(G, high)
        floor = None if top is None else spectral.cholesky_floor(G, low)
    if top is None or floor is None:
        return None
    margin = spectral.gram_margin(R, D, fro2)
    flops = spectral.gram_flops(R, D) + spectral.certificate_flops(n, top[1] + floor[1])
    return {"normsq": {"value": top[0] + margin, "certified": True, "flops": flops,
                       "method": f"Cholesky certificate of c I - G for the {n}x{n} Gram matrix "
                                 f"(c from a Lanczos estimate {high:.6g}, {top[1]} "
                                 f"factorisation(s)); margin {margin:.2e}"},
            "lmin": {"value": max(0.0, floor[0] - margin), "certified": True,
                     "method": f"Cholesky certificate of G - s I for the {n}x{n} Gram matrix "
                               f"(s from the same Lanczos run's estimate {low:.6g}"
                               f"{'' if floor[1] == 1 else ', refined by Lanczos on G^-1'}, "
                               f"{floor[1]} factorisation(s)) - margin {margin:.2e}"}}


def _gram64(K, workers: int = 1) -> np.ndarray:
    """The smaller Gram matrix K^T K or K K^T in float64, dense: sparse K by one product;
    dense K by blocks of `spectral.GRAM64_ROWS` rows on up to `workers` Python threads
    (`spectral.summed_grams`), or from a side of `spectral.THREADED_SIDE` by one product on
    `workers` BLAS threads (NumPy's matmul takes syrk for the transposed operand: half a
    general product's flops)."""
    if hasattr(K, "toarray"):
        G = K.T @ K if K.shape[0] >= K.shape[1] else K @ K.T
        return G.toarray() if hasattr(G, "toarray") else np.asarray(G)
    long_side = K if K.shape[0] >= K.shape[1] else K.T
    if long_side.shape[1] >= spectral.THREADED_SIDE:
        with blas_threads(workers):
            return np.asarray(long_side.T @ long_side)
    return spectral.summed_grams(long_side, spectral.GRAM64_ROWS, np.float64, workers)


def _power_estimate(K) -> dict:
    """20 power steps on K^T K: an estimate from below, never used in a constant."""
    rng = np.random.default_rng(0)
    v = rng.standard_normal(K.shape[1])
    lam = 0.0
    for _ in range(20):
        w = K.T @ (K @ v)
        lam = float(np.linalg.norm(w) / max(np.linalg.norm(v), 1e-300))
        v = w / max(np.linalg.norm(w), 1e-300)
    return {"value": lam, "certified": False,
            "method": "power iteration, 20 steps (estimate from below)"}


def loose_quantities(quantities: dict) -> list:
    """The ||K||^2 entries a Gram matrix would tighten (block sums: up to min(R, D)/32 times
    ||K||^2), which `compute_data_quantities(..., tight=True)` recomputes."""
    return [k for k, q in quantities.items() if q.get("loose")]


def needed_quantities(derivation) -> set:
    """The data-quantity symbols some constant (global or ball) reads: only these are computed
    at bind (mu's among them, so the bind-time check of mu > 0 has what it needs)."""
    records = list(derivation.constants.values()) + list(
        (derivation.ball or {}).get("constants", {}).values())
    return {s.name for rec in records for r in rec.walk() for s in r.expr.free_symbols}


def compute_data_quantities(derivation, data: dict, estimates: bool = False,
                            lazy: bool = True, tight: bool = False,
                            operators: set | None = None, workers: int = 1,
                            grams: dict | None = None) -> dict:
    """name -> {"value", "method", "certified", ...} for sizes, scalar data and data quantities;
    with `lazy`, only the quantities some constant reads (an operator none reads is not even
    built); with `tight`, ||K||^2 by the Gram matrix up to LMIN_FLOP_LIMIT instead of block sums
    (first-order step sizes: `runtime.tighten_constants`, which passes the names of the
    `operators` to recompute: the others are skipped). Gram matrices and block sums run on up
    to `workers` threads, with the same bits for every `workers` (`threads.in_threads`).
    `grams`: {name: None} for bound data matrices M whose Gram matrix the caller would reuse
    (the direct solvers' least-squares Hessian: hypergrad/gram.py); M^T M in float64,
    read-only, replaces None where some operator is M as it stands and its Gram matrix was
    formed here."""
    der = derivation
    needed = needed_quantities(der) if lazy else None
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
    out.update(_filter_entries(der, arrays, needed))
    seen: dict = {}  # the quantities of one data matrix, for every operator that is it
    for name, op in der.operators.items():
        kinds = tuple(w for w in QUANTITY_KINDS if needed is None or f"{w}_{name}" in needed)
        if (not kinds and not estimates) or (operators is not None and name not in operators):
            continue
        shape, var = (der.x_shape, der.x_name) if op.var == "x" else (der.theta_shape, der.theta_name)
        var_shape = tuple(int(concrete(s, sizes)) for s in shape)
        scaled = simple_operator(op, der, data, sizes, scalars) if op.block <= 1 else None
        factor = 1.0
        if scaled is not None:
            K, factor = scaled
            K3 = None if hasattr(K, "toarray") else K[:, None, :]
        else:
            K, K3 = operator_matrix(op, sizes, scalars, arrays, var, var_shape)
        if K is None:
            qs = {w: {"value": math.inf if w != "lmin" else 0.0, "certified": True,
                      "method": "operator too large to form densely: trivial bound"}
                  for w in kinds}
        else:
            keep: dict = {}
            qs = scaled_quantities(_shared(seen, K, K3, estimates, kinds, tight, workers, keep),
                                   factor)
            _keep_gram(grams, keep, K, data)
        for what, q in qs.items():
            key = f"{what}_{name}" if ":" not in what else f"normsq_{name}:estimate"
            q = dict(q)
            q["description"] = der.quantities.get(f"{what}_{name}", {}).get("description", what)
            out[key] = q
    _check_mu(der, out, sizes)
    return out


def _keep_gram(grams: dict | None, keep: dict, K, data: dict) -> None:
    """grams[name] = the Gram matrix in `keep`, for a name of `grams` that is the bound array K."""
    if grams is None or "gram" not in keep:
        return
    for name in grams:
        if data.get(name) is K:
            G = keep["gram"]
            G.flags.writeable = False
            grams[name] = G


def _shared(seen: dict, K, K3, estimates: bool, kinds: tuple, tight: bool,
            workers: int = 1, keep: dict | None = None) -> dict:
    """operator_quantities(K, ...), each kind computed once per matrix object: two operators that
    are the same data matrix up to a row scale of constant modulus (`simple_operator`: K is the
    bound array itself, as in y_i A x and A x - b) share one Gram matrix; a later operator
    computes only the kinds not yet there. K is kept in `seen` so that its id is not reused.
    `keep` as in `operator_quantities`."""
    key = (id(K), estimates, tight, K3 is None or K3.shape[1] == 1)
    _, have = seen.setdefault(key, (K, {}))
    missing = tuple(w for w in kinds if w not in have)
    if missing or (estimates and "normsq:estimate" not in have):
        have.update(operator_quantities(K, K3, estimates, missing, tight, workers, keep))
    return {w: dict(q) for w, q in have.items() if w in kinds or ":" in w}


def _filter_entries(der, arrays, needed) -> dict:
    """The data entries a filter's taps read (derivation/filters.py), from the bound data."""
    out = {}
    for name, q in der.quantities.items():
        if q.get("what") != "entry" or (needed is not None and name not in needed):
            continue
        value = float(np.asarray(arrays[q["array"]])[tuple(q["index"])])
        out[name] = {"value": value, "method": "data entry (a filter tap)", "certified": True,
                     "description": q["description"]}
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
                f"so g is constant along their common kernel; terms: {terms}. "
                f"Add a strongly convex term such as {der.ridge_term}")
    msg = (f"strong convexity unknown for this data: mu = {sp.sstr(mu)} evaluates to {val} "
           f"(a rank-deficient operator?). Add a strongly convex term such as {der.ridge_term}")
    if not der.allow_uncertified:
        raise ProblemError(msg)
