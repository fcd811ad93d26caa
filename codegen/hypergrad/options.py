"""The options of one hypergradient, validated once (docs/solvers.md 4).

`HypergradientOptions.make(options, **overrides)` is how every entry point reads its options:
an unknown keyword is refused with its name (SciPy's convention), a solver name is checked by
the registry, and combinations that cannot be answered (backprop with a gradient-free lower
solver, or with an accuracy target it has no bound for) are refused here, before any work.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from .common import DEFAULT_MAX_ITER, SolverError
from .registry import ADJOINT, AUTO, LOWER, check_adjoint_name, check_lower_name

__all__ = ["HypergradientOptions", "DEFAULT_LOWER", "DEFAULT_ADJOINT", "CERTIFICATES", "DEFAULTS"]

#: The certificates a hypergradient can report (docs/bounds.md 15 for "dwr" and "tight", 15.8
#: for "block").
CERTIFICATES = ("er", "dwr", "tight", "block", "auto")

#: The default solvers: chosen from the problem's structure and size (`codegen.hypergrad.auto`).
DEFAULT_LOWER = AUTO
DEFAULT_ADJOINT = AUTO


@dataclass(frozen=True)
class HypergradientOptions:
    """How to compute one hypergradient.

    lower, adjoint    solver names (registry) or "auto";
    eps, delta        certified lower accuracy G/mu <= eps, absolute true adjoint residual;
    max_iter          caps the lower solve (Newton: its work), adjoint_max_iter (default
                      max_iter) the adjoint;
    record            keep the solvers' per-iteration histories;
    refine_iter       CG steps (HVPs) that sharpen the certified ||x_eps - x*|| (0: e = G/mu);
    rtol, atol        ask for bound <= atol + rtol ||grad|| instead: eps and delta are then only
                      the first round's tolerances (`codegen.hypergrad.accuracy`);
    certificate       "er" (E&R's bound, docs/framework.md 7), "dwr" (the corrected h_c with
                      its product bound, docs/bounds.md 15: one forward and one dual solve per
                      certified component; where it does not apply, E&R's with a note) or
                      "tight" (the plain h with the bound |h - h_c| + bound(h_c), docs/bounds.md
                      15.6: within a few times h's true error; one forward and one dual
                      solve per hyperparameter up to `correction.MAX_COMPONENTS`, above it
                      "block"'s) or "block" (the same bound from the block correction: two
                      solves for every component, docs/bounds.md 15.8) or "auto" (the
                      default, docs/bounds.md 15.6: with rtol or atol, the tight or block
                      bound where it applies and its price over E&R's work is small: "tight"
                      with a first-order or CG lower solver (gd, hb, fista, cg), with Newton
                      and an iterative adjoint for one hyperparameter, and with the direct
                      adjoint where g is not quadratic; "block" with Newton and an iterative
                      adjoint for more and with any of them above
                      `correction.MAX_COMPONENTS`; "er" otherwise, and always at fixed eps
                      and delta);
    components        with "dwr": True certifies every component, False only the component along
                      h (one pair of solves); None: every component up to
                      `correction.MAX_COMPONENTS` hyperparameters.
    """

    lower: str = DEFAULT_LOWER
    adjoint: str = DEFAULT_ADJOINT
    eps: float = 1e-6
    delta: float = 1e-6
    max_iter: int = DEFAULT_MAX_ITER
    adjoint_max_iter: int | None = None
    record: bool = False
    refine_iter: int = 10
    rtol: float | None = None
    atol: float = 0.0
    certificate: str = "auto"
    components: bool | None = None

    def __post_init__(self) -> None:
        self._check(_FIELD_ORDER)

    def _check(self, names: Any) -> None:
        """SolverError unless the fields `names` (and the combinations they take part in) are
        valid; the rest was checked when this object's source was made. The checks run in the
        fields' declared order, so the first invalid field named is the same whatever the order
        of the keywords."""
        for check in _plan(tuple(names)):
            check(self)

    def evolve(self, **changes: Any) -> HypergradientOptions:
        """dataclasses.replace(self, **changes) with only the changed fields checked (and the
        combinations they enter): the same errors, without re-checking what this object's
        own construction checked. The options are frozen, and a hypergradient derives the same
        few from the same source at every call (the solvers "auto" chose, the certificate,
        each accuracy round's tolerances): each is made once per source and changes' names,
        types and values and shared after that. Only values of the plain types (float, int,
        bool, str, None) are keys, and no -0.0: 1, 1.0 and True, or 0.0 and -0.0, are equal
        keys but not equal options (-0.0 prints as "-0"); other values (refused by the
        checks, or a caller's own type) are made afresh every time."""
        return self._derived(changes)

    def _derived(self, changes: dict[str, Any]) -> HypergradientOptions:
        """evolve(**changes), the changes as a dict (`make` passes its keywords as they are)."""
        values = tuple(changes.values())
        types = tuple(map(type, values))
        if not _PLAIN.issuperset(types) or (0.0 in values and _negative_zero(values)):
            return self._changed(changes)
        key = (tuple(changes), types, values)
        entry = _DERIVED.get(id(self))
        made = None if entry is None else entry[1].get(key)
        if made is None:
            made = self._changed(changes)
            if entry is None:
                if len(_DERIVED) >= _DERIVED_MAX:
                    _DERIVED.clear()
                entry = _DERIVED[id(self)] = (self, {})
            elif len(entry[1]) >= _DERIVED_MAX:
                entry[1].clear()
            entry[1][key] = made
        return made

    def _changed(self, changes: dict[str, Any]) -> HypergradientOptions:
        """A new options object: self with `changes`, the changed fields checked."""
        if not changes.keys() <= _FIELDS:
            raise SolverError(f"unknown options {sorted(set(changes) - _FIELDS)}")
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        new._check(changes)
        return new

    @classmethod
    def make(cls, options: HypergradientOptions | None = None,
             **overrides: Any) -> HypergradientOptions:
        """options (default: the defaults) with keyword overrides; an unknown keyword raises
        SolverError naming it."""
        if options is not None and not isinstance(options, cls):
            raise SolverError(f"options must be a HypergradientOptions, got {options!r} "
                              "(pass solver names by keyword: lower=..., adjoint=...)")
        if not overrides.keys() <= _FIELDS:
            unknown = sorted(set(overrides) - _FIELDS)
            raise SolverError(f"unknown option{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))} for the hypergradient; the "
                              f"options are {', '.join(sorted(_FIELDS))}")
        base = options if options is not None else (
            DEFAULTS if cls is HypergradientOptions else cls())
        return base._derived(overrides) if overrides else base

    @property
    def targets_accuracy(self) -> bool:
        """rtol or atol asks for a certified accuracy (rounds of `codegen.hypergrad.accuracy`)."""
        return self.rtol is not None or bool(self.atol)

    @property
    def adjoint_cap(self) -> int:
        return int(self.max_iter if self.adjoint_max_iter is None else self.adjoint_max_iter)

    @property
    def is_auto(self) -> bool:
        return AUTO in (self.lower, self.adjoint)


_FIELD_ORDER = tuple(f.name for f in fields(HypergradientOptions))
_FIELDS = frozenset(_FIELD_ORDER)

#: The fields whose combination with adjoint="backprop" is refused.
_COMBINED = frozenset({"lower", "adjoint", "rtol", "atol"})


def _is_real(value: Any) -> bool:
    """A real number; plain floats and ints skip the ABC check, which costs microseconds on
    every round of an accuracy loop."""
    return type(value) in (float, int) or isinstance(value, numbers.Real)


def _tolerance(name: str) -> Callable[[HypergradientOptions], object]:
    def check(opts: HypergradientOptions) -> None:
        value = getattr(opts, name)
        # A negative tolerance can never be met: eps < 0 ended as "lower direct diverged".
        if not _is_real(value) or math.isnan(value) or value < 0:
            raise SolverError(f"{name} must be a number >= 0, got {value!r}")
    return check


def _check_rtol(opts: HypergradientOptions) -> None:
    """None (fixed eps and delta) or a real number: its value, with atol's, is checked where
    the rounds start (accuracy.check_targets: finite, >= 0, not both 0)."""
    if opts.rtol is not None and not _is_real(opts.rtol):
        raise SolverError(f"rtol must be a number or None, got {opts.rtol!r}")


def _check_components(opts: HypergradientOptions) -> None:
    if opts.components is not None and not isinstance(opts.components, (bool, np.bool_)):
        raise SolverError(f"components must be True, False or None, got {opts.components!r}")


def _count(name: str) -> Callable[[HypergradientOptions], object]:
    def check(opts: HypergradientOptions) -> None:
        value = getattr(opts, name)
        if name == "adjoint_max_iter" and value is None:  # None: max_iter's
            return
        if (not _is_real(value) or not math.isfinite(value)
                or not float(value).is_integer() or value < 0):
            raise SolverError(f"{name} must be a non-negative integer, got {value!r}")
    return check


def _check_certificate(opts: HypergradientOptions) -> None:
    if opts.certificate not in CERTIFICATES:
        raise SolverError(f"certificate must be one of {', '.join(map(repr, CERTIFICATES))}, "
                          f"got {opts.certificate!r}")


def _check_backprop(opts: HypergradientOptions) -> None:
    """adjoint="backprop" needs a lower solver with a trajectory and no accuracy target."""
    entry = ADJOINT.get(opts.adjoint)
    if entry is None or not entry.backprop:
        return
    lower = LOWER.get(opts.lower)
    if opts.lower != AUTO and (lower is None or not lower.keeps_trajectory):
        raise SolverError("adjoint='backprop' needs lower='gd' or 'hb' (reverse mode "
                          f"through the stored trajectory), not lower={opts.lower!r}")
    if opts.targets_accuracy:
        raise SolverError("rtol/atol steer the solvers by the certified bound, and "
                          "adjoint='backprop' has none; use adjoint='cg', 'gd' or 'hb'")


#: Each field's own check, in the order they run (rtol: codegen.hypergrad.accuracy).
_CHECKS: tuple[tuple[str, Callable[[HypergradientOptions], object]], ...] = (
    ("lower", lambda opts: check_lower_name(opts.lower, allow_auto=True)),
    ("adjoint", lambda opts: check_adjoint_name(opts.adjoint, allow_auto=True)),
    ("eps", _tolerance("eps")),
    ("delta", _tolerance("delta")),
    ("rtol", _check_rtol),
    ("atol", _tolerance("atol")),
    ("max_iter", _count("max_iter")),
    ("refine_iter", _count("refine_iter")),
    ("adjoint_max_iter", _count("adjoint_max_iter")),
    ("certificate", _check_certificate),
    ("components", _check_components),
)


@lru_cache(maxsize=256)
def _plan(names: tuple[str, ...]) -> tuple[Callable[[HypergradientOptions], object], ...]:
    """The checks that changing the fields `names` calls for, in their order (the options of
    one hypergradient change the same few sets of fields at every call)."""
    checks = tuple(check for name, check in _CHECKS if name in names)
    return checks + ((_check_backprop,) if not _COMBINED.isdisjoint(names) else ())


#: The default options, made (and checked) once: frozen, so `make` shares them.
DEFAULTS = HypergradientOptions()

#: The options `evolve` derived, by their source's id (the source is kept with them, so that
#: its id is not reused while they are): at most _DERIVED_MAX sources of _DERIVED_MAX each.
_DERIVED: dict[int, tuple[HypergradientOptions, dict[tuple[Any, ...], HypergradientOptions]]] = {}
_DERIVED_MAX = 64

#: The types whose equal values make equal options (up to the sign of a zero float).
_PLAIN = frozenset({float, int, bool, str, type(None)})


def _negative_zero(values: tuple[Any, ...]) -> bool:
    """Whether a -0.0 is among values (a loop: a generator costs twice as much here)."""
    for v in values:
        if v == 0.0 and type(v) is float and math.copysign(1.0, v) < 0:
            return True
    return False

