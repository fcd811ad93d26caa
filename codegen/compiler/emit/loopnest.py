"""Loop nests of one kernel: IR statements -> a tree of C loops and lines (`Node`s).

Each statement becomes its loops with the body at the innermost level; per statement the reads
become placeholders, loop-invariant calls are hoisted, `sympy.cse` shares subexpressions, and
reductions run in local accumulators (with `omp simd` where iterations are independent).
Statements fused over a shared outer loop (passes.fuse_outer_loops) share that loop, and a
declared-sparse matrix turns the loop over its columns into a loop over its stored entries.
A shared outer loop whose iterations are independent (up to sum reductions) is unrolled and
jammed by JAM rows (`jam`): one sweep over j serves JAM rows of a data matrix, so x, v and
the accumulated output are read from cache once per JAM rows and the JAM dot products run as
independent chains instead of one latency-bound chain.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import sympy as sp

from ...errors import ProblemError
from .. import ir
from ..passes import fuse_outer_loops, same_iteration
from .printer import KernelPrinter


@dataclass
class Node:
    """A loop (with children) or a line of C, as the template renders it."""

    text: str = ""
    loop: tuple[str, str, str, str] | None = None  # (var, start, stop, pragma)
    children: list[Node] = field(default_factory=list)
    step: int = 1
    simd: tuple[str, ...] | None = None  # an `omp simd` loop: its reduction accumulators (None: no simd)


# Loop-nest trip count above which the outer loop runs on all cores (a fork costs microseconds).
PARALLEL_MIN_WORK = 200000

# Rows per sweep of an unrolled-and-jammed outer loop. Measured on the 2-core AMD EPYC (AVX2, 16
# vector registers), logistic Hessian-vector product at 20000 x 2000, two threads: 17.3 ms with
# 1 row, 14.2 with 2, 12.3 with 4, 10.4 with 8, 9.7 with 16; 8 keeps the code small and the
# 2 x 8 dot-product accumulators in registers.
JAM = 8


class LoopNestBuilder:
    """Builds the body tree of one kernel; names of locals are unique across the kernel."""

    def __init__(self, program: ir.Program, printer: KernelPrinter, kernel_name: str):
        self.program, self.arrays = program, program.arrays
        self.printer, self.kernel_name = printer, kernel_name
        # Kernel-wide name counters: locals of different statements share the function scope.
        self.local_names = sp.numbered_symbols("c")
        self.n_acc = 0

    def code(self, expr: sp.Expr) -> str:
        return self.printer.doprint(expr)

    def index_code(self, expr: sp.Expr) -> str:
        return self.printer.index_code(sp.sympify(expr))

    def body(self) -> list[Node]:
        nodes: list[Node] = []
        for group in fuse_outer_loops(self.program):
            parallel = self.parallel_pragma(group)
            if len(group) == 1 and not parallel:
                nodes.extend(self.statement_nodes(group[0], fixed=0))
            elif (parallel and iterations_independent(group, self.arrays)
                  and not any(self.csr_read(stmt) for stmt in group)):
                nodes.extend(self.jammed_loops(group, parallel))
            else:
                outer = group[0].loops[0]
                loop = Node(loop=self.loop_header(outer, pragma=parallel))
                for stmt in group:
                    loop.children.extend(self.statement_nodes(stmt, fixed=1))
                nodes.append(loop)
        return nodes

    def jammed_loops(self, group: list[ir.Statement], pragma: str) -> list[Node]:
        """The group's outer loop over i unrolled by JAM and jammed, then a remainder loop.

        The main loop steps i by JAM over the largest multiple of JAM rows; its body holds JAM
        copies of every statement at rows i, i + 1, ..., each copy with its own locals and
        accumulators, and inner loops with equal headers merged (`jam`). The remainder loop runs
        the plain body for the last (trip count mod JAM) rows, serially.
        """
        outer = group[0].loops[0]
        var, start, stop = str(outer.var), self.index_code(outer.lo), self.index_code(outer.hi + 1)
        trips = stop if start == "0" else f"{stop} - {as_operand(start)}"
        split = f"{stop} - {as_operand(trips)} % {JAM}"  # the end of the last full group of JAM rows
        main = Node(loop=(var, start, split, pragma), step=JAM)
        for stmt in group:
            copies = [self.statement_nodes(_shift_outer(stmt, u), fixed=1) for u in range(JAM)]
            main.children.extend(jam(copies))
        rest = Node(loop=(var, split, stop, ""))
        for stmt in group:
            rest.children.extend(self.statement_nodes(stmt, fixed=1))
        return [main, rest]

    def parallel_pragma(self, group: list[ir.Statement]) -> str:
        """`omp parallel for` on a loop nest's outer loop when it pays and is race-free.

        Only nests with inner loops (a pass over a data matrix, not an O(n) sweep), and only
        when every update either writes the current outer iteration's own slice or sums into
        a target no outer index reaches (an OpenMP reduction, array sections for arrays). An
        `if` clause keeps small problems serial: a fork costs microseconds.
        """
        heaviest = max(group, key=lambda s: len(s.loops))
        if len(heaviest.loops) < 2:
            return ""
        kinds = _update_kinds(group)
        if kinds is None:
            return ""  # a max into shared data, or iterations scattering into each other
        reductions = []
        for target in kinds[1]:
            arr = self.arrays[target]
            reductions.append(arr.name if arr.is_scalar else
                              f"{arr.name}[:{self.index_code(ir.extent(arr))}]")
        # Trip count bound: indices in inner ranges (triangular sums) at their largest values.
        extents = sp.Mul(*[lp.hi - lp.lo + 1 for lp in heaviest.loops])
        for _ in heaviest.loops:
            extents = extents.subs({lp.var: lp.hi for lp in heaviest.loops})
        cost = self.index_code(sp.expand(extents))
        clause = f" reduction(+: {', '.join(reductions)})" if reductions else ""
        return f"#pragma omp parallel for schedule(static) if ({cost} > {PARALLEL_MIN_WORK}){clause}"

    def loop_header(self, lp: ir.Loop, pragma: str) -> tuple[str, str, str, str]:
        return (str(lp.var), self.index_code(lp.lo), self.index_code(lp.hi + 1), pragma)

    def statement_nodes(self, stmt: ir.Statement, fixed: int) -> list[Node]:
        """Nodes for one statement; its first `fixed` loops are already open around it."""
        loops = stmt.loops
        csr = self.csr_read(stmt)
        holders: dict[sp.Expr, sp.Symbol] = {}
        placeholders: dict[str, str] = {}
        for u in stmt.updates:
            for r in ir.reads_of(u.expr, self.arrays):
                if r not in holders:
                    h = sp.Symbol(f"hg_read{len(holders)}", real=True)
                    holders[r] = h
                    placeholders[h.name] = f"{r.base.label}_data[hg_p]" if r == csr else self.code(r)
        exprs = [ir.xreplace(u.expr, holders) for u in stmt.updates]
        depth_of_read = {h: self.depth_needed(r.free_symbols, loops) for r, h in holders.items()}
        hoisted, exprs = self.hoist_invariants(exprs, loops, fixed, depth_of_read)
        replacements, reduced = sp.cse(exprs, symbols=self.local_names, order="none")
        replacements = hoisted + replacements
        printer = KernelPrinter(self.arrays, placeholders)
        locals_at: dict[int, list[str]] = {}
        local_depth: dict[sp.Symbol, int] = {}
        for sym, expr in replacements:
            deps = [self.depth_needed(expr.free_symbols, loops)]
            deps += [depth_of_read[s] for s in expr.free_symbols if s in depth_of_read]
            deps += [local_depth[s] for s in expr.free_symbols if s in local_depth]
            d = max([fixed] + deps)
            local_depth[sym] = d
            locals_at.setdefault(d, []).append(f"const double {sym} = {printer.doprint(expr)};")
        innermost = len(loops)
        acc_lines_open: dict[int, list[str]] = {}
        acc_lines_close: dict[int, list[str]] = {}
        update_lines: list[str] = []
        accumulators: list[str] = []
        for u, e in zip(stmt.updates, reduced):
            value = printer.doprint(e)
            target = self.target_code(u)
            d = max([fixed] + [pos + 1 for pos, lp in enumerate(loops)
                               if any(lp.var in sp.sympify(i).free_symbols for i in u.index)])
            if d >= innermost:
                update_lines.append(self.update_line(target, value, u.op))
            else:
                acc = f"acc{self.n_acc}"
                self.n_acc += 1
                init = "-INFINITY" if u.op == "max" else "0.0"
                acc_lines_open.setdefault(d, []).append(f"double {acc} = {init};")
                update_lines.append(self.update_line(acc, value, u.op))
                acc_lines_close.setdefault(d, []).append(self.update_line(target, acc, u.op))
                if u.op == "+":
                    accumulators.append(acc)
        simd = self.simd_pragma(stmt, accumulators, update_lines)

        def build(depth: int) -> list[Node]:
            out = [Node(line) for line in locals_at.get(depth, [])]
            out += [Node(line) for line in acc_lines_open.get(depth, [])]
            if depth == innermost:
                out += [Node(line) for line in update_lines]
            elif csr is not None and depth == innermost - 1:
                name, row = csr.base.label, self.index_code(csr.indices[0])
                row_next = self.index_code(csr.indices[0] + 1)
                pragma = simd if simd.startswith("#pragma omp simd reduction") else ""
                loop = Node(loop=("hg_p", f"{name}_indptr[{row}]", f"{name}_indptr[{row_next}]", pragma))
                loop.children = [Node(f"const int64_t {loops[depth].var} = {name}_indices[hg_p];")]
                loop.children += build(depth + 1)
                out.append(loop)
            else:
                pragma = simd if depth == innermost - 1 else ""
                loop = Node(loop=self.loop_header(loops[depth], pragma),
                            simd=tuple(accumulators) if pragma else None)
                loop.children = build(depth + 1)
                out.append(loop)
            out += [Node(line) for line in acc_lines_close.get(depth, [])]
            return out

        return build(fixed)

    def csr_read(self, stmt: ir.Statement) -> sp.Indexed | None:
        """The read A[row, j] of a CSR array whose non-zeros the innermost loop (over j) visits.

        Legal only when j is the column index, the loop covers all columns and every update
        vanishes where A[row, j] = 0; anything else is refused with the reason.
        """
        reads = sorted({r for u in stmt.updates for r in ir.reads_of(u.expr, self.arrays)
                        if self.arrays[ir.read_name(r)].sparse}, key=sp.default_sort_key)
        if not reads:
            return None
        name = ir.read_name(reads[0])
        where = f"{self.kernel_name} (statement over {', '.join(str(lp.var) for lp in stmt.loops)})"
        if len(reads) > 1:
            raise ProblemError(f"{name} is sparse (CSR) but one loop nest reads {reads}; "
                               f"a CSR matrix can be read at one place per sum ({where})")
        r, inner = reads[0], stmt.loops[-1]
        row, col = r.indices
        if col != inner.var or inner.var in sp.sympify(row).free_symbols:
            raise ProblemError(f"{name} is sparse (CSR) but {r} is not summed over its column index "
                               f"in the innermost sum ({where}); CSR supports rows outer, columns inner")
        if (inner.lo, sp.expand(inner.hi - (self.arrays[name].shape[1] - 1))) != (0, 0):
            raise ProblemError(f"{name} is sparse (CSR) but the sum over {inner.var} does not "
                               f"cover all its columns ({where})")
        for u in stmt.updates:
            if sp.expand(u.expr.xreplace({r: 0})) != 0:
                raise ProblemError(f"{name} is sparse (CSR) but {u.expr} does not vanish where "
                                   f"{r} = 0, so its zeros cannot be skipped ({where})")
        return r

    def hoist_invariants(self, exprs: list[sp.Expr], loops: Sequence[ir.Loop], fixed: int,
                         depth_of_read: dict[sp.Symbol, int]
                         ) -> tuple[list[tuple[sp.Symbol, sp.Expr]], list[sp.Expr]]:
        """Pull function calls that no loop of this statement changes (exp(theta)...) out of it."""
        if len(loops) <= fixed:
            return [], exprs
        loop_vars = {lp.var for lp in loops}

        def invariant(e: sp.Expr) -> bool:
            return all(s not in loop_vars and depth_of_read.get(s, 0) <= fixed
                       for s in e.free_symbols)

        found: dict[sp.Expr, None] = {}

        def visit(e: sp.Expr) -> None:
            if not e.args:
                return
            if (isinstance(e, sp.Function) or isinstance(e, sp.Pow) and not e.exp.is_Integer) \
                    and invariant(e):  # the cheap test first: free_symbols walks all of `e`
                found.setdefault(e, None)
                return
            for a in e.args:
                visit(a)

        for e in exprs:
            visit(e)
        if not found:
            return [], exprs
        hoisted = [(next(self.local_names), e) for e in found]
        sub = {e: sym for sym, e in hoisted}
        return hoisted, [e.xreplace(sub) for e in exprs]

    def depth_needed(self, symbols: Iterable[sp.Symbol], loops: Sequence[ir.Loop]) -> int:
        positions = [pos + 1 for pos, lp in enumerate(loops) if lp.var in symbols]
        return max(positions, default=0)

    def target_code(self, u: ir.Update) -> str:
        arr = self.arrays[u.target]
        if arr.is_scalar:
            return arr.name
        return f"{arr.name}[{self.index_code(self.printer.flat_index(arr.name, u.index))}]"

    @staticmethod
    def update_line(target: str, value: str, op: str) -> str:
        if op == "max":
            return f"{target} = fmax({target}, {value});"
        return f"{target} += {value};"

    def simd_pragma(self, stmt: ir.Statement, accumulators: list[str],
                    update_lines: list[str]) -> str:
        """`omp simd` on the innermost loop when its iterations are provably independent."""
        if not stmt.loops or any(u.op == "max" for u in stmt.updates):
            return ""
        var = stmt.loops[-1].var
        written: dict[str, set[tuple[sp.Expr, ...]]] = {}
        for u in stmt.updates:
            if any(var in sp.sympify(i).free_symbols for i in u.index):
                written.setdefault(u.target, set()).add(tuple(u.index))
        read_names = {ir.read_name(r) for u in stmt.updates for r in ir.reads_of(u.expr, self.arrays)}
        if any(len(idx) > 1 for idx in written.values()) or set(written) & read_names:
            return ""
        direct = [u for u in stmt.updates if u.target not in written]
        if len(direct) > len(accumulators):
            return ""  # a scalar target updated directly inside the loop: keep it sequential
        if accumulators:
            return f"#pragma omp simd reduction(+:{', '.join(accumulators)})"
        return "#pragma omp simd"


def _update_kinds(group: list[ir.Statement]) -> tuple[set[str], list[str]] | None:
    """(row-local targets, sum-reduction targets in first-update order) of a group sharing an
    outer loop, or None if an update is neither: a row-local target is written only at the
    current outer iteration's slice; a reduction target is summed into at indices free of the
    outer variable (every row adds to it)."""
    outer = group[0].loops[0]
    row_local, reduced = set(), []
    for stmt in group:
        for u in stmt.updates:
            if u.index and same_iteration(u.index, outer):
                row_local.add(u.target)
            elif u.op == "+" and not any(outer.var in sp.sympify(i).free_symbols for i in u.index):
                if u.target not in reduced:
                    reduced.append(u.target)
            else:
                return None
    return row_local, reduced


def iterations_independent(group: list[ir.Statement], arrays: dict[str, ir.Array]) -> bool:
    """True if no iteration of the group's outer loop reads what another one writes.

    Every array the group writes must be either written and read only at the current outer
    iteration (a per-row temporary), or a sum-reduction target that nothing in the group reads
    (rows add to it in any order). Then the rows can run in any interleaving: in parallel, or
    JAM at a time.
    """
    kinds = _update_kinds(group)
    if kinds is None or kinds[0] & set(kinds[1]):
        return False
    outer, (row_local, reduced) = group[0].loops[0], kinds
    for stmt in group:
        for u in stmt.updates:
            for r in ir.reads_of(u.expr, arrays):
                name = ir.read_name(r)
                if name in reduced or (name in row_local
                                       and not same_iteration(ir.read_index(r), outer)):
                    return False
    return True


def as_operand(code: str) -> str:
    """C code as an operand of % or -: a name or number as is, anything else parenthesised."""
    return code if code.isidentifier() or code.isdigit() else f"({code})"


def _shift_outer(stmt: ir.Statement, offset: int) -> ir.Statement:
    """The statement at outer row var + offset (inner loop bounds and every index shifted)."""
    if offset == 0:
        return stmt
    var = stmt.loops[0].var
    sub = {var: var + offset}
    loops = stmt.loops[:1] + tuple(ir.Loop(lp.var, sp.sympify(lp.lo).xreplace(sub),
                                           sp.sympify(lp.hi).xreplace(sub))
                                   for lp in stmt.loops[1:])
    updates = tuple(ir.Update(u.target, tuple(sp.sympify(i).xreplace(sub) for i in u.index),
                              ir.xreplace(u.expr, sub), u.op) for u in stmt.updates)
    return ir.Statement(loops, updates)


def jam(copies: list[list[Node]]) -> list[Node]:
    """Interleave the node lists of copies of one statement (at different rows) into one list.

    The copies have the same shape. Position by position: lines of every copy in copy order;
    loops with the same header become one loop whose body jams the copies' bodies and whose
    `omp simd` reduces all their accumulators; loops whose headers differ (CSR rows, triangular
    bounds) stay separate, one after another. Legal because the copies are independent rows.
    """
    if len({len(nodes) for nodes in copies}) != 1:
        return [node for nodes in copies for node in nodes]  # shapes differ: one after another
    out = []
    for nodes in zip(*copies):
        first = nodes[0]
        if first.loop and all(n.loop and n.loop[:3] == first.loop[:3] for n in nodes):
            simd = None
            if all(n.simd is not None for n in nodes):
                simd = tuple(acc for n in nodes for acc in n.simd)
            pragma = ("" if simd is None else "#pragma omp simd" if not simd else
                      f"#pragma omp simd reduction(+:{', '.join(simd)})")
            merged = Node(loop=first.loop[:3] + (pragma,), step=first.step, simd=simd)
            merged.children = jam([n.children for n in nodes])
            out.append(merged)
        else:
            out.extend(nodes)
    return out
