"""What a problem's symbols declare about their values (SymPy assumptions such as positive=True).

SymPy simplifies with a declared assumption as soon as an expression is built: with
`nu = Symbol("nu", positive=True)`, `sqrt(x**2 + nu**2)` keeps nu, but `sqrt(nu**2)` is `nu`, and a
constant derived from it (L = 1 + 4 alpha / nu) is then wrong, even negative, for a nu < 0 that
the statement without the assumption would have treated as |nu|. So an assumption is a promise
about the values, and hypergen holds the user to it:

* data: every fact in `DATA_FACTS` a data symbol declares is recorded in the module's metadata
  and checked on the bound values (`runtime/validation.py`, `check_facts`); a declared fact
  hypergen cannot check on float64 values (prime, irrational, ...) is refused at build;
* x and theta: the solvers move them over all real values (no constraints), so any such fact is
  refused at build, naming the symbol.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import sympy as sp

from ..errors import ProblemError

__all__ = ["DATA_FACTS", "declared_facts", "refuse_variable_facts"]

#: Fact -> (test on a float64 array, what it says), for the facts a data symbol may declare.
DATA_FACTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]] = {
    "positive": (lambda a: a > 0, "> 0"),
    "negative": (lambda a: a < 0, "< 0"),
    "nonnegative": (lambda a: a >= 0, ">= 0"),
    "nonpositive": (lambda a: a <= 0, "<= 0"),
    "nonzero": (lambda a: a != 0, "!= 0"),
    "zero": (lambda a: a == 0, "== 0"),
    "integer": (lambda a: a == np.round(a), "an integer"),
    "even": (lambda a: a / 2 == np.round(a / 2), "an even integer"),
    "odd": (lambda a: (a - 1) / 2 == np.round((a - 1) / 2), "an odd integer"),
}

#: Facts that follow from another declared one (SymPy adds them): not checked twice.
_IMPLIED = {"positive": {"nonnegative", "nonzero"}, "negative": {"nonpositive", "nonzero"},
            "zero": {"nonnegative", "nonpositive", "integer", "even"}, "even": {"integer"},
            "odd": {"integer", "nonzero"}}

#: Facts every float64 value has, or that follow from DATA_FACTS (integer: rational, algebraic).
_HELD = frozenset({"commutative", "complex", "real", "finite", "hermitian"})
_IMPLIED_BY_INTEGER = frozenset({"rational", "algebraic"})


def _true_facts(obj: sp.Basic) -> set[str]:
    """The assumptions SymPy holds true of obj (a Symbol or an IndexedBase), the extended_
    forms left out (each follows from its finite form on finite values)."""
    facts = getattr(obj, "assumptions0", {})
    return {k for k, v in facts.items() if v is True and not k.startswith("extended_")}


def declared_facts(obj: sp.Basic, what: str) -> tuple[str, ...]:
    """The DATA_FACTS obj declares, in DATA_FACTS order; ProblemError naming obj for a
    declared fact bind could not check."""
    true = _true_facts(obj)
    implied = set().union(*(_IMPLIED.get(k, set()) for k in true))
    checked = tuple(k for k in DATA_FACTS if k in true and k not in implied)
    held = _HELD | (_IMPLIED_BY_INTEGER if "integer" in true else frozenset())
    unchecked = sorted(true - set(DATA_FACTS) - held)
    if unchecked:
        raise ProblemError(f"{what} declares {', '.join(f'{k}=True' for k in unchecked)}: bind "
                           f"can check only {', '.join(DATA_FACTS)} on float64 data; drop the "
                           f"others (SymPy would simplify the problem with them)")
    return checked


def refuse_variable_facts(obj: sp.Basic, what: str) -> None:
    """ProblemError naming obj (x or theta, or one of their Symbols) when it declares a fact
    beyond real=True: the solvers move x and theta over all real values, and SymPy has already
    simplified the problem with the fact (sqrt(x**2) is x when x is positive)."""
    true = _true_facts(obj) - _HELD - _IMPLIED_BY_INTEGER
    if true:
        raise ProblemError(f"{what} declares {', '.join(f'{k}=True' for k in sorted(true))}: x "
                           f"and theta range over all real values (hypergen has no constraints), "
                           f"and SymPy simplifies with such a fact (sqrt(u**2) becomes u for a "
                           f"positive u); declare it with real=True at most")
