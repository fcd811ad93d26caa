"""Call-time half of the data-local third derivative (docs/bounds.md 15.10): an upper bound on
||DA(x)[u]||, the spectral norm of the derivative of g's Hessian at x along u, from the records
of derivation/contraction.py and the rows their generated kernels wrote.

Each term with a third derivative adds |c| max |v| ||K||^2 max_I ||M(I)||, where M(I) =
psi'''(z_I)[K_I u] is the symmetric d x d matrix of the atom's third derivative and ||M(I)|| its
largest |eigenvalue|, which `lower_third_rows_<term>` writes row by row for d <= 2 (its entries
for more; compiler/contraction.py). Nothing here is a sup over an interval: the bound holds at x only.

Rounding: each row value is a short sum and a short formula, a few ulps off relative to the
size of its terms. Where those terms cancel (logistic's psi''' = (sigmoid(-t) - sigmoid(t))
sigmoid(t) sigmoid(-t) near t = 0; an entry t1 (2 t0^2 - t1^2 - nu^2) of isotropic TV near its
zero) the error is a few ulps of sup |psi'''| |K_I u|, not of the row's value: the total is
rounded up by MARGIN (relative) and by ABSOLUTE times the global L_A ||u|| (where L_A is
finite), which covers both.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import sympy as sp

from ..records import Derivation, load
from .numeric import environment, num

__all__ = ["contraction_bound", "row_peak", "MARGIN", "ABSOLUTE"]

MARGIN = 1e-9
ABSOLUTE = 64 * 2.0 ** -53


def contraction_bound(der: Derivation, theta: np.ndarray, quantities: dict,
                      rows: dict[str, np.ndarray | None], global_bound: float) -> float:
    """An upper bound on ||DA(x)[u]|| (the sum over g's terms with a third derivative), given
    each term's rows at x and u (label -> the row kernel's output, None where it failed) and
    the global bound L_A ||u|| (for the absolute rounding margin; inf skips it); inf where the
    derivation has no records, a term has no rows, its scale reads an uncertified data
    quantity, or a value is not finite."""
    if not der.contractions:
        return math.inf
    uncertified = {n for n, q in quantities.items()
                   if isinstance(q, dict) and not q.get("certified", True)}
    th, env = environment(der, theta, quantities)
    total = 0.0
    for label, record in der.contractions.items():
        scale, names = _scale(record["scale"])
        values = rows.get(label)
        if values is None or names & uncertified:
            return math.inf
        total += float(np.asarray(num(scale, env, th)).reshape(-1)[0]) * row_peak(
            values, len(record["args"]))
        if not math.isfinite(total):
            return math.inf
    floor = ABSOLUTE * global_bound if math.isfinite(global_bound) else 0.0
    return total * (1 + MARGIN) + floor


@functools.lru_cache(maxsize=64)
def _scale(text: str) -> tuple[sp.Expr, frozenset[str]]:
    expr = load(text)
    return expr, frozenset(s.name for s in expr.free_symbols)


def row_peak(values: np.ndarray, d: int) -> float:
    """max over the rows of ||M(I)||: the kernel's values themselves for d <= 2 (it writes the
    norm), else the largest |eigenvalue| of the symmetric d x d matrix whose entries a <= b the
    row holds (entries first). inf where a value is not finite."""
    entries = np.asarray(values, dtype=np.float64).reshape(1 if d <= 2 else d * (d + 1) // 2, -1)
    if entries.shape[1] == 0:
        return 0.0
    if d <= 2:
        peak = float(entries.max())
        return peak if math.isfinite(peak) else math.inf
    if not np.isfinite(entries).all():
        return math.inf
    M = np.empty((entries.shape[1], d, d))
    pairs = [(a, b) for a in range(d) for b in range(a, d)]
    for e, (a, b) in enumerate(pairs):
        M[:, a, b] = M[:, b, a] = entries[e]
    return float(np.abs(np.linalg.eigvalsh(M)).max())
