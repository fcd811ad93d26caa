"""Solver loops fused in C: whole CG, FISTA, gradient-descent and Newton-CG loops that call the
module's own kernels, so that a small problem pays one Python-to-C call per solve instead of a few per
iteration (docs/solvers.md 5, docs/compiler.md 11).

Each loop function takes every size, theta and every data array of the problem (in the order of
`problem.sizes` and `problem.data_specs`: the runtime rebuilds its arguments from meta.json), then
its vectors, a control vector `ctl` (tolerances, step parameters, caps, as doubles), an `info`
output (status, counts, final norms, as doubles) and the caller's `work` buffer: the loop's own
vectors first, then the prepared HVP's cache (when the module has one), then the work of the
kernels it calls. No allocation; the module's work_size covers every loop. What each loop
computes, step for step, is the Python loop it replaces (codegen/hypergrad/krylov.py `cg`,
codegen/hypergrad/lower/fista.py, codegen/hypergrad/lower/gradient.py, and
codegen/hypergrad/lower/newton.py, whose directions run `loop_cg` itself); the templates are
templates/solver_loops.c.j2 and templates/solver_loops.h.j2.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..problem import Problem
from .params import Param, wide


class KernelLike(Protocol):
    """What the loops need of a kernel renderer: its name, parameters and work extent."""

    name: str

    def params(self) -> list[Param]: ...

    def work_code(self) -> str | None: ...


#: Status codes a loop writes into info[0] (codegen/hypergrad/fused.py reads them).
LOOP_STATUS = {"converged": 0, "capped": 1, "diverged": 2, "non_finite": 3, "not_spd": 4,
               "no_decrease": 5}  # loop_newton: no step decreased ||grad g|| (Python says why)

#: Why a loop stopped on a failure, info's reason entry (the Python side turns it into a message).
LOOP_REASON = {"none": 0, "kernel": 1, "iterate": 2, "curvature": 3}

#: (name, doc, vectors of the loop's own in `work`, its vector parameters as (ctype, name)).
LOOPS = (
    ("loop_cg", "CG on A(xh) u = b from u with residual s = b - A u (both updated in place); "
     "step i < basis_cap writes d_i and A d_i to basis[2i n], basis[(2i + 1) n] (NULL: none); "
     "ctl = [tol, scale, max_iter, min_iter, diverge_from (< 0: none), mu (<= 0: none), "
     "basis_cap]; info = [status, iterations, matvecs, s.s, reason, value, alpha_mu "
     "(Gauss-Radau)]", 2,
     (("const double *restrict", "hg_xh"), ("double *restrict", "hg_u"), ("double *restrict", "hg_s"),
      ("double *restrict", "hg_basis"))),
    ("loop_fista", "strongly convex FISTA from x0: the last z with a finite gradient into z, "
     "its gradient into g; ctl = [tol, mu, tau, q, max_iter]; "
     "info = [status, iterations, gradients, ||g||, ||g0||, beta_last, have_z, reason]", 4,
     (("const double *restrict", "hg_x0"), ("double *restrict", "hg_z"), ("double *restrict", "hg_g"))),
    ("loop_descent", "gradient descent / heavy ball from x0: the last iterate into x, its gradient "
     "into g; ctl = [tol, mu, a, b, max_iter]; "
     "info = [status, iterations, gradients, ||g||, ||g0||, have_g, reason]", 3,
     (("const double *restrict", "hg_x0"), ("double *restrict", "hg_x"), ("double *restrict", "hg_g"))),
    ("loop_newton", "Newton-CG from x0 (directions by loop_cg from 0, steps halved until ||g|| "
     "decreases): the last x into x, its gradient into g; "
     "ctl = [tol, mu, L_A, max_iter (gradients + HVPs), inner_max, target_share]; "
     "info = [status, iterations, gradients, HVPs, ||g||, ||g0||, reason, value, have_g, "
     "last gradient failed]", 4,
     (("const double *restrict", "hg_x0"), ("double *restrict", "hg_x"), ("double *restrict", "hg_g"))),
)


def kernel_call(prefix: str, kernel: KernelLike, vectors: dict[str, str], work: str) -> str:
    """The C call of a module kernel from a loop: its vector parameters (x, v, cache, the
    output under "out") taken from `vectors`, its work at `work`, everything else by name
    (a loop has every size, theta and data parameter of the module)."""
    args = []
    for p in kernel.params():
        if p.role == "output":
            args.append(vectors["out"])
        elif p.role == "work":
            args.append(work)
        elif p.role == "input":
            args.append(vectors[p.name])
        else:
            args.append(p.name)
    return f"{prefix}_{kernel.name}({', '.join(args)})"


def loop_params(problem: Problem, by_name: dict[str, KernelLike]) -> list[Param]:
    """Every size, theta and every data array (CSR as three arrays) in problem order."""
    params = [Param("int64_t", s.name, "size") for s in problem.sizes]
    grad_params = {p.name: p for p in by_name["lower_grad"].params()}
    params.append(grad_params[problem.theta_spec.name])
    for spec in problem.data_specs:
        if spec.sparse:
            params += [Param("const double *restrict", f"{spec.name}_data", "csr_data"),
                       Param("const int64_t *restrict", f"{spec.name}_indices", "csr_indices"),
                       Param("const int64_t *restrict", f"{spec.name}_indptr", "csr_indptr")]
        elif spec.shape:
            params.append(Param("const double *restrict", spec.name, "data"))
        else:
            params.append(Param("double", spec.name, "scalar"))
    return params


def _cache_code(by_name: dict[str, Any]) -> str:
    apply = by_name.get("lower_hvp_apply")
    if apply is None:
        return "0"
    return str(apply.index_code(apply.cache_size()))


def loops_context(problem: Problem, kernels: Sequence[KernelLike], prefix: str
                  ) -> tuple[list[dict[str, Any]], list[str]]:
    """(template context of every loop, the work extents they add to work_size)."""
    by_name = {k.name: k for k in kernels}
    fixed = loop_params(problem, by_name)
    x = problem.x_spec.name
    grad = by_name["lower_grad"]
    n = next(p.length for p in grad.params() if p.name == x)
    prepared = "lower_hvp_apply" in by_name
    contexts, work = [], []
    cg_work: list[str] = []
    for name, doc, own, vectors in LOOPS:
        own_code = f"{own}*({wide(n)})"
        cache_at = f"hg_work + {own_code}"
        if name == "loop_newton":  # its own vectors, then loop_cg's or lower_grad's work
            kwork = f"hg_work + {own_code}"
            fixed_args = ", ".join(p.name for p in fixed)
            calls = {"grad": kernel_call(prefix, grad, {x: "hg_point", "out": "hg_grad"}, kwork),
                     "cg": f"{prefix}_loop_cg({fixed_args}, hg_x, hg_u, hg_s, NULL, hg_cg_ctl, "
                           f"hg_cg_info, {kwork})"}
            inner = grad.work_code()
            work += [f"{own_code} + {need}" for need in cg_work]
            work.append(own_code if inner is None else f"{own_code} + {inner}")
            used = []
        elif name == "loop_cg":
            base = f"{own_code} + ({_cache_code(by_name)})" if prepared else own_code
            kwork = f"hg_work + {base}"
            hvp = by_name["lower_hvp_apply" if prepared else "lower_hvp"]
            calls = {"hvp": kernel_call(prefix, hvp, {x: "hg_xh", "v": "hg_d", "cache": "hg_cache",
                                                      "out": "hg_Ad"}, kwork)}
            if prepared:
                calls["prepare"] = kernel_call(prefix, by_name["lower_hvp_prepare"],
                                               {x: "hg_xh", "out": "hg_cache"}, kwork)
            used = ["lower_hvp_prepare", "lower_hvp_apply"] if prepared else ["lower_hvp"]
        else:
            base, kwork = own_code, f"hg_work + {own_code}"
            calls = {"grad": kernel_call(prefix, grad, {x: "hg_point", "out": "hg_grad"}, kwork)}
            used = ["lower_grad"]
        for kernel in used:
            inner = by_name[kernel].work_code()
            work.append(base if inner is None else f"{base} + {inner}")
            if name == "loop_cg":
                cg_work.append(work[-1])
        params = [*fixed, *(Param(ctype, v, "vector") for ctype, v in vectors),
                  Param("const double *restrict", "hg_ctl", "control"),
                  Param("double *restrict", "hg_info", "info"),
                  Param("double *restrict", "hg_work", "work")]
        contexts.append({
            "name": name, "doc": doc, "params": params, "n": n,
            "sizes": [s.name for s in problem.sizes],
            "unused": [p.name for p in fixed if p.role != "size"],
            "prepared": prepared and name == "loop_cg", "cache_at": cache_at,
            "calls": calls, "status": LOOP_STATUS, "reasons": LOOP_REASON,
        })
    return contexts, work
