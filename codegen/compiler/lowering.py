"""Lowering: a SymPy objective with Sums over Idx ranges -> a loop-nest `Program` (ir.py).

Every Sum becomes a named temporary computed by its own statement, indexed by the enclosing loop
variables its body uses; the enclosing expression then reads that temporary. So
log(1 + exp(Sum_j A[i,j] x[j])) becomes `s0[i] += A[i,j]*x[j]` over (i, j) and the outer body
sees softplus(s0[i]). Nothing is unrolled: loop bounds stay symbolic in the sizes.

log(Sum_k exp(u_k)) is lowered with its maximum shifted out (s_max = max_k u_k, then
log(Sum_k exp(u_k - s_max)) + s_max); s_max is marked non-differentiable, which is exact because
the total derivative of that form in s_max is identically zero.

Index checks (free indices, shifted indices that may leave their array, non-affine indices) are
done here because they need the loop ranges; the messages name the array, index and objective.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import sympy as sp

from ..errors import ProblemError
from ..primitives import stabilise
from . import ir


class ArrayDeclaration(Protocol):
    """What the lowering reads of a problem's array (a `compiler.problem.ArraySpec`)."""

    @property
    def shape(self) -> tuple[sp.Expr, ...]: ...

    @property
    def role(self) -> str: ...

    @property
    def sparse(self) -> bool: ...


Loops = Sequence[ir.Loop]


class _Lowering:
    def __init__(self, arrays: Mapping[str, ArrayDeclaration], label: str) -> None:
        self.label = label
        self.arrays = {name: ir.Array(name, spec.shape, spec.role, sparse=spec.sparse)
                       for name, spec in arrays.items()}
        self.statements: list[ir.Statement] = []
        self.n_temps = 0
        self.sizes = {str(s) for a in arrays.values() for e in a.shape for s in sp.sympify(e).free_symbols}
        # (loops, body, op) -> temp: the same sum written twice is computed once
        self.seen: dict[tuple[object, ...], ir.Array] = {}

    # -- helpers ---------------------------------------------------------------------------
    def temp_for(self, dims: Loops, own: Loops, body: sp.Expr, op: str = "+",
                 differentiable: bool = True) -> ir.Array:
        """The temporary holding this reduction, emitting its statement the first time."""
        key = (tuple(dims), tuple(own), body, op)  # dims vs own: a full sum vs one per outer row
        if key not in self.seen:
            temp = self.new_temp(dims, differentiable)
            self.statements.append(ir.Statement(
                tuple(dims) + tuple(own), (ir.Update(temp.name, _storage(dims), body, op),)))
            self.seen[key] = temp
        return self.seen[key]

    def new_temp(self, dims: Loops, differentiable: bool = True) -> ir.Array:
        name = f"s{self.n_temps}"
        self.n_temps += 1
        shape = tuple(sp.expand(lp.hi - lp.lo + 1) for lp in dims)
        arr = ir.Array(name, shape, ir.TEMP, differentiable)
        self.arrays[name] = arr
        return arr

    def loop_of(self, limit: tuple[sp.Expr, sp.Expr, sp.Expr], outer: Loops) -> ir.Loop:
        var, lo, hi = limit
        if not isinstance(var, (sp.Symbol, sp.Idx)):
            raise ProblemError(f"{self.label}: summation variable {var} must be an Idx or Symbol")
        if str(var) in self.arrays or str(var) in self.sizes:
            raise ProblemError(f"{self.label}: the index {var} has the name of an array or size; "
                               f"rename it")
        if any(lp.var.name == str(var) for lp in outer):
            raise ProblemError(f"{self.label}: the index {var} is summed inside a sum over itself; "
                               f"use a different Idx for the inner sum")
        # Bounds may use enclosing indices (triangular sums): lift those to their loop variables.
        loop = ir.Loop(sp.Symbol(str(var), integer=True), self.lift(sp.sympify(lo), outer),
                       self.lift(sp.sympify(hi), outer))
        for which, bound in (("lower", loop.lo), ("upper", loop.hi)):
            # (n - 1)/2 passed the index proofs in real arithmetic and printed as a double
            # bound, i < n/2 + 1/2, which ran one step too far for even n (an out-of-bounds read)
            if bound.is_integer is not True:
                raise ProblemError(f"{self.label}: the sum over {var} has the {which} limit "
                                   f"{bound}, which is not an integer for every size; give the "
                                   f"range integer limits (a size symbol of its own, say)")
        return loop

    # -- the recursive lift ----------------------------------------------------------------
    def lift(self, expr: sp.Expr, loops: Loops) -> sp.Expr:
        """Return `expr` with every Sum replaced by a read of a temporary; `loops` enclose it."""
        if isinstance(expr, sp.Sum):
            return self.lift_sum(expr, loops)
        if isinstance(expr, sp.log) and isinstance(expr.args[0], sp.Sum) \
                and isinstance(expr.args[0].function, sp.exp):
            return self.lift_logsumexp(expr.args[0], loops)
        if isinstance(expr, sp.Indexed):
            return self.lift_indexed(expr, loops)
        if isinstance(expr, sp.Idx):
            return self.lift_index_symbol(expr, loops)
        if not expr.args or isinstance(expr, sp.Symbol):
            return self.lift_symbol(expr, loops)
        return expr.func(*[self.lift(a, loops) for a in expr.args])

    def lift_symbol(self, expr: sp.Expr, loops: Loops) -> sp.Expr:
        if isinstance(expr, sp.Symbol) and expr.name in self.arrays:
            return ir.read(self.arrays[expr.name], ())
        if isinstance(expr, sp.Symbol) and expr.is_integer:
            for lp in loops:
                if lp.var.name == expr.name:
                    return lp.var
        return expr

    def lift_index_symbol(self, idx: sp.Idx, loops: Loops) -> sp.Expr:
        for lp in loops:
            if lp.var.name == str(idx.label):
                return lp.var
        raise ProblemError(f"{self.label}: the index {idx} is used outside any sum over {idx} "
                           f"(it is free); wrap the term in sp.Sum(..., ({idx}, lo, hi))")

    def lift_indexed(self, node: sp.Indexed, loops: Loops) -> sp.Expr:
        name = str(node.base.label)
        index = tuple(self.lift(sp.sympify(i), loops) for i in node.indices)
        vars_ = {lp.var for lp in loops}
        for pos, e in enumerate(index):
            stray = [s for s in e.free_symbols if isinstance(s, sp.Idx)]
            if stray:
                raise ProblemError(f"{self.label}: index {stray[0]} in {node} is free")
            poly = sp.Poly(e, *sorted(vars_, key=str)) if vars_ else None
            if poly is not None and poly.total_degree() > 1:
                raise ProblemError(f"{self.label}: index {e} of {node} is not affine in the loop "
                                   f"indices; only shifts such as i + 1 are supported")
            self.check_bounds(node, name, pos, e, loops)
        return sp.Indexed(sp.IndexedBase(name), *index)

    def check_bounds(self, node: sp.Indexed, name: str, pos: int, e: sp.Expr,
                     loops: Loops) -> None:
        extent = self.arrays[name].shape[pos]
        lo, hi = _range_of(e, loops)
        if sp.simplify(lo).is_nonnegative is not True:
            raise ProblemError(f"{self.label}: index {e} of {node} can be negative (down to {lo}); "
                               f"narrow the sum range so it stays inside {name}")
        if sp.simplify(extent - 1 - hi).is_nonnegative is not True:
            raise ProblemError(f"{self.label}: index {e} of {node} can leave {name} (shape "
                               f"{self.arrays[name].shape}): it reaches {hi} but the last valid "
                               f"index is {extent - 1}; narrow the sum range")

    def lift_sum(self, expr: sp.Sum, loops: Loops) -> sp.Expr:
        own: list[ir.Loop] = []
        for limit in expr.limits:
            own.append(self.loop_of(limit, tuple(loops) + tuple(own)))
        body = self.lift(expr.function, tuple(loops) + tuple(own))
        dims = self.dims_for(body, loops, own)
        return ir.read(self.temp_for(dims, own, body), _storage(dims))

    def lift_logsumexp(self, s: sp.Sum, loops: Loops) -> sp.Expr:
        own: list[ir.Loop] = []
        for limit in s.limits:
            own.append(self.loop_of(limit, tuple(loops) + tuple(own)))
        u = self.lift(s.function.args[0], tuple(loops) + tuple(own))
        dims = self.dims_for(u, loops, own)
        m_read = ir.read(self.temp_for(dims, own, u, "max", differentiable=False), _storage(dims))
        total = self.temp_for(dims, own, sp.exp(u - m_read))
        return sp.log(ir.read(total, _storage(dims))) + m_read

    def dims_for(self, body: sp.Expr, loops: Loops, own: Loops) -> list[ir.Loop]:
        """The enclosing loops a temporary must be indexed by: those its body depends on."""
        used = set(body.free_symbols)
        for lp in own:
            used |= lp.lo.free_symbols | lp.hi.free_symbols
        dims = [lp for lp in loops if lp.var in used]
        for lp in dims:
            if (lp.lo.free_symbols | lp.hi.free_symbols) & {d.var for d in loops}:
                raise ProblemError(f"{self.label}: the range of {lp.var} depends on another index; "
                                   f"triangular ranges around a nested sum are not supported")
        return dims


def _storage(dims: Loops) -> tuple[sp.Expr, ...]:
    return tuple(lp.var - lp.lo for lp in dims)


def _range_of(e: sp.Expr, loops: Loops) -> tuple[sp.Expr, sp.Expr]:
    """Bounds of an affine index expression over the loop ranges (outer ranges substituted)."""
    lo = hi = sp.expand(e)
    for lp in reversed(loops):
        new_lo: list[sp.Expr] = []
        new_hi: list[sp.Expr] = []
        for bound, pick_hi in ((lo, False), (hi, True)):
            c = bound.coeff(lp.var)
            if c == 0:
                val = bound
            else:
                positive = c.is_positive
                if positive is None:
                    raise ProblemError(f"index {e}: cannot tell the sign of the coefficient {c}")
                at = lp.hi if positive == pick_hi else lp.lo
                val = sp.expand(bound.subs(lp.var, at))
            (new_hi if pick_hi else new_lo).append(val)
        lo, hi = new_lo[0], new_hi[0]
    return lo, hi


def lower_objective(expr: sp.Expr, arrays: Mapping[str, ArrayDeclaration], label: str,
                    result: str = "value") -> ir.Program:
    """Lower one scalar objective into a Program whose output is the scalar array `result`."""
    lowering = _Lowering(arrays, label)
    body = lowering.lift(stabilise(sp.sympify(expr)), ())
    stray = [s for s in body.free_symbols if isinstance(s, sp.Symbol) and s.is_integer
             and s.name not in {str(z) for z in _all_sizes(arrays)}]
    if stray:
        raise ProblemError(f"{label}: the index {stray[0]} is used outside any sum over it (free)")
    out = ir.Array(result, (), ir.OUTPUT)
    lowering.arrays[result] = out
    lowering.statements.append(ir.Statement((), (ir.Update(result, (), body),)))
    return ir.Program(lowering.arrays, lowering.statements, (result,))


def _all_sizes(arrays: Mapping[str, ArrayDeclaration]) -> set[sp.Symbol]:
    sizes: set[sp.Symbol] = set()
    for spec in arrays.values():
        for s in spec.shape:
            sizes |= sp.sympify(s).free_symbols
    return sizes


def check_indices(expr: sp.Expr, arrays: Mapping[str, ArrayDeclaration], label: str) -> None:
    """Validate indices (called at Problem construction); raises ProblemError naming the culprit."""
    lower_objective(expr, arrays, label)
