"""The lower Hessian as a weighted Gram matrix of one data matrix: A^T diag(w) A + R.

A generalised linear loss sum_i psi_i(a_i . x) has the Hessian A^T diag(w) A, w_i = psi_i''
at a_i . x (with whatever the rows carry: labels, weights, theta). Assembled column by column
from HVPs it costs n passes over A (n / 2 with the pair kernel); as a weighted Gram matrix it is
one BLAS-3 product, which at 10000 x 500 takes the time of about 25 HVPs. A learning run's held
factor (codegen/hypergrad/held_factor.py) assembles it this way where the module has the form.

The form is read off the HVP of g's terms that read a data matrix: after dead-code elimination,
its statements that depend on the direction v must be exactly

    gather    T[i] += A[i, j] * v[j]              (i over A's rows, j over x's entries)
    row       S[i] += (linear in the row arrays computed from T, at i)
    scatter   x_bar_dot[j] += A[i, j] * U[i]

so that U = w * T row by row. `lower_gram_weights` is that program with T[i] = 1 read in place of
the gather: its output is w. The rest of the Hessian, R, is the Hessian of g's terms that read no
data matrix: none, or exactly the terms with theta, whose Hessian `lower_hessian_varying`
already assembles (compiler/kernels.py split_hessian). Anything else has no Gram form, and the
held factor assembles from HVPs as before.
"""
from __future__ import annotations

import sympy as sp

from . import ir
from .autodiff import adjoint, tangent
from .lowering import lower_objective
from .passes import depending_on, eliminate_dead_code, one_update_each
from .problem import Problem

__all__ = ["gram_weights", "gram_weights_jvp", "WEIGHTS_OUTPUT", "WEIGHTS_TANGENT", "GRAM_DATA",
           "GRAM_REST"]

Arrays = dict[str, ir.Array]
Found = list[tuple[ir.Statement, ir.Update]]

#: The output of `lower_gram_weights` (a generator's own name: no user symbol starts with hg_).
WEIGHTS_OUTPUT = "hg_weights"
#: The output of `lower_gram_weights_jvp`, the weights' tangent (a generator's own name too).
WEIGHTS_TANGENT = f"{WEIGHTS_OUTPUT}_dot"
#: Keys of the weights program's meta: the data matrix A, and the kernel that assembles R
#: ("lower_hessian_varying") or None where R = 0.
GRAM_DATA, GRAM_REST = "gram_data", "gram_rest"


def gram_weights(problem: Problem, has_varying: bool) -> tuple[str, str, ir.Program] | None:
    """(name, doc, program) of `lower_gram_weights`, or None where g's Hessian has no Gram form
    (module docstring). has_varying: whether the module has `lower_hvp_varying` (the Hessian of
    g's terms with theta, R where those are the terms that read no data matrix)."""
    x, th = problem.x_spec.name, problem.theta_spec.name
    matrices = {n for n, a in problem.arrays.items()
                if a.role == ir.DATA and len(a.shape) > 1}
    terms = sp.Add.make_args(problem.g)
    data_terms = [t for t in terms if _names(t) & matrices]
    rest = [t for t in terms if t not in data_terms]
    if not data_terms or len(problem.x_spec.shape) != 1:
        return None
    if rest and not (has_varying and all(th in _names(t) for t in rest)
                     and not any(th in _names(t) for t in data_terms)):
        return None  # R would need a kernel of its own
    grad = adjoint(lower_objective(sp.Add(*data_terms), problem.arrays, "lower (data terms)"),
                   [x, th])
    out = f"{x}_bar_dot"
    hvp = tangent(grad, {x: "v"}, [out])
    hvp = eliminate_dead_code(hvp.with_statements(hvp.statements, [out]))
    program = _weights_program(hvp, x, out)
    if program is None:
        return None
    program.meta[GRAM_REST] = "lower_hessian_varying" if rest else None
    return ("lower_gram_weights", f"the row weights w of d2g/dx2 = {program.meta[GRAM_DATA]}^T "
            "diag(w) " + program.meta[GRAM_DATA] + (" + the Hessian of g's terms with theta"
                                                    if rest else ""), program)


def gram_weights_jvp(weights: ir.Program, x: str) -> tuple[str, str, ir.Program]:
    """(name, doc, program) of `lower_gram_weights_jvp`: w'(x)[v] = d/ds w(x + s v), the
    tangent of `lower_gram_weights` along x <- v.

    With d2g/dx2 = A^T diag(w(x)) A + R, the third derivative of g along e applied to u is
    A^T diag(w'(x)[e]) A u = A^T diag(w'(x)[u]) A e (third derivatives are symmetric) when R
    does not depend on x: the energy-norm terms of the DWR correction read w'(x)[u] / w(x)
    row by row (docs/bounds.md 15.9). One pass over A, like the weights."""
    jvp = tangent(weights, {x: "v"}, [WEIGHTS_TANGENT])
    program = eliminate_dead_code(jvp.with_statements(jvp.statements, [WEIGHTS_TANGENT]))
    return ("lower_gram_weights_jvp", "w'(x)[v] = d/ds w(x + s v), the tangent of the row "
            "weights along x", program)


def _names(expr: sp.Expr) -> set[str]:
    return {str(a.base.label) for a in expr.atoms(sp.Indexed)}


def _weights_program(hvp: ir.Program, x: str, out: str) -> ir.Program | None:
    """The HVP with 1 read for the gather's T[i] and U as the output `WEIGHTS_OUTPUT`, or
    None unless its v-dependent statements are one gather, row statements and one scatter
    through the same dense data matrix (module docstring)."""
    arrays = hvp.arrays
    statements = one_update_each(hvp)
    varying = depending_on(statements, arrays, "v")
    gathers: Found = []
    scatters: Found = []
    rows: Found = []
    invariant: list[ir.Statement] = []
    for st in statements:
        if not {u.target for u in st.updates} & varying:
            invariant.append(st)
            continue
        (u,) = st.updates
        kind = _kind(st, u, arrays, x, out)
        if kind is None:
            return None
        {"gather": gathers, "scatter": scatters, "row": rows}[kind].append((st, u))
    if len(gathers) != 1 or len(scatters) != 1:
        return None
    (gst, gu), (_, su) = gathers[0], scatters[0]
    matrix = ir.read_name(_matrix_read(gu.expr, arrays))
    if matrix != ir.read_name(_matrix_read(su.expr, arrays)) or arrays[matrix].sparse:
        return None
    i = gst.loops[0].var
    chain = {gu.target} | {u.target for _, u in rows}
    source = su.expr / _matrix_read(su.expr, arrays)  # U[i'] of the scatter's own loop
    if not isinstance(source, sp.Indexed) or ir.read_name(source) not in chain:
        return None
    whole = (gst.loops[0].lo, gst.loops[0].hi)
    if not all((st.loops[0].lo, st.loops[0].hi) == whole and _linear_row(st, u, chain, arrays)
               for st, u in rows):
        return None  # a row statement over part of the rows, or not linear in the chain
    ones = [_with_unit_gather(st, u, gu.target, arrays) for st, u in rows]
    weights = ir.Array(WEIGHTS_OUTPUT, arrays[gu.target].shape, ir.OUTPUT)
    copy = ir.Statement((ir.Loop(i, gst.loops[0].lo, gst.loops[0].hi),),
                        (ir.Update(WEIGHTS_OUTPUT, (i,), ir.read(
                            arrays[ir.read_name(source)], (i,))),))
    kept = {n: a for n, a in arrays.items() if n not in ("v", out)}
    kept[WEIGHTS_OUTPUT] = weights
    program = ir.Program(kept, [*invariant, *ones, copy],
                         (WEIGHTS_OUTPUT,), {**hvp.meta, GRAM_DATA: matrix})
    return eliminate_dead_code(program)


def _matrix_read(expr: sp.Expr, arrays: Arrays) -> sp.Indexed | None:
    """The single read of a two-dimensional data array in expr, or None."""
    found = [r for r in ir.reads_of(expr, arrays) if isinstance(r, sp.Indexed)
             and arrays[ir.read_name(r)].role == ir.DATA and len(arrays[ir.read_name(r)].shape) == 2]
    return found[0] if len(found) == 1 else None


def _kind(st: ir.Statement, u: ir.Update, arrays: Arrays, x: str, out: str) -> str | None:
    """"gather", "scatter" or "row" for a v-dependent statement of the Gram form, else None."""
    if len(st.updates) != 1 or u.op != "+":
        return None
    loops = st.loops
    A = _matrix_read(u.expr, arrays)
    if A is not None and len(loops) == 2 and tuple(A.indices) == (loops[0].var, loops[1].var):
        rows, cols = arrays[ir.read_name(A)].shape
        full = (loops[0].lo == 0 and sp.simplify(loops[0].hi - (rows - 1)) == 0
                and loops[1].lo == 0 and sp.simplify(loops[1].hi - (cols - 1)) == 0
                and sp.simplify(arrays[x].shape[0] - cols) == 0)
        i, j = loops[0].var, loops[1].var
        rest = u.expr / A
        if full and u.target != out and u.index == (i,) and rest == sp.Indexed("v", j):
            return "gather"
        if (full and u.target == out and u.index == (j,) and isinstance(rest, sp.Indexed)
                and tuple(rest.indices) == (i,)):
            return "scatter"
        return None
    if len(loops) == 1 and u.target != out and u.index == (loops[0].var,) and A is None:
        return "row"
    return None


def _with_unit_gather(st: ir.Statement, u: ir.Update, gathered: str,
                      arrays: Arrays) -> ir.Statement:
    """The row statement with its read of the gather's T at its own row replaced by 1."""
    unit = {ir.read(arrays[gathered], (st.loops[0].var,)): sp.Integer(1)}
    return ir.Statement(st.loops, (ir.Update(u.target, u.index, ir.xreplace(u.expr, unit)),))


def _linear_row(st: ir.Statement, u: ir.Update, chain: set[str], arrays: Arrays) -> bool:
    """Whether a row statement reads the chain's arrays only at its own row and is linear in
    them (it is, as a tangent; checked so that w * T is what the scatter sees)."""
    i = st.loops[0].var
    reads = [r for r in ir.reads_of(u.expr, arrays) if ir.read_name(r) in chain]
    if not reads or any(tuple(ir.read_index(r)) != (i,) for r in reads):
        return False
    if "v" in {ir.read_name(r) for r in ir.reads_of(u.expr, arrays)}:
        return False
    symbols = [sp.Dummy() for _ in reads]
    expr = u.expr.xreplace(dict(zip(reads, symbols)))
    return all(sp.diff(expr, a, b) == 0 for a in symbols for b in symbols)
