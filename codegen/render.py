"""Rendering: kernel programs -> one C translation unit and its header, through Jinja templates.

Python decides *what* each kernel computes (a tree of loops and lines per kernel); the templates
in templates/ own the layout of the file, the helpers and the function frames. Output is
deterministic: names come from the IR, iteration orders are fixed, nothing depends on ids or time.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import jinja2
import sympy as sp

from . import __version__, ir
from .errors import ProblemError
from .kernels import KernelSpec
from .optimize import fuse_outer_loops
from .printer import KernelPrinter

ABI_VERSION = 1


def templates_dir() -> Path:
    """templates/ of a source checkout, or codegen/templates of an installed package."""
    checkout = Path(__file__).resolve().parent.parent / "templates"
    if (checkout / "module.c.j2").exists():
        return checkout
    return Path(str(resources.files("codegen") / "templates"))


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True, autoescape=False)


@dataclass
class Node:
    """A loop (with children) or a line of C, as the template renders it."""

    text: str = ""
    loop: tuple | None = None  # (var, start, stop, pragma)
    children: list = field(default_factory=list)


@dataclass
class Param:
    ctype: str
    name: str
    role: str  # "size", "theta", "data", "scalar", "input", "output", "work"
    length: str = ""  # C expression of the element count, for arrays


def _size_symbols(program: ir.Program, sizes) -> list:
    used = set()
    for arr in program.arrays.values():
        for s in arr.shape:
            used |= sp.sympify(s).free_symbols
    for stmt in program.statements:
        for lp in stmt.loops:
            used |= lp.lo.free_symbols | lp.hi.free_symbols
        for u in stmt.updates:
            used |= u.expr.free_symbols
    return [s for s in sizes if s in used]


def _extent(arr: ir.Array) -> sp.Expr:
    return sp.Mul(*arr.shape) if arr.shape else sp.Integer(1)


class KernelRenderer:
    """Turns one KernelSpec into the parameters, work layout and body tree of its C function."""

    def __init__(self, spec: KernelSpec, problem):
        self.spec, self.problem = spec, problem
        self.program = spec.program
        self.arrays = self.program.arrays
        self.printer = KernelPrinter(self.arrays)
        # Kernel-wide name counters: locals of different statements share the function scope.
        self.local_names = sp.numbered_symbols("c")
        self.n_acc = 0

    def code(self, expr) -> str:
        return self.printer.doprint(expr)

    def index_code(self, expr) -> str:
        return self.printer.index_code(sp.sympify(expr))

    # -- the function frame ----------------------------------------------------------------
    def params(self) -> list:
        prob, used = self.problem, set(self.arrays)
        params = [Param("int64_t", s.name, "size") for s in _size_symbols(self.program, prob.sizes)]
        th = prob.theta_spec
        params.append(Param("const double *restrict", th.name, "theta",
                            self.index_code(_extent(self.arrays[th.name]))))
        for spec in prob.data_specs:
            if spec.name in used:
                if spec.sparse:
                    params += [Param("const double *restrict", f"{spec.name}_data", "csr_data"),
                               Param("const int64_t *restrict", f"{spec.name}_indices", "csr_indices"),
                               Param("const int64_t *restrict", f"{spec.name}_indptr", "csr_indptr")]
                elif spec.shape:
                    params.append(Param("const double *restrict", spec.name, "data",
                                        self.index_code(_extent(self.arrays[spec.name]))))
                else:
                    params.append(Param("double", spec.name, "scalar"))
        xs = prob.x_spec.name
        params.append(Param("const double *restrict", xs, "input",
                            self.index_code(_extent(self.arrays[xs]))))
        for name in self.spec.inputs:
            params.append(Param("const double *restrict", name, "input",
                                self.index_code(_extent(self.arrays[name]))))
        out = self.arrays[self.spec.output]
        params.append(Param("double *restrict", self.out_param(), "output",
                            self.index_code(_extent(out))))
        if self.work_arrays():
            params.append(Param("double *restrict", "work", "work"))
        return params

    def out_param(self) -> str:
        return "value_out" if self.arrays[self.spec.output].is_scalar else self.spec.output

    def work_arrays(self) -> list:
        return [a for a in self.arrays.values() if a.role == ir.TEMP and not a.is_scalar]

    def scalar_locals(self) -> list:
        return [a for a in self.arrays.values()
                if a.role in (ir.TEMP, ir.OUTPUT) and a.is_scalar]

    def work_size(self) -> sp.Expr:
        return sp.Add(*[_extent(a) for a in self.work_arrays()])

    def setup_lines(self) -> list:
        """Carve temporaries out of `work`, and zero every accumulator."""
        lines, offset = [], sp.Integer(0)
        out = self.arrays[self.spec.output]
        read = {ir.read_name(r) for st in self.program.statements for u in st.updates
                for r in ir.reads_of(u.expr, self.arrays)}
        for p in self.params():
            if p.role in ("theta", "input") and p.name not in read:
                lines.append(f"(void){p.name};  /* part of the uniform signature, unused here */")
        for arr in self.work_arrays():
            lines.append(f"double *restrict {arr.name} = work + {self.index_code(offset)};")
            offset += _extent(arr)
        for arr in self.scalar_locals():
            lines.append(f"double {arr.name} = {self._initial(arr.name)};")
        for arr in self.work_arrays() + ([] if out.is_scalar else [out]):
            extent = self.index_code(_extent(arr))
            init = self._initial(arr.name)
            if init == "0.0":
                lines.append(f"memset({arr.name}, 0, sizeof(double) * (size_t)({extent}));")
            else:
                lines.append(f"for (int64_t hg_k = 0; hg_k < {extent}; ++hg_k) {arr.name}[hg_k] = {init};")
        return lines

    def _initial(self, name: str) -> str:
        maxed = any(u.target == name and u.op == "max"
                    for s in self.program.statements for u in s.updates)
        return "-INFINITY" if maxed else "0.0"

    # -- bodies ----------------------------------------------------------------------------
    def body(self) -> list:
        nodes = []
        for group in fuse_outer_loops(self.program):
            if len(group) == 1:
                nodes.extend(self.statement_nodes(group[0], fixed=0))
            else:
                outer = group[0].loops[0]
                loop = Node(loop=self.loop_header(outer, pragma=""))
                for stmt in group:
                    loop.children.extend(self.statement_nodes(stmt, fixed=1))
                nodes.append(loop)
        return nodes

    def loop_header(self, lp: ir.Loop, pragma: str) -> tuple:
        return (str(lp.var), self.index_code(lp.lo), self.index_code(lp.hi + 1), pragma)

    def statement_nodes(self, stmt: ir.Statement, fixed: int) -> list:
        """Nodes for one statement; its first `fixed` loops are already open around it."""
        loops = stmt.loops
        csr = self.csr_read(stmt)
        holders, placeholders = {}, {}
        for u in stmt.updates:
            for r in ir.reads_of(u.expr, self.arrays):
                if r not in holders:
                    h = sp.Symbol(f"hg_read{len(holders)}", real=True)
                    holders[r] = h
                    placeholders[h.name] = f"{r.base.label}_data[hg_p]" if r == csr else self.code(r)
        exprs = [u.expr.xreplace(holders) for u in stmt.updates]
        depth_of_read = {h: self.depth_needed(r.free_symbols, loops) for r, h in holders.items()}
        hoisted, exprs = self.hoist_invariants(exprs, loops, fixed, depth_of_read)
        replacements, reduced = sp.cse(exprs, symbols=self.local_names, order="none")
        replacements = hoisted + replacements
        printer = KernelPrinter(self.arrays, placeholders)
        locals_at = {}
        local_depth = {}
        for sym, expr in replacements:
            deps = [self.depth_needed(expr.free_symbols, loops)]
            deps += [depth_of_read[s] for s in expr.free_symbols if s in depth_of_read]
            deps += [local_depth[s] for s in expr.free_symbols if s in local_depth]
            d = max([fixed] + deps)
            local_depth[sym] = d
            locals_at.setdefault(d, []).append(f"const double {sym} = {printer.doprint(expr)};")
        innermost = len(loops)
        acc_lines_open, acc_lines_close, update_lines = {}, {}, []
        accumulators = []
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

        def build(depth: int) -> list:
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
                loop = Node(loop=self.loop_header(loops[depth], pragma))
                loop.children = build(depth + 1)
                out.append(loop)
            out += [Node(line) for line in acc_lines_close.get(depth, [])]
            return out

        return build(fixed)

    def csr_read(self, stmt: ir.Statement):
        """The read A[row, j] of a CSR array whose non-zeros the innermost loop (over j) visits.

        Legal only when j is the column index, the loop covers all columns and every update
        vanishes where A[row, j] = 0; anything else is refused with the reason.
        """
        reads = sorted({r for u in stmt.updates for r in ir.reads_of(u.expr, self.arrays)
                        if self.arrays[ir.read_name(r)].sparse}, key=sp.default_sort_key)
        if not reads:
            return None
        name = ir.read_name(reads[0])
        where = f"{self.spec.name} (statement over {', '.join(str(lp.var) for lp in stmt.loops)})"
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

    def hoist_invariants(self, exprs, loops, fixed, depth_of_read):
        """Pull function calls that no loop of this statement changes (exp(theta)...) out of it."""
        if len(loops) <= fixed:
            return [], exprs
        loop_vars = {lp.var for lp in loops}

        def invariant(e):
            return all(s not in loop_vars and depth_of_read.get(s, 0) <= fixed
                       for s in e.free_symbols)

        found = {}

        def visit(e):
            if not e.args:
                return
            if invariant(e) and (isinstance(e, sp.Function) or
                                 isinstance(e, sp.Pow) and not e.exp.is_Integer):
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

    def depth_needed(self, symbols, loops) -> int:
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

    def simd_pragma(self, stmt: ir.Statement, accumulators: list, update_lines) -> str:
        """`omp simd` on the innermost loop when its iterations are provably independent."""
        if not stmt.loops or any(u.op == "max" for u in stmt.updates):
            return ""
        var = stmt.loops[-1].var
        written = {}
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

    def context(self) -> dict:
        params = self.params()
        out = self.arrays[self.spec.output]
        return {
            "name": self.spec.name, "doc": self.spec.doc, "params": params,
            "sizes": [p.name for p in params if p.role == "size"],
            "setup": self.setup_lines(), "body": self.body(),
            "outputs": [(self.out_param(), self.index_code(_extent(out)), out.is_scalar, out.name)],
        }


def render_module(problem, specs: list) -> tuple:
    """Return (source, header, cdef) for one problem: deterministic C99 text.

    The cdef is the header's declarations as cffi parses them (no include guards, no restrict).
    """
    env = environment()
    kernels = [KernelRenderer(spec, problem) for spec in specs]
    contexts = [k.context() for k in kernels]
    sizes = [s.name for s in problem.sizes]
    work = [k.index_code(k.work_size()) for k in kernels if k.work_arrays()]
    ctx = {
        "problem": problem.name, "prefix": f"hg_{problem.name}", "version": __version__,
        "abi": ABI_VERSION, "kernels": contexts, "sizes": sizes, "work": work,
        "template_digest": template_digest(),
    }
    header = env.get_template("module.h.j2").render(**ctx)
    source = env.get_template("module.c.j2").render(header=header, **ctx)
    cdef = "\n".join(line.replace("restrict ", "") for line in header.splitlines()
                     if not line.startswith(("#ifndef", "#endif", "#include", "/*", " *"))
                     and not (line.startswith("#define") and line.endswith("_H")))
    return source, header, cdef


def template_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(templates_dir().glob("*.j2")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]
