"""The kernel table: which derivative program each public kernel is (interface.md section 3).

Takes a `Problem`, returns plain `KernelSpec`s (name, doc, optimised program, argument roles);
nothing here knows about C.
"""
from __future__ import annotations

from dataclasses import dataclass


from . import ir
from .autodiff import adjoint, tangent
from .lower import lower_objective
from .optimize import eliminate_dead_code, schedule


@dataclass(frozen=True)
class KernelSpec:
    name: str
    doc: str
    program: ir.Program
    inputs: tuple  # names of the vector inputs after x and theta ("v", "q" or "t")
    output: str  # the array the kernel returns


def kernel_specs(problem) -> list:
    """All kernels of a problem, in the fixed order of the interface."""
    x, th = problem.x_spec.name, problem.theta_spec.name
    g = lower_objective(problem.g, problem.arrays, "lower")
    f = lower_objective(problem.f + problem.r, problem.arrays, "upper")
    grad_g = adjoint(g, [x, th])
    grad_f = adjoint(f, [x, th])
    specs = [
        ("lower_value", "g(x, theta), the lower-level objective", g, (), "value"),
        ("lower_grad", "grad_x g(x, theta)", grad_g, (), f"{x}_bar"),
        ("lower_hvp", "(d2g/dx2) v, forward over reverse", tangent(grad_g, {x: "v"}, [f"{x}_bar_dot"]),
         ("v",), f"{x}_bar_dot"),
        ("cross_vjp", "B^T q = d/dtheta <grad_x g, q>", tangent(grad_g, {x: "q"}, [f"{th}_bar_dot"]),
         ("q",), f"{th}_bar_dot"),
        ("cross_jvp", "B t = d/ds grad_x g(x, theta + s t)", tangent(grad_g, {th: "t"}, [f"{x}_bar_dot"]),
         ("t",), f"{x}_bar_dot"),
        ("upper_value", "f(x, theta) + r(theta), the upper-level objective", f, (), "value"),
        ("upper_grad", "grad_x f(x, theta)", grad_f, (), f"{x}_bar"),
        ("upper_theta_grad", "grad_theta (f + r): the direct theta terms of the hypergradient",
         grad_f, (), f"{th}_bar"),
    ]
    out = []
    for name, doc, program, inputs, output in specs:
        program = schedule(eliminate_dead_code(program.with_statements(program.statements, [output])))
        out.append(KernelSpec(name, doc, program, inputs, output))
    return out

