"""lower="auto" and adjoint="auto", the defaults: solvers chosen from the problem's structure,
size and, where the choice hinges on it, its condition number L/mu at theta (docs/solvers.md 3).

    lower   g quadratic (k.is_quadratic), x_size <= QUADRATIC_DIRECT_MAX  "direct"
            g quadratic with a Gram form, x_size <= GRAM_DIRECT_MAX       "direct"
            ... x_size <= DIRECT_MAX_SIZE and the bind kept A^T A         "direct"
            g quadratic                                                  "cg"
            g not quadratic, x_size <= NONQUADRATIC_DIRECT_MAX           "direct"
            g not quadratic, a cheap kernel with fused loops (`cheap_fused`),
              x_size <= FISTA_MAX_SIZE and L/mu <= FISTA_KAPPA_MAX at theta  "fista"
            g not quadratic, an HVP kernel                               "newton"
            no HVP kernel                                                "fista"
    adjoint lower is "direct" (the factor is shared), or
            x_size <= ADJOINT_DIRECT_MAX                                 "direct"
            otherwise                                                    "cg"

With adjoint="backprop" (a stored trajectory) lower "auto" is "gd". The thresholds are measured
(docs/solvers.md 3): one factorisation serves a quadratic g's lower solve and adjoint, so it
pays up to about 150 entries, and up to GRAM_DIRECT_MAX where the Hessian is A^T diag(w) A
plus the theta terms' (`gram.py`: one BLAS product per bind instead of n HVPs), and up to
the direct solvers' DIRECT_MAX_SIZE where the data constants at theta formed A^T A and the
bind kept it (the product then costs nothing more: ridge 20000 x 2000 took 1.14 s for the first
call against CG's 1.51 s, and 0.15 s at the next theta against 0.50, two threads); a
non-quadratic g needs a new factor at every Newton step, so there it pays only for a handful
of entries, and Newton-CG (no L needed, quadratic convergence near x*) takes over. FISTA's
iterations grow like sqrt(L/mu) and Newton-CG's much less, but a Newton step costs a few
Python-to-C round trips where FISTA runs whole in one fused C call: on a well-conditioned
problem whose kernels cost a few vector passes (stencils: TV), FISTA's extra gradients cost
less than Newton's round trips, up to a few thousand entries. Without theta (theta=None) the
rule is the one of structure and size alone (Newton-CG). L/mu is read only where it decides,
so the other cases pay nothing for it; for one theta the choice is fixed, so every round and
every sample of one call use the same solvers.
"""
from __future__ import annotations

import math
from typing import Any

from .common import checked_constants
from .dense import DIRECT_MAX_SIZE
from .fused import CHEAP_DATA_PER_ENTRY, data_per_entry, loops_for
from .gram import has_gram_form, kept_gram
from .registry import AUTO

__all__ = ["QUADRATIC_DIRECT_MAX", "GRAM_DIRECT_MAX", "NONQUADRATIC_DIRECT_MAX",
           "ADJOINT_DIRECT_MAX", "FISTA_KAPPA_MAX", "FISTA_MAX_SIZE", "cheap_fused",
           "choose_lower", "choose_adjoint", "choose_solvers"]

#: Largest x for lower="direct" when g is quadratic (one factor for the lower solve and adjoint).
QUADRATIC_DIRECT_MAX = 150

#: ... and when its Hessian has the Gram form: ridge at 2000 x 500, 5000 x 1000 (one thread,
#: medians of 5 fresh binds) took 45 / 323 ms for the first call against CG's 51 / 319, and 5.1 /
#: 27 ms at the next theta against 24 / 113; at 20000 x 2000 the first call took 4.7 s against
#: 3.7-4.1 s.
GRAM_DIRECT_MAX = 1000

#: Largest x for lower="direct" when g is not quadratic (a factor per Newton step).
NONQUADRATIC_DIRECT_MAX = 16

#: Largest x for adjoint="direct" after an iterative lower solve (a factor of its own).
ADJOINT_DIRECT_MAX = 32

#: Largest L/mu at theta for which a cheap fused kernel takes FISTA rather than Newton-CG.
FISTA_KAPPA_MAX = 10.0

#: Largest x for which a cheap fused kernel takes FISTA (beyond it the kernels' own cost
#: outweighs Newton's round trips and Newton-CG's fewer work units win).
FISTA_MAX_SIZE = 2048


def cheap_fused(k: Any) -> bool:
    """Whether k's solver loops run fused in C and its data hold at most CHEAP_DATA_PER_ENTRY
    numbers per entry of x (a kernel of a few vector passes: a stencil)."""
    return loops_for(k) is not None and data_per_entry(k) <= CHEAP_DATA_PER_ENTRY


def _well_conditioned(k: Any, theta: Any) -> bool:
    """L/mu <= FISTA_KAPPA_MAX at theta (k.constants(theta), checked); an infinite L is not."""
    c = checked_constants(k, theta)
    return math.isfinite(c["L"]) and c["L"] <= FISTA_KAPPA_MAX * c["mu"]


def _gram_kept(k: Any, theta: Any) -> bool:
    """Whether the bind keeps the A^T A of g's Gram form once its data constants are formed (the
    call at theta forms them anyway: k.constants(theta), checked)."""
    if theta is None or not has_gram_form(k):
        return False
    checked_constants(k, theta)
    return kept_gram(k) is not None


def choose_lower(k: Any, adjoint: str = AUTO, theta: Any = None) -> str:
    """The lower solver "auto" stands for on kernel k (adjoint: the adjoint solver asked for;
    theta: where L/mu is read when the choice between FISTA and Newton-CG hinges on it)."""
    if adjoint == "backprop":
        return "gd"  # reverse mode through a stored GD trajectory
    if not (hasattr(k, "lower_hvp") or hasattr(k, "hvp_at")):
        return "fista"  # first order: a finite L is all it needs
    n = getattr(k, "x_size", None)
    quadratic = bool(getattr(k, "is_quadratic", False))
    limit = QUADRATIC_DIRECT_MAX if quadratic else NONQUADRATIC_DIRECT_MAX
    if n is not None and (n <= limit or (quadratic and n <= GRAM_DIRECT_MAX
                                         and has_gram_form(k))):
        return "direct"
    if quadratic and n is not None and n <= DIRECT_MAX_SIZE and _gram_kept(k, theta):
        return "direct"
    if quadratic:
        return "cg"
    if (theta is not None and n is not None and n <= FISTA_MAX_SIZE and cheap_fused(k)
            and _well_conditioned(k, theta)):
        return "fista"
    return "newton"


def choose_adjoint(k: Any, lower: str = AUTO, theta: Any = None) -> str:
    """The adjoint solver "auto" stands for on kernel k after the lower solver `lower`."""
    if lower == AUTO:
        lower = choose_lower(k, theta=theta)
    n = getattr(k, "x_size", None)
    if lower == "direct" or (n is not None and n <= ADJOINT_DIRECT_MAX):
        return "direct"
    return "cg"


def choose_solvers(k: Any, lower: str, adjoint: str, theta: Any = None) -> tuple[str, str]:
    """(lower, adjoint) with each "auto" replaced by its choice on kernel k at theta."""
    if lower == AUTO:
        lower = choose_lower(k, adjoint, theta)
    if adjoint == AUTO:
        adjoint = choose_adjoint(k, lower, theta)
    return lower, adjoint
