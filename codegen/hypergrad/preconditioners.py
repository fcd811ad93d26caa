"""The preconditioner a learning run holds for each of its kernels (docs/solvers.md 8).

While a run lasts (`holding`, entered by `learn/driver.py`), the Newton-CG directions and the
adjoint CG of a kernel are preconditioned by what the run holds for it (`held_for`):

    x entries and data                         held
    at most FACTOR_MAX_SIZE entries, n^2 at    the Hessian's factor (held_factor.HeldFactor),
    most the data's numbers (a triangular      assembled once the steps it would save have
    solve costs less than an HVP), and at      cost its price; where a deflation is held too,
    least FACTOR_MIN_DATA numbers              it preconditions until then
    DEFLATION_MIN_SIZE to DEFLATION_MAX_SIZE   a deflation of A's smallest eigenvalues
    entries, at least DEFLATION_MIN_DATA       (deflation.Deflation)

Both run CG in Python (`krylov.cg` with `precondition`), so with little data, where an HVP
costs little more than a Python step, nothing is held and the solves stay in the fused C loops.
The factor needs less data than the deflation: with it a solve takes a few Python steps, not
tens, and no Rayleigh-Ritz step follows. Nothing is held outside a run: a single hypergradient
call is the same with or without a run before it.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Union

from .deflation import DEFLATION_MAX_SIZE, DEFLATION_MIN_SIZE, Deflation
from .dense import theta_part
from .fused import data_per_entry
from .gram import gram_at, gram_price
from .held_factor import HeldFactor

__all__ = ["DEFLATION_MIN_DATA", "FACTOR_MIN_DATA", "FACTOR_MAX_SIZE", "Held", "holding",
           "held_for"]

#: Least data (numbers, nonzeros for sparse data) for a run to hold a deflation: its Python
#: steps and Rayleigh-Ritz step must weigh little next to an HVP. On hypercleaning with digits
#: (x of 650 entries, 75,000 numbers of data) a learning run took 1.5-2.1x the time with a
#: deflation, for the same HVPs per solve.
DEFLATION_MIN_DATA = 1 << 18
#: Least data for a held factor. One weight per feature (logistic_weights, theta0 = 0, seeds
#: 0-2, one thread): 9,000 numbers (200 x 30, p = 100) took the same time with it or without,
#: 18,000 (300 x 40, p = 150) 0.78x, 40,000 (500 x 50, p = 300) 0.59x, 150,000 (1000 x 100,
#: p = 500) 0.51x; 3,000-7,000 took 1.2-1.4x.
FACTOR_MIN_DATA = 1 << 14

#: Largest x for a held factor: 8 n^2 bytes (32 MB) and n^3 / 3 flops per assembly.
FACTOR_MAX_SIZE = 2048

Held = Union[Deflation, HeldFactor]

_HELD: weakref.WeakKeyDictionary[Any, Held] = weakref.WeakKeyDictionary()


def _preconditioner_for(k: Any) -> Held | None:
    """A fresh preconditioner of the kind k calls for, or None (no x size, too little data, or
    x too large for either). A kernel that is not a bound problem counts as having much data."""
    n = getattr(k, "x_size", None)
    if not isinstance(n, int):
        return None
    numbers = data_per_entry(k) * n
    deflation = (Deflation() if DEFLATION_MIN_SIZE <= n <= DEFLATION_MAX_SIZE
                 and numbers >= DEFLATION_MIN_DATA else None)
    if n <= FACTOR_MAX_SIZE and n * n <= numbers and numbers >= FACTOR_MIN_DATA:
        part = theta_part(k)
        gram = gram_at(k, part) if gram_price(n) < n else None  # else n HVPs cost less
        return HeldFactor(deflation, part, getattr(k, "hvp_pair_at", None), gram)
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
