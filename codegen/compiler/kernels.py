"""The kernel table: which derivative program each public kernel is (docs/interface.md section 3).

Takes a `Problem`, returns plain `KernelSpec`s (name, doc, optimised program, argument roles);
nothing here knows about C.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sympy as sp

from . import ir
from .autodiff import adjoint, tangent
from .contraction import RowKernel
from .gram import WEIGHTS_OUTPUT, WEIGHTS_TANGENT, gram_weights, gram_weights_jvp
from .lowering import lower_objective
from .passes import depending_on, eliminate_dead_code, one_update_each, schedule
from .problem import Problem


@dataclass(frozen=True)
class KernelSpec:
    name: str
    doc: str
    program: ir.Program
    inputs: tuple[str, ...]  # names of the vector inputs after x and theta ("v", "q" or "t"; "cache")
    output: str  # the array the kernel returns ("cache": the cache arrays, one buffer)
    cache: tuple[str, ...] = ()  # the cache arrays (role CACHE), in buffer order


#: The buffer that carries the prepared HVP's cache arrays between its two kernels.
CACHE_BUFFER = "cache"


def kernel_specs(problem: Problem, third_rows: Sequence[RowKernel] = ()) -> list[KernelSpec]:
    """All kernels of a problem, in the fixed order of the interface; third_rows: the row
    kernels of the data-local third derivative (`contraction.third_row_kernels`), last."""
    x, th = problem.x_spec.name, problem.theta_spec.name
    g = lower_objective(problem.g, problem.arrays, "lower")
    f = lower_objective(problem.f + problem.r, problem.arrays, "upper")
    grad_g = adjoint(g, [x, th])
    grad_f = adjoint(f, [x, th])
    hvp = tangent(grad_g, {x: "v"}, [f"{x}_bar_dot"])
    cross = tangent(grad_g, {th: "t"}, [f"{x}_bar_dot"])
    cross_t = tangent(grad_g, {x: "q"}, [f"{th}_bar_dot"])
    specs: list[tuple[str, str, ir.Program, tuple[str, ...], str]] = [
        ("lower_value", "g(x, theta), the lower-level objective", g, (), "value"),
        ("lower_grad", "grad_x g(x, theta)", grad_g, (), f"{x}_bar"),
        ("lower_hvp", "(d2g/dx2) v, forward over reverse", hvp, ("v",), f"{x}_bar_dot"),
        ("cross_vjp", "B^T q = d/dtheta <grad_x g, q>", cross_t, ("q",), f"{th}_bar_dot"),
        ("cross_jvp", "B t = d/ds grad_x g(x, theta + s t)", cross, ("t",), f"{x}_bar_dot"),
        ("upper_value", "f(x, theta) + r(theta), the upper-level objective", f, (), "value"),
        ("upper_grad", "grad_x f(x, theta)", grad_f, (), f"{x}_bar"),
        ("upper_theta_grad", "grad_theta (f + r): the direct theta terms of the hypergradient",
         grad_f, (), f"{th}_bar"),
        # H_f v: the DWR correction's dual right-hand side (docs/bounds.md 15.2)
        ("upper_hvp", "(d2f/dx2) v, forward over reverse", tangent(grad_f, {x: "v"}, [f"{x}_bar_dot"]),
         ("v",), f"{x}_bar_dot"),
        # (D A(x)[w]) v = grad_x (v^T A(x) w), the third derivative of g contracted with v and w
        # (symmetric in v, w): the non-quadratic DWR correction's dual right-hand side
        # (docs/bounds.md 15.3). A second tangent of the HVP, along x <- w; w is named hg_w and
        # the second tangents T_dw_dot (names a user symbol may not take: a size may be "w").
        ("lower_tvp", "(d3g/dx3)[v, w, .] = grad_x (v^T (d2g/dx2) w), forward over the HVP",
         tangent(hvp, {x: "hg_w"}, [f"{x}_bar_dot_dw_dot"], suffix="_dw_dot"), ("v", "hg_w"),
         f"{x}_bar_dot_dw_dot"),
        # D_t(x) w = grad_x (w^T B(x) t) = d/ds B(x + s w) t, the cross derivative once more in x
        # (d^3 g/dx dx dtheta contracted with w and t; D_t(x) is symmetric): the DWR correction's
        # D_u q when B is not affine in x (docs/bounds.md 15.3). A second tangent of the cross
        # JVP along x <- hg_w, named as lower_tvp's.
        ("cross_hvp", "(d3g/dx2 dtheta)[t, w, .] = grad_x (w^T B(x) t), forward over the cross JVP",
         tangent(cross, {x: "hg_w"}, [f"{x}_bar_dot_dw_dot"], suffix="_dw_dot"), ("t", "hg_w"),
         f"{x}_bar_dot_dw_dot"),
        # G_w = d/ds B(x + s w)^T q, the same third derivative contracted with q and w in x
        # (a theta vector): the block correction's G_w when B is not affine in x
        # (docs/bounds.md 15.8). A second tangent of the cross VJP along x <- hg_w.
        ("cross_tvp", "(d3g/dx2 dtheta)[q, w, .] = d/ds B(x + s w)^T q, forward over the cross VJP",
         tangent(cross_t, {x: "hg_w"}, [f"{th}_bar_dot_dw_dot"], suffix="_dw_dot"), ("q", "hg_w"),
         f"{th}_bar_dot_dw_dot"),
    ]
    split = split_hessian(problem)
    specs += split
    # A^T diag(w) A + R: the Hessian as one BLAS product for a learning run's held factor
    gram = gram_weights(problem, any(name == "lower_hvp_varying" for name, *_ in split))
    if gram is not None:
        specs.append((*gram, (), WEIGHTS_OUTPUT))
        specs.append((*gram_weights_jvp(gram[2], x), ("v",), WEIGHTS_TANGENT))
    specs += [row[:5] for row in third_rows]
    out: list[KernelSpec] = []
    for name, doc, program, inputs, output in specs:
        program = _optimised(program, output)
        out.append(KernelSpec(name, doc, program, inputs, output))
        if name == "lower_hvp":
            prepared = prepared_hvp(program, output)
            out += prepared or paired_hvp(hvp, program, x)
    return out


#: The output of `lower_hvp_pair`: its two products stacked as rows (a generator's own name).
PAIR_OUTPUT = "hg_products"


def paired_hvp(hvp: ir.Program, optimised: ir.Program, x: str) -> list[KernelSpec]:
    """[lower_hvp_pair], (d2g/dx2) v and (d2g/dx2) hg_w in one pass over the data, or [] where
    the HVP makes no pass over a data matrix (a stencil: two calls cost what one would).

    Two CG solves with the Hessian at one x (the adjoint's and the correction's forward solve,
    docs/solvers.md 9) can run in lock step on it: a dense row pass reads a_i once for
    a_i . x, a_i . v and a_i . hg_w, then scatters a_i into both products. Built as a second
    tangent of the HVP program along x <- hg_w: its tangent of x_bar is the product with hg_w,
    in the same statements (so in the same loops) as the product with v; the third-derivative
    tangents of the v-tangents are dead code. The two products become the rows of PAIR_OUTPUT,
    shape (2, *x's shape). hvp: the HVP program before dead-code elimination (its tangent
    needs the primal statements), optimised: after it (what the HVP reads)."""
    data = _data_matrices(optimised)
    if not any(len(st.loops) > 1 and _reads(ir.Program(optimised.arrays, [st])) & data
               for st in optimised.statements):
        return []
    first, second = f"{x}_bar_dot", f"{x}_bar_wdot"
    both = tangent(hvp, {x: "hg_w"}, [first, second], suffix="_wdot")
    both = eliminate_dead_code(both.with_statements(both.statements, [first, second]))
    shape = both.arrays[first].shape
    arrays = {n: a for n, a in both.arrays.items() if n not in (first, second)}
    arrays[PAIR_OUTPUT] = ir.Array(PAIR_OUTPUT, (sp.Integer(2), *shape), ir.OUTPUT)
    rows = {first: 0, second: 1}
    statements = [ir.Statement(st.loops, tuple(
        ir.Update(PAIR_OUTPUT, (sp.Integer(rows[u.target]), *u.index), u.expr, u.op)
        if u.target in rows else u for u in st.updates)) for st in both.statements]
    program = ir.Program(arrays, statements, (PAIR_OUTPUT,), dict(both.meta))
    return [KernelSpec("lower_hvp_pair", "(d2g/dx2) v and (d2g/dx2) hg_w, the rows of one "
                       "output, in one pass over the data", _optimised(program, PAIR_OUTPUT),
                       ("v", "hg_w"), PAIR_OUTPUT)]


def _data_matrices(program: ir.Program) -> set[str]:
    """The data arrays of two or more dimensions (dense; CSR data has its prepared HVP)."""
    return {n for n, a in program.arrays.items() if a.role == ir.DATA and len(a.shape) > 1}


def _optimised(program: ir.Program, output: str) -> ir.Program:
    return schedule(eliminate_dead_code(program.with_statements(program.statements, [output])))


def _reads(program: ir.Program) -> set[str]:
    return {ir.read_name(r) for st in program.statements for u in st.updates
            for r in ir.reads_of(u.expr, program.arrays)}


def split_hessian(problem: Problem) -> list[tuple[str, str, ir.Program, tuple[str, ...], str]]:
    """The HVPs of g's terms without theta (`lower_hvp_fixed`) and with it
    (`lower_hvp_varying`), when the first reads neither x nor theta; only the second when the
    first reads x but the second reads no data matrix; else [].

    g = g_fixed(x) + g_varying(x, theta) split at its top-level sum. When g_fixed's Hessian is a
    matrix the data fix (ridge: A^T A of ||A x - b||^2 / 2), the direct solvers form it once per
    bind and add the Hessian of the rest at each (x, theta) (e^theta I: n^2 numbers instead of
    n HVPs through A, codegen/hypergrad/dense.py). When it changes with x (a logistic loss), a
    learning run's held factor still swaps the theta terms' Hessian for the new theta's, if
    that costs no pass over the data (codegen/hypergrad/held_factor.py). A g whose every term
    reads theta, or none, has no such split (the whole Hessian is then either recomputed, or
    fixed by the data already: meta "data_only")."""
    x, th = problem.x_spec.name, problem.theta_spec.name

    def reads_theta(term: sp.Expr) -> bool:
        return any(str(a.base.label) == th for a in term.atoms(sp.Indexed))

    terms = sp.Add.make_args(problem.g)
    fixed = [t for t in terms if not reads_theta(t)]
    varying = [t for t in terms if reads_theta(t)]
    if not fixed or not varying:
        return []
    hvps = []
    for part, label in ((sp.Add(*fixed), "fixed"), (sp.Add(*varying), "varying")):
        grad = adjoint(lower_objective(part, problem.arrays, f"lower ({label} terms)"), [x, th])
        hvps.append(tangent(grad, {x: "v"}, [f"{x}_bar_dot"]))
    theta_terms = ("lower_hvp_varying", "(d2 g_varying/dx2) v, g_varying the terms of g with "
                   "theta", hvps[1], ("v",), f"{x}_bar_dot")
    if _reads(_optimised(hvps[0], f"{x}_bar_dot")) & {x, th}:
        # g_fixed is not quadratic in x: its Hessian changes with x, nothing to keep
        cheap = _optimised(hvps[1], f"{x}_bar_dot")
        return [] if _reads(cheap) & _data_matrices(cheap) else [theta_terms]
    return [
        ("lower_hvp_fixed", "(d2 g_fixed/dx2) v, g_fixed the terms of g without theta (read "
         "neither x nor theta)", hvps[0], ("v",), f"{x}_bar_dot"),
        theta_terms,
    ]


def prepared_hvp(program: ir.Program, output: str, direction: str = "v") -> list[KernelSpec]:
    """The HVP split at its x-only temporaries: [prepare, apply], or [] if it has none.

    Every solver that needs HVPs (CG for the adjoint or a Newton step) calls them many times at
    one x. Arrays the HVP computes from x alone (z = A x of a logistic loss, a pass over A)
    are then the same every time: `lower_hvp_prepare` writes them into a cache buffer once, and
    `lower_hvp_apply` reads them from it for each v, skipping their loops. A statement is
    v-dependent if it reads `direction` or a v-dependent array, or adds into one (the output
    collects both kinds); the cache holds the non-scalar temporaries the v-dependent part reads
    and no v-dependent statement writes. Loop-free x-only scalars are recomputed by apply. Only
    worth it when the cached work is heavy (`_heavy`): a dense row pass reads each row once for
    a_i . x and a_i . v together, so caching a_i . x saves no memory traffic and the prepare
    pass costs one (logistic 20000 x 2000: 6% slower with it).
    Statements are split into one update each first: the forward-over-reverse transform puts
    z = A x and its tangent A v in one statement.
    """
    arrays = program.arrays
    stmts = one_update_each(program)
    varying = depending_on(stmts, arrays, direction)
    dependent = [st for st in stmts if {u.target for u in st.updates} & varying]
    read_by_dependent = {ir.read_name(r) for st in dependent for u in st.updates
                         for r in ir.reads_of(u.expr, arrays)}
    cache = [name for name, a in arrays.items()
             if name in read_by_dependent and name not in varying
             and a.role == ir.TEMP and not a.is_scalar]
    # A statement that fills a cache array must fill nothing else (apply drops it whole).
    producers = [st for st in stmts if {u.target for u in st.updates} & set(cache)]
    if not cache or any(not {u.target for u in st.updates} <= set(cache) for st in producers):
        return []
    if not any(_heavy(st, arrays) for st in producers):
        return []
    cached = dict(arrays)
    for name in cache:
        cached[name] = ir.Array(name, arrays[name].shape, ir.CACHE)
    invariant = [st for st in stmts if st not in dependent]
    prepare = eliminate_dead_code(ir.Program(cached, invariant, tuple(cache), dict(program.meta)))
    apply = eliminate_dead_code(ir.Program(
        cached, [st for st in stmts if st not in producers], (output,), dict(program.meta)))
    return [
        KernelSpec("lower_hvp_prepare", "the x-only part of (d2g/dx2) v, once per x",
                   schedule(prepare), (), CACHE_BUFFER, tuple(cache)),
        KernelSpec("lower_hvp_apply", "(d2g/dx2) v from lower_hvp_prepare's cache",
                   schedule(apply), (CACHE_BUFFER, direction), output, tuple(cache)),
    ]


def _heavy(stmt: ir.Statement, arrays: dict[str, ir.Array]) -> bool:
    """Work worth caching across HVPs: a loop nest deeper than a matrix-vector pass (a matrix
    product, as in a multi-class loss: hypercleaning's HVP 6.0 -> 4.3 ms), or gathers through a
    CSR matrix (CSR logistic's HVP 6 -> 3 ms)."""
    reads = {ir.read_name(r) for u in stmt.updates for r in ir.reads_of(u.expr, arrays)}
    return len(stmt.loops) > 2 or any(arrays[name].sparse for name in reads)
