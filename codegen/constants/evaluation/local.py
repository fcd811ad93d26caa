"""Local (ball) constants for atoms with unbounded derivatives (docs/framework.md section 8.4).

exp(t) and polynomial atoms of degree >= 3 have psi'' and psi''' unbounded on R, so L, L_A (and L_B,
L_f when such an atom carries theta or sits in f) are infinite globally. On a ball B(x, r) the
argument z_i = k_i . y + b_i of atom row i stays in I_i = [z_i - r ||k_i||, z_i + r ||k_i||], so

    sup_{y in B} |psi''(k_i.y + b_i)| <= sup_{I_i} |psi''|,   sup |psi'''| likewise,

and every structural rule of `derivation.terms` holds on the ball with sup_R replaced by
max_i sup_{I_i}. `derive` stores, per such term, the data needed to rebuild z = K x + b and ||k_i||
(the affine argument as SymPy text) and, per constant, a "ball" Record whose expression uses the
symbols ball_hi_<term> (max_i sup_{I_i} psi'', clipped at 0 from below), ball_peak_<term>
(max_i sup_{I_i} |psi''|), ball_d3_<term> (max_i sup_{I_i} |psi'''|) and ball_d4_<term>
(max_i sup_{I_i} |psi''''|, for L_3).

`evaluate_local(der, theta, quantities, x, radius, data)` returns the dict of `evaluate` with L,
L_A, L_B, L_3, L_DB, L_f, L_Hf replaced by min(global, ball) -- valid on B(x, radius) only. mu is
NEVER local: it certifies ||x - x*|| <= G/mu, i.e. it is what puts x* into the ball in the first
place, so it stays the global value from `evaluate`.

Sups over I_i, vectorised over the rows, with outward margins:
- exp components kappa exp(a t + b): |kappa a^n| exp(max over the two ends) (monotone);
- the polynomial part p: p^(n) over I_i is bounded by the max over the two ends and the real parts
  of all (complex) roots of p^(n+1) clipped into I_i (extra points only evaluate p^(n) inside I_i,
  so they never raise the value above the true sup), plus a Horner rounding margin;
- z is computed as K x + b in float64 with the margin (D + 2) u (|K| |x| + |b|), r ||k_i|| is
  rounded up by 1e-12 relative.
Not handled (the global value stays): atoms whose psi contains theta or anything but a polynomial
plus multiples of exp(a t + b); group atoms; operators too large to form densely (ENTRY_LIMIT).
"""
from __future__ import annotations

import math
from collections import ChainMap

import numpy as np
import sympy as sp

from ..derivation.filters import XINF
from ..records import Operator, load
from .interpreter import (
    DenseOnDemand,
    Env,
    as_int,
    bind_sizes,
    concrete,
    expand_axes,
    interpret,
    operator_matrix,
)
from .numeric import environment, evaluate, num, round_up

U = 2.0 ** -53
REL = 1e-12
CRIT_REL = 1e-9  # relative margin for values at numerically located critical points


def _poly_deriv(c, n):
    for _ in range(n):
        c = np.array([k * c[k] for k in range(1, len(c))]) if len(c) > 1 else np.array([0.0])
    return c


def _horner(c, t):
    out = np.zeros_like(t)
    for coef in c[::-1]:
        out = out * t + coef
    return out


def _poly_sup(c, n, lo, hi):
    """(signed sup, sup |.|) of the n-th derivative of sum c_k t^k over [lo_i, hi_i] (outward)."""
    p = _poly_deriv(c, n)
    if not np.any(p):
        z = np.zeros_like(lo)
        return z, z
    dp = _poly_deriv(p, 1)
    pts = [lo, hi]
    if len(dp) > 1 and np.any(dp):
        nz = np.nonzero(dp)[0][-1]
        roots = np.roots(dp[: nz + 1][::-1]) if nz > 0 else np.array([])
        for r in np.real(roots):
            pts.append(np.clip(r, lo, hi))
    vals = np.array([_horner(p, t) for t in pts])
    tmax = np.maximum(np.abs(lo), np.abs(hi))
    absp = _horner(np.abs(p), tmax)  # sum |p_k| |t|^k >= |p| on the interval
    margin = 4 * (len(p) + 2) * U * absp + CRIT_REL * np.max(np.abs(vals), axis=0)
    return np.max(vals, axis=0) + margin, np.max(np.abs(vals), axis=0) + margin


def _exp_sup(kappa, a, b, n, lo, hi):
    coef = kappa * a ** n
    with np.errstate(over="ignore"):
        ehi = np.exp(np.maximum(a * lo + b, a * hi + b))
        elo = np.exp(np.minimum(a * lo + b, a * hi + b))
    absv = abs(coef) * ehi * (1 + 8 * U)
    signed = coef * ehi * (1 + 8 * U) if coef >= 0 else coef * elo * (1 - 8 * U)
    return signed, absv


def interval_sups(components, lo, hi) -> dict:
    """max over rows of: sup psi'' (clipped >= 0), sup |psi''|, sup |psi'''|, sup |psi''''| over
    [lo_i, hi_i]."""
    coeffs, exps = components
    s2, a2 = _poly_sup(coeffs, 2, lo, hi)
    _, a3 = _poly_sup(coeffs, 3, lo, hi)
    _, a4 = _poly_sup(coeffs, 4, lo, hi)
    for kappa, a, b in exps:
        s, ab = _exp_sup(kappa, a, b, 2, lo, hi)
        s2, a2 = s2 + s, a2 + ab
        a3 = a3 + _exp_sup(kappa, a, b, 3, lo, hi)[1]
        a4 = a4 + _exp_sup(kappa, a, b, 4, lo, hi)[1]

    def top(v):
        v = float(np.max(v)) if v.size else 0.0
        return math.inf if math.isnan(v) else v * (1 + REL)

    return {"hi": max(top(s2), 0.0), "peak": top(a2), "d3": top(a3), "d4": top(a4)}


# -- bind-time rebuild of z = K x + b --------------------------------------------------------
def bind_context(der, data) -> tuple:
    """(sizes, scalars, dense-on-demand arrays, x shape) of one bind: what rebuilding an
    operator or an offset from the data needs."""
    sizes = bind_sizes(der, data)
    scalars = {n: float(np.asarray(data[n])) for n in der.scalars}
    arrays = DenseOnDemand(data, [k for k, shape in der.data_shapes.items() if shape])
    xshape = tuple(int(concrete(s, sizes)) for s in der.x_shape)
    return sizes, scalars, arrays, xshape


def _operator(info, der, data, ctx):
    """Dense K (rows x dim x), |K|, row norms, and a function theta -> b (offsets)."""
    sizes, scalars, arrays, xshape = ctx
    lin, off, limits = load(info["lin"]), load(info["off"]), tuple(load(info["limits"]))
    op = Operator("ball", lin, limits, 0, {}, "x", sp.S.Zero, "")
    K, _ = operator_matrix(op, sizes, scalars, arrays, der.x_name, xshape)
    if K is None:
        return None
    rows = tuple(s for s, _, _ in limits)

    def offsets(theta):
        if off == 0:
            return np.zeros(K.shape[0])
        arrs = ChainMap({}, arrays)  # no copy: arrays densify on demand
        arrs[der.theta_name] = np.asarray(theta, dtype=np.float64).reshape(-1)
        E = Env(sizes, scalars, arrs, "__no_variable__", (1,))
        env, shape = {}, []
        for s, lo, hi in limits:
            env[s] = np.arange(as_int(lo, E), as_int(hi, E) + 1)
            shape.append(env[s].size)
        axes, arr, _ = interpret(off, env, E)
        extra = [a for a in axes if a not in rows]
        if extra:
            raise ValueError(f"offset has a free index {extra[0]}")
        return np.broadcast_to(expand_axes(np.asarray(arr, dtype=float), axes, rows, False),
                               tuple(shape)).reshape(-1)

    rownorm = np.sqrt(np.sum(K * K, axis=1)) * (1 + 2 * (K.shape[1] + 2) * U)
    return {"K": K, "absK": np.abs(K), "rownorm": rownorm, "offsets": offsets,
            "theta_free": not any(str(ix.base.label) == der.theta_name
                                  for ix in off.atoms(sp.Indexed)), "b": None}


def ball_values(der, theta, x, radius, data, cache=None) -> dict:
    """symbol name -> value for the ball symbols of every ball term (missing: not available)."""
    cache = {} if cache is None else cache
    terms = (der.ball or {}).get("terms", {})
    out = {}
    if not terms:
        return out
    if "ctx" not in cache:
        cache["ctx"] = bind_context(der, data)
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    r = float(radius)
    if not (math.isfinite(r) and r >= 0 and np.all(np.isfinite(x))):
        return out
    for label, info in terms.items():
        key = "op:" + label
        if key not in cache:
            try:
                cache[key] = _operator(info, der, data, cache["ctx"])
            except Exception:  # noqa: BLE001 - no local constant, the global one stays
                cache[key] = None
        op = cache[key]
        if op is None or op["K"].shape[1] != x.size:
            continue
        if op["theta_free"]:
            if op["b"] is None:
                op["b"] = op["offsets"](theta)
            b = op["b"]
        else:
            b = op["offsets"](theta)
        z = op["K"] @ x + b
        zerr = (x.size + 2) * U * (op["absK"] @ np.abs(x) + np.abs(b)) * 2
        rad = r * op["rownorm"] * (1 + REL) + zerr
        sups = interval_sups(info["components"], z - rad, z + rad)
        for w, v in sups.items():
            out[f"ball_{w}_{label}"] = v
    return out


def evaluate_local(der, theta, quantities, x, radius, data, cache=None) -> dict:
    """`evaluate` with L, L_A, L_B, L_3, L_DB, L_f, L_Hf replaced by min(global, bound on the
    ball B(x, radius)) where a ball record exists.

    Keys as `evaluate` (+ "domains": name -> "ball" | "all x", "radius"). mu stays GLOBAL: it is
    never evaluated on the ball (its role is to prove ||x - x*|| <= G/mu).
    """
    out = evaluate(der, theta, quantities)
    flags = dict(out["certified_flags"])
    domains = {k: "all x" for k in flags}
    ball = (der.ball or {}).get("constants", {})
    if ball:
        vals = ball_values(der, theta, x, radius, data, cache)
        th, env = environment(der, theta, quantities)
        env.update(vals)
        xc = np.asarray(x, dtype=np.float64).reshape(-1)
        if math.isfinite(float(radius)) and radius >= 0 and np.all(np.isfinite(xc)):
            # sup ||y||_inf over B(x, r) <= ||x||_inf + r (learned filters, derivation/filters.py)
            env[XINF.name] = (float(np.max(np.abs(xc), initial=0.0)) + float(radius)) * (1 + REL)
        used_uncertified = {n for n, q in quantities.items()
                            if isinstance(q, dict) and not q.get("certified", True)}
        for name, rec in ball.items():
            if name == "mu" or name not in out:
                continue  # mu is never local
            if any(s.name.startswith("ball_") and s.name not in env for s in rec.expr.free_symbols):
                continue
            v = num(rec.expr, env, th)
            v = float(np.asarray(v).reshape(-1)[0]) if np.ndim(v) else float(v)
            if math.isnan(v):
                continue
            v = round_up(v)
            if v < out[name]:
                out[name] = v
                domains[name] = "ball"
                flags[name] = rec.certified and not ({s.name for s in rec.expr.free_symbols}
                                                     & used_uncertified)
    out["certified_flags"] = flags
    out["certified"] = all(flags.values())
    out["domains"] = domains
    out["radius"] = float(radius)
    return out
