"""Derivatives as program transforms: reverse sweep (`adjoint`) and forward mode (`tangent`).

Both work statement by statement on the loop-nest IR and take scalar `sympy.diff` of each update
body with respect to its reads; nothing is unrolled. Every derivative the bounds need composes
from the two:

    lower_grad  = adjoint(g)                       -> x_bar
    lower_hvp   = tangent(adjoint(g), x <- v)      -> x_bar_dot      (forward over reverse)
    cross_vjp   = tangent(adjoint(g), x <- q)      -> theta_bar_dot  (B^T q = d/dtheta <grad_x g, q>)
    cross_jvp   = tangent(adjoint(g), theta <- t)  -> x_bar_dot      (B t)
    lower_tvp   = tangent(lower_hvp, x <- hg_w)    -> x_bar_dot_dw_dot (grad_x (v^T A(x) w): the
                                                      third derivative of g with two vectors)
    cross_hvp   = tangent(cross_jvp, x <- hg_w)    -> x_bar_dot_dw_dot (grad_x (w^T B(x) t))
    cross_tvp   = tangent(cross_vjp, x <- hg_w)    -> theta_bar_dot_dw_dot (d/ds B(x + s w)^T q)

The adjoint of `T[I] += e(..., Y[J], ...)` over a loop nest is `Y_bar[J] += T_bar[I] * de/dY[J]`
over the same nest: a transposed contraction, or a scatter for shifted indices. Reads of
non-differentiable arrays (the max of a log-sum-exp) are constants.
"""
from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Sequence

import sympy as sp

from . import ir


def partials(expr: sp.Expr, arrays: dict[str, ir.Array],
             wrt: Collection[str]) -> list[tuple[sp.Expr, sp.Expr]]:
    """[(read, d expr / d read)] for every read of an array named in `wrt`; zero partials dropped."""
    targets = tuple(r for r in ir.reads_of(expr, arrays) if ir.read_name(r) in wrt)
    return list(_partials(expr, targets)) if targets else []


@functools.lru_cache(maxsize=4096)
def _partials(expr: sp.Expr, targets: tuple[sp.Expr, ...]) -> tuple[tuple[sp.Expr, sp.Expr], ...]:
    """The non-zero d expr / d target. Memoised: the kernels differentiate the same update bodies
    along the same reads several times (the HVP and cross_vjp are both tangents of the adjoint
    along x), and `sp.diff` of a large body is the costly step."""
    holders = [sp.Symbol(f"hg_read{k}", real=True) for k in range(len(targets))]
    to_holder = dict(zip(targets, holders))
    back = dict(zip(holders, targets))
    held = ir.xreplace(expr, to_holder)
    out: list[tuple[sp.Expr, sp.Expr]] = []
    for r, h in zip(targets, holders):
        d = sp.diff(held, h)
        if d != 0:
            out.append((r, ir.xreplace(d, back)))
    return tuple(out)


def active_arrays(program: ir.Program, wrt: Iterable[str]) -> set[str]:
    """Arrays whose value depends on the arrays in `wrt` (activity analysis)."""
    active = set(wrt)
    for stmt in program.statements:
        for u in stmt.updates:
            if program.arrays[u.target].differentiable and any(
                    ir.read_name(r) in active for r in ir.reads_of(u.expr, program.arrays)):
                active.add(u.target)
    return active


def adjoint(program: ir.Program, wrt: Sequence[str], seed: str = "value") -> ir.Program:
    """Append the reverse sweep of `program` for the scalar output `seed`; outputs <name>_bar."""
    arrays = dict(program.arrays)
    active = active_arrays(program, wrt)

    def bar_of(name: str) -> ir.Array:
        bar = f"{name}_bar"
        if bar not in arrays:
            role = ir.OUTPUT if name in wrt else ir.TEMP
            arrays[bar] = ir.Array(bar, program.arrays[name].shape, role)
        return arrays[bar]

    for name in wrt:
        bar_of(name)
    sweep: list[ir.Statement] = []
    for stmt in reversed(program.statements):
        updates: list[ir.Update] = []
        for u in stmt.updates:
            if u.target not in active:
                continue
            if u.target == seed:
                adj = sp.Integer(1)
            elif f"{u.target}_bar" in arrays:
                adj = ir.read(arrays[f"{u.target}_bar"], u.index)
            else:
                continue  # nothing downstream depends on this value
            for r, d in partials(u.expr, arrays, active):
                updates.append(ir.Update(bar_of(ir.read_name(r)).name, ir.read_index(r), adj * d))
        if updates:
            sweep.append(ir.Statement(stmt.loops, tuple(updates)))
    outputs = tuple(f"{name}_bar" for name in wrt)
    return ir.Program(arrays, list(program.statements) + sweep, outputs, dict(program.meta))


def tangent(program: ir.Program, seeds: dict[str, str], outputs: Sequence[str],
            suffix: str = "_dot") -> ir.Program:
    """Forward-mode derivative of every statement along `seeds` ({array: its tangent input}).

    Each statement keeps its primal updates and gains the tangent updates in the same loop nest,
    so the derivative shares the loops (and the reads) of the value it differentiates. The
    tangent of array T is named T + suffix: a second tangent of a tangent program (a third
    derivative) takes another suffix, so its arrays do not collide with the first's T_dot.
    """
    arrays = dict(program.arrays)
    dots: dict[str, str] = {}
    for name, tangent_input in seeds.items():
        arrays[tangent_input] = ir.Array(tangent_input, program.arrays[name].shape, ir.INPUT)
        dots[name] = tangent_input
    statements: list[ir.Statement] = []
    for stmt in program.statements:
        updates = list(stmt.updates)
        for u in stmt.updates:
            if not arrays[u.target].differentiable:
                continue
            terms = [d * ir.read(arrays[dots[ir.read_name(r)]], ir.read_index(r))
                     for r, d in partials(u.expr, arrays, set(dots))]
            if not terms:
                continue
            dot = f"{u.target}{suffix}"
            if dot not in arrays:
                role = ir.OUTPUT if dot in outputs else ir.TEMP
                arrays[dot] = ir.Array(dot, arrays[u.target].shape, role)
                dots[u.target] = dot
            updates.append(ir.Update(dot, u.index, sp.Add(*terms), u.op))
        statements.append(ir.Statement(stmt.loops, tuple(updates)))
    for name in outputs:  # an output no tangent reaches is identically zero, but still returned
        shape = arrays[name].shape if name in arrays else program.arrays[name[: -len(suffix)]].shape
        arrays[name] = ir.Array(name, shape, ir.OUTPUT)
    return ir.Program(arrays, statements, tuple(outputs), dict(program.meta))

