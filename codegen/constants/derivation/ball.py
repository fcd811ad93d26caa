"""Build-time half of the local (ball) constants (docs/constants.md 3; evaluation/local.py is the
bind-time half): the ball symbols of a term, and what an atom psi(k_i.x + b_i) must record so
that sup |psi''|, sup |psi'''|, sup |psi''''| over the argument intervals can be evaluated at bind
time.

Handled atoms: psi = polynomial + sum kappa exp(a t + b) with numbers only (the forms whose sups
over an interval `evaluation.local.interval_sups` bounds rigorously).
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from ..records import T, dump, qsym


def ball_symbols(label: str) -> dict:
    """The symbols ball_hi/peak/d3/d4_<label> a term's ball constants are written in."""
    return {w: qsym(f"ball_{w}_{label}") for w in ("hi", "peak", "d3", "d4")}


def ball_components(psi: sp.Expr) -> tuple | None:
    """(polynomial coefficients, [(kappa, a, b)]) with psi = poly(t) + sum kappa exp(a t + b),
    all numbers (cosh and sinh as their exps); None when psi has another form (or theta/data
    symbols)."""
    psi = sp.sympify(psi)
    if psi.has(sp.cosh, sp.sinh):
        psi = psi.rewrite(sp.exp)
    if psi.free_symbols - {T}:
        return None
    poly = sp.S.Zero
    exps = []
    for term in sp.Add.make_args(sp.expand(psi, deep=False)):
        if term.is_polynomial(T):
            poly += term
            continue
        kappa = sp.Mul(*[f for f in sp.Mul.make_args(term) if not f.has(T)])
        rest = sp.Mul(*[f for f in sp.Mul.make_args(term) if f.has(T)])
        if not isinstance(rest, sp.exp):
            return None
        try:
            p = sp.Poly(rest.args[0], T)
        except sp.PolynomialError:
            return None
        if p.degree() != 1:
            return None
        a, b = p.all_coeffs()
        if not (kappa.is_number and a.is_number and b.is_number):
            return None
        exps.append((float(kappa), float(a), float(b)))
    try:
        coeffs = [float(c) for c in sp.Poly(poly, T).all_coeffs()] if poly != 0 else [0.0]
    except (sp.PolynomialError, TypeError):
        return None
    if not exps and len(coeffs) <= 3:
        return None  # degree <= 2: finite globally, nothing to do
    return np.array(coeffs[::-1]), exps  # ascending powers


def term_info(psi: sp.Expr, lin: sp.Expr, off: sp.Expr, limits: tuple) -> dict | None:
    """What the bind-time rebuild of z = K x + b needs (SymPy text), with psi's components;
    None when psi is not of a handled form."""
    comps = ball_components(psi)
    if comps is None:
        return None
    return {"psi": dump(psi), "lin": dump(lin), "off": dump(off),
            "limits": dump(sp.Tuple(*[sp.Tuple(*lim) for lim in limits])), "components": comps}
