"""The closing step of a hypergradient in one C call (docs/compiler.md 11, docs/solvers.md 5).

After the adjoint solve the driver needs, at (x_eps, theta) and the adjoint q, three kernels:
`cross_vjp` (B^T q), `upper_theta_grad` (the direct theta terms) and `upper_value` (f + r). On a
small problem each Python-to-C call costs more than its arithmetic, so every module also exports
`hg_<name>_closing`, which calls the three in turn from C: the same functions on the same
arguments, hence the same bits as three separate calls. Its arguments are those of the solver
loops (every size, theta and every data array in meta.json's order; `loops.loop_params`), then
x, q, the three outputs and the caller's work buffer, which each kernel reuses from its start
(they run one after the other), so work_size needs nothing new. The template is
templates/closing.c.j2 (declared by templates/closing.h.j2).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..problem import Problem
from .loops import KernelLike, kernel_call, loop_params
from .params import Param

#: The kernels the closing step calls, in order, with the output each writes.
CLOSING_KERNELS = (("cross_vjp", "hg_btq"), ("upper_theta_grad", "hg_direct"),
                   ("upper_value", "hg_value"))

CLOSING_DOC = ("a hypergradient's closing step at (x, theta) with adjoint q in one call: "
               "cross_vjp (B^T q) into btq, upper_theta_grad into direct, upper_value into "
               "value[0]; status 1 if an output is not finite")


def _length(kernel: KernelLike, role: str, name: str | None = None) -> str:
    return next(p.length for p in kernel.params() if p.role == role
                and (name is None or p.name == name))


def closing_context(problem: Problem, kernels: Sequence[KernelLike], prefix: str
                    ) -> dict[str, Any]:
    """The template context of `hg_<name>_closing`: its parameters and the C calls of its
    kernels, with x at hg_x, q at hg_q and every kernel's work at the start of hg_work."""
    by_name = {k.name: k for k in kernels}
    x = problem.x_spec.name
    cross = by_name["cross_vjp"]
    fixed = loop_params(problem, by_name)
    n, p = _length(cross, "input", x), _length(cross, "output")
    params = [*fixed,
              Param("const double *restrict", "hg_x", "vector", n),
              Param("const double *restrict", "hg_q", "vector", n),
              Param("double *restrict", "hg_btq", "vector", p),
              Param("double *restrict", "hg_direct", "vector",
                    _length(by_name["upper_theta_grad"], "output")),
              Param("double *restrict", "hg_value", "vector", "1"),
              Param("double *restrict", "hg_work", "work")]
    calls, passed = [], set()
    for name, out in CLOSING_KERNELS:
        kernel = by_name[name]
        calls.append(kernel_call(prefix, kernel, {x: "hg_x", "q": "hg_q", "out": out}, "hg_work"))
        passed |= {"hg_work" if q.role == "work" else q.name for q in kernel.params()
                   if q.role not in ("input", "output")}
    return {
        "name": "closing", "doc": CLOSING_DOC, "params": params,
        "sizes": [s.name for s in problem.sizes],
        "unused": [q.name for q in [*fixed, params[-1]]
                   if q.role != "size" and q.name not in passed],
        "calls": calls,
    }
