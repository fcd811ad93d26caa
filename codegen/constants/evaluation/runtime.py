"""Constants at run time: stated ones (from the problem file) or derived ones (constants.json).

Stated constants are SymPy expressions in theta and scalar data; they are "assumed", never
certified, and every result computed with them says so. Derived constants come from
`codegen.constants.derivation` (structural rules with an audit trail) through constants.json. This
module is the per-bind glue the runtime's BoundProblem calls.
"""
from __future__ import annotations

import math

import numpy as np
import sympy as sp

from ...errors import HypergenError
from ...threads import one_blas_thread
from ..records import Derivation
from .contraction import contraction_bound
from .cross import CrossNorm, prepare_cross
from .local import evaluate_local
from .numeric import evaluate, reads_theta
from .quantities import compute_data_quantities, loose_quantities

NAMES = ("mu", "L", "L_A", "L_B", "L_f")


def prepare_constants(module, data: dict, grams: dict | None = None) -> dict:
    """Everything `evaluate_constants` needs, computed once per bind (data quantities included);
    `grams` receives the data matrices' Gram matrices formed on the way
    (`compute_data_quantities`)."""
    meta = module.meta
    if module.constants_json is not None:
        derivation = _parsed(module.constants_json)
        with one_blas_thread() as workers:  # before the kernels run (`codegen.threads`)
            quantities = compute_data_quantities(derivation, data, workers=workers, grams=grams)
        return {"kind": "derived", "derivation": derivation, "data": data,
                "quantities": quantities,
                "source": "stated" if meta.get("stated_constants") else "derived"}
    stated = meta.get("stated_constants")
    if not stated:
        raise HypergenError(
            f"{module.name}: no constants: they could not be derived and the problem states none "
            f"(pass constants={{'mu': ..., 'L': ...}} to Problem)")
    theta = sp.IndexedBase(meta["theta"])
    exprs = {k: sp.sympify(v) for k, v in stated.items()}  # srepr text parses back
    scalars = {s: float(data[s.name]) for e in exprs.values() for s in e.free_symbols
               if isinstance(s, sp.Symbol) and s.name in data}
    fns = {k: sp.lambdify([theta], e.xreplace(scalars), modules="math") for k, e in exprs.items()}
    return {"kind": "stated", "functions": fns}


_PARSED: dict = {}  # id(constants.json content) -> (content, Derivation)


def _parsed(raw) -> Derivation:
    """Derivation.from_json(raw), once per module's constants.json content (it eval'd ~65 SymPy
    expressions, 5-15 ms, at every bind): the records are read-only after parsing. The content
    is kept with it so that its id is not reused."""
    hit = _PARSED.get(id(raw))
    if hit is None or hit[0] is not raw:
        hit = (raw, Derivation.from_json(raw))
        _PARSED[id(raw)] = hit
    return hit[1]


def tighten_constants(prepared: dict) -> bool:
    """Recompute, once per bind, the ||K||^2 that block sums bounded (docs/constants.md 4) by the
    Gram matrix, for a first-order solver whose step size 1/L they would shrink (GD, HB, FISTA:
    8x the iterations at 20000 x 2000). True if anything changed (the caller re-reads the
    constants); the time shows in each quantity's `seconds`."""
    if prepared["kind"] != "derived" or prepared.get("tight"):
        return False
    prepared["tight"] = True
    loose = loose_quantities(prepared["quantities"])
    if not loose:
        return False
    names = {key.split("_", 1)[1] for key in loose}  # normsq_K1 -> K1: only those again
    with one_blas_thread() as workers:
        fresh = compute_data_quantities(prepared["derivation"], prepared["data"], tight=True,
                                        operators=names, workers=workers)
    prepared["quantities"] = {**prepared["quantities"], **fresh}
    prepared.pop("theta_free", None)
    prepared.pop("last_theta", None)
    return True


def constants_cost(prepared: dict) -> dict:
    """{"flops", "seconds"} of this bind's data quantities (docs/constants.md 4): each operator's
    computation once (its quantities share one record of time; operators that share a data
    matrix share one computation). For a caller that reports the constants with the first
    hypergradient's work; stated constants cost nothing here. Kept with the quantities it sums:
    they change only by replacement (`tighten_constants`), so a hypergradient's two reads (before
    and after it) cost a lookup, not a pass over the records."""
    quantities = prepared.get("quantities", {})
    kept = prepared.get("cost")
    if kept is not None and kept[0] is quantities:
        return dict(kept[1])
    records = [q for q in quantities.values() if "seconds" in q]
    distinct = {(q["seconds"], q["method"]): q for q in records}  # shared records: one each
    flops = sum(int(q.get("flops", 0)) for q in distinct.values())
    seconds = sum({float(q["seconds"]) for q in records})  # one time per computation
    prepared["cost"] = (quantities, {"flops": flops, "seconds": seconds})
    return {"flops": flops, "seconds": seconds}


def evaluate_constants(prepared: dict, theta: np.ndarray) -> dict:
    """The constants at theta; derived constants that read no theta are evaluated once per bind,
    the others once per theta in a row (a hypergradient with the correction asks up to eight
    times at one theta; 35 us each on the logistic example), both kept in `prepared` and handed
    out as copies."""
    if prepared["kind"] == "derived":
        if "reads_theta" not in prepared:  # a tree walk: once per bind
            prepared["reads_theta"] = reads_theta(prepared["derivation"])
        key = np.asarray(theta, dtype=np.float64).tobytes()
        last = prepared.get("last_theta")
        out = prepared.get("theta_free") or (last[1] if last and last[0] == key else None)
        if out is None:
            out = evaluate(prepared["derivation"], theta, prepared["quantities"])
            if out["mu"] > 0:  # mu <= 0 raises or warns at every call instead
                if prepared["reads_theta"]:
                    prepared["last_theta"] = (key, out)
                else:
                    prepared["theta_free"] = out
        return dict(out, certified_flags=dict(out["certified_flags"]),
                    source=prepared.get("source", "derived"))
    out = {}
    for name in NAMES:
        fn = prepared["functions"].get(name)
        out[name] = float(fn(theta)) if fn is not None else math.inf
    out["certified"] = False
    out["source"] = "stated"
    return out


def evaluate_local_constants(prepared: dict, theta: np.ndarray, x: np.ndarray, radius: float,
                             data: dict) -> dict:
    """`evaluate_constants`, with L, L_A, L_B, L_f valid on the ball B(x, radius) only
    (docs/framework.md section 8.4; constants.local). mu stays global. Stated constants: unchanged."""
    if prepared["kind"] != "derived":
        return evaluate_constants(prepared, theta)
    return evaluate_local(prepared["derivation"], theta, prepared["quantities"], x, radius, data,
                          cache=prepared.setdefault("ball_cache", {}))


def third_contraction(prepared: dict, theta: np.ndarray, rows: dict, norm_u: float) -> float:
    """An upper bound on ||DA(x)[u]||, the derivative of g's Hessian at x along u, from each
    term's rows at x and u (docs/bounds.md 15.10; constants.evaluation.contraction; norm_u =
    ||u|| for its rounding margin); inf for stated constants or where the derivation has no
    local rule."""
    if prepared["kind"] != "derived":
        return math.inf
    global_bound = float(evaluate_constants(prepared, theta)["L_A"]) * norm_u
    return contraction_bound(prepared["derivation"], theta, prepared["quantities"], rows,
                             global_bound)


def cross_norm_structure(prepared: dict, data: dict) -> CrossNorm | None:
    """The per-bind `constants.evaluation.cross.CrossNorm` (one-pass bound on ||B||), or None when the
    theta-structure of g is not per-sample weights (or the constants are stated): callers then
    fall back to cross JVPs. Prepared once, kept in `prepared`."""
    if prepared["kind"] != "derived":
        return None
    if "cross" not in prepared:
        prepared["cross"] = prepare_cross(prepared["derivation"], data)
    cross = prepared["cross"]
    return None if isinstance(cross, str) else cross
