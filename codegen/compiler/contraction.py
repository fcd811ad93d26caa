"""The row values of the data-local third derivative (docs/bounds.md 15.10): one kernel per atom
term c sum_I v_I psi(K_I x + b_I) of g with a third derivative, from the term's record in the
constants derivation (constants/derivation/contraction.py: SymPy srepr text, read back here
with sympify).

For every row I the kernel `lower_third_rows_<term>` writes ||M(I)||, the spectral norm of

    M_ab(I) = sum_c psi_abc(z_I) (K_I v)_c,   z_I = K_I x + b_I,

the third derivative of the atom at its argument contracted with the direction's image:
|psi'''(z_I) (k_I . v)| for a scalar atom, a symmetric 2 x 2 matrix's closed form for a group
atom of two arguments (isotropic TV), and the entries a <= b themselves (entry first) for more.
The runtime bounds ||DA(x)[v]|| by |c| max |v| ||K||^2 max_I ||M(I)||. The values are written as
a gradient: the kernel is the reverse sweep of sum_I sum_e rows[e, I] value_e(I) with respect
to `rows`, which is linear in it, so its adjoint is the values themselves, row by row, and the
lowering's index checks and temporaries (a data operator's row sums) apply as they do to g.
"""
from __future__ import annotations

from typing import Any

import sympy as sp

from ..primitives import logcosh, sigmoid, softplus
from . import ir
from .autodiff import adjoint
from .lowering import lower_objective
from .problem import Problem

__all__ = ["third_row_kernels", "RowKernel", "ROWS", "ROWS_OUTPUT", "DIRECTION"]

#: (name, doc, program, inputs, output, meta) of one row kernel.
RowKernel = tuple[str, str, ir.Program, tuple[str, ...], str, dict[str, Any]]

#: The auxiliary row weights the entries are the gradient of, and that gradient (generator names).
ROWS = "hg_rows"
ROWS_OUTPUT = f"{ROWS}_bar"
#: The direction v (the HVP's name for it).
DIRECTION = "v"


def third_row_kernels(problem: Problem, records: dict[str, Any]) -> list[RowKernel]:
    """(name, doc, program, inputs, output, meta) of one kernel per record (term label ->
    record), in the labels' order; meta: the term, the atom's number of arguments d and the
    output's shape (one norm per row for d <= 2, else d (d + 1) / 2 entries, entry first).
    All or none: a record whose row program cannot be built leaves the problem without rows
    (the runtime then has no local bound, and the corrections keep Corollary 15.3's L_A), never
    without its other kernels."""
    out: list[RowKernel] = []
    for label in sorted(records):
        try:
            program, shape, d = _row_program(problem, records[label], label)
        except Exception:  # noqa: BLE001 - no rows at all: the bounds keep the global L_A
            return []
        name = f"lower_third_rows_{label}"
        doc = (f"||psi'''(K_I x + b_I)[K_I v]|| row by row for the term {label} of g (its atom's "
               "third derivative contracted with the direction)")
        out.append((name, doc, program, (DIRECTION,), ROWS_OUTPUT,
                    {"term": label, "kernel": name, "args": d,
                     "shape": [str(e) for e in shape]}))
    return out


def _row_program(problem: Problem, record: dict[str, Any], label: str
                 ) -> tuple[ir.Program, tuple[sp.Expr, ...], int]:
    x = problem.x_spec.name
    theta = sp.IndexedBase(problem.theta_spec.name)
    psi = _parsed(record["psi"])
    names = {s.name: s for s in psi.free_symbols}
    psi = psi.xreplace({names[t]: theta[k] for t, k in record["theta"]})
    args = [names.get(a, sp.Symbol(a, real=True)) for a in record["args"]]
    lins = [_parsed(e) for e in record["lins"]]
    at = [lin + _parsed(off) for lin, off in zip(lins, record["offs"])]
    along = [_along(lin, x) for lin in lins]
    limits = [tuple(lim) for lim in _parsed(record["limits"])]
    d = len(args)
    at_row = dict(zip(args, at))
    entries = [sp.Add(*[_compact(sp.diff(psi, args[a], args[b], args[c]), args).xreplace(at_row)
                        * along[c] for c in range(d)]) for a in range(d) for b in range(a, d)]
    if d <= 2:  # the row's norm itself: |s|, or the 2 x 2 closed form |a + c|/2 + sqrt(...)
        entries = [_norm(entries)]
    rows = tuple(hi - lo + 1 for _, lo, hi in limits)
    shape = ((len(entries),) if len(entries) > 1 else ()) + rows
    weights = sp.IndexedBase(ROWS)
    position = tuple(s - lo for s, lo, _ in limits)
    body = sp.Add(*[weights[((e,) if len(entries) > 1 else ()) + position] * entry
                    for e, entry in enumerate(entries)])
    arrays: dict[str, Any] = dict(problem.arrays)
    arrays[DIRECTION] = ir.Array(DIRECTION, tuple(problem.x_spec.shape), ir.INPUT)
    arrays[ROWS] = ir.Array(ROWS, shape, ir.INPUT)
    objective = lower_objective(sp.Sum(body, *limits), arrays,
                                f"third-derivative rows of the term {label} of g")
    return adjoint(objective, [ROWS]), shape, d


def _compact(derivative: sp.Expr, args: list[sp.Symbol]) -> sp.Expr:
    """An algebraic derivative over one denominator, factored: SymPy's third derivative of
    sqrt(t^2 + nu^2) is 3 t (t^2 / (t^2 + nu^2) - 1) / (t^2 + nu^2)^1.5, whose terms cancel, and
    -3 nu^2 t / (t^2 + nu^2)^2.5 does not (the 2 x 2 norm of isotropic TV squares such entries:
    compact they render in about half the time). Left as it is where a function other than a
    power reads the arguments (softplus, sigmoid: their stable forms stay)."""
    if any(f.has(*args) for f in derivative.atoms(sp.Function)):
        return derivative
    return sp.factor(sp.together(derivative))


def _parsed(text: str) -> sp.Expr:
    """A record's SymPy srepr text, with the atoms' own functions (softplus, sigmoid, logcosh)."""
    return sp.sympify(text, locals={"softplus": softplus, "sigmoid": sigmoid, "logcosh": logcosh})


def _norm(entries: list[sp.Expr]) -> sp.Expr:
    """The spectral norm of the symmetric 1 x 1 or 2 x 2 matrix with these entries a <= b."""
    if len(entries) == 1:
        return sp.Abs(entries[0])
    a, b, c = entries
    return sp.Abs(a + c) / 2 + sp.sqrt((a - c) ** 2 / 4 + b ** 2)


def _along(lin: sp.Expr, x: str) -> sp.Expr:
    """lin with every read of x replaced by the same read of the direction: K_I v."""
    v = sp.IndexedBase(DIRECTION)
    return lin.replace(lambda e: isinstance(e, sp.Indexed) and str(e.base.label) == x,
                       lambda e: v[e.indices])
