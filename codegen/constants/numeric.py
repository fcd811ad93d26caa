"""`evaluate`: the constants at one theta, with outward rounding (constants.md section 5).

Expressions are evaluated by a small float64 interpreter (stable sigmoid/softplus, max/min over
the theta entries for per-sample weights); mu is rounded down and every Lipschitz constant up by
a relative 1e-12, which covers the few roundings of these short expressions. oo stays math.inf.
"""
from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import sympy as sp

from ..errors import ProblemError
from ..primitives import sigmoid, softplus
from .records import T, ThetaMax, ThetaMin

REL = 1e-12


def _sig(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


_F = {sp.exp: np.exp, sp.log: np.log, sp.Abs: np.abs, sp.sin: np.sin, sp.cos: np.cos,
      sp.tanh: np.tanh, sp.cosh: np.cosh, sp.sinh: np.sinh, sp.atan: np.arctan,
      sigmoid: _sig, softplus: lambda z: np.logaddexp(0.0, z)}


def num(expr, env: dict, theta: np.ndarray):
    """Float value of a constant's expression; env maps symbol names to floats."""
    if expr.is_Number:  # oo and -oo too (singletons; float() gives +-inf)
        return float(expr)
    if isinstance(expr, sp.Symbol):
        if expr.name not in env:
            raise ProblemError(f"no value for {expr.name} (bind the data quantities first)")
        return env[expr.name]
    if isinstance(expr, (ThetaMax, ThetaMin)):
        lam = expr.args[0]
        vals = num(lam.expr, {**env, T.name: theta}, theta)
        vals = np.broadcast_to(np.asarray(vals, dtype=float), theta.shape)
        return float(np.min(vals) if isinstance(expr, ThetaMin) else np.max(vals))
    args = [num(a, env, theta) for a in expr.args]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if expr.is_Add:
            return sum(args[1:], args[0])
        if expr.is_Mul:
            out = args[0]
            for a in args[1:]:
                out = out * a
            return out
        if expr.is_Pow:
            return np.power(args[0], args[1])
        if isinstance(expr, sp.Max):
            return np.maximum.reduce(np.broadcast_arrays(*args)) if len(args) > 1 else args[0]
        if isinstance(expr, sp.Min):
            return np.minimum.reduce(np.broadcast_arrays(*args)) if len(args) > 1 else args[0]
        fn = _F.get(type(expr))
        if fn is not None:
            return fn(args[0])
    raise ProblemError(f"cannot evaluate {expr} numerically")


@functools.lru_cache(maxsize=256)
def _symbol_names(expr) -> frozenset:
    """The names of an expression's free symbols (SymPy recomputes them on every call)."""
    return frozenset(s.name for s in expr.free_symbols)


def _up(v):
    return v + REL * abs(v) if math.isfinite(v) else v


def _down(v):
    return v - REL * abs(v) if math.isfinite(v) else v


def environment(derivation, theta, quantities):
    th = np.atleast_1d(np.asarray(theta, dtype=np.float64)).reshape(-1)
    env = {}
    for name, q in quantities.items():
        if ":" not in name:
            env[name] = float(q["value"]) if not isinstance(q, (int, float)) else float(q)
    for name, k in derivation.theta_symbols:
        if k >= th.size:
            raise ProblemError(f"theta has {th.size} entries; the constants read entry {k}")
        env[name] = float(th[k])
    return th, env


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
        v = _down(v) if name == "mu" else _up(v)
        out[name] = v
        flags[name] = rec.certified and not (_symbol_names(rec.expr) & used_uncertified)
    if not out["mu"] > 0:
        msg = (f"mu(theta) = {out['mu']:.6g} <= 0 at theta = {th.tolist()}: strong convexity is "
               f"not certified here (mu = {sp.sstr(der.constants['mu'].expr)}; "
               f"{der.constants['mu'].theta_region})")
        if not der.allow_uncertified:
            raise ProblemError(msg)
        warnings.warn(msg, stacklevel=2)
        flags["mu"] = False
    out["certified"] = all(flags.values())
    out["certified_flags"] = flags
    return out
