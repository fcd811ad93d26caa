"""L_DB: a Lipschitz constant of x -> D_u(x) = d(B(x) u)/dx per ||u|| (docs/constants.md 3.5, 8.3),
the constant the DWR correction's cross term needs when B = d_theta grad_x g is not affine in x.

`cross_lipschitz` is the global rule of one term (theta in the coefficient, a per-sample weight,
a Charbonnier's nu); `learned_cross_lipschitz` the ball rule for theta in a learned filter's taps,
which has no global constant (the tap column's x-derivative grows with dK_l x along the kernel
of K) but a finite one on a ball, where ||y||_inf <= ball_xinf.
"""
from __future__ import annotations

import sympy as sp

from .filters import XINF


def mul(a, b):
    """a*b where oo*anything non-negative stays oo (never oo*0 = nan at evaluation)."""
    if a == sp.oo or b == sp.oo:
        return sp.oo
    return a * b


def offset_slopes(off, ctx) -> dict | None:
    """{theta symbol: |d b/d theta|} for theta in the offset b(theta) of an atom's argument
    K x + b (a learned shift, softplus(x_j - t)): {} where b has no theta; None where no rule
    applies, a slope that reads data, an index or theta with a symbolic index (it would vary
    with the row). The slope may depend on theta (b = -e^t c)."""
    if not ctx.has_theta(off):
        return {}
    b = ctx.thetafy(off)
    if b is None:
        return None
    theta_syms = set(ctx.theta_syms.values())
    slopes = {}
    for s in b.free_symbols & theta_syms:
        d = sp.diff(b, s)
        if d.atoms(sp.Indexed) or d.free_symbols - theta_syms:
            return None
        slopes[s] = sp.Abs(d)
    return slopes


def _inside(f) -> set | None:
    """The theta symbols inside the atom (psi'' depends on them), None when some has no
    sup|d psi'''/d theta| (then no rule)."""
    inside = {s for s, val in f.dth.items() if val != 0}
    if inside and (f.d3th is None or not inside <= set(f.d3th)):
        return None
    return inside


def _combined(cols: dict):
    """sqrt(sum_l L_l^2) (Cauchy-Schwarz: sum_l |u_l| L_l <= ||u|| sqrt(sum_l L_l^2))."""
    vals = [v for v in cols.values() if v != 0]
    if any(v == sp.oo for v in vals):
        return sp.oo
    if not vals:
        return sp.S.Zero
    return vals[0] if len(vals) == 1 else sp.sqrt(sp.factor_terms(sp.Add(*[v**2 for v in vals])))


def cross_lipschitz(c, ps, f, op, off, ctx, single, dv, vmax):
    """L_DB of a term c(theta) sum_I w_I(theta_I) psi(K_I x + b; theta) whose B is not affine in
    x (docs/constants.md 3.5). Its part of d(B u)/dx is sum_l u_l K^T diag_I(beta_Il(x)) K with
    beta_Il = dc/dtheta_l w_I psi'' + c w_I d psi''/dtheta_l (+ c w'(theta_I) psi'' for the
    sample's own weight), whose x-Lipschitz constants per ||K_I (x - y)|| are
    L_l = |dc/dtheta_l| max w sup|psi'''| + |c| max w sup|d psi'''/dtheta_l| (the atom table's
    d3th, for theta inside the atom) and |c| max|w'| sup|psi'''|; theta_l in the offset b adds
    beta_Il = c w_I psi''' db/dtheta_l, of constant |c| max w sup|psi''''| |db/dtheta_l|. As
    for L_A, with sum_l |u_l| L_l <= ||u|| sqrt(sum_l L_l^2): (sqrt(sum_l L_l^2) + |c| max|w'|
    sup|psi'''|) ||K||^2 max_I ||K_I||. No rule (oo): an offset whose slope varies with the
    row (`offset_slopes`), theta in a learned filter's taps (only on a ball:
    `learned_cross_lipschitz`), or inside an atom without d3th."""
    slopes = offset_slopes(off, ctx)
    if f.dth is None or slopes is None or op.dtaps:
        return sp.oo
    inside = _inside(f)
    if inside is None:
        return sp.oo
    theta_syms = set(ctx.theta_syms.values())
    cols = {s: mul(sp.Abs(sp.diff(c, s)) * vmax, f.d3) for s in c.free_symbols & theta_syms}
    for s in inside:
        cols[s] = cols.get(s, 0) + mul(sp.Abs(c) * vmax, f.d3th[s])
    for s, slope in slopes.items():
        cols[s] = cols.get(s, 0) + mul(mul(sp.Abs(c) * vmax, f.d4), slope)
    beta = _combined(cols)
    if ps is not None:
        if not single:
            return sp.oo
        beta = beta + mul(sp.Abs(c) * dv, f.d3)
    return mul(beta, op.normsq * op.rowmax)


def learned_cross_lipschitz(c, f, op, off, ctx):
    """L_DB on a ball of a term c(theta) sum_I psi(K_I x + b; theta) with theta in the taps of the
    filter K (docs/constants.md 8.3); it reads ball_xinf >= sup ||y||_inf over the ball.

    With u = K x + b, K_l = dK/dtheta_l (||K_l|| <= m_l, rows of K_l of norm <= m_l,
    |(K_l y)_I| <= m_l ||y||_inf), the tap part of column l of B is
    c (K_l^T psi'(u) + K^T diag(psi''(u)) K_l x), whose x-derivative is
    c (K_l^T diag(psi''(u)) K + K^T diag(psi''(u)) K_l + K^T diag(psi'''(u) (K_l x)) K). Between
    x and y = x - d of the ball, |psi^(j)(u_I(x)) - psi^(j)(u_I(y))| <= sup|psi^(j+1)| max_I ||K_I||
    ||d||, so the three parts change by at most |c| m_l sqrt(N) d3 rho (twice) and
    |c| N (d4 rho m_l ball_xinf + d3 m_l) per ||d|| (N >= ||K||^2, rho = max_I ||K_I||,
    d3, d4 = sup|psi'''|, sup|psi''''|; group atoms: the forms' norms, 3.11). Columns of theta in
    c or inside the atom add the global rule's L_l; columns combine by Cauchy-Schwarz. oo where
    the atom has no sup|psi''''|, theta sits in the offset, or inside the atom without d3th."""
    if f.dth is None or ctx.has_theta(off) or f.d3 == sp.oo or f.d4 == sp.oo:
        return sp.oo
    inside = _inside(f)
    if inside is None:
        return sp.oo
    N, rho = op.normsq, op.rowmax
    cols = {s: sp.Abs(sp.diff(c, s)) * f.d3 * N * rho
            for s in c.free_symbols & set(ctx.theta_syms.values())}
    for s in inside:
        cols[s] = cols.get(s, 0) + sp.Abs(c) * f.d3th[s] * N * rho
    for s, m in op.dtaps.items():
        taps = sp.Abs(c) * m * (2 * f.d3 * sp.sqrt(N) * rho + N * (f.d4 * rho * XINF + f.d3))
        cols[s] = cols.get(s, 0) + taps
    return _combined(cols)
