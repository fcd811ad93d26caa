"""The atom table: scalar functions psi(t) and what the rules need of them (docs/constants.md 2, 3).

`analyse_atom(psi)` returns `AtomFacts`: the range [lo, hi] of psi'' on R, sup |psi'''| (d3), and
for theta-dependent parameters sup_t |d psi''/d theta_l| (dth). Table entries carry exact values;
outside the table SymPy's `function_range` is tried under a timeout (certified), then a sampled
estimate (never certified). Non-C^2 atoms give d3 = oo with a message; unbounded psi'' gives
hi = oo ("infinite": only local constants on a ball would be finite; not derived here).
"""
from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field

import numpy as np
import scipy.special
import sympy as sp
from sympy.calculus.util import maximum, minimum

from ...primitives import logcosh, sigmoid, softplus, stabilise
from ..records import T

SQRT3_18 = sp.sqrt(3) / 18  # sup |logistic'''| = sup |sigma''|
CHARB3 = sp.Rational(48, 25) / sp.sqrt(5)  # sup |d^3/dt^3 sqrt(t^2 + 1)| = 0.8587, at t = 1/2
LOGCOSH3 = 4 / (3 * sp.sqrt(3))  # sup |d^3 log cosh t| = 0.770
STUDENT3 = sp.Rational(3, 2) + sp.sqrt(2)  # sup |d^3 log(1 + t^2)|
LSE3 = 1 / sp.sqrt(2)  # Lipschitz constant of the Hessian of log-sum-exp (see lse_facts)
LSE4 = sp.S.Half  # sup of the fourth derivative of log-sum-exp (see lse_facts)
# sup_s |d/dw d^3/ds^3 sqrt(s^2 + w)| at w = 1: 0.9661, at s^2 = (6 - sqrt30)/4 (see _charbonnier)
CHARB3W = 48 * sp.sqrt(180 - 30 * sp.sqrt(30)) / (10 - sp.sqrt(30)) ** sp.Rational(7, 2)
#: f(a t + b) for the functions with bounded derivatives: (sup|f'|, sup|f''|, sup|f'''|,
#: sup|f''''|), with f'' in [-sup, sup] (odd about a point for the first five, sin and cos by
#: periodicity). sup|f'| is at t = 0 (tanh' = sech^2, sigmoid' = s (1 - s), atan' = 1/(1 + t^2),
#: asinh' = (1 + t^2)^(-1/2), erf' = 2 exp(-t^2)/sqrt(pi)); each other sup is |f^(k)| at a root
#: of f^(k+1) (SymPy's `maximum`); tests/test_constants.py checks them against a grid and
#: mpmath. Before, SymPy's function_range ran at every build (2.5 s for tanh, against a 3 s
#: timeout) and sigmoid's timed out into a sampled, uncertified estimate.
TANH4 = (8 * (sp.S.Half + sp.sqrt(105) / 30) * (sp.sqrt(105) / 10 + sp.S.Half)
         * sp.sqrt(sp.S.Half - sp.sqrt(105) / 30))  # 4.0859
BOUNDED = {
    sp.tanh: (sp.S.One, 4 * sp.sqrt(3) / 9, sp.Integer(2), TANH4),
    sigmoid: (sp.Rational(1, 4), sp.sqrt(3) / 18, sp.Rational(1, 8), TANH4 / 32),  # tanh(t/2)
    sp.atan: (sp.S.One, 3 * sp.sqrt(3) / 8, sp.Integer(2),
              24 * sp.sqrt(1 - 2 * sp.sqrt(5) / 5) * (1 - 2 * (1 - 2 * sp.sqrt(5) / 5)
                                                      / (2 - 2 * sp.sqrt(5) / 5))
              / (2 - 2 * sp.sqrt(5) / 5) ** 3),  # 4.6686
    sp.asinh: (sp.S.One, 2 * sp.sqrt(3) / 9, sp.Integer(1),
               3 * sp.sqrt(sp.Rational(3, 2) - sp.sqrt(30) / 4)
               * (3 - 5 * (sp.Rational(3, 2) - sp.sqrt(30) / 4)
                  / (sp.Rational(5, 2) - sp.sqrt(30) / 4))
               / (sp.Rational(5, 2) - sp.sqrt(30) / 4) ** sp.Rational(5, 2)),  # 1.9323
    sp.erf: (2 / sp.sqrt(sp.pi), 2 * sp.sqrt(2) * sp.exp(-sp.S.Half) / sp.sqrt(sp.pi),
             4 / sp.sqrt(sp.pi),
             8 * sp.sqrt(6) * sp.sqrt(sp.Rational(3, 2) - sp.sqrt(6) / 2)
             * sp.exp(sp.sqrt(6) / 2 - sp.Rational(3, 2)) / sp.sqrt(sp.pi)),  # 4.4047
    sp.sin: (sp.S.One, sp.S.One, sp.S.One, sp.S.One),
    sp.cos: (sp.S.One, sp.S.One, sp.S.One, sp.S.One),
}
NONSMOOTH = (sp.Abs, sp.Max, sp.Min, sp.Piecewise, sp.Heaviside, sp.sign)
SMOOTH_HINT = ("use a smooth alternative such as the Charbonnier function sqrt(t**2 + nu**2) "
               "(nu > 0) instead of |t| or Huber")


@dataclass
class AtomFacts:
    name: str
    lo: sp.Expr
    hi: sp.Expr
    d3: sp.Expr
    dth: dict | None = field(default_factory=dict)  # theta symbol -> sup_t |d psi''/d theta|
    kind: str = "exact"  # of the range: exact | bound | estimate | infinite
    certified: bool = True
    rule: str = ""
    message: str = ""
    d4: sp.Expr = sp.oo  # sup |psi''''| (L_3); oo where the table has no value
    # theta symbol -> sup_t |d psi'''/d theta| (L_DB for theta inside the atom); None: no rule
    d3th: dict | None = None
    d1: sp.Expr = sp.oo  # sup |psi'| (L_ft of theta in f's coefficients); oo: none or unbounded

    @property
    def peak(self):
        """sup |psi''|."""
        return sp.Max(sp.Abs(self.lo), sp.Abs(self.hi)) if self.lo != -self.hi else sp.Abs(self.hi)


def lse_facts() -> AtomFacts:
    """log-sum-exp of a vector u: Hessian diag(p) - p p^T in [0, 1/2] (Boehning 1992).

    Third derivative: D^3[h,h,h] = sum_k p_k (h_k - hbar)^3 with hbar = p.h, so
    |D^3[h,h,h]| <= max_k |h_k - hbar| Var_p(h) <= sqrt2 ||h|| * ||h||^2 / 2; for a symmetric
    trilinear form this diagonal bound is its norm, so the Hessian is (1/sqrt2)-Lipschitz.
    Fourth derivative: D^4[h,h,h,h] = E Y^4 - 3 (E Y^2)^2 (the fourth cumulant of h under p,
    Y = h - hbar). Y lies in an interval of length r = max h - min h <= sqrt2 ||h|| containing 0,
    so V = E Y^2 <= r^2/4 and (E Y^2)^2 <= E Y^4 <= r^2 V: the cumulant lies in
    [-2 V^2, r^2 V - 3 V^2], within [-r^4/8, r^4/12], so |D^4[h,h,h,h]| <= ||h||^4/2 (attained
    at p = (1/2, 1/2), h = (1, -1)/sqrt2); the norm of the symmetric form is that sup (L_3).
    docs/constants.md 3.5.
    """
    return AtomFacts("log-sum-exp", sp.S.Zero, sp.S.Half, LSE3, {}, "exact", True,
                     "atom table: log-sum-exp, Hessian in [0, I/2] (Boehning), "
                     "third derivative <= 1/sqrt2, fourth <= 1/2 (derived)", d4=LSE4)


def _poly_coeffs(arg, degree):
    """The coefficients (highest first) if arg is a polynomial of exactly `degree` in t whose
    coefficients are free of t, else None."""
    if not arg.has(T):
        return None
    try:
        poly = sp.Poly(arg, T)
    except sp.PolynomialError:
        return None
    if poly.degree() != degree or any(c.has(T) for c in poly.all_coeffs()):
        return None
    return tuple(poly.all_coeffs())


def _linear(arg):
    """(a, b) if arg == a*t + b with a, b free of t, else None."""
    return _poly_coeffs(arg, 1)


def _quadratic(arg):
    return _poly_coeffs(arg, 2)


def _theta_free(expr, theta_syms):
    return not (expr.free_symbols & set(theta_syms))


def analyse_atom(psi, theta_syms=(), timeout=3.0) -> AtomFacts | None:
    """Facts about psi(t) on all of R, or None when no rule applies (psi has data, ...)."""
    psi = stabilise(sp.sympify(psi))
    if psi.is_Add:
        parts = [a for a in psi.args if a.has(T)]
        if len(parts) > 1:
            facts = [analyse_atom(p, theta_syms, timeout) for p in parts]
            if any(f is None for f in facts):
                return None
            return _sum_facts(facts)
        psi = parts[0]
    kappa = sp.S.One
    if psi.is_Mul:
        kappa = sp.Mul(*[a for a in psi.args if not a.has(T)])
        psi = sp.Mul(*[a for a in psi.args if a.has(T)])
    facts = _base(psi, theta_syms, timeout)
    if facts is None or kappa == 1:
        return facts
    return _scale_facts(facts, kappa, theta_syms)


def _sum_facts(facts):
    dth = None
    if all(f.dth is not None for f in facts):
        dth = {}
        for f in facts:
            for k, v in f.dth.items():
                dth[k] = dth.get(k, 0) + v
    return AtomFacts(" + ".join(f.name for f in facts), sp.Add(*[f.lo for f in facts]),
                     sp.Add(*[f.hi for f in facts]), sp.Add(*[f.d3 for f in facts]), dth,
                     "bound", all(f.certified for f in facts),
                     "sum of atoms: " + "; ".join(f.rule for f in facts),
                     "; ".join(f.message for f in facts if f.message),
                     sp.Add(*[f.d4 for f in facts]), _add_dicts([f.d3th for f in facts]),
                     sp.Add(*[f.d1 for f in facts]))


def _add_dicts(ds):
    """Key-wise sums (the sups of a sum's parts add); None if any part has no rule (None)."""
    if any(d is None for d in ds):
        return None
    out: dict = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _scale_facts(f, kappa, theta_syms):
    if kappa.is_nonnegative:
        lo, hi = kappa * f.lo, kappa * f.hi
    elif kappa.is_nonpositive:
        lo, hi = kappa * f.hi, kappa * f.lo
    else:
        return None
    dth = None
    if f.dth is not None:
        dth = {k: sp.Abs(kappa) * v for k, v in f.dth.items()}
        for s in kappa.free_symbols & set(theta_syms):
            dth[s] = dth.get(s, 0) + sp.Abs(sp.diff(kappa, s)) * f.peak
    d3th = None
    if f.d3th is not None:  # d(kappa psi''')/dtheta = kappa' psi''' + kappa d psi'''/dtheta
        d3th = {k: sp.Abs(kappa) * v for k, v in f.d3th.items()}
        for s in kappa.free_symbols & set(theta_syms):
            d3th[s] = d3th.get(s, 0) + sp.Abs(sp.diff(kappa, s)) * f.d3
    return AtomFacts(f"{kappa}*{f.name}", lo, hi, sp.Abs(kappa) * f.d3, dth, f.kind, f.certified,
                     f.rule + f"; scaled by {kappa}", f.message, sp.Abs(kappa) * f.d4, d3th,
                     sp.Abs(kappa) * f.d1)


def _base(psi, theta_syms, timeout):
    if psi.has(*NONSMOOTH):
        return _nonsmooth(psi, theta_syms)
    if psi.is_polynomial(T):
        return _polynomial(psi, theta_syms)
    if isinstance(psi, softplus):
        ab = _linear(psi.args[0])
        if ab and ab[0].is_number and ab[0] != 0:
            a, b = ab
            return AtomFacts("softplus", sp.S.Zero, a**2 / 4, abs(a)**3 * SQRT3_18,
                             {} if _theta_free(b, theta_syms) else None, "exact", True,
                             "atom table: softplus(a t + b), psi'' in (0, a^2/4], "
                             "sup|psi'''| = |a|^3 sqrt3/18, sup|psi''''| = a^4/8", "", a**4 / 8,
                             d1=sp.Abs(a))
    if isinstance(psi, sp.Pow) and psi.exp == sp.S.Half:
        q = _quadratic(psi.base)
        if q is not None:
            return _charbonnier(*q, theta_syms)
    if isinstance(psi, logcosh):
        ab = _linear(psi.args[0])
        if ab and ab[0].is_number and ab[0] != 0:
            a, b = ab
            return AtomFacts("log cosh", sp.S.Zero, a**2, abs(a)**3 * LOGCOSH3,
                             {} if _theta_free(b, theta_syms) else None, "exact", True,
                             "atom table: log cosh(a t + b), psi'' in (0, a^2], "
                             "sup|psi'''| = |a|^3 4/(3 sqrt3), sup|psi''''| = 2 a^4", "",
                             2 * a**4, d1=sp.Abs(a))
    if isinstance(psi, sp.log):
        q = _quadratic(psi.args[0])
        if q is not None and all(_theta_free(c, theta_syms) for c in q) and q[0].is_positive:
            al, be, ga = q
            nu2 = sp.simplify(ga / al - be**2 / (4 * al**2))
            if nu2.is_positive:
                return AtomFacts("log(1 + t^2) (Student-t)", -1 / (4 * nu2), 2 / nu2,
                                 STUDENT3 / nu2 ** sp.Rational(3, 2), {}, "exact", True,
                                 "atom table: log((t + tau)^2 + nu^2), psi'' in "
                                 "[-1/(4 nu^2), 2/nu^2], sup|psi'''| = (3/2 + sqrt2)/nu^3",
                                 "nonconvex atom: negative curvature -1/(4 nu^2)",
                                 d1=1 / sp.sqrt(nu2))
    if isinstance(psi, sp.exp):
        ab = _linear(psi.args[0])
        if ab:
            return AtomFacts("exp", sp.S.Zero, sp.oo, sp.oo, {}, "infinite", True,
                             "atom table: exp(a t + b), psi'' in (0, oo)",
                             "exp has unbounded curvature: L and L_A are infinite globally "
                             "(only local constants on a ball exist)")
    if isinstance(psi, sp.cosh):
        ab = _linear(psi.args[0])
        if ab and ab[0].is_number and ab[0] != 0:
            a, b = ab
            return AtomFacts("cosh", a**2, sp.oo, sp.oo, {} if _theta_free(b, theta_syms) else None,
                             "infinite", True, "atom table: cosh(a t + b), psi'' = a^2 cosh in "
                             "[a^2, oo)", "cosh has unbounded curvature: L and L_A are infinite "
                             "globally (only local constants on a ball exist)")
    if type(psi) in BOUNDED and len(psi.args) == 1:
        ab = _linear(psi.args[0])
        if ab and ab[0].is_number and ab[0] != 0:
            return _bounded(psi, ab, theta_syms)
    return _generic(psi, theta_syms, timeout)


def _bounded(psi, ab, theta_syms):
    """f(a t + b), f in BOUNDED: psi^(k)(t) = a^k f^(k)(a t + b) over all t, the sups scaled."""
    f1, f2, f3, f4 = BOUNDED[type(psi)]
    a, b = sp.Abs(ab[0]), ab[1]
    name = type(psi).__name__
    return AtomFacts(name, -a ** 2 * f2, a ** 2 * f2, a ** 3 * f3,
                     {} if _theta_free(b, theta_syms) else None, "exact", True,
                     f"atom table: {name}(a t + b), psi'' in [-a^2 {f2}, a^2 {f2}], "
                     f"sup|psi'''| = |a|^3 {f3}, sup|psi''''| = a^4 {sp.N(f4, 6)}", "", a ** 4 * f4,
                     d1=a * f1)


def _polynomial(psi, theta_syms):
    poly = sp.Poly(psi, T)
    deg = poly.degree()
    if deg <= 1:
        return AtomFacts("linear", sp.S.Zero, sp.S.Zero, sp.S.Zero, {}, "exact", True,
                         "linear atom: psi'' = 0", "", sp.S.Zero)
    if deg == 2:
        a2 = 2 * poly.all_coeffs()[0]
        dth = {s: sp.Abs(sp.diff(a2, s)) for s in a2.free_symbols & set(theta_syms)}
        return AtomFacts("quadratic", a2, a2, sp.S.Zero, dth, "exact", True,
                         f"quadratic atom: psi'' = {a2} (exact), psi''' = 0", "", sp.S.Zero)
    p2 = sp.Poly(sp.diff(psi, T, 2), T)
    lo = -sp.oo
    coeffs = p2.all_coeffs()
    if p2.degree() % 2 == 0 and all(c.is_number for c in coeffs) and coeffs[0] > 0:
        crit = sp.Poly(sp.diff(p2.as_expr(), T), T).real_roots()
        lo = sp.Min(*[p2.as_expr().subs(T, r) for r in crit]) if crit else p2.as_expr().subs(T, 0)
        lo = sp.nsimplify(lo) if lo.is_number else lo
    return AtomFacts(f"polynomial of degree {deg}", lo, sp.oo, sp.oo, {}, "infinite", True,
                     f"polynomial atom of degree {deg}: psi'' = {p2.as_expr()} is unbounded",
                     f"psi(t) = {psi} has unbounded curvature: L and L_A are infinite globally "
                     "(only local constants on a ball exist)")


def _charbonnier(al, be, ga, theta_syms):
    """sqrt(al((t + tau)^2 + nu^2)); the group atom reuses its values (group_charbonnier).

    With psi = sqrt(s^2 + w) (al = 1, w = nu^2): psi'' = w (s^2 + w)^(-3/2), max 1/sqrt(w);
    |psi'''| max 48/(25 sqrt5)/w at s = sqrt(w)/2; psi'''' = 3 w (4 s^2 - w)(s^2 + w)^(-7/2), max
    modulus 3/w^(3/2) at s = 0. For theta in nu^2: d psi''/dw = (s^2 - w/2)(s^2 + w)^(-5/2), sup
    w^(-3/2)/2 at s = 0 (L_B), and d psi'''/dw = 3 s (3 w - 2 s^2)/(2 (s^2 + w)^(7/2)) =
    w^-2 h(s/sqrt(w)) with h(r) = r (9/2 - 3 r^2)/(1 + r^2)^(7/2); h' vanishes where
    12 r^4 - 36 r^2 + 9/2 = 0, and the larger |h| of the two roots is at r^2 = (6 - sqrt30)/4:
    CHARB3W = 0.9661 (L_DB; docs/constants.md 3.11)."""
    if not (al.is_positive and _theta_free(al, theta_syms) and _theta_free(be, theta_syms)):
        return None
    nu2 = sp.simplify(ga / al - be**2 / (4 * al**2))
    if not nu2.is_positive:
        return None
    ra = sp.sqrt(al)
    th = nu2.free_symbols & set(theta_syms)
    dth = {s: sp.simplify(ra * sp.Abs(sp.diff(nu2, s)) / 2 / nu2 ** sp.Rational(3, 2)) for s in th}
    d3th = {s: sp.simplify(ra * CHARB3W * sp.Abs(sp.diff(nu2, s)) / nu2**2) for s in th}
    return AtomFacts("Charbonnier", sp.S.Zero, sp.simplify(ra / sp.sqrt(nu2)),
                     sp.simplify(ra * CHARB3 / nu2), dth, "exact", True,
                     "atom table: Charbonnier sqrt(a((t + tau)^2 + nu^2)), psi'' in "
                     "(0, sqrt(a)/nu], sup|psi'''| = sqrt(a) 48/(25 sqrt5)/nu^2, "
                     "sup|psi''''| = 3 sqrt(a)/nu^3 (at t = -tau), "
                     "sup|d psi'''/d(nu^2)| = sqrt(a) 0.9661/nu^4", "",
                     sp.simplify(3 * ra / nu2 ** sp.Rational(3, 2)), d3th, d1=ra)


def group_charbonnier(psi, ts, theta_syms):
    """psi(t_1..t_k) = sqrt(a sum t_k^2 + c): the isotropic Charbonnier group atom.

    Every derivative bound is the k = 1 value (docs/constants.md 3.11). Along a unit h through z,
    t -> psi(z + t h) = sqrt(a) sqrt((t + z.h)^2 + nu_h^2) with nu_h^2 = |z|^2 - (z.h)^2 + c/a
    >= c/a: a scalar Charbonnier whose nu_h^2 is at least c/a. Its j-th derivative at t = 0 is
    D^j psi(z)[h, .., h], and the scalar sups (psi'' <= sqrt(a)/nu_h, |psi'''| <=
    sqrt(a) 0.8587/nu_h^2, |psi''''| <= 3 sqrt(a)/nu_h^3, and the nu^2-derivatives of psi'' and
    psi''') decrease in nu_h, so they hold with nu_h^2 = c/a. A symmetric multilinear form's norm
    is the sup of its diagonal over unit h (Banach), so the Hessian lies in [0, a/sqrt(c)], and
    sup||D^3 psi||, sup||D^4 psi|| (L_A, L_3) and the nu^2-derivatives (L_B, L_DB) are the
    k = 1 values, attained on lines through 0.
    """
    if not (isinstance(psi, sp.Pow) and psi.exp == sp.S.Half):
        return None
    try:
        poly = sp.Poly(psi.base, *ts)
    except sp.PolynomialError:
        return None
    terms = poly.terms()
    squares = {}
    const = sp.S.Zero
    for mon, coeff in terms:
        if sum(mon) == 0:
            const = coeff
        elif sum(mon) == 2 and max(mon) == 2:
            squares[mon.index(2)] = coeff
        else:
            return None
    if len(squares) != len(ts) or len(set(squares.values())) != 1:
        return None
    al = squares[0]
    facts = _charbonnier(al, sp.S.Zero, const, theta_syms)
    if facts is not None:
        facts.name = f"group Charbonnier (k = {len(ts)})"
        facts.rule = ("atom table: isotropic Charbonnier sqrt(a |v|^2 + nu^2), v in R^k: Hessian in "
                      "[0, a/nu], ||D^3|| <= a^(3/2) 48/(25 sqrt5)/nu^2, ||D^4|| <= 3 a^2/nu^3, "
                      "||d D^3/d(nu^2)|| <= a^(3/2) 0.9661/nu^4 (the k = 1 values: every line "
                      "through v is a scalar Charbonnier with a larger nu)")
    return facts


def _nonsmooth(psi, theta_syms):
    if isinstance(psi, sp.Abs) and _linear(psi.args[0]):
        return AtomFacts("|t|", sp.S.Zero, sp.oo, sp.oo, {}, "infinite", True,
                         "non-smooth atom |a t + b|: convex, psi'' is a Dirac mass at the kink",
                         f"{psi} is not twice differentiable: L and L_A are infinite; "
                         + SMOOTH_HINT)
    est = _sampled(psi, theta_syms)
    if est is None:
        return None
    est.d3, est.dth = sp.oo, {}
    est.name = "non-smooth " + str(psi)
    est.message = (f"{psi} is not twice differentiable: L_A is infinite and the curvature "
                   f"range is only sampled; " + SMOOTH_HINT)
    return est


_NUMPY = [{"sigmoid": lambda z: 0.5 * (1 + np.tanh(z / 2)),
           "softplus": lambda z: np.logaddexp(0, z), "Heaviside": lambda z, h=0.5: np.heaviside(z, h),
           "logcosh": lambda z: np.logaddexp(z, -z) - np.log(2.0),
           # NumPy has no erf: lambdify fell back to math.erf, which takes no array (a raw
           # TypeError ended `hypergen build` on erf(u)**2)
           "erf": scipy.special.erf, "erfc": scipy.special.erfc},
          "numpy"]


def _sampled(psi, theta_syms):
    """Sampled psi'' range and sup|psi'''| (finite differences on a log grid): an estimate."""
    if psi.free_symbols - {T}:
        return None
    f = sp.lambdify(T, psi, modules=_NUMPY)
    grid = np.concatenate([-np.logspace(3, -4, 4000), [0.0], np.logspace(-4, 3, 4000)])
    h = 1e-4
    with np.errstate(all="ignore"):
        p2 = (f(grid + h) - 2 * f(grid) + f(grid - h)) / h**2
        p3 = (f(grid + 2 * h) - 2 * f(grid + h) + 2 * f(grid - h) - f(grid - 2 * h)) / (2 * h**3)
    if not (np.all(np.isfinite(p2)) and np.all(np.isfinite(p3))):
        return None
    return AtomFacts(str(psi), sp.Float(p2.min()), sp.Float(p2.max()), sp.Float(np.abs(p3).max()),
                     {}, "estimate", False, "sampled psi'' and psi''' on a grid of 8001 points "
                     "in [-1e3, 1e3] (estimate, not certified)")


class _Timeout(Exception):
    pass


def _with_timeout(fn, seconds):
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise _Timeout

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    except (_Timeout, NotImplementedError, ValueError, TypeError, AttributeError):
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _generic(psi, theta_syms, timeout):
    """Atoms outside the table: SymPy's function_range (certified) or sampling (estimate)."""
    if psi.free_symbols - {T}:
        return None  # parameters (theta, data) outside the table: no rule
    plain = psi.rewrite(sp.exp) if psi.has(sigmoid, softplus) else psi
    p2, p3 = sp.diff(plain, T, 2), sp.diff(plain, T, 3)

    def ranges():
        lo, hi = minimum(p2, T), maximum(p2, T)
        d3 = sp.Max(maximum(p3, T), -minimum(p3, T))
        return lo, hi, d3

    res = _with_timeout(ranges, timeout)
    if res is not None and all(v.is_real is not False and not v.has(sp.AccumBounds) for v in res):
        lo, hi, d3 = res
        return AtomFacts(str(psi), lo, hi, d3, {}, "exact", True,
                         "SymPy function_range of psi'' and psi''' on R")
    return _sampled(psi, theta_syms)
