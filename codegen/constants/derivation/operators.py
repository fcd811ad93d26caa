"""Linear operators x -> (u_I)_I inside atoms: selections, stencils, data operators.

Selections and in-bounds stencils get analytic norms (exact, or Young's ||K|| <= ||k||_1);
anything else with data becomes an `Operator` whose norms are computed at bind time
(`quantities.py`), with Kronecker factors I (x) K detected here and reduced there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from ..records import Record, qsym


@dataclass
class OpFacts:
    normsq: sp.Expr
    lmin: sp.Expr
    rowmax: sp.Expr
    normsq_exact: bool
    lmin_exact: bool
    rows: sp.Expr
    full_identity: bool  # K^T K = a^2 I exactly
    record: Record
    name: str = ""
    # learned filters (derivation/filters.py): theta symbol -> m_l >= ||dK/dtheta_l||
    dtaps: dict = field(default_factory=dict)
    # a selection of one entry of x at fixed numbers (x given as Symbols, x[2]): its flat
    # position, so terms on single entries can add on the Hessian's diagonal (rules.py)
    entry: int | None = None


def _count(limits):
    return sp.Mul(*[lim[2] - lim[1] + 1 for lim in limits])


def affine_index(e, syms):
    """(symbol, shift) for e = s + c, (None, c) for a constant, else False."""
    e = sp.sympify(e)
    if e.is_Integer:
        return None, int(e)
    for s in syms:
        c = sp.simplify(e - s)
        if c.is_Integer:
            return s, int(c)
    return False


def summands(u):
    """The terms of u with every Sum of an Add split into Sums of its parts, so that the parts
    reading x (or theta) can be told from the rest: the linear map and offset of an atom's
    argument (`terms.split_affine`), theta's part of an offset (`upper_theta`)."""
    parts = []
    for a in sp.Add.make_args(u):
        if isinstance(a, sp.Sum) and a.function.is_Add:
            parts += [sp.Sum(b, *a.limits) for b in a.function.args]
        else:
            parts.append(a)
    return parts


def classify_operator(lin, limits, block, ctx, var="x", lse=False) -> OpFacts:
    """The linear map I -> lin_I: a selection or stencil (analytic norms) or a data operator."""
    spec = ctx.x if var == "x" else ctx.th
    shape = tuple(spec.shape)
    syms = [lim[0] for lim in limits]
    rows = _count(limits)
    data = [ix for ix in lin.atoms(sp.Indexed) if str(ix.base.label) != spec.name]
    if not lse and not data and not lin.has(sp.Sum) and not (lin.free_symbols & ctx.scalars):
        res = _structural(sp.expand(lin), limits, syms, shape, spec.name, rows)
        if res is not None:
            return res
    reduce = {}
    for lim in limits:
        r = _kron_axis(lin, lim, spec.name, shape)
        if r is not None:
            reduce[lim[0]] = r
    what = "x" if var == "x" else "theta"
    definition = (f"K?: {what} -> ({sp.sstr(lin)})_{{{', '.join(str(s) for s in syms) or '-'}}}, "
                  f"{sp.sstr(rows)} rows" + (f", per-sample blocks over {syms[:block]}"
                                              if 0 < block < len(syms) else ""))
    name = ctx.register(lin, limits, block, reduce, var, rows, definition)
    ns, lm, rm = qsym(f"normsq_{name}"), qsym(f"lmin_{name}"), qsym(f"rowmax_{name}")
    rec = Record(f"operator {name}", ns, "exact", True,
                 "data operator: norms computed at bind time (eigvalsh of the smaller Gram matrix "
                 "+ rounding margin; certified)", children=[], term=ctx.operators[name].definition)
    return OpFacts(ns, lm, rm, True, True, rows, False, rec, name)


def _kron_axis(lin, lim, xname, shape):
    """Axis r if index s appears in lin only as the bare r-th index of x over its full range."""
    s, lo, hi = lim
    axes = set()
    for ix in lin.atoms(sp.Indexed):
        own = str(ix.base.label) == xname
        for r, e in enumerate(ix.indices):
            if e.has(s):
                if not own or e != s:
                    return None
                axes.add(r)
    if len(axes) != 1:
        return None
    r = axes.pop()
    stripped = lin.xreplace({ix: sp.Dummy() for ix in lin.atoms(sp.Indexed)})
    if stripped.has(s) or lo != 0 or sp.simplify(hi - (shape[r] - 1)) != 0:
        return None
    return r


def _taps(lin, syms, xname):
    """(signature, {shift: tap}) for lin = sum of number * x[outer index + shift], else None."""
    reads = []
    for arg in sp.Add.make_args(lin):
        coeff, rest = arg.as_coeff_Mul()
        if not (isinstance(rest, sp.Indexed) and str(rest.base.label) == xname):
            return None
        reads.append((rest, coeff))
    return collect_taps(reads, syms)


def collect_taps(reads, syms):
    """(signature, {shift: tap}) of the reads [(x[outer index + shift], tap), ...] when every
    read has the same affine signature in the outer indices `syms`, each of them used exactly
    once, and some tap is nonzero; else None. What a shift-structured operator (here) and a
    filter with symbolic taps (filters.py) both are."""
    taps, sig = {}, None
    for read, coeff in reads:
        pos = [affine_index(e, syms) for e in read.indices]
        if any(p is False for p in pos):
            return None
        this_sig = tuple(p[0] for p in pos)
        if sig is not None and sig != this_sig:
            return None
        sig = this_sig
        shift = tuple(p[1] for p in pos)
        taps[shift] = taps.get(shift, 0) + coeff
    taps = {k: v for k, v in taps.items() if v != 0}
    used = [s for s in sig if s is not None] if sig else []
    if not taps or len(set(used)) != len(used) or set(used) != set(syms):
        return None
    return sig, taps


def _structural(lin, limits, syms, shape, xname, rows):
    found = _taps(lin, syms, xname)
    if found is None:
        return None
    sig, taps = found
    if len(taps) == 1:
        (shift, a), = taps.items()
        full = True
        lims = {lim[0]: lim for lim in limits}
        for r, (s, c) in enumerate(zip(sig, shift)):
            if s is None:
                full = full and shape[r] == 1 and c == 0
            else:
                _, lo, hi = lims[s]
                full = full and sp.simplify(lo + c) == 0 and sp.simplify(hi + c - shape[r] + 1) == 0
        a2 = sp.sympify(a) ** 2
        lmin = a2 if full else sp.S.Zero
        desc = (f"selection {a}*{xname}[...] ({'every entry once' if full else 'a subset of entries'}):"
                f" K^T K = {a2}*{'I' if full else 'diag(0/1)'}; ||K||^2 = {a2}, lambda_min = {lmin}")
        rec = Record("operator (selection)", a2, "exact", True, desc)
        return OpFacts(a2, lmin, sp.Abs(a), True, True, rows, full, rec, "selection",
                       entry=_flat_entry(sig, shift, shape))
    l1 = sum(abs(v) for v in taps.values())
    l2 = sp.sqrt(sum(v**2 for v in taps.values()))
    zero_sum = sum(taps.values()) == 0
    text = ", ".join(f"{v}@{k}" for k, v in sorted(taps.items()))
    desc = (f"stencil (in-bounds Toeplitz section) with taps {text}: ||K|| <= ||k||_1 = {l1} "
            f"(Young), ||K||^2 <= {l1**2}; rows have norm ||k||_2 = {l2}"
            + ("; taps sum to 0: constants are in the kernel, lambda_min = 0" if zero_sum else ""))
    rec = Record("operator (stencil)", l1**2, "bound", True, desc)
    return OpFacts(sp.sympify(l1**2), sp.S.Zero, l2, False, zero_sum, rows, False, rec, "stencil")


def _flat_entry(sig, shift, shape) -> int | None:
    """The flat (C order) position of a selection that reads x at fixed numbers (no summation
    index) in an x of numeric shape, else None."""
    if any(s is not None for s in sig) or not all(sp.sympify(d).is_Integer for d in shape):
        return None
    dims = [int(d) for d in shape]
    if not all(0 <= int(c) < d for c, d in zip(shift, dims)):
        return None
    flat = 0
    for c, d in zip(shift, dims):
        flat = flat * d + int(c)
    return flat


def stacked_stencil(lins, limits, ctx):
    """Stencils D_1..D_k stacked per outer index (a group atom's argument D_p x in R^k)."""
    syms = [lim[0] for lim in limits]
    found = [_taps(sp.expand(lin), syms, ctx.x.name) for lin in lins]
    if any(f is None for f in found) or len({f[0] for f in found}) != 1:
        return None
    shifts = sorted({k for _, taps in found for k in taps})
    M = sp.Matrix([[taps.get(k, 0) for k in shifts] for _, taps in found])
    block = sp.sqrt(max(sp.Matrix(M * M.T).eigenvals()))  # exact spectral norm of D_p
    normsq = sum(sum(abs(v) for v in taps.values()) ** 2 for _, taps in found)
    zero = all(sum(taps.values()) == 0 for _, taps in found)
    desc = (f"{len(lins)} stencils stacked per outer index, D_p = {M.tolist()} on shifts {shifts}: "
            f"||D||^2 <= sum_k ||k_k||_1^2 = {normsq} (Young per component), ||D_p|| = {block} "
            f"(exact)" + ("; constants are in the kernel, lambda_min = 0" if zero else ""))
    rec = Record("operator (stacked stencils)", normsq, "bound", True, desc)
    return OpFacts(sp.sympify(normsq), sp.S.Zero, block, False, zero, len(lins) * _count(limits),
                   False, rec, "stacked stencils")
