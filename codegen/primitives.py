"""Numerically stable scalar primitives and the rewrites that introduce them.

log(1 + exp(z)) overflows for z > 709 and its derivative exp(z)/(1 + exp(z)) gives inf/inf; the
same holds for 1/(1 + exp(-z)). The primitives below carry their own derivative rules (softplus'
= sigmoid, sigmoid'(z) = sigmoid(z) sigmoid(-z)), so every derivative the generator takes stays in the
stable forms, and they print as branch-free stable C helpers (see templates/module.c.j2).
log(cosh(z)) overflows for |z| > 710 the same way; logcosh' = tanh keeps its derivatives stable.
Log-sum-exp is handled structurally by the lowering (max shifted out), not here.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sympy as sp


class softplus(sp.Function):
    """softplus(z) = log(1 + exp(z)), printed as fmax(z, 0) + log1p(exp(-|z|))."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sigmoid(self.args[0])

    @classmethod
    def eval(cls, z: sp.Expr) -> sp.Expr | None:
        if z.is_Number and z == 0:
            return sp.log(2)
        return None

    def _eval_rewrite_as_log(self, z: sp.Expr, **kwargs: Any) -> sp.Expr:
        return sp.log(1 + sp.exp(z))

    def _eval_is_real(self) -> bool | None:
        real: bool | None = self.args[0].is_real
        return real

    def _eval_is_positive(self) -> bool | None:
        return True if self.args[0].is_real else None


class sigmoid(sp.Function):
    """sigmoid(z) = 1 / (1 + exp(-z)), printed branching on the sign of z."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        # sigmoid(z) sigmoid(-z), not s (1 - s): 1 - s cancels to 0 for z > 37 (true e^-z).
        return sigmoid(self.args[0]) * sigmoid(-self.args[0])

    @classmethod
    def eval(cls, z: sp.Expr) -> sp.Expr | None:
        if z.is_Number and z == 0:
            return sp.Rational(1, 2)
        return None

    def _eval_rewrite_as_exp(self, z: sp.Expr, **kwargs: Any) -> sp.Expr:
        return 1 / (1 + sp.exp(-z))

    def _eval_is_real(self) -> bool | None:
        real: bool | None = self.args[0].is_real
        return real

    def _eval_is_positive(self) -> bool | None:
        return True if self.args[0].is_real else None


class logcosh(sp.Function):
    """logcosh(z) = log(cosh(z)), printed as |z| + log1p(exp(-2|z|)) - log 2: cosh(z) overflows
    for |z| > 710, and the derivatives SymPy takes of log(cosh(z)) are ratios of sinh and cosh
    (inf/inf there). Its derivative is tanh(z), whose own derivatives stay in tanh."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return sp.tanh(self.args[0])

    @classmethod
    def eval(cls, z: sp.Expr) -> sp.Expr | None:
        if z.is_Number and z == 0:
            return sp.S.Zero
        return None

    def _eval_is_real(self) -> bool | None:
        real: bool | None = self.args[0].is_real
        return real


ALLOWED_FUNCTIONS = frozenset({
    sp.exp, sp.log, sp.sin, sp.cos, sp.tan, sp.sinh, sp.cosh, sp.tanh, sp.atan, sp.asinh,
    sp.erf, sp.Abs, softplus, sigmoid, logcosh,
})


def _one_plus_exp(expr: sp.Expr) -> sp.Expr | None:
    """Return u if expr == 1 + exp(u) (in any term order), else None."""
    if isinstance(expr, sp.Add) and len(expr.args) == 2 and sp.S.One in expr.args:
        other = expr.args[0] if expr.args[1] == 1 else expr.args[1]
        if isinstance(other, sp.exp):
            return other.args[0]
    return None


def stabilise(expr: sp.Expr) -> sp.Expr:
    """Rewrite log(1 + exp(u)) -> softplus(u), 1/(1 + exp(-u)), exp(u)/(1 + exp(u)) ->
    sigmoid(u) and log(cosh(u)) -> logcosh(u)."""

    def rewrite(node: sp.Basic) -> sp.Basic:
        if isinstance(node, sp.log):
            if isinstance(node.args[0], sp.cosh):
                return logcosh(node.args[0].args[0])
            u = _one_plus_exp(node.args[0])
            if u is not None:
                return softplus(u)
        if isinstance(node, sp.Pow) and node.exp == -1:
            u = _one_plus_exp(node.base)
            if u is not None:
                return sigmoid(-u)
        if isinstance(node, sp.Mul):  # exp(u) * sigmoid(-u) (from exp(u)/(1 + exp(u))) -> sigmoid(u)
            factors = list(node.args)
            for fac in factors:
                if isinstance(fac, sigmoid) and sp.exp(-fac.args[0]) in factors:
                    rest = list(factors)
                    rest.remove(fac)
                    rest.remove(sp.exp(-fac.args[0]))
                    return sp.Mul(*rest) * sigmoid(-fac.args[0])
        return node

    return _bottom_up(expr, rewrite)


def _bottom_up(expr: sp.Basic, fn: Callable[[sp.Basic], sp.Basic]) -> sp.Basic:
    if not expr.args or isinstance(expr, (sp.Indexed, sp.Idx)):
        return expr
    args = [_bottom_up(a, fn) if isinstance(a, sp.Basic) else a for a in expr.args]
    if isinstance(expr, (sp.Sum,)):
        new = expr.func(args[0], *expr.limits)
    else:
        new = expr.func(*args) if args != list(expr.args) else expr
    return fn(new)
