"""Records of a derivation: one `Record` per constant (a tree), `Derivation` for a problem, JSON.

Expressions are SymPy in the theta symbols, the size symbols, scalar data symbols and the
data-quantity symbols (`normsq_K1` = ||K1||^2 ...); they are stored with `sp.srepr` and read back
with `eval` in a namespace of SymPy and the classes below (constants.json is trusted input, like
the generated module next to it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from ..primitives import logcosh, sigmoid, softplus

KINDS = ("exact", "bound", "estimate", "assumed", "infinite")
T = sp.Symbol("t", real=True)  # the free variable of atoms psi(t) and of per-sample weights v(t)


class ThetaMax(sp.Function):
    """ThetaMax(Lambda(t, v(t))) = max over the entries theta_k of v(theta_k) (per-sample weights)."""

    nargs = 1

    def _sympystr(self, printer):
        return "max_k " + printer.doprint(self.args[0].expr.xreplace({T: sp.Symbol("theta_k")}))

    def _eval_is_real(self):
        return True

    def _eval_is_nonnegative(self):
        return self.args[0].expr.is_nonnegative

    def _eval_is_positive(self):
        return self.args[0].expr.is_positive


class ThetaMin(ThetaMax):
    """min over the entries theta_k of v(theta_k)."""

    def _sympystr(self, printer):
        return "min_k " + printer.doprint(self.args[0].expr.xreplace({T: sp.Symbol("theta_k")}))


class FilterGainSq(sp.Function):
    """FilterGainSq(shifts, c_1, ..., c_n): a certified upper bound on sup_omega
    |sum_s c_s exp(i omega.s)|^2, the squared norm of the convolution by the taps c on l2(Z^k)
    (derivation/filters.py), evaluated numerically (evaluation/spectral.py `filter_gain_sq`)."""

    def _eval_is_real(self) -> bool:
        return True

    def _eval_is_nonnegative(self) -> bool:
        return True


def qsym(name: str) -> sp.Symbol:
    """A data-quantity symbol (every data quantity is a norm or eigenvalue: non-negative)."""
    return sp.Symbol(name, nonnegative=True)


_NS = {k: getattr(sp, k) for k in dir(sp) if not k.startswith("_")}
_NS.update(ThetaMax=ThetaMax, ThetaMin=ThetaMin, FilterGainSq=FilterGainSq, sigmoid=sigmoid,
           softplus=softplus, logcosh=logcosh)


def dump(expr) -> str:
    return sp.srepr(sp.sympify(expr))


def load(text: str):
    return eval(text, {"__builtins__": {}}, dict(_NS))  # noqa: S307 (our own srepr output)


@dataclass
class Record:
    """One constant (or one contribution to it): how it was obtained and whether it is certified."""

    name: str
    expr: sp.Expr
    kind: str
    certified: bool
    rule: str
    domain: str = "all x"
    theta_region: str = "all theta"
    children: list = field(default_factory=list)
    term: str = ""
    message: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} not in {KINDS}")
        self.expr = sp.sympify(self.expr)

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()

    def uncertify(self, reason: str = ""):
        for r in self.walk():
            r.certified = False
            if reason and r is self and reason not in r.message:
                r.message = (r.message + "; " if r.message else "") + reason

    def to_dict(self) -> dict:
        return {"name": self.name, "expr": dump(self.expr), "text": sp.sstr(self.expr),
                "kind": self.kind, "certified": self.certified, "rule": self.rule,
                "domain": self.domain, "theta_region": self.theta_region, "term": self.term,
                "message": self.message, "children": [c.to_dict() for c in self.children]}

    @classmethod
    def from_dict(cls, d: dict) -> Record:
        return cls(name=d["name"], expr=load(d["expr"]), kind=d["kind"], certified=d["certified"],
                   rule=d["rule"], domain=d["domain"], theta_region=d["theta_region"],
                   term=d.get("term", ""), message=d.get("message", ""),
                   children=[cls.from_dict(c) for c in d["children"]])


@dataclass
class Operator:
    """A linear map x -> (u_I)_I read from the problem, whose norms are computed at bind time.

    `lin` is the x-linear part of the atom argument, `limits` the row indices (outer sums, then
    an atom's inner index), the first `block` of them identify a sample (a block of rows).
    `reduce` maps a row index to the axis of x it addresses alone (a Kronecker factor I (x) K:
    fixed to one value, which keeps every norm). `var` is "x" (or "theta" for d(offset)/dtheta).
    """

    name: str
    lin: sp.Expr
    limits: tuple
    block: int
    reduce: dict
    var: str
    rows: sp.Expr
    definition: str

    def to_dict(self) -> dict:
        return {"name": self.name, "lin": dump(self.lin), "limits": dump(sp.Tuple(*self.limits)),
                "block": self.block, "reduce": [[dump(k), v] for k, v in self.reduce.items()],
                "var": self.var, "rows": dump(self.rows), "definition": self.definition}

    @classmethod
    def from_dict(cls, d: dict) -> Operator:
        return cls(name=d["name"], lin=load(d["lin"]), limits=tuple(load(d["limits"])),
                   block=d["block"], reduce={load(k): v for k, v in d["reduce"]}, var=d["var"],
                   rows=load(d["rows"]), definition=d["definition"])


@dataclass
class Derivation:
    """Everything `evaluate` and `compute_data_quantities` need; no reference to the Problem."""

    problem: str
    constants: dict  # name -> Record: mu, L, L_A, L_B, L_f (+ L_ft)
    operators: dict  # name -> Operator
    quantities: dict  # symbol name -> {"operator", "what", "description"}
    theta_symbols: list  # [(symbol name, flat index)] of index-free theta reads
    theta_name: str
    x_name: str
    x_shape: tuple
    theta_shape: tuple
    sizes: list  # size symbol names
    scalars: list  # scalar data symbol names
    data_shapes: dict  # data array name -> shape tuple (SymPy)
    conditions: list = field(default_factory=list)  # [(srepr of symbol, message)]: must be > 0
    status: str = "certified"  # certified | conditional | uncertified
    allow_uncertified: bool = False
    messages: list = field(default_factory=list)
    refutation: dict | None = None  # bind-time wide test: {"rows": [(term, rows)], "dim": d}
    mu_check: str = "proved"  # proved | data | theta | none
    # local (ball) constants (derivation/ball.py, evaluation/local.py): {"constants": name ->
    # Record (domain "ball"), "terms": label -> rebuild info}; empty when every constant is finite
    # globally
    ball: dict = field(default_factory=dict)
    # the data-local third derivative (derivation/contraction.py, evaluation/contraction.py):
    # term label -> record (JSON text); empty when some term of g has a third derivative and no
    # record, or none has one
    contractions: dict = field(default_factory=dict)

    def to_json(self) -> str:
        d = {
            "format": "hypergen-constants-1", "problem": self.problem,
            "constants": {k: r.to_dict() for k, r in self.constants.items()},
            "operators": {k: o.to_dict() for k, o in self.operators.items()},
            "quantities": self.quantities, "theta_symbols": self.theta_symbols,
            "theta_name": self.theta_name, "x_name": self.x_name,
            "x_shape": dump(sp.Tuple(*self.x_shape)), "theta_shape": dump(sp.Tuple(*self.theta_shape)),
            "sizes": self.sizes, "scalars": self.scalars,
            "data_shapes": {k: dump(sp.Tuple(*v)) for k, v in self.data_shapes.items()},
            "conditions": self.conditions, "status": self.status,
            "allow_uncertified": self.allow_uncertified, "messages": self.messages,
            "refutation": None if self.refutation is None else {
                "rows": [[t, dump(r)] for t, r in self.refutation["rows"]],
                "dim": dump(self.refutation["dim"])},
            "mu_check": self.mu_check,
        }
        if self.ball:  # only for problems with ball constants (older files stay byte-identical)
            d["ball"] = {"constants": {k: r.to_dict() for k, r in self.ball["constants"].items()},
                         "terms": {k: ball_info_to_json(v) for k, v in self.ball["terms"].items()}}
        if self.contractions:  # likewise: only where g has a third derivative
            d["contractions"] = self.contractions
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text) -> Derivation:
        d = json.loads(text) if isinstance(text, (str, bytes)) else text
        ref = d.get("refutation")
        return cls(
            problem=d["problem"],
            constants={k: Record.from_dict(v) for k, v in d["constants"].items()},
            operators={k: Operator.from_dict(v) for k, v in d["operators"].items()},
            quantities=d["quantities"], theta_symbols=[tuple(t) for t in d["theta_symbols"]],
            theta_name=d["theta_name"], x_name=d["x_name"], x_shape=tuple(load(d["x_shape"])),
            theta_shape=tuple(load(d["theta_shape"])), sizes=d["sizes"], scalars=d["scalars"],
            data_shapes={k: tuple(load(v)) for k, v in d["data_shapes"].items()},
            conditions=[tuple(c) for c in d["conditions"]], status=d["status"],
            allow_uncertified=d["allow_uncertified"], messages=d["messages"],
            refutation=None if ref is None else {
                "rows": [(t, load(r)) for t, r in ref["rows"]], "dim": load(ref["dim"])},
            mu_check=d["mu_check"],
            ball=_ball_from_json(d.get("ball")),
            contractions=d.get("contractions", {}),
        )

    @property
    def certified(self) -> bool:
        return all(r.certified for r in self.constants.values())

    @property
    def ridge_term(self) -> str:
        """A strongly convex term to suggest, in this problem's own x and theta."""
        return ridge_term(self.x_name, self.x_shape, [n for n, _ in self.theta_symbols])


def ridge_term(x_name: str, x_shape: tuple, theta_names: list[str],
               x_symbols: list[str] | None = None) -> str:
    """'(exp(lam)/2)*Sum(X[i, j]**2, (i, 0, m - 1), (j, 0, n - 1))': a ridge term on x as the
    user wrote it (its Symbols, or its array with one index per axis), weighted by exp of the
    one hyperparameter (learnable, positive for every theta) or, with several, by a constant."""
    weight = f"exp({theta_names[0]})/2" if len(theta_names) == 1 else "1e-3/2"
    if x_symbols:
        squares = " + ".join(f"{s}**2" for s in x_symbols)
    else:
        idx = ["j"] if len(x_shape) == 1 else ["i", "j"]
        limits = ", ".join(f"({v}, 0, {sp.sstr(sp.sympify(n) - 1)})" for v, n in zip(idx, x_shape))
        squares = f"Sum({x_name}[{', '.join(idx)}]**2, {limits})"
    return f"({weight})*({squares})"


def _ball_from_json(d: dict | None) -> dict:
    if not d:
        return {}
    return {"constants": {k: Record.from_dict(v) for k, v in d["constants"].items()},
            "terms": {k: ball_info_from_json(v) for k, v in d["terms"].items()}}


def ball_info_to_json(info: dict) -> dict:
    """A ball term's rebuild info (derivation.ball.term_info) as JSON: the atom's components
    (polynomial coefficients, exp terms) as plain lists."""
    c, exps = info["components"]
    return {k: v for k, v in info.items() if k != "components"} | {
        "poly": [float(v) for v in c], "exps": [list(e) for e in exps]}


def ball_info_from_json(d: dict) -> dict:
    """The inverse of `ball_info_to_json`."""
    out = {k: v for k, v in d.items() if k not in ("poly", "exps")}
    out["components"] = (np.array(d["poly"], dtype=float), [tuple(e) for e in d["exps"]])
    return out
