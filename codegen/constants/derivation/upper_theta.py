"""L_ft, the Lipschitz constant in x of grad_theta f, for one term c psi(K x + b) of f
(docs/constants.md 3.9): theta in the offset of a quadratic atom, or in the coefficient alone."""
from __future__ import annotations

import sympy as sp

from .operators import classify_operator, summands


def upper_theta_lipschitz(c, ps, f, op, off, ctx, limits):
    """Lipschitz constant in x of grad_theta f for one term of f (L_ft): theta in the offset of
    a quadratic atom, or in the coefficient alone (docs/constants.md 3.9)."""
    theta = c.free_symbols & set(ctx.theta_syms.values())
    if ps is None and not theta and f.d3 == 0 and f.lo == f.hi and ctx.has_theta(off):
        lin_t, rest = _split_theta(off, ctx)
        if ctx.has_theta(rest):
            return sp.oo
        opt = classify_operator(lin_t, limits, 0, ctx, var="theta", lse=True)
        return sp.Abs(c) * sp.Abs(f.hi) * sp.sqrt(op.normsq) * sp.sqrt(opt.normsq)
    if (ps is None and theta and not ctx.has_theta(off) and f.dth == {} and f.d1 != sp.oo
            and op.rows is not None):
        # grad_theta (c(theta) sum_i psi(k_i x + b_i)) = grad c(theta) F(x), and F is Lipschitz
        # with sup ||K^T psi'(K x + b)|| <= ||K|| sqrt(rows) sup|psi'|
        grad_c = sp.sqrt(sp.Add(*[sp.diff(c, s) ** 2 for s in sorted(theta, key=str)]))
        return grad_c * f.d1 * sp.sqrt(op.normsq) * sp.sqrt(op.rows)
    return sp.oo


def _split_theta(off, ctx):
    parts = summands(off)
    lin = sp.Add(*[a for a in parts if ctx.has_theta(a)])
    rest = sp.Add(*[a for a in parts if not ctx.has_theta(a)])
    # theta must enter linearly with theta-free coefficients
    deg_ok = all(_theta_linear(a, ctx) for a in sp.Add.make_args(lin))
    return (lin, rest) if deg_ok else (lin, lin)


def _theta_linear(a, ctx):
    if isinstance(a, sp.Sum):
        return _theta_linear(a.function, ctx)
    if isinstance(a, sp.Indexed):
        return True
    if a.is_Mul:
        dep = [b for b in a.args if ctx.has_theta(b)]
        return len(dep) == 1 and _theta_linear(dep[0], ctx)
    return False
