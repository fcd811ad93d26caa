"""From a canonical objective to terms, atoms and linear operators (docs/constants.md section 3).

`flatten` splits g into terms coef(theta) * Sum_I w_I(theta_I) * core_I (x-free parts dropped),
`analyse_term` recognises the core (linear, psi(k_I.x + b_I), log-sum-exp over an inner index)
and the operator K (selection, stencil or data), and returns the term's curvature interval, L_A
and cross-derivative bounds as SymPy expressions, with the records that explain them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from ...primitives import stabilise
from ..records import Operator, Record, T, ThetaMax, ThetaMin
from .atoms import AtomFacts, analyse_atom, group_charbonnier, lse_facts
from .ball import ball_symbols, term_info
from .contraction import contraction_info
from .filters import filter_operator, learned_columns, stacked_filters
from .ldb import cross_lipschitz, learned_cross_lipschitz, offset_slopes
from .ldb import mul as _mul
from .operators import OpFacts, classify_operator, stacked_stencil, summands
from .upper_theta import upper_theta_lipschitz


# -- reads and degrees ------------------------------------------------------------------------
def reads(expr, name):
    return [ix for ix in expr.atoms(sp.Indexed) if str(ix.base.label) == name]


class VarReads:
    """Which expressions read x or theta, and their degree in x: all that `flatten`,
    `max_affine` and `split_affine` need (a Derivation read back from JSON gives the names)."""

    def __init__(self, x_name: str, theta_name: str):
        self.x_name, self.theta_name = x_name, theta_name

    def has_x(self, expr) -> bool:
        return any(str(ix.base.label) == self.x_name for ix in expr.atoms(sp.Indexed))

    def has_theta(self, expr) -> bool:
        return any(str(ix.base.label) == self.theta_name for ix in expr.atoms(sp.Indexed))

    def degree(self, expr) -> int | sp.Expr:
        """Polynomial degree in the x entries (oo when x sits inside a nonlinear function)."""
        if not self.has_x(expr):
            return 0
        if isinstance(expr, sp.Indexed):
            return 1
        if expr.is_Add:
            return max(self.degree(a) for a in expr.args)
        if expr.is_Mul:
            return sum(self.degree(a) for a in expr.args)
        if expr.is_Pow and expr.exp.is_Integer and expr.exp >= 0:
            return self.degree(expr.base) * int(expr.exp)
        if isinstance(expr, sp.Sum):
            if any(self.has_x(l) for lim in expr.limits for l in lim[1:]):
                return sp.oo
            return self.degree(expr.function)
        return sp.oo


class Ctx(VarReads):
    """What the analysis needs of the problem, plus the registry of data operators."""

    def __init__(self, problem):
        self.problem = problem
        super().__init__(problem.x_spec.name, problem.theta_spec.name)
        self.x = problem.x_spec
        self.th = problem.theta_spec
        self.x_shape = tuple(self.x.shape)
        self.dim = sp.Mul(*self.x_shape)
        names = problem.theta_names
        n_fixed = int(self.th.shape[0]) if self.th.shape[0].is_Integer else None
        self._names = names
        self.theta_syms = {}  # flat index -> Symbol
        self.n_fixed = n_fixed
        self.scalars = {sp.Symbol(a.name) for a in problem.data_specs if a.shape == ()}
        self.scalar_names = sorted(a.name for a in problem.data_specs if a.shape == ())
        self.sizes = set(problem.sizes)
        self.operators = {}
        self.quantities = {}
        self.conditions = {}  # scalar data symbol name -> message

    def theta_symbol(self, k: int | sp.Expr) -> sp.Symbol:
        """The real Symbol of theta's entry k: a number, or an expression in the sizes (the
        entry theta[m + n] of a theta of m + n + 1 entries, known at bind)."""
        if k not in self.theta_syms:
            if not isinstance(k, int):
                name = f"{self.th.name}[{sp.sstr(k)}]"
            elif self._names is not None and k < len(self._names):
                name = self._names[k]
            elif len(self.th.shape) == 2:  # numeric shape (Problem checks it)
                pos = np.unravel_index(k, tuple(int(s) for s in self.th.shape))
                name = f"{self.th.name}[{', '.join(str(int(p)) for p in pos)}]"
            else:
                name = f"{self.th.name}[{k}]"
            self.theta_syms[k] = sp.Symbol(name, real=True)
        return self.theta_syms[k]

    def thetafy(self, expr):
        """theta[k] (k a number; theta[f, k] for a 2-D theta, flattened in C order) -> real
        Symbol; None if a theta read has a symbolic index."""
        rep = {}
        for ix in reads(expr, self.th.name):
            flat = self.theta_flat(ix)
            if flat is None:
                return None
            rep[ix] = self.theta_symbol(flat)
        return expr.xreplace(rep)

    def theta_flat(self, ix) -> int | sp.Expr | None:
        """The flat (C order) position of the theta read ix: a number, an expression in the
        sizes alone for a 1-D theta (theta[m + n]: one entry, fixed once the data are bound),
        None for an index that reads a loop index or anything else."""
        if len(ix.indices) == 1 and not ix.indices[0].is_Integer:
            e = sp.sympify(ix.indices[0])
            return e if e.free_symbols and e.free_symbols <= self.sizes else None
        if len(ix.indices) != len(self.th.shape) or not all(e.is_Integer for e in ix.indices):
            return None
        if len(ix.indices) == 1:
            return int(ix.indices[0])
        if not all(s.is_Integer for s in self.th.shape):
            return None
        return int(np.ravel_multi_index(tuple(int(e) for e in ix.indices),
                                        tuple(int(s) for s in self.th.shape)))

    def register(self, lin, limits, block, reduce, var, rows, definition) -> str:
        for name, op in self.operators.items():  # one operator per distinct map
            if op.lin == lin and op.limits == tuple(limits) and op.block == block and op.var == var:
                return name
        name = f"K{len(self.operators) + 1}"
        self.operators[name] = Operator(name, lin, tuple(limits), block, reduce, var, rows,
                                        definition.replace("K?", name))
        for what, desc in (("normsq", f"||{name}||^2 = lambda_max({name}^T {name})"),
                           ("lmin", f"lambda_min({name}^T {name})"),
                           ("rowmax", f"max_I ||{name}_I|| (largest row or per-sample block)")):
            self.quantities[f"{what}_{name}"] = {"operator": name, "what": what,
                                                 "description": desc}
        return name


# -- flattening ------------------------------------------------------------------------------
@dataclass
class Term:
    coef: sp.Expr
    weight: sp.Expr
    limits: tuple
    core: sp.Expr

    @property
    def source(self) -> str:
        """The term in the canonical names (x[k], theta[k]): records keep it and parse it back."""
        return sp.sstr(self.expression())

    def shown(self, names: dict) -> str:
        """The term for messages, in the user's own Symbols (`Problem.shown`)."""
        return sp.sstr(self.expression().xreplace(names))

    def expression(self) -> sp.Expr:
        body = self.weight * self.core
        inner = sp.Sum(body, *self.limits) if self.limits else body
        return sp.Mul(self.coef, inner, evaluate=False) if self.coef != 1 else inner


def flatten(expr, ctx: Ctx) -> list:
    out = []
    _flatten(stabilise(sp.sympify(expr)), sp.S.One, sp.S.One, (), ctx, out)
    res = []
    for t in out:  # sums over indices the term does not use are multiplicities
        keep, coef = [], t.coef
        for lim in t.limits:
            if t.core.has(lim[0]) or t.weight.has(lim[0]):
                keep.append(lim)
            else:
                coef = coef * (lim[2] - lim[1] + 1)
        res.append(Term(coef, t.weight, tuple(keep), t.core))
    return res


def _flatten(expr, coef, weight, limits, ctx, out):
    if not ctx.has_x(expr):
        return
    if expr.is_Add:
        for a in expr.args:
            _flatten(a, coef, weight, limits, ctx, out)
    elif expr.is_Mul:
        xdep = [a for a in expr.args if ctx.has_x(a)]
        bound = [lim[0] for lim in limits]
        free = [a for a in expr.args if not ctx.has_x(a)]
        c = sp.Mul(*[a for a in free if not any(a.has(s) for s in bound)])
        w = sp.Mul(*[a for a in free if any(a.has(s) for s in bound)])
        if len(xdep) == 1:
            _flatten(xdep[0], coef * c, weight * w, limits, ctx, out)
        else:
            out.append(Term(coef * c, weight * w, limits, sp.Mul(*xdep)))
    elif isinstance(expr, sp.Sum):
        _flatten(expr.function, coef, weight, limits + tuple(expr.limits), ctx, out)
    else:
        out.append(Term(coef, weight, limits, expr))


# -- term analysis ---------------------------------------------------------------------------
@dataclass
class TermFacts:
    label: str
    source: str
    shown: str  # source in the user's Symbols, for messages
    kind: str  # linear | atom | lse | unsupported
    lo: sp.Expr = sp.S.Zero
    hi: sp.Expr = sp.S.Zero
    lo_exact: bool = True
    hi_exact: bool = True
    scalar: bool = True  # Hessian exactly s I (or 0)
    LA: sp.Expr = sp.S.Zero
    L3: sp.Expr = sp.S.Zero  # Lipschitz constant of x -> D(Hessian)(x): sup|psi''''| rule
    B_affine: bool = True  # B = d_theta grad_x g of this term is affine in x
    LDB: sp.Expr = sp.S.Zero  # Lipschitz constant of x -> d(B u)/dx per ||u|| (0: B affine)
    LB_cols: dict = field(default_factory=dict)
    LB_ps: sp.Expr = sp.S.Zero
    LB_note: str = ""
    Lft: sp.Expr = sp.S.Zero
    certified: bool = True
    rows: sp.Expr | None = sp.S.Zero
    rule: str = ""
    message: str = ""
    parts: list = field(default_factory=list)  # Records: atom, operator, weights
    has_theta: bool = False
    ball: dict | None = None  # local (ball) versions of hi, LA, LB_cols, LB_ps + rebuild info
    contraction: dict | None = None  # what ||DA(x)[u]|| needs at one x (derivation/contraction.py)
    # a term on one fixed entry k of x (x given as Symbols): (k, lower, upper curvature along
    # e_k); such terms add on the Hessian's diagonal (rules.py)
    diagonal: tuple | None = None


def _sign(c, ctx):
    """'+', '-' or '?' for coefficient c; scalar data may be assumed positive (checked at bind)."""
    if c.is_nonnegative:
        return "+"
    if c.is_nonpositive:
        return "-"
    data = c.free_symbols & ctx.scalars
    if data:
        pos = {s: sp.Symbol(s.name, positive=True) for s in data}
        cp = c.xreplace(pos)
        if cp.is_nonnegative or cp.is_nonpositive:
            for s in data:
                ctx.conditions[s.name] = (f"scalar data {s.name} is assumed > 0 (the sign of the "
                                          f"coefficient {c} depends on it); checked at bind")
            return "+" if cp.is_nonnegative else "-"
    return "?"


def max_affine(expr, ctx, out):
    if not ctx.has_x(expr):
        return
    if ctx.degree(expr) <= 1:
        out.add(expr)
        return
    for a in ([expr.function] if isinstance(expr, sp.Sum) else expr.args):
        max_affine(a, ctx, out)


def split_affine(u, ctx):
    parts = summands(u)
    lin = sp.Add(*[a for a in parts if ctx.has_x(a)])
    off = sp.Add(*[a for a in parts if not ctx.has_x(a)])
    return lin, off


def _per_sample(w, limits, ctx):
    """(v(t), ok) for a weight w_I = v(theta[I]); (None, True) when w = 1."""
    if w == 1:
        return None, True
    if any(str(ix.base.label) != ctx.th.name for ix in w.atoms(sp.Indexed)):
        return None, False  # data-dependent weights: no rule
    rds = {ix for ix in reads(w, ctx.th.name)}
    if len(rds) != 1:
        return None, False
    ix = rds.pop()
    v = w.xreplace({ix: T})
    if any(v.has(lim[0]) for lim in limits) or ctx.has_theta(v):
        return None, False
    if not v.is_nonnegative:
        return None, False
    # one-to-one: the index is the sample index plus a shift of numbers and sizes (theta[m + j])
    shift = sp.simplify(ix.indices[0] - limits[0][0]) if len(limits) == 1 else None
    single = shift is not None and not shift.has(limits[0][0]) and all(
        s.is_integer for s in shift.free_symbols)
    return (v, single), True


def analyse_term(term: Term, ctx: Ctx, label: str, upper=False) -> TermFacts:
    tf = TermFacts(label, term.source, term.shown(ctx.problem.shown), "unsupported")
    tf.has_theta = ctx.has_theta(term.coef) or ctx.has_theta(term.weight) or ctx.has_theta(term.core)
    c = ctx.thetafy(term.coef)
    if c is None:
        return _unsupported(tf, f"theta with a symbolic index in the coefficient {term.coef}")
    if ctx.degree(term.core) <= 1:
        tf.kind, tf.rows, tf.rule = "linear", sp.S.Zero, "linear in x: no curvature, B constant in x"
        if upper and tf.has_theta:
            tf.Lft, tf.LB_note = sp.oo, "theta times a linear term of f: no global rule (L_ft = oo)"
        return tf
    ps, ok = _per_sample(term.weight, term.limits, ctx)
    if not ok:
        return _unsupported(tf, f"weight {term.weight} (data-dependent or unrecognised per-sample "
                                f"weight)")
    core = term.core
    inner = ()
    if (isinstance(core, sp.log) and isinstance(core.args[0], sp.Sum)
            and isinstance(core.args[0].function, sp.exp) and ctx.degree(core.args[0].function.args[0]) <= 1):
        u = core.args[0].function.args[0]
        inner = tuple(core.args[0].limits)
        facts = lse_facts()
        tf.kind = "lse"
    else:
        found = set()
        max_affine(core, ctx, found)
        if len(found) > 1:
            return _group(tf, term, c, ps, core, found, ctx, upper)
        if len(found) != 1:
            return _unsupported(tf, f"x enters {core} through {len(found)} different affine "
                                    f"expressions (no separable-atom rule)")
        u = found.pop()
        psi = core.xreplace({u: T})
        foreign = psi.atoms(sp.Indexed) - set(reads(psi, ctx.th.name))
        if ctx.has_x(psi) or any(psi.has(lim[0]) for lim in term.limits) or foreign:
            return _unsupported(tf, f"the atom {psi} depends on data or indices besides its argument")
        psi = ctx.thetafy(psi)
        if psi is None:
            return _unsupported(tf, "theta with a symbolic index inside the atom")
        facts = analyse_atom(psi, list(ctx.theta_syms.values()))
        if facts is None:
            return _unsupported(tf, f"no rule for the atom psi(t) = {psi}")
        tf.kind = "atom"
    lin, off = split_affine(u, ctx)
    limits = tuple(term.limits) + inner
    op = filter_operator(lin, limits, ctx) if not inner and _filter_candidate(lin, ctx) else None
    if ctx.has_theta(lin):
        if op is None:
            return _unsupported(tf, f"theta multiplies x inside the atom argument {u}, and it is "
                                    f"not a filter sum_s c_s(theta) x[I + s] with numeric tap "
                                    f"ranges (docs/constants.md 8)")
        if ps is not None:
            return _unsupported(tf, "per-sample weights on a learned filter: no rule (write one "
                                    "term per filter)")
    if op is None:
        op = classify_operator(lin, limits, len(term.limits), ctx, lse=bool(inner))
    tf.rows = op.rows
    tf = _combine(tf, c, ps, facts, op, off, ctx, upper, limits)
    if tf.kind == "atom" and facts.d3 != 0:
        tf.contraction = contraction_info([T], psi, [lin], [off], limits, c, ps, op.normsq,
                                          ctx.theta_syms)
    if op.dtaps:
        _learned(tf, c, facts, op, off, ctx)
    elif tf.kind == "atom" and facts.kind == "infinite" and (facts.hi == sp.oo or facts.d3 == sp.oo):
        _ball(tf, c, ps, facts, psi, lin, off, op, ctx, upper, limits)
    return tf


def _filter_candidate(lin, ctx) -> bool:
    """A learned filter (theta in the taps), or a filter whose taps are data entries: every
    Sum in lin has numeric limits, so it unrolls into taps (derivation/filters.py)."""
    if ctx.has_theta(lin):
        return True
    sums = lin.atoms(sp.Sum)
    data = [ix for ix in lin.atoms(sp.Indexed) if str(ix.base.label) != ctx.x.name]
    if not data:
        return False
    if not sums:  # taps written out: Kf[0, 0]*X[i, j] + Kf[0, 1]*X[i, j + 1]
        return all(e.is_Integer for ix in data for e in ix.indices)
    return all(all(sp.sympify(e).is_Integer for e in lim[1:]) for s in sums for lim in s.limits)


def _learned(tf, c, facts, op, off, ctx) -> None:
    """L_B columns of theta in a learned filter's taps (filters.learned_columns) and L_DB
    (ldb.learned_cross_lipschitz): infinite over R^n when the atom's third derivative is not 0;
    the finite ball versions (they read ball_xinf) go to tf.ball."""
    if None in tf.LB_cols or tf.kind != "atom":
        return
    glob, ball = learned_columns(c, facts, op)
    ball_cols = dict(tf.LB_cols)
    for s in glob:
        tf.LB_cols[s] = sp.oo if glob[s] == sp.oo else tf.LB_cols.get(s, 0) + glob[s]
        ball_cols[s] = ball_cols.get(s, 0) + ball[s]
    if any(v == sp.oo for v in tf.LB_cols.values()):
        tf.LB_note = ("theta in the taps of a filter inside a non-quadratic atom: B is Lipschitz "
                      "only on a ball (x can grow along the filter's kernel); ball constant "
                      "with ball_xinf = ||x||_inf + r")
        tf.ball = {"hi": tf.hi, "LA": tf.LA, "LB_cols": ball_cols, "LB_ps": tf.LB_ps, "info": None,
                   "LDB": tf.LDB if tf.B_affine else learned_cross_lipschitz(c, facts, op, off, ctx)}


def _ball(tf, c, ps, facts, psi, lin, off, op, ctx, upper, limits):
    """Local (ball) versions of the term's constants (derivation/ball.py, evaluation/local.py):
    the same rules with sup_R |psi''|, |psi'''| replaced by symbols evaluated over the atom's
    argument intervals."""
    info = term_info(psi, lin, off, limits)
    if info is None:
        return
    sy = ball_symbols(tf.label)

    class _BallFacts(AtomFacts):
        @property
        def peak(self):
            return sy["peak"]

    bf = _BallFacts(facts.name + " (on the ball)", facts.lo, sy["hi"], sy["d3"], facts.dth,
                    "bound", facts.certified, facts.rule + "; sup over the ball's argument intervals",
                    d4=sy["d4"])
    saved = (tf.lo, tf.hi, tf.LA, dict(tf.LB_cols), tf.LB_ps, tf.LB_note, tf.Lft, tf.rule,
             tf.message, tf.parts, tf.lo_exact, tf.hi_exact, tf.scalar, tf.certified, tf.L3,
             tf.LDB, tf.diagonal)
    _combine(tf, c, ps, bf, op, off, ctx, upper, limits)
    tf.ball = {"hi": tf.hi, "LA": tf.LA, "LB_cols": dict(tf.LB_cols), "LB_ps": tf.LB_ps,
               "L3": tf.L3, "LDB": tf.LDB, "info": info}
    (tf.lo, tf.hi, tf.LA, tf.LB_cols, tf.LB_ps, tf.LB_note, tf.Lft, tf.rule, tf.message, tf.parts,
     tf.lo_exact, tf.hi_exact, tf.scalar, tf.certified, tf.L3, tf.LDB, tf.diagonal) = saved


def _unsupported(tf, why):
    tf.kind, tf.certified, tf.rows = "unsupported", False, None
    tf.lo, tf.hi, tf.LA, tf.LB_ps, tf.Lft, tf.L3 = -sp.oo, sp.oo, sp.oo, sp.oo, sp.oo, sp.oo
    tf.B_affine = not tf.has_theta
    tf.LDB = sp.S.Zero if tf.B_affine else sp.oo
    tf.lo_exact = tf.hi_exact = tf.scalar = False
    tf.message = f"no rule applies: {why}"
    return tf


def _weighted_curvature(c, sign, f: AtomFacts, weights):
    """[s_lo, s_hi] containing c v psi'' for every atom argument and every per-sample weight v in
    weights = (vmin, vmax) (None: v = 1), by the sign of c (section 3.3 of docs/constants.md)."""
    lo, hi = f.lo, f.hi

    def vlo(z):  # min over v in [vmin, vmax] of v*z
        if weights is None:
            return z
        vmin, vmax = weights
        return vmin * z if z.is_nonnegative else (vmax * z if z.is_nonpositive else sp.Min(vmin * z, vmax * z))

    def vhi(z):
        if weights is None:
            return z
        vmin, vmax = weights
        return vmax * z if z.is_nonnegative else (vmin * z if z.is_nonpositive else sp.Max(vmin * z, vmax * z))

    if sign == "+":
        return _mul(c, vlo(lo)) if lo != -sp.oo else -sp.oo, _mul(c, vhi(hi))
    if sign == "-":
        return -sp.oo if hi == sp.oo else c * vhi(hi), sp.oo if lo == -sp.oo else c * vlo(lo)
    if weights is None and f.kind == "exact" and lo == hi:
        # constant curvature (a quadratic atom): c psi'' is c lo whatever the sign of c (a weight
        # theta/2 ||x||^2 gives mu = theta, checked > 0 at evaluate, not -|theta|)
        return _mul(c, lo), _mul(c, lo)
    s_hi = _mul(sp.Abs(c) * (sp.S.One if weights is None else weights[1]), f.peak)
    return -s_hi, s_hi


def _combine(tf, c, ps, f: AtomFacts, op: OpFacts, off, ctx, upper, limits):
    sign = _sign(c, ctx)
    if ps is None:
        vmax = vmin = sp.S.One
        dv = sp.S.Zero
        single = True
    else:
        v, single = ps
        vmax, vmin = ThetaMax(sp.Lambda(T, v)), ThetaMin(sp.Lambda(T, v))
        dv = ThetaMax(sp.Lambda(T, sp.Abs(sp.diff(v, T))))
    s_lo, s_hi = _weighted_curvature(c, sign, f, None if ps is None else (vmin, vmax))
    N, lam = op.normsq, op.lmin

    def apply(s, low):
        if s in (sp.oo, -sp.oo):
            return s
        if low:
            return s * lam if s.is_nonnegative else (s * N if s.is_nonpositive else sp.Min(s * lam, s * N))
        return s * N if s.is_nonnegative else (s * lam if s.is_nonpositive else sp.Max(s * lam, s * N))

    tf.lo, tf.hi = apply(s_lo, True), apply(s_hi, False)
    if op.entry is not None and ps is None:  # H_t = c psi'' a^2 e_k e_k^T, N = a^2
        tf.diagonal = (op.entry, s_lo if s_lo in (sp.oo, -sp.oo) else s_lo * N,
                       s_hi if s_hi in (sp.oo, -sp.oo) else s_hi * N)
    const_curv = f.lo == f.hi and f.kind == "exact" and ps is None and sign != "?"
    tf.lo_exact = const_curv and (op.lmin_exact if sign == "+" else op.normsq_exact)
    tf.hi_exact = const_curv and (op.normsq_exact if sign == "+" else op.lmin_exact)
    tf.scalar = const_curv and op.full_identity
    tf.certified = f.certified
    tf.LA = _mul(_mul(sp.Abs(c) * vmax, f.d3), N * op.rowmax) if f.d3 != 0 else sp.S.Zero
    # one derivative higher: ||D^2 H[a, e]|| <= |c| max w sup|psi''''| max_I||K_I||^2 ||K||^2
    tf.L3 = (_mul(_mul(sp.Abs(c) * vmax, f.d4), N * op.rowmax ** 2) if f.d3 != 0
             else sp.S.Zero)
    # psi''' = 0: the term is quadratic in x for every theta, so its part of B is affine in x
    tf.B_affine = f.d3 == 0 or not tf.has_theta
    tf.LDB = (sp.S.Zero if tf.B_affine
              else cross_lipschitz(c, ps, f, op, off, ctx, single, dv, vmax))
    # cross derivatives: theta in c, in the atom's parameters, in the offset, per-sample weights
    notes = []
    theta_syms = set(ctx.theta_syms.values())
    cols = {}
    for s in c.free_symbols & theta_syms:
        cols[s] = cols.get(s, 0) + _mul(sp.Abs(sp.diff(c, s)) * vmax, f.peak) * N
    if f.dth is None:
        cols = {None: sp.oo}
        notes.append("theta inside the atom with no rule for d psi''/d theta")
    else:
        for s, val in f.dth.items():
            cols[s] = cols.get(s, 0) + _mul(sp.Abs(c) * vmax, val) * N
    ps_part = sp.S.Zero
    if ps is not None:  # rows grouped by the weight's index (one row per group when single)
        ps_part = _mul(sp.Abs(c) * dv, f.peak) * (op.rowmax * sp.sqrt(N) if single else N)
    # theta in the offset b: column l of B is c K^T diag(w psi''(u)) db/dtheta_l, which moves
    # by at most |c| max w sup|psi'''| |db/dtheta_l| ||K||^2 per ||x - y||
    slopes = offset_slopes(off, ctx) if tf.kind == "atom" else ({} if not ctx.has_theta(off) else None)
    if slopes is None and f.d3 != 0:
        cols = {None: sp.oo}
        notes.append("theta in the argument of a non-quadratic atom, its slope varying with the "
                     "row: no rule")
    elif f.d3 != 0 and None not in cols:
        for s, slope in slopes.items():
            cols[s] = cols.get(s, 0) + _mul(_mul(sp.Abs(c) * vmax, f.d3), slope) * N
    tf.LB_cols, tf.LB_ps, tf.LB_note = cols, ps_part, "; ".join(notes)
    if upper and tf.has_theta:
        tf.Lft = upper_theta_lipschitz(c, ps, f, op, off, ctx, limits)
    wtxt = "" if ps is None else f", per-sample weight v(theta_I) = {ps[0]} in [{vmin}, {vmax}]"
    tf.rule = (f"{tf.kind}: coefficient {c} ({'>= 0' if sign == '+' else '<= 0' if sign == '-' else 'sign unknown'})"
               f"{wtxt}; {f.name} of K x + b, K: {op.name}")
    tf.message = f.message
    arec = Record(f"atom {f.name}", f.hi, f.kind if f.kind != "infinite" else "infinite",
                  f.certified, f.rule, children=[], message=f.message,
                  term=f"psi'' in [{sp.sstr(f.lo)}, {sp.sstr(f.hi)}], sup|psi'''| = {sp.sstr(f.d3)}")
    tf.parts = [arec, op.record]
    return tf


def _group(tf, term, c, ps, core, found, ctx, upper):
    """A vector atom phi(D_p x + b_p) over stacked stencils (isotropic TV and the like)."""
    us = sorted(found, key=sp.default_sort_key)
    ts = sp.symbols(f"t0:{len(us)}", real=True)
    psi = core.xreplace(dict(zip(us, ts)))
    if ctx.has_x(psi) or any(psi.has(lim[0]) for lim in term.limits):
        return _unsupported(tf, f"x enters {core} through {len(us)} affine expressions and the "
                                f"atom is not a recognised group atom")
    psi = ctx.thetafy(psi)
    facts = None if psi is None else group_charbonnier(psi, ts, list(ctx.theta_syms.values()))
    if facts is None:
        return _unsupported(tf, f"x enters {core} through {len(us)} different affine expressions "
                                f"(only the group atom sqrt(sum u_k^2 + nu^2) is known)")
    parts = [split_affine(u, ctx) for u in us]
    lins = [lin for lin, _ in parts]
    if any(_filter_candidate(lin, ctx) for lin in lins):
        op = stacked_filters(lins, tuple(term.limits), ctx)
        if op is None or (op.dtaps and ps is not None):
            return _unsupported(tf, "a group atom over filters needs every component to be a "
                                    "filter sum_s c_s x[I + s] with numeric tap ranges, and no "
                                    "per-sample weight on learned taps (docs/constants.md 8)")
    else:
        op = stacked_stencil(lins, tuple(term.limits), ctx)
    if op is None:
        return _unsupported(tf, "group atom over data operators: no rule (only stencils)")
    tf.kind, tf.rows = "atom", op.rows
    off = sp.Add(*[o for _, o in parts])
    tf = _combine(tf, c, ps, facts, op, off, ctx, upper, tuple(term.limits))
    if facts.d3 != 0:
        tf.contraction = contraction_info(list(ts), psi, lins, [o for _, o in parts],
                                          tuple(term.limits), c, ps, op.normsq, ctx.theta_syms)
    if op.dtaps:
        _learned(tf, c, facts, op, off, ctx)
    return tf
