"""The C99 printer for scalar statement bodies: strict, allow-listed, readable.

It prints only Sum-free scalar expressions (the lowering lifted every Sum), flattens array reads
to row-major offsets using the IR's shapes, expands small integer powers into products and
refuses any function outside `primitives.ALLOWED_FUNCTIONS` instead of emitting a comment.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sympy as sp
from sympy.printing.c import C99CodePrinter

from ...errors import ProblemError
from ...primitives import ALLOWED_FUNCTIONS, logcosh, sigmoid, softplus
from .. import ir

_C_FUNCTION = {softplus: "hg_softplus", sigmoid: "hg_sigmoid", logcosh: "hg_logcosh"}


class KernelPrinter(C99CodePrinter):
    """C99 printer that knows the program's arrays (for flat indexing) and read placeholders."""

    def __init__(self, arrays: dict[str, ir.Array],
                 placeholders: dict[str, str] | None = None) -> None:
        # No M_PI-style macros: they are POSIX, not C99; constants print as 17-digit literals.
        super().__init__({"strict": True, "math_macros": {}})
        self.arrays = arrays
        self.placeholders = placeholders or {}

    def flat_index(self, name: str, index: Iterable[sp.Expr]) -> sp.Expr:
        shape = self.arrays[name].shape
        flat, stride = sp.Integer(0), sp.Integer(1)
        for extent, idx in zip(reversed(shape), reversed(tuple(index))):
            flat += sp.sympify(idx) * stride
            stride *= extent
        return sp.expand(flat)

    def doprint(self, expr: sp.Expr, assign_to: Any = None) -> str:
        """Print, refusing any function outside the allow-list (SymPy would print tgamma...)."""
        for node in sp.preorder_traversal(expr):
            if isinstance(node, sp.core.function.Application) and not isinstance(node, sp.Indexed) \
                    and type(node) not in ALLOWED_FUNCTIONS:
                raise ProblemError(f"cannot print {node}: {type(node).__name__} is not among the "
                                   f"supported functions")
        code: str = super().doprint(expr, assign_to)
        return code

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        name = str(expr.base.label)
        return f"{name}[{self.index_code(self.flat_index(name, expr.indices))}]"

    def index_code(self, expr: sp.Expr) -> str:
        """Integer index arithmetic: printed without floating-point literals or pow()."""
        code: str = IndexPrinter().doprint(expr)
        return code

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        if expr.name in self.placeholders:
            return self.placeholders[expr.name]
        code: str = super()._print_Symbol(expr)
        return code

    def _print_Pow(self, expr: sp.Pow) -> str:
        base, exp = expr.base, expr.exp
        if exp.is_Integer and 2 <= abs(int(exp)) <= 4:
            b = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Mul"] + 1)
            prod = "*".join([b] * abs(int(exp)))
            # Parenthesised: SymPy's Mul printer puts a Pow after "/" as if it were atomic.
            return f"({prod})" if exp > 0 else f"(1.0/({prod}))"
        if exp.is_Rational and exp.q == 2 and (exp.p == -1 or 3 <= abs(exp.p) <= 7):
            # x^(3/2) = x*sqrt(x), x^(-1/2) = 1/sqrt(x): pow() is a libm call the loop cannot
            # vectorise; the smoothed-TV HVP at 256 x 256 spent most of its 1.6 ms in it.
            b = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Mul"] + 1)
            prod = "*".join([b] * (abs(exp.p) // 2) + [f"sqrt({self._print(base)})"])
            return f"({prod})" if exp > 0 else f"(1.0/({prod}))"
        code: str = super()._print_Pow(expr)
        return code

    def _print_Function(self, expr: sp.Function) -> str:
        name = _C_FUNCTION.get(type(expr))
        if name is not None:
            return f"{name}({self._print(expr.args[0])})"
        code: str = super()._print_Function(expr)
        return code

    def _print_Sum(self, expr: sp.Sum) -> str:
        raise ProblemError(f"internal: a Sum reached the C printer unlifted: {expr}")

    def _print_NumberSymbol(self, expr: sp.NumberSymbol) -> str:
        return repr(float(expr))

    _print_Pi = _print_Exp1 = _print_EulerGamma = _print_GoldenRatio = _print_Catalan = _print_NumberSymbol

    def _print_Rational(self, expr: sp.Rational) -> str:
        return f"{float(expr.p)!r}/{float(expr.q)!r}".replace("inf", "INFINITY")

    def _print_Integer(self, expr: sp.Integer) -> str:
        return f"{int(expr)}.0" if abs(int(expr)) < 2**53 else f"{float(expr)!r}"


class IndexPrinter(C99CodePrinter):
    """Integer size, offset and index arithmetic (over int64_t sizes and indices).

    A power of a size, n**2 of an (n, n) variable, prints as the product (n*n): SymPy's pow(n, 2)
    is a double, which made `pointer + pow(n, 2)` fail to compile and work_size round through
    floating point above 2**53.
    """

    def __init__(self) -> None:
        super().__init__({"strict": True})

    def _print_Max(self, expr: sp.Max) -> str:
        """max(a, b, ...) of integers as nested conditionals (fmax would be a double):
        `ir.extent`'s clamp, (n - 2 > 0 ? n - 2 : 0)."""
        code: str = self._print(expr.args[0])
        for arg in expr.args[1:]:
            other: str = self._print(arg)
            code = f"({other} > {code} ? {other} : {code})"
        return code

    def _print_Pow(self, expr: sp.Pow) -> str:
        base, exp = expr.base, expr.exp
        if not (exp.is_Integer and exp > 0):
            raise ProblemError(f"cannot print {expr} as integer C: the exponent of an index or "
                               f"size expression must be a positive integer")
        b = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Mul"] + 1)
        return "(" + "*".join([b] * int(exp)) + ")"


def print_expr(expr: sp.Expr, arrays: dict[str, ir.Array],
               placeholders: dict[str, str] | None = None) -> str:
    try:
        return KernelPrinter(arrays, placeholders).doprint(expr)
    except sp.printing.codeprinter.PrintMethodNotImplementedError as exc:
        raise ProblemError(f"cannot print {expr} as C: {exc}") from None
