"""The preconditioner a learning run holds for each of its kernels (docs/solvers.md 8).

While a run lasts (`holding`, entered by `learn/driver.py`), the Newton-CG directions and the
adjoint CG of a kernel with enough data (HELD_MIN_DATA) are preconditioned by what the run
holds for it (`held_for`):

    x entries                                  held
    at most FACTOR_MAX_SIZE, with n^2 at most  the Hessian's factor (held_factor.HeldFactor),
    the data's numbers (so that a triangular   assembled once the steps it would save have
    solve costs less than an HVP)              cost its price; from DEFLATION_MIN_SIZE on a
                                               deflation preconditions until then
    otherwise, DEFLATION_MIN_SIZE to           a deflation of A's smallest eigenvalues
    DEFLATION_MAX_SIZE                         (deflation.Deflation)

Both run CG in Python (`krylov.cg` with `precondition`), so with little data, where an HVP
costs little more than a Python step, nothing is held and the solves stay in the fused C loops.
Nothing is held outside a run: a single hypergradient call is the same with or without a run
before it.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Union

from .deflation import DEFLATION_MAX_SIZE, DEFLATION_MIN_SIZE, Deflation
from .dense import theta_part
from .fused import data_per_entry
from .held_factor import HeldFactor

__all__ = ["HELD_MIN_DATA", "FACTOR_MAX_SIZE", "Held", "holding", "held_for"]

#: Least data (numbers, nonzeros for sparse data) for a run to hold a preconditioner: its
#: Python steps (and the deflation's Rayleigh-Ritz step) must weigh little next to an HVP. On
#: hypercleaning with digits (x of 650 entries, 75,000 numbers of data) a learning run took
#: 1.5-2.1x the time with a deflation, for the same HVPs per solve.
HELD_MIN_DATA = 1 << 18

#: Largest x for a held factor: 8 n^2 bytes (32 MB) and n^3 / 3 flops per assembly.
FACTOR_MAX_SIZE = 2048

Held = Union[Deflation, HeldFactor]

_HELD: weakref.WeakKeyDictionary[Any, Held] = weakref.WeakKeyDictionary()


def _preconditioner_for(k: Any) -> Held | None:
    """A fresh preconditioner of the kind k calls for, or None (no x size, too little data, or
    x too large for either). A kernel that is not a bound problem counts as having much data."""
    n = getattr(k, "x_size", None)
    numbers = data_per_entry(k) * n if isinstance(n, int) else 0.0
    if not isinstance(n, int) or numbers < HELD_MIN_DATA:
        return None
    deflation = Deflation() if DEFLATION_MIN_SIZE <= n <= DEFLATION_MAX_SIZE else None
    if n <= FACTOR_MAX_SIZE and n * n <= numbers:
        return HeldFactor(deflation, theta_part(k), getattr(k, "hvp_pair_at", None))
    return deflation


@contextmanager
def holding(kernels: list[Any]) -> Iterator[None]:
    """Hold a preconditioner for each kernel of a learning run that calls for one, for the
    duration of the block."""
    added = []
    for k in kernels:
        held = _preconditioner_for(k)
        if held is None:
            continue
        try:
            if k not in _HELD:
                _HELD[k] = held
                added.append(k)
        except TypeError:  # not weakly referenceable: nothing is held for it
            continue
    try:
        yield
    finally:
        for k in added:
            _HELD.pop(k, None)


def held_for(k: Any) -> Held | None:
    """The preconditioner a run holds for kernel k, else None."""
    try:
        return _HELD.get(k)
    except TypeError:
        return None
