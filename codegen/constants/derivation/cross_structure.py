"""The theta-structure of g read back from a derivation, for the structural ||B|| bound
(evaluation/cross.py holds the numbers and the reasoning, docs/bounds.md).

`structure(der)` re-parses the term sources recorded in the L record of constants.json and returns
one spec per theta term when theta enters g only as per-sample weights v(theta_I); NotAvailable
otherwise (the caller then falls back to cross JVPs).
"""
from __future__ import annotations

import sympy as sp
from sympy.parsing.sympy_parser import parse_expr

from ...primitives import logcosh, sigmoid, softplus
from ..records import Derivation, T
from .terms import Term, VarReads, flatten, max_affine, split_affine


class NotAvailable(Exception):
    """The structure is not per-sample weights: no structural bound (fall back to JVPs)."""


def _namespace(der):
    ns = {name: sp.IndexedBase(name) for name in der.data_shapes if der.data_shapes[name]}
    ns[der.x_name] = sp.IndexedBase(der.x_name)
    ns[der.theta_name] = sp.IndexedBase(der.theta_name)
    for s in list(der.sizes) + list(der.scalars):
        ns[s] = sp.Symbol(s)
    glob = {}
    exec("from sympy import *", glob)  # noqa: S102 - the parser's usual global namespace
    glob.update(sigmoid=sigmoid, softplus=softplus, logcosh=logcosh)
    return ns, glob


def _reads(expr, name):
    return [ix for ix in expr.atoms(sp.Indexed) if str(ix.base.label) == name]


def structure(der: Derivation) -> list:
    """Per-sample term specs [{kind, coef, v, sample, inner, u/lin, psi}] of the theta terms of g.

    Raises NotAvailable when theta enters g in any other way."""
    rec = der.constants.get("L")
    if rec is None or not rec.children:
        raise NotAvailable("no term records in the derivation")
    ns, glob = _namespace(der)
    ctx = VarReads(der.x_name, der.theta_name)
    specs = []
    for child in rec.children:
        if not child.term:
            raise NotAvailable(f"term {child.name} has no recorded source")
        try:
            expr = parse_expr(child.term, local_dict=dict(ns), global_dict=glob)
        except Exception as exc:  # noqa: BLE001 - an unparsable source: no structural bound
            raise NotAvailable(f"cannot parse term {child.term!r}: {exc}") from None
        for t in flatten(expr, ctx):
            if not (ctx.has_theta(t.coef) or ctx.has_theta(t.weight) or ctx.has_theta(t.core)):
                continue
            specs.append(_term_spec(t, ctx, der))
    if not specs:
        raise NotAvailable("theta does not enter g through x-dependent terms")
    return specs


def _term_spec(t: Term, ctx: VarReads, der: Derivation) -> dict:
    if ctx.has_theta(t.coef) or ctx.has_theta(t.core):
        raise NotAvailable(f"theta outside a per-sample weight in {t.source}")
    factors = sp.Mul.make_args(t.weight)
    tf = [f for f in factors if ctx.has_theta(f)]
    data = sp.Mul(*[f for f in factors if not ctx.has_theta(f)])
    reads = {ix for f in tf for ix in _reads(f, der.theta_name)}
    if len(reads) != 1:
        raise NotAvailable(f"weight {t.weight} reads theta at {len(reads)} indices")
    ix = reads.pop()
    syms = [lim[0] for lim in t.limits]
    if len(ix.indices) != 1 or ix.indices[0] not in syms:
        raise NotAvailable(f"theta index {ix} is not a summation index")
    s = ix.indices[0]
    v = sp.Mul(*tf).xreplace({ix: T})
    if v.free_symbols - {T} or v.atoms(sp.Indexed):
        raise NotAvailable(f"weight {v} depends on more than theta_I")
    sample = next(lim for lim in t.limits if lim[0] == s)
    inner = tuple(lim for lim in t.limits if lim[0] != s)
    spec = {"coef": t.coef, "v": v, "sample": sample, "inner": inner, "source": t.source}
    core = t.core
    if ctx.degree(core) <= 1:
        lin, _ = split_affine(core, ctx)
        body = data * lin
        spec.update(kind="linear", lin=sp.Sum(body, *inner) if inner else body, rows=())
        return spec
    if data != 1:
        raise NotAvailable(f"data factor {data} on a nonlinear core in {t.source}")
    if (isinstance(core, sp.log) and isinstance(core.args[0], sp.Sum)
            and isinstance(core.args[0].function, sp.exp)
            and ctx.degree(core.args[0].function.args[0]) <= 1):
        u = core.args[0].function.args[0]
        lse = tuple(core.args[0].limits)
        if len(lse) != 1:
            raise NotAvailable("log-sum-exp over several indices")
        spec.update(kind="lse", u=u, rows=inner + lse)
    else:
        found = set()
        max_affine(core, ctx, found)
        if len(found) != 1:
            raise NotAvailable(f"core {core} is not psi(affine)")
        u = found.pop()
        psi = core.xreplace({u: T})
        if psi.free_symbols - {T} or psi.atoms(sp.Indexed):
            raise NotAvailable(f"atom {psi} depends on data, indices or theta")
        spec.update(kind="atom", u=u, psi=psi, rows=inner)
    if ctx.has_theta(spec["u"]):
        raise NotAvailable("theta inside an atom argument")
    return spec
