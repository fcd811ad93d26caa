"""The solvers by name: one entry per solver, with what it needs and what it supports.

This is the one place where solver names are known and checked. Adding a lower solver is one
module in `lower/` (a function LowerTask -> LowerResult) and one line here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .adjoint import direct as adjoint_direct
from .adjoint import krylov as adjoint_krylov
from .common import AdjointTask, LowerTask, SolverError
from .lower import cg as lower_cg
from .lower import direct as lower_direct
from .lower import fista, gradient, newton
from .results import AdjointResult, LowerResult

__all__ = ["LowerEntry", "AdjointEntry", "LOWER", "ADJOINT", "LOWER_SOLVERS", "ADJOINT_SOLVERS",
           "AUTO", "LOWER_CHOICES", "ADJOINT_CHOICES", "lower_entry", "adjoint_entry",
           "check_lower_name", "check_adjoint_name"]

#: The name that asks `codegen.hypergrad.auto` to choose the solver from the problem.
AUTO = "auto"


@dataclass(frozen=True)
class LowerEntry:
    """A lower solver and its needs.

    needs_quadratic  only for a constant Hessian (k.is_quadratic);
    needs_finite_L   takes a step size from L (an infinite global L is replaced by L on a ball
                     around x0 by the hypergradient, docs/bounds.md 4);
    keeps_trajectory can store x_0..x_K for adjoint="backprop".
    """

    solve: Callable[[LowerTask], LowerResult]
    needs_quadratic: bool = False
    needs_finite_L: bool = False
    keeps_trajectory: bool = False


@dataclass(frozen=True)
class AdjointEntry:
    """An adjoint solver and its needs. backprop has no `solve` of this form: it runs through
    `backprop_adjoint` on the stored lower trajectory and has no certified bound."""

    solve: Callable[[AdjointTask], AdjointResult] | None
    needs_finite_L: bool = False
    backprop: bool = False


LOWER: dict[str, LowerEntry] = {
    "gd": LowerEntry(gradient.solve_gd, needs_finite_L=True, keeps_trajectory=True),
    "hb": LowerEntry(gradient.solve_hb, needs_finite_L=True, keeps_trajectory=True),
    "fista": LowerEntry(fista.solve_fista, needs_finite_L=True),
    "cg": LowerEntry(lower_cg.solve_cg, needs_quadratic=True),
    "newton": LowerEntry(newton.solve_newton),
    "direct": LowerEntry(lower_direct.solve_direct),
}

ADJOINT: dict[str, AdjointEntry] = {
    "cg": AdjointEntry(adjoint_krylov.solve_cg),
    "gd": AdjointEntry(adjoint_krylov.solve_gd, needs_finite_L=True),
    "hb": AdjointEntry(adjoint_krylov.solve_hb, needs_finite_L=True),
    "direct": AdjointEntry(adjoint_direct.solve_direct),
    "backprop": AdjointEntry(None, backprop=True),
}

LOWER_SOLVERS = tuple(LOWER)
ADJOINT_SOLVERS = tuple(ADJOINT)

#: What `hypergradient` accepts as lower= and adjoint=: the solvers and "auto".
LOWER_CHOICES = LOWER_SOLVERS + (AUTO,)
ADJOINT_CHOICES = ADJOINT_SOLVERS + (AUTO,)


def check_lower_name(name: str, allow_auto: bool = False) -> str:
    """name if it is a lower solver (or "auto" where allowed), else SolverError."""
    if name in LOWER or (allow_auto and name == AUTO):
        return name
    choices = LOWER_CHOICES if allow_auto else LOWER_SOLVERS
    raise SolverError(f"unknown lower solver {name!r}; choose from {choices}")


def check_adjoint_name(name: str, allow_auto: bool = False) -> str:
    """name if it is an adjoint solver (or "auto" where allowed), else SolverError."""
    if name in ADJOINT or (allow_auto and name == AUTO):
        return name
    choices = ADJOINT_CHOICES if allow_auto else ADJOINT_SOLVERS
    raise SolverError(f"unknown adjoint solver {name!r}; choose from {choices}")


def lower_entry(name: str) -> LowerEntry:
    return LOWER[check_lower_name(name)]


def adjoint_entry(name: str) -> AdjointEntry:
    return ADJOINT[check_adjoint_name(name)]
