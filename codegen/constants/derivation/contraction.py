"""Build-time half of the data-local third derivative (docs/bounds.md 15.10; the call-time half
is evaluation/contraction.py): what a term c * sum_I v_I psi(K_I x + b_I) must record so that
||DA(x)[u]|| can be bounded at one x and one direction u from the data, row by row.

For such a term (psi scalar, or a group atom of a few arguments) the derivative of its Hessian
along u is

    DA_t(x)[u] = c K^T blockdiag_I(v_I psi'''(z_I)[K_I u]) K,   z_I = K_I x + b_I,

so ||DA_t(x)[u]|| <= |c| max |v| ||K||^2 max_I ||psi'''(z_I)[K_I u]||, with ||K||^2 the bound the
term's L_A already uses. The global L_A replaces the last factor by sup |psi'''| max ||K_I|| ||u||:
a sup over every argument and a Cauchy-Schwarz over every row. Smoothed TV at its examples' nu
is 500 times looser that way (docs/bounds.md 15.10).
"""
from __future__ import annotations

import sympy as sp

from ..records import T, ThetaMax, dump


def contraction_info(args: list, psi: sp.Expr, lins: list, offs: list, limits: tuple,
                     c: sp.Expr, ps, normsq: sp.Expr, theta_syms: dict) -> dict:
    """The record of one atom term (JSON-ready text): psi in its argument symbols `args` and
    theta's symbols ("theta": [name, flat index] of those it reads; theta_syms: flat index ->
    symbol), the linear parts `lins` and offsets `offs` of its arguments (x and theta as indexed
    reads), the row limits, and scale = |c| max |v| ||K||^2 (ps: the per-sample weight
    (v, single) or None)."""
    vmax = sp.S.One if ps is None else ThetaMax(sp.Lambda(T, sp.Abs(ps[0])))
    reads = sorted((s.name, k if isinstance(k, int) else sp.sstr(k))
                   for k, s in theta_syms.items() if s in psi.free_symbols)
    return {"args": [a.name for a in args], "psi": dump(psi), "theta": reads,
            "lins": [dump(e) for e in lins],
            "offs": [dump(e) for e in offs],
            "limits": dump(sp.Tuple(*[sp.Tuple(*lim) for lim in limits])),
            "scale": dump(sp.Abs(c) * vmax * normsq)}


def complete(records: dict, terms: list) -> dict:
    """records (label -> info) where every term of g with a third derivative has one, else {}:
    a term without one (log-sum-exp, no rule) leaves ||DA[u]|| with no local bound."""
    if not records or any(t.LA != 0 and t.label not in records for t in terms):
        return {}
    return records
