"""`derive`: the structural rules over the terms of g and f, combined into a Derivation.

Weyl: the Hessian of g is the sum of the terms' Hessians, so the curvature intervals, L_A and
the cross-derivative columns add. Strong convexity is certified (mu > 0 proved symbolically),
conditional (mu > 0 depends on a data quantity or on theta: checked at bind / evaluate), refuted
(every x-dependence goes through linear maps with fewer rows than dim x, or a fixed-size problem
whose Hessian has a negative eigenvalue at a witness point: ProblemError), or unknown
(ProblemError unless allow_uncertified, and then nothing is certified).
"""
from __future__ import annotations

import warnings

import numpy as np
import sympy as sp

from ...errors import ProblemError
from ..records import Derivation, Record, ThetaMin, ridge_term
from .contraction import complete
from .filters import XINF
from .terms import Ctx, analyse_term, flatten


def _hint(ctx: Ctx) -> str:
    """What to add, in the problem's own x and theta."""
    x = ctx.problem.x
    symbols = [x.name] if isinstance(x, sp.Symbol) else (
        [s.name for s in x] if isinstance(x, (list, tuple)) else None)
    term = ridge_term(ctx.x.name, ctx.x_shape, ctx.problem.theta_names or [], symbols)
    return f"Add a strongly convex term such as {term}"


def _kind(exprs_exact, expr, estimate=False):
    if expr == sp.oo:
        return "infinite"
    if estimate:
        return "estimate"
    return "exact" if exprs_exact else "bound"


def _term_record(name, t, expr, exact):
    est = any(p.kind == "estimate" for p in t.parts)
    if t.kind != "unsupported":
        kind = _kind(exact, expr, est)
    else:
        kind = "infinite" if (t.certified and expr in (sp.oo, -sp.oo)) else "assumed"
    return Record(f"{name}[{t.label}]", expr, kind, t.certified, t.rule or t.message,
                  children=[Record(p.name, p.expr, p.kind, p.certified, p.rule, term=p.term,
                                   message=p.message) for p in t.parts],
                  term=t.source, message=t.message if t.kind != "unsupported" else "")


def _sum(values):
    if any(v == sp.oo for v in values):
        return sp.oo
    if any(v == -sp.oo for v in values):
        return -sp.oo
    return sp.Add(*values)


def _lb(cols, ps):
    if None in cols or any(v == sp.oo for v in cols.values()) or ps == sp.oo:
        return sp.oo
    vals = [v for v in cols.values() if v != 0]
    main = vals[0] if len(vals) == 1 else sp.sqrt(sp.Add(*[v**2 for v in vals]))
    return main + ps


def derive(problem, allow_uncertified: bool = False) -> Derivation:
    """Derive mu, L, L_A, L_B, L_f (and L_ft) of a Problem with an audit trail."""
    ctx = Ctx(problem)
    gt = [analyse_term(t, ctx, f"g{k + 1}") for k, t in enumerate(flatten(problem.g, ctx))]
    ft = [analyse_term(t, ctx, f"f{k + 1}", upper=True) for k, t in enumerate(flatten(problem.f, ctx))]
    stated = dict(problem.constants or {})
    refute, refutation = _rows_refutation(gt, ctx)
    if refute:
        raise ProblemError(refute)
    for t in ft:  # an upper-level term without a rule only makes L_f infinite (still sound)
        if t.kind == "unsupported":
            t.certified, t.lo, t.hi = True, -sp.oo, sp.oo
    messages, uncertified_reason = _admit_lower_terms(gt, stated, allow_uncertified)
    records = _lower_records(gt, ctx.dim) | _upper_records(ft, ctx.has_theta(sp.sympify(problem.f)),
                                                           ctx.dim)
    ball = _ball_records(gt, ft, records, stated)
    mu_check, reason = _strong_convexity(records["mu"], gt, problem, ctx, messages,
                                         allow_uncertified or "mu" in stated)
    uncertified_reason = uncertified_reason or reason
    if uncertified_reason:
        for r in list(records.values()) + list(ball.get("constants", {}).values()):
            r.uncertify(uncertified_reason)
        warnings.warn(f"{problem.name}: constants not certified: {uncertified_reason}", stacklevel=2)
    _apply_stated(records, stated, ctx)
    status = ("uncertified" if not all(r.certified for r in records.values())
              else "certified" if mu_check == "proved" else "conditional")
    return Derivation(
        problem=problem.name, constants=records, operators=ctx.operators,
        quantities=ctx.quantities,
        theta_symbols=sorted((s.name, k if isinstance(k, int) else sp.sstr(k))
                             for k, s in ctx.theta_syms.items()),
        theta_name=ctx.th.name, x_name=ctx.x.name, x_shape=ctx.x_shape,
        theta_shape=tuple(ctx.th.shape), sizes=[s.name for s in problem.sizes],
        scalars=ctx.scalar_names,
        data_shapes={a.name: tuple(a.shape) for a in problem.data_specs},
        conditions=sorted(ctx.conditions.items()), status=status,
        allow_uncertified=allow_uncertified, messages=messages + [
            t.message for t in gt + ft if t.message and t.kind != "unsupported"],
        refutation=refutation, mu_check=mu_check, ball=ball,
        contractions=complete({t.label: t.contraction for t in gt if t.contraction}, gt))


def _admit_lower_terms(gt: list, stated: dict, allow_uncertified: bool) -> tuple[list, str]:
    """Refuse estimated or rule-less terms of g unless the user allows uncertified constants (or
    states mu); rule-less terms are then assumed convex. Returns (messages, uncertified reason)."""
    estimated = [t for t in gt if t.kind != "unsupported" and not t.certified]
    if estimated and not allow_uncertified and "mu" not in stated:
        raise ProblemError("constants not certifiable: " + "; ".join(
            f"{t.label} = {t.shown}: {t.message or 'curvature only estimated'}" for t in estimated)
            + " (pass allow_uncertified=True to use the estimates)")
    unknown = [t for t in gt if t.kind == "unsupported"]
    if not unknown:
        return [], ""
    text = "; ".join(f"{t.label} = {t.shown}: {t.message}" for t in unknown)
    if not allow_uncertified and "mu" not in stated:
        raise ProblemError(f"strong convexity unknown: {text}. Rewrite the term with "
                           f"table atoms, or pass allow_uncertified=True to assume it convex")
    for t in unknown:
        t.lo, t.hi, t.LA, t.LB_cols, t.LB_ps = sp.S.Zero, sp.oo, sp.oo, {None: sp.oo}, sp.oo
        t.message += " (assumed convex: NOT certified)"
    return [f"unknown terms assumed convex: {text}"], "rests on terms assumed convex"


def _lower_records(gt: list, dim: sp.Expr) -> dict:
    """mu, L, L_A, L_B of g: Weyl over the terms (Hessians, third derivatives, B's columns add)."""
    records = {}
    certified = all(t.certified for t in gt)
    nonscalar = sum(1 for t in gt if not t.scalar)
    diagonal = _diagonal(gt, dim)
    rest = gt if diagonal is None else [t for t in gt if t.diagonal is None]
    extra = "" if diagonal is None else (
        "; the terms on single entries of x add on the Hessian's diagonal, whose extreme "
        "eigenvalues are the min and max over entries of their summed bounds")
    mu = _sum([t.lo for t in rest] + ([] if diagonal is None else [diagonal[0]]))
    exact = diagonal is None and nonscalar <= 1
    records["mu"] = Record("mu", mu, _kind(all(t.lo_exact for t in gt) and exact, mu),
                           certified,
                           "Weyl: the Hessian is the sum of the terms' Hessians; mu = sum of the "
                           "terms' lower curvature bounds" + extra,
                           children=[_term_record("mu", t, t.lo, t.lo_exact) for t in gt])
    L = _sum([t.hi for t in rest] + ([] if diagonal is None else [diagonal[1]]))
    records["L"] = Record("L", L, _kind(all(t.hi_exact for t in gt) and exact, L),
                          certified, "Weyl: L = sum of the terms' upper curvature bounds" + extra,
                          children=[_term_record("L", t, t.hi, t.hi_exact) for t in gt])
    LA = _sum([t.LA for t in gt])
    records["L_A"] = Record("L_A", LA, _kind(LA == 0, LA), certified,
                            "sum over terms of |c| max w sup|psi'''| ||K||^2 max_I ||K_I|| "
                            "(quadratic terms: 0)",
                            children=[_term_record("L_A", t, t.LA, t.LA == 0) for t in gt],
                            message="; ".join(sorted({t.message for t in gt
                                                      if t.LA == sp.oo and t.message})))
    L3 = _sum([t.L3 for t in gt])
    records["L_3"] = Record("L_3", L3, _kind(L3 == 0, L3), certified,
                            "Lipschitz constant of x -> DA(x) (fourth derivative of g): sum over "
                            "terms of |c| max w sup|psi''''| ||K||^2 max_I ||K_I||^2 (quadratic "
                            "terms: 0; group atoms: sup of the form's norm; infinite where the atom "
                            "table has no sup|psi''''|)",
                            children=[_term_record("L_3", t, t.L3, t.L3 == 0) for t in gt])
    LDB = _sum([t.LDB for t in gt])
    records["L_DB"] = Record(
        "L_DB", LDB, _kind(LDB == 0, LDB), certified,
        "Lipschitz constant of x -> d(B u)/dx per ||u||: 0 for terms without theta or quadratic "
        "in x (B affine in x); otherwise (sqrt(sum_l L_l^2) + |c| max|w'| sup|psi'''|) ||K||^2 "
        "max_I ||K_I||, L_l = |dc/dtheta_l| max w sup|psi'''| + |c| max w sup|d psi'''/dtheta_l| "
        "(theta in the coefficient, a per-sample weight w(theta_I), a Charbonnier's nu; infinite "
        "for theta in the atom's argument or an atom without d psi'''/dtheta; theta in a "
        "filter's taps: infinite here, finite on the ball, docs/constants.md 8.3)",
        children=[_term_record("L_DB", t, t.LDB, t.LDB == 0) for t in gt])
    cols, ps = {}, sp.S.Zero
    for t in gt:
        for s, v in t.LB_cols.items():
            cols[s] = cols.get(s, 0) + v
        ps = ps + t.LB_ps
    LB = _lb(cols, ps)
    records["L_B"] = Record(
        "L_B", LB, _kind(LB == 0, LB), certified,
        "columns of B: theta_l in a coefficient c gives |dc/dtheta_l| sup|psi''| ||K||^2, in an "
        "atom parameter |c| sup|d psi''/d theta_l| ||K||^2 (added over terms), combined as "
        "sqrt(sum of squares); per-sample weights add max|v'| sup|psi''| max_I||K_I|| ||K||",
        children=[_term_record("L_B", t, _lb(dict(t.LB_cols), t.LB_ps),
                               _lb(dict(t.LB_cols), t.LB_ps) == 0) for t in gt],
        message="; ".join(sorted({t.LB_note for t in gt if t.LB_note})))
    return records


#: Largest x (entries) whose single-entry terms are grouped on the diagonal (`_diagonal`):
#: x given as a list of Symbols is small; the min over entries is a SymPy Min of D terms.
DIAGONAL_MAX = 256


def _diagonal(gt: list, dim: sp.Expr) -> tuple[sp.Expr, sp.Expr] | None:
    """(lower, upper) curvature bounds of the terms on single fixed entries of x (x given as
    Symbols: exp(t)/2 (x0**2 + x1**2) is two terms, each 0 in mu alone) taken together: their
    Hessians are diagonal, entry k's in [sum of their lower bounds on k, sum of upper], so the
    sum's eigenvalues lie in [min_k, max_k] (an entry no such term reads counts 0). None for
    fewer than two such terms or an x whose size is not a number up to DIAGONAL_MAX."""
    on = [t for t in gt if t.diagonal is not None]
    if len(on) < 2 or not (dim.is_Integer and int(dim) <= DIAGONAL_MAX):
        return None
    lows, highs = [sp.S.Zero] * int(dim), [sp.S.Zero] * int(dim)
    for t in on:
        k, lo, hi = t.diagonal
        lows[k], highs[k] = lows[k] + lo, highs[k] + hi
    return sp.Min(*lows), sp.Max(*highs)


LFT_ZERO_RULE = ("theta enters f only through terms without x: grad_theta f does not depend on "
                 "x, so its Lipschitz constant in x is 0")


def _upper_records(ft: list, f_reads_theta: bool, dim: sp.Expr) -> dict:
    """L_f (Weyl over the terms of f, those on single entries of x together, `_diagonal`) and,
    when f reads theta, L_ft. `flatten` drops the terms of f without x; when theta sits only
    there (f = ||x - y||^2/2 + theta^2), grad_theta f is constant in x and L_ft = 0 exactly
    (without this record the consumers would read L_ft = inf)."""
    diagonal = _diagonal(ft, dim)
    rest = ft if diagonal is None else [t for t in ft if t.diagonal is None]
    Lf = _curvature_bound(_sum([t.lo for t in rest] + ([] if diagonal is None else [diagonal[0]])),
                          _sum([t.hi for t in rest] + ([] if diagonal is None else [diagonal[1]])))
    nfs = sum(1 for t in ft if not t.scalar)
    records = {"L_f": Record(
        "L_f", Lf, _kind(all(t.hi_exact and t.lo_exact for t in ft) and nfs <= 1, Lf),
        all(t.certified for t in ft),
        "max(|m_f|, |M_f|) of the upper level's curvature interval (Weyl over the terms of f)",
        children=[_term_record("L_f", t, t.hi, t.hi_exact) for t in ft],
        message="; ".join(t.message for t in ft if t.kind == "unsupported"))}
    LHf = _sum([t.LA for t in ft])
    records["L_Hf"] = Record("L_Hf", LHf, _kind(LHf == 0, LHf), all(t.certified for t in ft),
                             "Lipschitz constant of x -> H_f(x): the rule of L_A over the terms "
                             "of f (quadratic f: 0)",
                             children=[_term_record("L_Hf", t, t.LA, t.LA == 0) for t in ft])
    if any(t.has_theta for t in ft):
        Lft = _sum([t.Lft for t in ft if t.has_theta])
        records["L_ft"] = Record("L_ft", Lft, _kind(False, Lft), all(t.certified for t in ft),
                                 "Lipschitz constant in x of grad_theta f: theta in the offset of a "
                                 "quadratic atom gives |c| psi'' ||K_x|| ||K_theta||, theta in the "
                                 "coefficient alone ||grad c|| sup|psi'| ||K|| sqrt(rows); "
                                 "otherwise infinite (no rule)",
                                 children=[_term_record("L_ft", t, t.Lft, False)
                                           for t in ft if t.has_theta])
    elif f_reads_theta:
        records["L_ft"] = Record("L_ft", sp.S.Zero, "exact", True, LFT_ZERO_RULE)
    return records


def _strong_convexity(mu_record: Record, gt: list, problem, ctx: Ctx, messages: list,
                      may_stay_unknown: bool) -> tuple[str, str]:
    """How mu > 0 is known: proved, data (checked at bind), theta (checked at evaluate) or none
    (refuted by a witness, or unknown: ProblemError unless allowed). Returns (status, reason to
    uncertify)."""
    mu = mu_record.expr
    mu_check = _mu_status(mu, ctx)
    if mu_check == "none":
        witness = _witness(problem, ctx)
        if witness:
            raise ProblemError(witness)
        msg = (f"strong convexity unknown: the curvature lower bound mu = {sp.sstr(mu)} is not "
               f"provably positive (terms: "
               + "; ".join(f"{t.label} = {t.shown} gives {sp.sstr(t.lo)}" for t in gt)
               + f"). {_hint(ctx)}")
        if not may_stay_unknown:
            raise ProblemError(msg)
        messages.append(msg)
        return mu_check, "strong convexity unknown"
    if mu_check == "theta":
        mu_record.theta_region = f"where {sp.sstr(mu)} > 0 (checked at evaluate)"
    elif mu_check == "data":
        mu_record.theta_region = "all theta, if the data quantities make mu > 0 (checked at bind)"
    return mu_check, ""


def _apply_stated(records: dict, stated: dict, ctx: Ctx) -> None:
    """Constants the user states replace the derived ones (kept as children): assumed, never
    certified."""
    for key, value in stated.items():
        expr = ctx.thetafy(sp.sympify(value))
        old = records.get(key)
        records[key] = Record(key, expr, "assumed", False,
                              "stated by the user (Problem(constants=...)): not certified; "
                              "spot-check by sampling", children=[old] if old else [])


BALL_RULE = ("on the ball B(x, r) only (docs/framework.md section 8.4): the rules of the global constant "
             "with sup|psi''|, sup|psi'''|, sup|psi''''| of each unbounded atom psi(k_i.x + b_i) "
             "taken over [z_i - r||k_i||, z_i + r||k_i||], z = K x + b at the centre "
             "(ball_hi/peak/d3/d4_<term>, evaluated by constants.local.evaluate_local); mu stays "
             "global")


XINF_RULE = ("; learned filters: |(dK/dtheta_l y)_I| <= m_l ||y||_inf <= m_l ball_xinf on the "
             "ball, ball_xinf = ||x||_inf + r (docs/constants.md 8)")


LDB_BALL_RULE = ("; theta in a learned filter's taps: column l adds |c| m_l (2 sup|psi'''| "
                 "||K|| max_I||K_I|| + ||K||^2 (sup|psi''''| max_I||K_I|| ball_xinf + "
                 "sup|psi'''|)), the change of c (dK_l^T diag psi'' K + K^T diag psi'' dK_l + "
                 "K^T diag(psi''' dK_l x) K) (docs/constants.md 8.3)")


def _ball_records(gt, ft, records, stated):
    """Ball versions of L, L_A, L_B, L_3, L_DB, L_f and L_Hf where some term has an unbounded
    atom (never mu)."""
    if not any(t.ball for t in gt + ft):
        return {}
    terms = {t.label: t.ball["info"] for t in gt + ft if t.ball and t.ball["info"] is not None}

    def val(t, key):
        return t.ball.get(key, getattr(t, key)) if t.ball else getattr(t, key)

    exprs = {}
    exprs["L"] = (_sum([val(t, "hi") for t in gt]), gt)
    exprs["L_A"] = (_sum([val(t, "LA") for t in gt]), gt)
    cols, ps = {}, sp.S.Zero
    for t in gt:
        for s, v in (t.ball["LB_cols"] if t.ball else t.LB_cols).items():
            cols[s] = cols.get(s, 0) + v
        ps = ps + val(t, "LB_ps")
    exprs["L_B"] = (_lb(cols, ps), gt)
    exprs["L_DB"] = (_sum([val(t, "LDB") for t in gt]), gt)
    exprs["L_3"] = (_sum([val(t, "L3") for t in gt]), gt)
    if any(t.ball for t in ft):
        Lf = _curvature_bound(_sum([t.lo for t in ft]), _sum([val(t, "hi") for t in ft]))
        exprs["L_f"] = (Lf, ft)
        exprs["L_Hf"] = (_sum([val(t, "LA") for t in ft]), ft)
    out = {}
    for name, (expr, ts) in exprs.items():
        if name in stated or name not in records or expr == sp.oo or expr == records[name].expr:
            continue
        if not expr.free_symbols or not any(s.name.startswith("ball_") for s in expr.free_symbols):
            continue
        interval = any(s.name.startswith(("ball_hi_", "ball_peak_", "ball_d3_", "ball_d4_"))
                       for s in expr.free_symbols)
        rule = (BALL_RULE if interval else "on the ball B(x, r) only (docs/framework.md section "
                "8.4): the rules of the global constant") + (XINF_RULE if XINF in expr.free_symbols
                                                              else "")
        if name == "L_DB":
            rule += LDB_BALL_RULE
        out[name] = Record(name, expr, "bound", all(t.certified for t in ts), rule,
                           domain="ball", term=", ".join(t.label for t in ts if t.ball))
        records[name].message = ((records[name].message + "; ") if records[name].message else "") \
            + "a local (ball) bound exists: constants.evaluate_local"
    if not out:
        return {}
    return {"constants": out, "terms": terms}


def _mu_status(mu, ctx):
    pos = {s: sp.Symbol(s.name, positive=True) for s in mu.free_symbols if s.name in ctx.conditions}
    m = mu.xreplace(pos)
    if m == -sp.oo:
        return "none"
    if m.is_positive:
        return "proved"
    if m == 0 or m.is_nonpositive:
        return "none"
    theta = set(ctx.theta_syms.values())
    if m.free_symbols & theta or m.has(ThetaMin):
        return "theta"
    if any(s.name in ctx.quantities for s in m.free_symbols):
        return "data"
    return "none"


def _rows_refutation(gt, ctx):
    """Refuted when every x-dependence goes through linear maps with < dim x rows in total."""
    if any(t.rows is None for t in gt):
        return None, None
    rows = [(f"{t.label} = {t.shown}", t.rows) for t in gt if t.kind != "linear"]
    info = {"rows": rows, "dim": ctx.dim}
    gap = sp.simplify(ctx.dim - sp.Add(*[r for _, r in rows]))
    if gap.is_positive:
        terms = "; ".join(f"{s} (K with {sp.sstr(r)} rows)" for s, r in rows)
        return (f"refuted: g is not strongly convex: every x-dependence goes through linear maps "
                f"with {sp.sstr(sp.Add(*[r for _, r in rows]))} rows in total < dim x = "
                f"{sp.sstr(ctx.dim)}, so g is constant along their common kernel; terms: {terms}. "
                f"{_hint(ctx)}"), info
    return None, info


def _witness(problem, ctx):
    """Fixed-size, data-free g: a point where the unrolled Hessian has a negative eigenvalue."""
    g = problem.g
    if not all(s.is_Integer for s in ctx.x_shape) or problem.data_specs:
        return None
    try:
        g = g.doit()
    except Exception:  # noqa: BLE001 - any failure just means no witness
        return None
    if g.atoms(sp.Sum):
        return None
    shape = tuple(int(s) for s in ctx.x_shape)
    d = int(np.prod(shape))
    xs = sp.symbols(f"w0:{d}", real=True)
    rep = {}
    for ix in g.atoms(sp.Indexed):
        name = str(ix.base.label)
        if name == ctx.x.name:
            rep[ix] = xs[int(np.ravel_multi_index(tuple(int(e) for e in ix.indices), shape))]
        elif name == ctx.th.name:
            rep[ix] = sp.S.Zero
    H = sp.lambdify([xs], sp.hessian(g.xreplace(rep), xs), "numpy")
    rng = np.random.default_rng(0)
    for pt in [np.zeros(d)] + [rng.uniform(-1, 1, d) for _ in range(8)]:
        ev = np.linalg.eigvalsh(np.asarray(H(pt), dtype=float))
        if ev[0] < -1e-9:
            return (f"refuted: g is not convex: at x = {np.round(pt, 4).tolist()} (theta = 0) the "
                    f"Hessian has the eigenvalue {ev[0]:.6g} < 0. Check the negative-curvature "
                    f"terms of {problem.show(problem.g)}. {_hint(ctx)}")
    return None


def _curvature_bound(lo, hi):
    """max(|lo|, |hi|) for a curvature interval [lo, hi] (L_f of the upper level), symbolic."""
    if lo == -sp.oo or hi == sp.oo:
        return sp.oo
    if lo.is_nonnegative or lo == 0:
        return hi
    if hi.is_nonpositive:
        return -lo
    return sp.Max(-lo, hi)
