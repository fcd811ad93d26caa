"""Rendering: kernel programs -> one C translation unit and its header, through Jinja templates.

Python decides *what* each kernel computes (a tree of loops and lines per kernel); the templates
in templates/ own the layout of the file, the helpers and the function frames. Output is
deterministic: names come from the IR, iteration orders are fixed, nothing depends on ids or time.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Union

import jinja2
import sympy as sp

from ...version import ABI_VERSION, __version__
from .. import ir
from ..kernels import CACHE_BUFFER, KernelSpec
from ..problem import Problem
from .closing import closing_context
from .loopnest import LoopNestBuilder, Node
from .loops import loops_context
from .params import Param, wide
from .printer import KernelPrinter


def templates_dir() -> Path:
    """templates/ of a source checkout, or codegen/templates of an installed package."""
    checkout = Path(__file__).resolve().parents[3] / "templates"
    if (checkout / "module.c.j2").exists():
        return checkout
    return Path(str(resources.files("codegen") / "templates"))


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True, autoescape=False)


def _size_symbols(program: ir.Program, sizes: Sequence[sp.Symbol]) -> list[sp.Symbol]:
    used: set[sp.Symbol] = set()
    for arr in program.arrays.values():
        for s in arr.shape:
            used |= sp.sympify(s).free_symbols
    for stmt in program.statements:
        for lp in stmt.loops:
            used |= lp.lo.free_symbols | lp.hi.free_symbols
        for u in stmt.updates:
            used |= ir.free_symbols(u.expr)
    return [s for s in sizes if s in used]


class KernelRenderer:
    """Turns one KernelSpec into the parameters, work layout and body tree of its C function."""

    def __init__(self, spec: KernelSpec, problem: Problem) -> None:
        self.spec, self.problem = spec, problem
        self.name, self.doc = spec.name, spec.doc
        self.program = spec.program
        self.arrays = self.program.arrays
        self.printer = KernelPrinter(self.arrays)

    def code(self, expr: sp.Expr) -> str:
        return self.printer.doprint(expr)

    def index_code(self, expr: sp.Expr | int) -> str:
        return self.printer.index_code(sp.sympify(expr))

    # -- the function frame ----------------------------------------------------------------
    def params(self) -> list[Param]:
        prob, used = self.problem, set(self.arrays)
        params = [Param("int64_t", s.name, "size") for s in _size_symbols(self.program, prob.sizes)]
        th = prob.theta_spec
        params.append(Param("const double *restrict", th.name, "theta",
                            self.index_code(ir.extent(self.arrays[th.name]))))
        for spec in prob.data_specs:
            if spec.name in used:
                if spec.sparse:
                    params += [Param("const double *restrict", f"{spec.name}_data", "csr_data"),
                               Param("const int64_t *restrict", f"{spec.name}_indices", "csr_indices"),
                               Param("const int64_t *restrict", f"{spec.name}_indptr", "csr_indptr")]
                elif spec.shape:
                    params.append(Param("const double *restrict", spec.name, "data",
                                        self.index_code(ir.extent(self.arrays[spec.name]))))
                else:
                    params.append(Param("double", spec.name, "scalar"))
        xs = prob.x_spec.name
        params.append(Param("const double *restrict", xs, "input",
                            self.index_code(ir.extent(self.arrays[xs]))))
        for name in self.spec.inputs:
            extent = self.cache_size() if name == CACHE_BUFFER else ir.extent(self.arrays[name])
            params.append(Param("const double *restrict", name, "input", self.index_code(extent)))
        params.append(Param("double *restrict", self.out_param(), "output",
                            self.index_code(self.output_extent())))
        if self.work_arrays():
            params.append(Param("double *restrict", "work", "work"))
        return params

    def out_param(self) -> str:
        if self.spec.output == CACHE_BUFFER:
            return CACHE_BUFFER
        return "value_out" if self.arrays[self.spec.output].is_scalar else self.spec.output

    def output_extent(self) -> sp.Expr:
        if self.spec.output == CACHE_BUFFER:
            return self.cache_size()
        return ir.extent(self.arrays[self.spec.output])

    def cache_arrays(self) -> list[ir.Array]:
        return [self.arrays[name] for name in self.spec.cache]

    def cache_size(self) -> sp.Expr:
        return sp.Add(*[ir.extent(a) for a in self.cache_arrays()])

    def work_arrays(self) -> list[ir.Array]:
        return [a for a in self.arrays.values() if a.role == ir.TEMP and not a.is_scalar]

    def scalar_locals(self) -> list[ir.Array]:
        return [a for a in self.arrays.values()
                if a.role in (ir.TEMP, ir.OUTPUT) and a.is_scalar]

    def work_size(self) -> sp.Expr:
        return sp.Add(*[ir.extent(a) for a in self.work_arrays()])

    def work_code(self) -> str | None:
        """C expression of the doubles of `work` this kernel uses (None: it takes no work)."""
        return self.index_code(self.work_size()) if self.work_arrays() else None

    def setup_lines(self) -> list[str]:
        """Carve temporaries out of `work` (cache arrays out of `cache`: written by the prepare
        kernel, read-only in the apply kernel), and zero every accumulator."""
        lines, offset = [], sp.Integer(0)
        writes_cache = self.spec.output == CACHE_BUFFER
        read = {ir.read_name(r) for st in self.program.statements for u in st.updates
                for r in ir.reads_of(u.expr, self.arrays)}
        for p in self.params():
            if p.role in ("theta", "input") and p.name not in read and p.name != CACHE_BUFFER:
                lines.append(f"(void){p.name};  /* part of the uniform signature, unused here */")
        for arr in self.cache_arrays():
            qualifier = "" if writes_cache else "const "
            lines.append(f"{qualifier}double *restrict {arr.name} = "
                         f"{CACHE_BUFFER} + {self.index_code(offset)};")
            offset += ir.extent(arr)
        offset = sp.Integer(0)
        for arr in self.work_arrays():
            lines.append(f"double *restrict {arr.name} = work + {self.index_code(offset)};")
            offset += ir.extent(arr)
        for arr in self.scalar_locals():
            lines.append(f"double {arr.name} = {self._initial(arr.name)};")
        if writes_cache:
            outputs = self.cache_arrays()
        else:
            out = self.arrays[self.spec.output]
            outputs = [] if out.is_scalar else [out]
        zeroed = self.work_arrays() + outputs
        for arr in zeroed:
            extent = self.index_code(ir.extent(arr))
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

    def body(self) -> list[Node]:
        return LoopNestBuilder(self.program, self.printer, self.spec.name).body()

    def context(self) -> dict[str, Any]:
        params = self.params()
        scalar = self.spec.output != CACHE_BUFFER and self.arrays[self.spec.output].is_scalar
        return {
            "name": self.spec.name, "doc": self.spec.doc, "params": params,
            "sizes": [p.name for p in params if p.role == "size"],
            "setup": self.setup_lines(), "body": self.body(),
            "outputs": [(self.out_param(), self.index_code(self.output_extent()), scalar,
                         self.spec.output)],
        }


class ColumnsRenderer:
    """A kernel that runs another on every unit vector: a derivative as a dense matrix, in one
    call instead of one per column (the direct solvers of a small problem need the Hessian and
    B whole, and each separate call from Python costs more than its arithmetic).

    Column c of the output, at output + c * rows, is base(..., direction = e_c, ...); the unit
    vector lives at the start of `work`, the base kernel's own work after it. The first failing
    column's status is returned as it is.
    """

    def __init__(self, name: str, doc: str, base: KernelRenderer, direction: str, out: str,
                 prefix: str):
        self.name, self.doc, self.base, self.direction = name, doc, base, direction
        self.out, self.prefix = out, prefix
        base_params = base.params()
        self.count = next(p.length for p in base_params if p.name == direction)
        self.rows = next(p.length for p in base_params if p.role == "output")

    def params(self) -> list[Param]:
        kept = [p for p in self.base.params() if p.name != self.direction
                and p.role not in ("output", "work")]
        return kept + [Param("double *restrict", self.out, "output",
                             f"({wide(self.rows)})*({self.count})"),
                       Param("double *restrict", "work", "work")]

    def work_code(self) -> str:
        inner = self.base.work_code()
        return self.count if inner is None else f"{inner} + ({wide(self.count)})"

    def context(self) -> dict[str, Any]:
        params = self.params()
        args = []
        for p in self.base.params():
            if p.name == self.direction:
                args.append("hg_unit")
            elif p.role == "output":
                args.append(f"{self.out} + hg_col*({self.rows})")
            elif p.role == "work":
                args.append(f"work + {self.count}")
            else:
                args.append(p.name)
        ok = f"{self.prefix.upper()}_OK"
        column = Node(loop=("hg_col", "0", self.count, ""), children=[
            Node(text="hg_unit[hg_col] = 1.0;"),
            Node(text=f"const int hg_status = {self.prefix}_{self.base.name}({', '.join(args)});"),
            Node(text="hg_unit[hg_col] = 0.0;"),
            Node(text=f"if (hg_status != {ok}) {{"),
            Node(text="    return hg_status;"),
            Node(text="}"),
        ])
        return {
            "name": self.name, "doc": self.doc, "params": params,
            "sizes": [p.name for p in params if p.role == "size"],
            "setup": ["double *restrict hg_unit = work;",
                      f"memset(hg_unit, 0, sizeof(double) * (size_t)({self.count}));"],
            "body": [column], "outputs": [],
        }


#: (name, doc, base kernel, its direction input, output parameter) of the dense-matrix kernels.
COLUMN_KERNELS = (
    ("lower_hessian", "d2g/dx2 as a dense matrix: column c is lower_hvp with v = e_c",
     "lower_hvp", "v", "hessian_out"),
    ("cross_matrix", "B = d2g/dx dtheta as a dense matrix: column c is cross_jvp with t = e_c",
     "cross_jvp", "t", "cross_out"),
    # the Hessian split at g's terms without and with theta (compiler/kernels.py split_hessian):
    # only in modules whose g has that split
    ("lower_hessian_fixed", "d2 g_fixed/dx2 as a dense matrix, fixed by the data: column c is "
     "lower_hvp_fixed with v = e_c", "lower_hvp_fixed", "v", "hessian_out"),
    ("lower_hessian_varying", "d2 g_varying/dx2 as a dense matrix: column c is "
     "lower_hvp_varying with v = e_c", "lower_hvp_varying", "v", "hessian_out"),
)


Renderer = Union["KernelRenderer", "ColumnsRenderer"]


def kernel_renderers(problem: Problem, specs: list[KernelSpec]) -> list[Renderer]:
    """The renderers of every C function of the module: one per KernelSpec, then the
    dense-matrix kernels built on them."""
    kernels = [KernelRenderer(spec, problem) for spec in specs]
    by_name = {k.name: k for k in kernels}
    prefix = f"hg_{problem.name}"
    columns = [ColumnsRenderer(name, doc, by_name[base], direction, out, prefix)
               for name, doc, base, direction, out in COLUMN_KERNELS if base in by_name]
    return [*kernels, *columns]


def render_module(problem: Problem, specs: list[KernelSpec]) -> tuple[str, str, str]:
    """Return (source, header, cdef) for one problem: deterministic C99 text.

    The cdef is the header's declarations as cffi parses them (no include guards, no restrict).
    """
    env = environment()
    kernels = kernel_renderers(problem, specs)
    contexts = [k.context() for k in kernels]
    sizes = [s.name for s in problem.sizes]
    work = [k.work_code() for k in kernels if k.work_code() is not None]
    loops, loop_work = loops_context(problem, kernels, f"hg_{problem.name}")
    ctx = {
        "problem": problem.name, "prefix": f"hg_{problem.name}", "version": __version__,
        "abi": ABI_VERSION, "kernels": contexts, "sizes": sizes, "work": work + loop_work,
        "loops": loops, "closing": closing_context(problem, kernels, f"hg_{problem.name}"),
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
