"""Filters: linear maps K = sum_s c_s S_s whose taps c_s are not numbers (docs/constants.md 8).

A filter response `Sum(theta[k] * x[i + k], k)` or `Sum(Kf[f, a, b] * X[i + a, j + b], a, b)`
(numeric tap ranges, summed over the rows whose window lies inside x) unrolls to
sum_s c_s x[I + s] with shifts s and taps c_s that are expressions in theta entries, data
entries and scalar data. Such a map is an in-bounds section of the convolution by c on Z^k, so

    ||K|| <= sup_omega |c^(omega)| <= ||c||_1 = sum_s |c_s|       (Young; every row carries all taps)
    ||k_I|| = ||c||_2 for every row I,   lambda_min(K^T K) >= 0 (trivial),
    dK/dtheta_l = sum_s (dc_s/dtheta_l) S_s, so ||dK/dtheta_l|| <= m_l = sum_s |dc_s/dtheta_l| and
    |(dK/dtheta_l y)_I| <= m_l ||y||_inf.

The bounds are SymPy expressions in the theta entries and the data entries (symbols
`Kf[0, 1, 2]` whose values are read from the data at bind, `evaluation/quantities.py`):
||K||^2 <= min(||c||_1^2, FilterGainSq(shifts, c)), the second the certified frequency-response
bound (`evaluation/spectral.py`), evaluated at each theta (memoised on the tap values).
"""
from __future__ import annotations

import sympy as sp

from ..records import FilterGainSq, Record, qsym
from .operators import OpFacts, collect_taps

# sup over the ball of ||y||_inf, bound at evaluate_local as ||x_c||_inf + r (evaluation/local.py)
XINF = qsym("ball_xinf")


def entry_symbol(name: str, index: tuple) -> sp.Symbol:
    """The symbol of one data entry read by a tap (its value is read at bind)."""
    return sp.Symbol(f"{name}[{', '.join(str(i) for i in index)}]", real=True)


def _coefficient(expr, ctx) -> sp.Expr | None:
    """A tap's coefficient with theta entries and data entries as symbols; None if it reads
    anything else indexed (a symbolic index)."""
    rep = {}
    for ix in expr.atoms(sp.Indexed):
        if not all(e.is_Integer for e in ix.indices):
            return None
        name = str(ix.base.label)
        if name == ctx.th.name:
            rep[ix] = ctx.theta_symbol(ctx.theta_flat(ix))
        elif name == ctx.x.name:
            return None
        else:
            index = tuple(int(e) for e in ix.indices)
            sym = entry_symbol(name, index)
            rep[ix] = sym
            ctx.quantities[sym.name] = {"what": "entry", "array": name, "index": list(index),
                                        "description": f"data entry {sym.name} (a filter tap)"}
    return expr.xreplace(rep)


#: A filter has a handful of taps; unrolling a Sum with literal limits of 2**31 terms would hang
#: the build, so longer literal ranges are left to the operator rules.
MAX_UNROLLED_TAPS = 4096


def _unrolled_terms(lin) -> int:
    """How many terms `doit` would write out for the Sums in `lin` with literal limits (an upper
    estimate: the product over all of them); Sums with symbolic limits stay unexpanded."""
    count = 1
    for term in lin.atoms(sp.Sum):
        for _, low, high in term.limits:
            if low.is_Integer and high.is_Integer:
                count *= max(int(high) - int(low) + 1, 1)
    return count


def unrolled_taps(lin, limits, ctx) -> tuple[tuple, dict] | None:
    """(signature, {shift: coefficient}) of lin = sum_s c_s x[I + s], inner sums unrolled;
    None when lin is not of that form (then no filter rule applies)."""
    syms = [lim[0] for lim in limits]
    if _unrolled_terms(lin) > MAX_UNROLLED_TAPS:
        return None  # a contraction over a long literal range is an operator, not a filter
    try:
        flat = sp.expand(lin.doit())
    except (TypeError, ValueError, NotImplementedError):
        return None
    if flat.has(sp.Sum):
        return None
    reads = []
    for arg in sp.Add.make_args(flat):
        factors = sp.Mul.make_args(arg)
        xs = [f for f in factors if isinstance(f, sp.Indexed) and str(f.base.label) == ctx.x.name]
        if len(xs) != 1:
            return None
        rest = sp.Mul(*[f for f in factors if f is not xs[0]])
        if any(rest.has(s) for s in syms) or ctx.has_x(rest):
            return None
        coeff = _coefficient(rest, ctx)
        if coeff is None:
            return None
        reads.append((xs[0], coeff))
    return collect_taps(reads, syms)


def filter_operator(lin, limits, ctx) -> OpFacts | None:
    """OpFacts of a filter whose taps read theta or data entries (module docstring), with
    `dtaps` = {theta_l: m_l}; None when lin is not a filter."""
    found = unrolled_taps(lin, limits, ctx)
    if found is None:
        return None
    _, taps = found
    coeffs = [taps[k] for k in sorted(taps)]
    l1 = sp.Add(*[sp.Abs(c) for c in coeffs])
    l2 = sp.sqrt(sp.Add(*[c**2 for c in coeffs]))
    theta = set(ctx.theta_syms.values())
    reads_theta = any(c.free_symbols & theta for c in coeffs)
    shifts = sp.Tuple(*[sp.Tuple(*k) for k in sorted(taps)])
    normsq = sp.Min(l1**2, FilterGainSq(shifts, *coeffs))
    how = ("||K||^2 <= min(||c||_1^2 (Young), certified sup_omega |c^(omega)|^2 (frequency "
           "response on a grid plus a curvature margin)), evaluated "
           + ("at each theta" if reads_theta else "once per bind"))
    dtaps = {s: sp.Add(*[sp.Abs(sp.diff(c, s)) for c in coeffs])
             for s in sorted(set().union(*[c.free_symbols for c in coeffs]) & theta,
                             key=lambda s: s.name)}
    text = ", ".join(f"{sp.sstr(v)}@{k}" for k, v in sorted(taps.items()))
    desc = (f"filter (in-bounds convolution section) K = sum_s c_s S_s with taps {text}: {how}; "
            f"rows have norm ||c||_2 = {sp.sstr(l2)}; lambda_min >= 0"
            + (f"; ||dK/d{', '.join(s.name for s in dtaps)}|| <= sum_s |dc_s/dtheta_l| "
               f"(learned taps)" if dtaps else ""))
    rec = Record("operator (filter)", normsq, "bound", True, desc)
    rows = sp.Mul(*[lim[2] - lim[1] + 1 for lim in limits])
    return OpFacts(normsq, sp.S.Zero, l2, False, False, rows, False, rec, "filter", dtaps)


def learned_columns(c, f, op: OpFacts) -> tuple[dict, dict]:
    """The columns of L_B for theta_l in the taps of a learned filter, (global, ball).

    Column l of B is d/dtheta_l [c K^T psi'(K x + b)] = c dK_l^T psi'(u) + c K^T diag(psi''(u)) dK_l x.
    Between x and y in a ball: the first part and c K^T diag(psi''(u(x))) dK_l (x - y) are each
    <= |c| P m_l ||K|| ||x - y|| (P = sup |psi''|); the rest, c K^T (diag psi''(u(x)) - diag
    psi''(u(y))) dK_l y, is <= |c| ||K|| sup|psi'''| ||K (x - y)|| max_I |(dK_l y)_I|
    <= |c| d3 ||K||^2 m_l X_inf ||x - y|| with X_inf = sup ||y||_inf over the ball: finite only on
    a ball when psi''' != 0 (x can grow along the kernel of K while dK_l x grows)."""
    N = op.normsq
    glob, ball = {}, {}
    for s, m in op.dtaps.items():
        first = 2 * sp.Abs(c) * f.peak * m * sp.sqrt(N)
        if f.d3 == 0:
            glob[s] = ball[s] = first
            continue
        glob[s] = sp.oo
        ball[s] = first + sp.Abs(c) * f.d3 * N * m * XINF
    return glob, ball


def stacked_filters(lins, limits, ctx) -> OpFacts | None:
    """Filters D_1..D_k stacked per row (a group atom phi(D_p x), e.g. isotropic TV of learned
    differences): ||D||^2 <= sum_k ||D_k||^2, ||D_p|| <= ||D_p||_F = sqrt(sum_k ||c_k||_2^2), and
    for learned taps ||dD/dtheta_l|| and max_p ||(dD/dtheta_l y)_p|| / ||y||_inf are both
    <= sqrt(sum_k m_kl^2), so `learned_columns` applies with that m_l."""
    ops = [filter_operator(lin, limits, ctx) for lin in lins]
    if any(op is None for op in ops):
        return None
    syms = sorted(set().union(*[op.dtaps for op in ops]), key=lambda s: s.name)
    dtaps = {s: sp.sqrt(sp.Add(*[op.dtaps.get(s, 0) ** 2 for op in ops])) for s in syms}
    normsq = sp.Add(*[op.normsq for op in ops])
    block = sp.sqrt(sp.Add(*[op.rowmax ** 2 for op in ops]))
    rec = Record("operator (stacked filters)", normsq, "bound", True,
                 f"{len(ops)} filters stacked per row: ||D||^2 <= sum_k ||D_k||^2, ||D_p|| <= "
                 f"sqrt(sum_k ||c_k||_2^2); " + "; ".join(op.record.rule for op in ops))
    return OpFacts(normsq, sp.S.Zero, block, False, False, len(ops) * ops[0].rows, False, rec,
                   "stacked filters", dtaps)
