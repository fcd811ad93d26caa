"""The loop-nest IR: plain, immutable data shared by every stage after the problem statement.

A `Program` is a straight-line list of `Statement`s over named `Array`s. A statement is a loop
nest (run-time bounds in the size symbols) whose body applies one or more `Update`s
`target[index] op= expr`, where `expr` is a scalar SymPy expression whose reads are
`Indexed(IndexedBase(name), *index)` (arrays) or `Symbol(name)` (scalars). Every target is zeroed
(or set to -inf for a max) at kernel entry and only accumulated afterwards, which makes the
derivative transforms (autodiff.py) and fusion (passes.py) simple and order-independent.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import sympy as sp

# Array roles. Inputs are read-only kernel arguments; outputs and temporaries are accumulated.
# A cache array is a temporary of the HVP that depends on x but not on v: the prepared HVP
# writes it once per x (lower_hvp_prepare) and reads it for every v (lower_hvp_apply).
DATA, X, THETA, INPUT, TEMP, OUTPUT, CACHE = "data", "x", "theta", "input", "temp", "output", "cache"


@dataclass(frozen=True)
class Array:
    name: str
    shape: tuple[sp.Expr, ...]  # SymPy extents in the size symbols; () for a scalar
    role: str
    differentiable: bool = True  # False for the max of a log-sum-exp (its total derivative is 0)
    sparse: bool = False  # CSR data: loops over its second index visit only the stored entries

    @property
    def is_scalar(self) -> bool:
        return self.shape == ()


def extent(array: Array) -> sp.Expr:
    """The number of entries of `array` (1 for a scalar): the product of its dimensions, each
    clamped at 0 unless the sizes (integers >= 1) prove it nonnegative. A temporary over the
    rows of a sum whose range is empty at small sizes (i in 0..n-3 at n = 1) has n - 2 entries
    by its formula; as a work offset, a memset length or an OpenMP array section, -1 reached
    outside the buffer and crashed the interpreter."""
    dims = [d if sp.sympify(d).is_nonnegative else sp.Max(0, d) for d in array.shape]
    return sp.Mul(*dims)


@dataclass(frozen=True)
class Loop:
    var: sp.Symbol  # integer Symbol named after the user's Idx
    lo: sp.Expr
    hi: sp.Expr  # inclusive, like SymPy's Sum limits


@dataclass(frozen=True)
class Update:
    target: str
    index: tuple[sp.Expr, ...]  # storage coordinates, affine in loop variables
    expr: sp.Expr
    op: str = "+"  # "+" accumulates, "max" takes the running maximum


@dataclass(frozen=True)
class Statement:
    loops: tuple[Loop, ...]
    updates: tuple[Update, ...]


@dataclass
class Program:
    arrays: dict[str, Array]  # name -> Array
    statements: list[Statement]
    outputs: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def with_statements(self, statements: Iterable[Statement],
                        outputs: Iterable[str] | None = None) -> Program:
        return replace(self, statements=list(statements),
                       outputs=self.outputs if outputs is None else tuple(outputs))


def read(array: Array, index: tuple[sp.Expr, ...]) -> sp.Expr:
    """The SymPy expression that reads `array` at `index` inside a statement body."""
    if array.is_scalar:
        return sp.Symbol(array.name, real=True)
    return sp.Indexed(sp.IndexedBase(array.name), *index)


def reads_of(expr: sp.Expr, arrays: dict[str, Array]) -> list[sp.Expr]:
    """Distinct reads (Indexed or scalar Symbols naming an array) in `expr`, in a stable order.

    Every pass asks this of the same few hundred (often huge) update expressions again and again,
    so the tree walk and the sort are done once per expression (`_read_candidates`) and only the
    filter by `arrays` runs per call.
    """
    return [node for node, name, indexed in _read_candidates(expr)
            if name in arrays and (indexed or arrays[name].is_scalar)]


@functools.lru_cache(maxsize=4096)
def _read_candidates(expr: sp.Expr) -> tuple[tuple[sp.Expr, str, bool], ...]:
    """Every Indexed and Symbol node of `expr` as (node, array name, is Indexed), sorted by
    `sp.default_sort_key` (a subset of a sorted list stays sorted, so `reads_of` filters it).

    The walk visits each distinct subexpression once: derivatives share subtrees heavily, and
    `sp.preorder_traversal` would walk every shared copy again.
    """
    found: list[tuple[sp.Expr, str, bool]] = []
    seen: set[sp.Basic] = set()
    stack: list[sp.Basic] = [expr]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if isinstance(node, sp.Indexed):
            found.append((node, str(node.base.label), True))
        elif isinstance(node, sp.Symbol):
            found.append((node, node.name, False))
        stack.extend(node.args)
    return tuple(sorted(found, key=lambda c: sp.default_sort_key(c[0])))


@functools.lru_cache(maxsize=4096)
def free_symbols(expr: sp.Expr) -> frozenset[sp.Basic]:
    """`expr.free_symbols`, computed once per expression (SymPy recomputes it on every access)."""
    return frozenset(expr.free_symbols)


def xreplace(expr: sp.Expr, rule: dict[Any, Any]) -> sp.Expr:
    """`expr.xreplace(rule)`, rebuilding each distinct subexpression once.

    SymPy's xreplace walks the expression as a tree, so a subtree shared many times (derivative
    bodies share theirs heavily) is walked and rebuilt once per occurrence. This walks the same
    nodes in the same way (a node changes when a rule fires below it, and is then rebuilt with
    `func(*args)`), so the result is the same expression.
    """
    memo: dict[sp.Basic, tuple[sp.Basic, bool]] = {}

    def walk(node: sp.Basic) -> tuple[sp.Basic, bool]:
        if node in rule:
            return rule[node], True
        done = memo.get(node)
        if done is None:
            parts = [walk(a) if isinstance(a, sp.Basic) else (a, False) for a in node.args]
            changed = any(c for _, c in parts)
            done = (node.func(*[a for a, _ in parts]), True) if changed else (node, False)
            memo[node] = done
        return done

    return walk(expr)[0] if rule else expr


def read_name(r: sp.Expr) -> str:
    return str(r.base.label) if isinstance(r, sp.Indexed) else r.name


def read_index(r: sp.Expr) -> tuple[sp.Expr, ...]:
    return tuple(r.indices) if isinstance(r, sp.Indexed) else ()

