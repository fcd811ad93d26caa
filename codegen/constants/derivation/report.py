"""`format_tree`: the derivation as readable text (for `hypergen audit FILE`)."""
from __future__ import annotations

import sympy as sp

from ..records import load


def _flag(rec):
    return "certified" if rec.certified else "NOT certified"


def _lines(rec, depth, out):
    pad = "  " * depth
    out.append(f"{pad}{rec.name} = {sp.sstr(rec.expr)}   [{rec.kind}, {_flag(rec)}]")
    if rec.term:
        out.append(f"{pad}    term: {rec.term}")
    if rec.rule:
        out.append(f"{pad}    rule: {rec.rule}")
    if rec.message:
        out.append(f"{pad}    note: {rec.message}")
    for c in rec.children:
        _lines(c, depth + 1, out)


def _terms(der):
    seen, out = set(), []
    for key in ("mu", "L_f"):
        rec = der.constants.get(key)
        if rec is None:
            continue
        for r in rec.walk():
            if "[" in r.name and r.term and r.name.split("[")[1] not in seen:
                seen.add(r.name.split("[")[1])
                out.append(r)
    return out


#: The constants the DWR correction's second-order terms need (docs/bounds.md 15.3): 0 where g
#: is quadratic (L_3), f is quadratic (L_Hf) or B is affine in x (L_DB).
_CORRECTION_CONSTANTS = ("L_3", "L_Hf", "L_DB")


def _certificates(der) -> list:
    """Which bounds a hypergradient of this problem can report (docs/bounds.md 7, 15), read from
    the derived constants: the correction ("dwr", "tight") needs L_3, L_Hf and L_DB finite,
    globally or on the ball; E&R's needs nothing more. At run time each is also checked at theta."""
    ball = (der.ball or {}).get("constants", {})
    infinite = [name for name in _CORRECTION_CONSTANTS if name in der.constants
                and der.constants[name].expr.has(sp.oo, sp.zoo) and name not in ball]
    quadratic = all(der.constants[name].expr == 0 for name in ("L_A", "L_Hf")
                    if name in der.constants)
    out = ["", "certificates (docs/bounds.md 7, 15):"]
    if der.mu_check == "none":  # built with allow_uncertified: every bound divides by mu
        return out + [f"  none: mu = {sp.sstr(der.constants['mu'].expr)} is not provably "
                      "positive; a hypergradient raises where mu(theta) <= 0, and elsewhere its "
                      "bounds rest on the unproved mu (certified=False)"]
    out.append("  er: E&R's bound, always")
    if infinite:
        out.append(f"  dwr, tight: not available ({', '.join(infinite)} infinite: the "
                   "correction's second-order terms have no finite bound)")
        out.append("  default (\"auto\") with rtol or atol: E&R's")
        return out
    corollary = "15.2, g and f quadratic in x" if quadratic else "15.3"
    local = [name for name in _CORRECTION_CONSTANTS if name in ball
             and der.constants[name].expr.has(sp.oo, sp.zoo)]
    out.append(f"  dwr, tight: available (Corollary {corollary}) where "
               f"{', '.join(_CORRECTION_CONSTANTS)} are finite at theta"
               + (f" ({', '.join(local)} on the ball B(x_eps, e) only)" if local else ""))
    if der.contractions:
        out.append("    their third-derivative terms also read ||DA(x_eps)[u]|| from the data, row by "
                   "row (docs/bounds.md 15.10): " + "; ".join(
                       f"term {label}: {sp.sstr(load(r['scale']))} * max over rows of "
                       f"||psi'''[K_I u]||, psi = {sp.sstr(load(r['psi']))}"
                       for label, r in sorted(der.contractions.items())))
    out.append("  default (\"auto\") with rtol or atol: \"tight\" with a first-order or cg lower "
               "solver (gd, hb, fista, cg) and with newton and an iterative adjoint for one "
               "hyperparameter, \"block\" with newton for more and above 8, E&R's otherwise "
               "(direct; docs/bounds.md 15.6, 15.8)")
    return out


def format_tree(derivation, quantities: dict | None = None) -> str:
    """Terms (with their atoms and operators), then each constant with the terms' contributions;
    with the `quantities` of a bind (`compute_data_quantities`), each data quantity's value and
    the method that certified it."""
    der = derivation
    out = [f"constants of {der.problem}: {der.status}"]
    theta = ", ".join(f"{n} = {der.theta_name}[{k}]" for n, k in der.theta_symbols)
    if theta:
        out.append(f"theta: {theta}")
    for _sym, msg in der.conditions:
        out.append(f"condition: {msg}")
    out += ["", "terms:"]
    for r in _terms(der):
        out.append(f"  {r.name.split('[')[1][:-1]} = {r.term}")
        out.append(f"      rule: {r.rule}")
        for c in r.children:
            what = c.term or f"{sp.sstr(c.expr)}"
            out.append(f"      {c.name}: {what}   [{c.kind}, {_flag(c)}]")
            out.append(f"          {c.rule}")
    for name, rec in der.constants.items():
        out.append("")
        out.append(f"{name} = {sp.sstr(rec.expr)}   [{rec.kind}, {_flag(rec)}; {rec.domain}; "
                   f"{rec.theta_region}]")
        out.append(f"    rule: {rec.rule}")
        if rec.message:
            out.append(f"    note: {rec.message}")
        for c in rec.children:
            if c.kind == "assumed" or "[" not in c.name:
                _lines(c, 2, out)
                continue
            out.append(f"    {c.name.split('[')[1][:-1]}: {sp.sstr(c.expr)}   [{c.kind}, {_flag(c)}]"
                       + (f"  note: {c.message}" if c.message else ""))
    for name, rec in (der.ball or {}).get("constants", {}).items():
        out.append("")
        out.append(f"{name} (on the ball B(x, r) only) = {sp.sstr(rec.expr)}   [{rec.kind}, "
                   f"{_flag(rec)}; {rec.domain}; terms {rec.term}]")
        out.append(f"    rule: {rec.rule}")
    out += _certificates(der)
    if der.operators or der.quantities:
        out += ["", "data quantities (computed at bind time):"]
        out += [f"  {op.definition}" for op in der.operators.values()]
        out += [f"  {name}: {q['description']}" for name, q in der.quantities.items()]
    if quantities:
        out += ["", "data quantities of this bind (value: method):"]
        out += [f"  {name} = {q['value']:.6g}: {q['method']}"
                + ("" if q.get("certified", True) else "   [NOT certified]")
                for name, q in quantities.items() if name in der.quantities
                or name.endswith(":estimate")]
    if der.messages:
        out.append("")
        out.extend(f"message: {m}" for m in der.messages)
    return "\n".join(out) + "\n"
