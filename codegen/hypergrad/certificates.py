"""Which certificate a hypergradient call gets, and the rounds of the corrected ones.

E&R's bound (docs/framework.md 7) is always available; the DWR-corrected bounds (docs/bounds.md
15) need more kernels and constants and cost more solves, and pay only with some solvers. The
rules live here, apart from the plain hypergradient they wrap: `resolved_certificate` names the
certificate "auto" and "tight" stand for, `certificate_refused` says why one does not apply to a
problem (it then falls back to E&R's), and `corrected` runs the chosen correction's rounds
around a plain round (`accuracy.Round`) the caller supplies.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .accuracy import TIGHT_RELATIVE, Round, corrected_to_accuracy, first_tolerances
from .block import block_to_accuracy, block_unavailable
from .common import call_kernel, checked_constants, norm, x_size_of
from .correction import MAX_COMPONENTS, dwr_unavailable
from .options import DEFAULTS, HypergradientOptions
from .registry import adjoint_entry, lower_entry
from .results import HypergradientResult

__all__ = ["corrected", "resolved_certificate", "certificate_refused", "tight_by_default",
           "first_round", "BLOCK_FROM", "BLOCK_SOLVERS"]


def corrected(k: Any, th: np.ndarray, opts: HypergradientOptions, chosen: str, run: Round,
              x0: Any, q0: Any, dense: dict[str, Any] | None = None) -> HypergradientResult:
    """The rounds of the chosen correction: "tight" and "dwr" (docs/bounds.md 15.5-15.6),
    "block" (15.8); dense: the rounds' factor cache, which the correction's solves read where
    the adjoint is direct (`solve.correction_solve`)."""
    if chosen in ("tight", "block"):
        eps, delta = first_tolerances(opts.rtol or 0.0, opts.eps, opts.delta, tight=True)
        if chosen == "block":  # two solves for all components (docs/bounds.md 15.8)
            return block_to_accuracy(run, k, opts.rtol, float(opts.atol), eps, delta, x0, q0,
                                     opts.refine_iter, opts.adjoint_cap, dense=dense)
        return corrected_to_accuracy(run, k, opts.rtol, float(opts.atol), eps, delta, x0, q0,
                                     opts.refine_iter, True, opts.adjoint_cap, TIGHT_RELATIVE,
                                     tight=True, dense=dense)
    components = th.size <= MAX_COMPONENTS if opts.components is None else opts.components
    eps, delta, relative, spent = first_round(k, th, opts, x0)
    return corrected_to_accuracy(run, k, opts.rtol, float(opts.atol), eps, delta, x0, q0,
                                 opts.refine_iter, components, opts.adjoint_cap, relative, spent,
                                 dense=dense)


def resolved_certificate(opts: HypergradientOptions, size: int, quadratic: bool = False) -> str:
    """The certificate that runs: "er", "dwr", "tight" (one forward and one dual solve per
    component) or "block" (two solves for all, docs/bounds.md 15.8). "tight" above
    MAX_COMPONENTS hyperparameters is the block one; "auto" (with rtol / atol) is E&R's where
    `tight_by_default` says no (quadratic: g is quadratic in x), else the tight bound for one
    hyperparameter and, with Newton or CG and an iterative adjoint, the block bound from
    BLOCK_FROM. With a first-order lower solver, and with the direct adjoint (whose solves are
    triangular solves by the held factor, exact to rounding), the tight bound stays per
    component up to MAX_COMPONENTS."""
    asked = opts.certificate
    if asked == "auto":
        if not tight_by_default(opts.lower, opts.adjoint, quadratic):
            return "er"
        block = size > MAX_COMPONENTS or (opts.lower in BLOCK_SOLVERS and opts.adjoint != "direct"
                                          and size >= BLOCK_FROM)
        return "block" if block else "tight"
    if asked == "tight" and size > MAX_COMPONENTS:
        return "block"
    return asked


def certificate_refused(k: Any, th: np.ndarray, opts: HypergradientOptions,
                        chosen: str) -> str | None:
    """Why the chosen certificate ("dwr", "tight", "block"; "er" when "auto" keeps E&R's)
    falls back to E&R's bound at th, or None. The cheap rules first: "auto" with the direct
    lower solve (or Newton with the direct adjoint) never pays for the constants that
    `dwr_unavailable` evaluates."""
    if chosen == "er":
        return (f"auto keeps E&R's with lower={opts.lower!r}, adjoint={opts.adjoint!r} and "
                f"{th.size} hyperparameters")
    if adjoint_entry(opts.adjoint).backprop:
        return "adjoint='backprop' has no adjoint residual to correct"
    why = dwr_unavailable(k, th)
    if why is None and chosen == "block":
        return block_unavailable(k, th)
    return why


#: With Newton or CG and an iterative adjoint "auto" takes the tight bound (docs/bounds.md 15.6)
#: below this many hyperparameters and the block bound (15.8) from it (BLOCK_SOLVERS). The tight
#: one pays a forward and a dual solve per hyperparameter, the block one two solves for all:
#: from two on the block one took 0.54-0.82 of the tight one's work with CG (group ridge, the
#: paper quadratic) for a bound / true error of 1.1-3.0 against 1.0-20, and with Newton on TV
#: 0.99-1.1x E&R's work for 3.9-895 against E&R's 44-1.6e5. With a first-order lower solver
#: (gd, hb, fista) it took 0.33-0.93 of the work on the same problems with bounds as close, but
#: over a sweep of 11,886 calls its bound was 1.49 times the error in the median where the
#: tight one's was 1.21, with outliers 10-1000 times looser (1-D TV with fista at rtol 1e-2:
#: 95 against 2.5; at theta0 - 5 with gd 1544 against 1.4), and a caller's eps = delta = 1e-2
#: on the FoE example sent its lower solve to its cap (6.3x the work): those keep the tight one.
#: With the direct adjoint the block bound took 0.5-0.9 of the units but only 1-6% less time,
#: and after the direct lower solve it was 23 times the error where the tight one was 1.0.
BLOCK_FROM = 2
#: The lower solvers with which "auto" takes the block bound from BLOCK_FROM hyperparameters.
BLOCK_SOLVERS = ("newton", "cg")


def tight_by_default(lower: str, adjoint: str, quadratic: bool = False) -> bool:
    """Whether "auto" tries a corrected bound with these solvers (the tight one of docs/bounds.md
    15.6, the block one of 15.8 where `resolved_certificate` says): with a first-order lower
    solver (tight: 0.6-1.25x E&R's work) or CG (the forward solve from its Krylov basis, 15.7:
    0.86-0.98x), with Newton and an iterative adjoint, and with the direct adjoint where g is not
    quadratic: the correction's solves then reuse the adjoint's factor, their residuals are at
    the rounding level, and the bound comes within a few times h's error (Newton lands that
    error far below the target; with CG solves planned at a quarter of the target the bound
    was 8-2000 times it). Not for a quadratic g with the direct solvers: their E&R bound is at
    the rounding level in one round."""
    if lower_entry(lower).needs_finite_L or lower == "cg":
        return True
    if adjoint == "direct":
        return lower in ("newton", "direct") and not quadratic
    return lower == "newton"


def first_round(k: Any, th: np.ndarray, opts: HypergradientOptions,
                x0: Any) -> tuple[float, float, float, dict[str, int]]:
    """(eps, delta, relative tolerance of the forward and dual CGs, work) of the DWR's first
    round. With rtol: each solve to sqrt(rtol) of its starting size (the bound's terms are
    products of two such errors; docs/bounds.md 15.5): eps = s ||grad g(x0)||/mu,
    delta = s ||grad f(x0)||, s = sqrt(rtol); one lower and one upper gradient. eps is never
    looser than the tight rounds' first (`first_tolerances`, rtol/2 absolute): with a small mu,
    s ||grad g(x0)||/mu asks for no solve at all, and the ball B(x_eps, e) it leaves is too
    large for local constants (exp atoms: infinite there, and an infinite bound ends the
    rounds). Otherwise the options' eps and delta, and the CGs to delta relative."""
    if opts.rtol is None or opts.rtol <= 0:
        return opts.eps, opts.delta, 1e-3, {}
    s = math.sqrt(float(opts.rtol))
    xs = np.zeros(x_size_of(k)) if x0 is None else np.asarray(x0, float).ravel()
    g0, _ = call_kernel(k.lower_grad, xs, th)
    b0, _ = call_kernel(k.upper_grad, xs, th)
    spent = {"lower_grads": 1, "units": 1}
    if g0 is None or b0 is None or not norm(g0) > 0 or not norm(b0) > 0:
        return opts.eps, opts.delta, s, spent
    mu = checked_constants(k, th)["mu"]
    cap = first_tolerances(float(opts.rtol), DEFAULTS.eps, DEFAULTS.delta, tight=True)[0]
    return min(s * norm(g0) / mu, cap), s * norm(b0), s, spent
