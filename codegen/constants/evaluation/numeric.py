"""`evaluate`: the constants at one theta, with outward rounding (docs/constants.md section 5).

Expressions are evaluated by a small float64 interpreter (stable sigmoid/softplus/logcosh, max/min over
the theta entries for per-sample weights); mu is rounded down and every Lipschitz constant up by
a relative 1e-12, which covers the few roundings of these short expressions. oo stays math.inf.
"""
from __future__ import annotations

import functools
import math
import sys
import warnings

import numpy as np
import sympy as sp

from ...errors import ProblemError
from ...primitives import logcosh, sigmoid, softplus
from ..records import FilterGainSq, T, ThetaMax, ThetaMin
from .spectral import filter_gain_sq

REL = 1e-12


def _sig(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


_F = {sp.exp: np.exp, sp.log: np.log, sp.Abs: np.abs, sp.sin: np.sin, sp.cos: np.cos,
      sp.tanh: np.tanh, sp.cosh: np.cosh, sp.sinh: np.sinh, sp.atan: np.arctan,
      sigmoid: _sig, softplus: lambda z: np.logaddexp(0.0, z), logcosh: lambda z: np.logaddexp(z, -z) - np.log(2.0)}


def num(expr, env: dict, theta: np.ndarray):
    """Float value of a constant's expression; env maps symbol names to floats."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _compiled(expr)(env, theta)


@functools.lru_cache(maxsize=1024)
def _compiled(expr):
    """The expression as nested Python closures f(env, theta), built once per expression: a
    hypergradient evaluates the constants at every theta, and walking the SymPy tree there
    (type tests, attribute lookups) cost more than the arithmetic."""
    if expr.is_Number or (expr.is_number and expr.is_extended_real):
        value = float(expr)  # oo and -oo (float() gives +-inf), pi and 2/sqrt(pi) (erf) too
        return lambda env, theta: value
    if isinstance(expr, sp.Symbol):
        name = expr.name

        def symbol(env, theta):
            if name not in env:
                raise ProblemError(f"no value for {name} (bind the data quantities first)")
            return env[name]
        return symbol
    if isinstance(expr, (ThetaMax, ThetaMin)):
        inner = _compiled(expr.args[0].expr)
        reduce = np.min if isinstance(expr, ThetaMin) else np.max

        def over_theta(env, theta):
            vals = inner({**env, T.name: theta}, theta)
            return float(reduce(np.broadcast_to(np.asarray(vals, dtype=float), theta.shape)))
        return over_theta
    if isinstance(expr, FilterGainSq):
        return _filter_gain(expr)
    args = tuple(_compiled(a) for a in expr.args)
    if expr.is_Add:
        return lambda env, theta: sum((a(env, theta) for a in args[1:]), args[0](env, theta))
    if expr.is_Mul:
        def product(env, theta):
            out = args[0](env, theta)
            for a in args[1:]:
                out = out * a(env, theta)
            return out
        return product
    if expr.is_Pow:
        base, exponent = args
        return lambda env, theta: np.power(base(env, theta), exponent(env, theta))
    if isinstance(expr, (sp.Max, sp.Min)):
        if len(args) == 1:
            return args[0]
        pick = np.maximum if isinstance(expr, sp.Max) else np.minimum
        return lambda env, theta: pick.reduce(np.broadcast_arrays(*(a(env, theta) for a in args)))
    fn = _F.get(type(expr))
    if fn is not None:
        (arg,) = args
        return lambda env, theta: fn(arg(env, theta))
    raise ProblemError(f"cannot evaluate {expr} numerically")


def _filter_gain(expr):
    """FilterGainSq(shifts, c_1..c_n): the taps evaluated, then the certified frequency-response
    bound of `spectral.filter_gain_sq` (memoised on the tap values: fixed filters are evaluated
    once)."""
    shifts = tuple(tuple(int(v) for v in s) for s in expr.args[0])
    taps = tuple(_compiled(a) for a in expr.args[1:])

    def gain(env, theta):
        values = tuple(float(np.asarray(a(env, theta)).reshape(-1)[0]) for a in taps)
        return _gain_of(shifts, values)
    return gain


@functools.lru_cache(maxsize=256)
def _gain_of(shifts: tuple, values: tuple) -> float:
    return filter_gain_sq(np.array(shifts), np.array(values))


@functools.lru_cache(maxsize=256)
def _symbol_names(expr) -> frozenset:
    """The names of an expression's free symbols (SymPy recomputes them on every call)."""
    return frozenset(s.name for s in expr.free_symbols)


def reads_theta(derivation) -> bool:
    """Does any constant's expression read theta (a theta symbol, or a max / min over its
    entries)? If none does, the constants are fixed by the data: one evaluation per bind serves
    every theta (the paper's quadratic problem: mu = 2 s_min(D)^2, L_A = L_B = 0)."""
    names = {name for name, _ in derivation.theta_symbols}
    return any(_symbol_names(rec.expr) & names or rec.expr.has(ThetaMax)
               for rec in derivation.constants.values())


def round_up(v: float) -> float:
    """v rounded outward (up) by REL: covers the roundings of a constant's short expression."""
    return v + REL * abs(v) if math.isfinite(v) else v


def round_down(v: float) -> float:
    """v rounded down by REL (mu: a lower bound)."""
    return v - REL * abs(v) if math.isfinite(v) else v


def _mu_rounded(expr, v: float, env: dict, theta: np.ndarray) -> float:
    """mu rounded down by REL times the sum of its terms' moduli: a sum such as 1 - e^theta N/4
    (a non-convex expert) cancels near the edge of its region, where REL |mu| would not cover
    the roundings of its terms."""
    if not (expr.is_Add and math.isfinite(v)):
        return round_down(v)
    scale = sum(abs(float(np.asarray(num(a, env, theta)).reshape(-1)[0])) for a in expr.args)
    return v - REL * max(scale, abs(v)) if math.isfinite(scale) else round_down(v)


def environment(derivation, theta, quantities):
    th = np.atleast_1d(np.asarray(theta, dtype=np.float64)).reshape(-1)
    env = {}
    for name, q in quantities.items():
        if ":" not in name:
            env[name] = float(q["value"]) if not isinstance(q, (int, float)) else float(q)
    for name, k in derivation.theta_symbols:
        flat = theta_entry(k, env)
        if not 0 <= flat < th.size:
            raise ProblemError(f"theta has {th.size} entries; the constants read entry {k} = {flat}")
        env[name] = float(th[flat])
    return th, env


def theta_entry(k: int | str, env: dict) -> int:
    """The flat index of a theta read: k itself, or k's expression in the sizes (theta[m + n])
    evaluated with the bound sizes in env."""
    if isinstance(k, int):
        return k
    expr = _size_expression(k)
    return int(expr.xreplace({s: sp.Integer(int(env[s.name])) for s in expr.free_symbols}))


@functools.lru_cache(maxsize=64)
def _size_expression(k: str) -> sp.Expr:
    """k parsed once (evaluate runs at every hypergradient)."""
    return sp.sympify(k)


def _theta_shown(der, th: np.ndarray, env: dict) -> str:
    """'lam = -1' for the entries the constants read by name (their values in env), else theta
    itself (short)."""
    if der.theta_symbols and len(der.theta_symbols) <= 6:
        return ", ".join(f"{name} = {env[name]:.6g}" for name, _ in der.theta_symbols)
    if th.size <= 4:
        return f"theta = {np.array2string(th, precision=6, separator=', ')}"
    return f"theta (norm {np.linalg.norm(th):.6g})"


def evaluate(derivation, theta, quantities) -> dict:
    """mu, L, L_A, L_B, L_f (and L_ft) at theta, floats (math.inf allowed), plus `certified`."""
    der = derivation
    th, env = environment(der, theta, quantities)
    used_uncertified = {n for n, q in quantities.items()
                        if isinstance(q, dict) and not q.get("certified", True)}
    out, flags = {}, {}
    for name, rec in der.constants.items():
        v = num(rec.expr, env, th)
        v = float(np.asarray(v).reshape(-1)[0]) if np.ndim(v) else float(v)
        if math.isnan(v):
            if name == "mu":
                raise ProblemError(f"mu evaluates to NaN at theta = {th}")
            v = math.inf
        v = _mu_rounded(rec.expr, v, env, th) if name == "mu" else round_up(v)
        if name == "mu" and v == math.inf:  # an overflow (e^theta): the largest float is a lower bound
            v = sys.float_info.max
        if v < 0 and name != "mu":  # a norm or a Lipschitz constant: never certify it negative
            raise ProblemError(
                f"{name} = {sp.sstr(rec.expr)} = {v:.6g} < 0 at {_theta_shown(der, th, env)}: a bound on "
                f"a norm cannot be negative (a data value against an assumption the problem "
                f"declares, or a stated constant that is wrong)")
        out[name] = v
        flags[name] = rec.certified and not (_symbol_names(rec.expr) & used_uncertified)
    if not out["mu"] > 0:
        why = ("mu depends on theta and is checked at every evaluation" if der.mu_check == "theta"
               else f"mu > 0 is certified {der.constants['mu'].theta_region}")
        msg = (f"mu = {sp.sstr(der.constants['mu'].expr)} = {out['mu']:.6g} <= 0 at "
               f"{_theta_shown(der, th, env)}: g is not certified strongly convex there ({why})")
        if not der.allow_uncertified:
            raise ProblemError(msg)
        warnings.warn(msg, stacklevel=2)
        flags["mu"] = False
    out["certified"] = all(flags.values())
    out["certified_flags"] = flags
    return out
