"""The hypergradient with certified a posteriori and a priori error bounds (docs/framework.md
2, 6, 7; docs/solvers.md 4).

    1. lower solve, any method, to x_eps with G/mu <= eps (G = ||grad_x g(x_eps)||);
    2. adjoint solve, any method, A(x_eps) q = grad_x f(x_eps) to a TRUE residual R <= delta;
    3. h = -B(x_eps)^T q + grad_theta f(x_eps) + grad r(theta)   (one cross VJP).

All second derivatives are taken at the single point x_eps; that is what makes the bound of
docs/framework.md 7 computable. A result never carries a silently wrong number: every returned
float is checked with isfinite, and `status` is "ok" only when (a) both solvers reached their
tolerance, (b) the constants are certified, (c) the a posteriori bound is finite and (d) no
zero-hypergradient trap occurred. Otherwise `reasons` says why; `usable` says whether `grad` is
still a finite estimate whose `bound` is valid (e.g. a capped solve or uncertified constants),
as opposed to a failure.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, NamedTuple

import numpy as np

from ..errors import KernelError
from .accuracy import (
    add_work,
    check_targets,
    to_accuracy,
)
from .adjoint.backprop import backprop_adjoint
from .auto import choose_solvers
from .bounds import (
    ROUNDING_FLOOR,
    apriori_bound,
    corrected_value,
    cross_norm,
    refined_distance,
)
from .certificates import certificate_refused, corrected, resolved_certificate
from .common import (
    SolverError,
    call_kernel,
    checked_constants,
    checked_theta,
    finite,
    fmt,
    grad_norm,
    norm,
    x_size_of,
)
from .fused import closing_for, contiguous
from .local_third import er_bound
from .options import HypergradientOptions
from .registry import adjoint_entry, lower_entry
from .results import (
    AdjointResult,
    HypergradientResult,
    LowerResult,
    Reason,
    ReasonKind,
    Status,
    evolve,
)
from .solve import run_adjoint, run_lower

__all__ = ["hypergradient", "hypergradient_samples"]


class _Ledger:
    """What one hypergradient has spent and found so far (work, reasons, notes)."""

    __slots__ = ("work", "reasons", "notes")

    def __init__(self, notes: list[Any] | None = None) -> None:
        self.work: dict[str, Any] = {"lower_grads": 0, "hvps": 0, "cross": 0}
        self.reasons: list[Any] = []
        self.notes: list[Any] = [] if notes is None else notes

    def reason(self, kind: ReasonKind, text: str, status: Status | None = None) -> None:
        self.reasons.append(Reason(kind, text, status))

    def totals(self) -> dict[str, Any]:
        return dict(self.work, units=self.work["lower_grads"] + self.work["hvps"])


def hypergradient(k: Any, theta: Any, options: HypergradientOptions | None = None, *,
                  x0: Any = None, q0: Any = None, **overrides: Any) -> HypergradientResult:
    """The hypergradient of F(theta) = f(x*(theta), theta) + r(theta) with certified bounds.

    options: a HypergradientOptions, and/or its fields as keywords (lower, adjoint, eps, delta,
    max_iter, adjoint_max_iter, record, refine_iter, rtol, atol); an unknown keyword raises.
    lower in ("gd", "hb", "fista", "cg", "newton", "direct", "auto"), adjoint in ("cg", "gd",
    "hb", "direct", "backprop", "auto"); "auto" chooses from the problem (`codegen.hypergrad.auto`)
    and the result names the choice (lower_solver, adjoint_solver). "backprop" differentiates a
    stored GD or HB trajectory (its bound is inf: E&R's analysis does not cover it). x0
    warm-starts the lower solve (the test is made before the first step), q0 the adjoint (a
    nonzero q0 is legal but is no longer "backprop"). Constants are read from k.constants(theta)
    at this theta (pitfall 3).

    rtol, atol: ask for a certified accuracy instead, bound <= atol + rtol ||grad||. eps and
    delta are then only the first round's tolerances; the bound's own parts tighten them, round
    after warm-started round. status says so if the target is not reached.
    """
    opts = _resolved(k, HypergradientOptions.make(options, **overrides), theta)
    if opts.certificate != "er":
        return _with_certificate(k, theta, opts, x0, q0)
    if opts.targets_accuracy:  # refused before theta is checked, as the rounds refuse it
        check_targets(0.0 if opts.rtol is None else float(opts.rtol), float(opts.atol))
    return _er(k, checked_theta(k, theta), opts, x0, q0)


def _er(k: Any, th: np.ndarray, opts: HypergradientOptions, x0: Any,
        q0: Any) -> HypergradientResult:
    """E&R's bound with th checked (once, not in every round) and opts resolved (no "auto"):
    in rounds for rtol / atol, else one solve."""
    if opts.targets_accuracy:
        return _in_rounds(partial(_once, k, th), opts, x0, q0)
    if adjoint_entry(opts.adjoint).backprop and q0 is not None:
        raise SolverError("adjoint='backprop' takes no q0 (a warm start is not backprop)")
    return _once(k, th, opts, x0, q0)


def _once(k: Any, th: np.ndarray, opts: HypergradientOptions, x0: Any,
          q0: Any, keep_basis: bool = False, companion: Any = None,
          dense: dict[str, Any] | None = None, sharpen: bool = True) -> HypergradientResult:
    """One hypergradient with E&R's bound at fixed eps and delta: th checked, opts resolved;
    keep_basis: a lower CG keeps its Krylov directions for the correction's forward solve;
    companion: a krylov.Companion the adjoint CG solves alongside (docs/solvers.md 9); dense:
    the direct solvers' factor cache, kept by the caller (a correction's solves read it);
    sharpen: E&R's bound may spend a pass on the third derivative along q (`er_bound`), not
    where a correction's bound replaces it."""
    c_global = checked_constants(k, th)
    ledger = _Ledger(notes=list(c_global["notes"]))
    adjoint = adjoint_entry(opts.adjoint)
    c = _step_size_constants(k, th, c_global, opts.lower, x0, ledger, adjoint.needs_finite_L)
    if dense is None:  # lower="direct" and adjoint="direct" share one Hessian factor
        dense = {}
    backprop = adjoint.backprop
    low = run_lower(k, th, c, opts.lower, opts.eps, x0, opts.max_iter, opts.record, backprop,
                    dense, keep_basis)
    ledger.work["lower_grads"] += low.n_grad
    ledger.work["hvps"] += low.n_hvp
    if low.status is not Status.CONVERGED:
        ledger.reason(ReasonKind.LOWER_SOLVE,
                      f"lower {low.solver} {low.status} (G/mu = {fmt(low.bound)}, eps = "
                      f"{fmt(opts.eps)}{'; ' + low.message if low.message else ''})",
                      low.status)
    c, e = _localised(k, th, c, c_global, low, opts.refine_iter, backprop, ledger)
    b, msg = call_kernel(k.upper_grad, low.x, th)
    if b is None:
        ledger.reason(ReasonKind.NON_FINITE, f"grad_x f not finite at x_eps ({msg})")
        return _failed(th, low, c, opts, ledger)
    adj = _adjoint(k, th, c, low, b, opts, backprop, q0, dense, ledger, companion)
    closing = _closing(k, th, low.x, adj)
    grad, direct = _assemble(th, adj, closing, ledger)
    return _bounded(k, th, c, low, adj, b, e, grad, direct, closing, ledger, sharpen)


def _with_certificate(k: Any, theta: Any, opts: HypergradientOptions, x0: Any,
                      q0: Any) -> HypergradientResult:
    """The hypergradient with the certificate opts names ("dwr", "tight", "block", or what
    "auto" resolves to, `resolved_certificate`) where it applies, else E&R's with a note
    saying why."""
    asked = opts.certificate
    if asked == "auto" and not opts.targets_accuracy:
        # fixed eps and delta: the caller plans the accuracy (the learning loops do), and the
        # correction's extra solves would buy nothing it asked for
        return _er(k, checked_theta(k, theta), opts.evolve(certificate="er"), x0, q0)
    if opts.targets_accuracy:  # refused before any work, as the E&R rounds refuse it
        check_targets(0.0 if opts.rtol is None else opts.rtol, float(opts.atol))
    th = checked_theta(k, theta)
    chosen = resolved_certificate(opts, th.size, bool(getattr(k, "is_quadratic", False)))
    why = certificate_refused(k, th, opts, chosen)
    if why is not None:
        res = _er(k, th, opts.evolve(certificate="er"), x0, q0)
        if asked == "auto":  # the default: `certificate` names the bound, docs/bounds.md 15.6 why
            return _past_the_floor(k, th, opts, res) if chosen == "er" else res
        return evolve(res, notes=tuple(res.notes) + (
            f"certificate {asked!r}: E&R's bound, no DWR correction ({why})",))
    try:
        return _corrected(k, th, opts, chosen, x0, q0)
    except (KernelError, FloatingPointError, OverflowError) as exc:
        # a correction kernel (upper HVP, third derivatives, cross products) not finite where
        # the plain hypergradient was: E&R's bound, never an exception or a wrong bound
        res = _er(k, th, opts.evolve(certificate="er"), x0, q0)
        return evolve(res, notes=tuple(res.notes) + (
            f"certificate {asked!r}: E&R's bound, the correction failed ({exc})",))


def _corrected(k: Any, th: np.ndarray, opts: HypergradientOptions, chosen: str, x0: Any,
               q0: Any) -> HypergradientResult:
    """The rounds of the chosen correction ("dwr", "tight", "block"), each round's plain
    hypergradient by `_once` at the round's eps and delta."""
    plain = opts.evolve(certificate="er", rtol=None, atol=0.0)
    dense: dict[str, Any] = {}  # the last round's factor, for the correction's direct solves

    def run(eps: float, delta: float, x0: Any, q0: Any, refine: int,
            companion: Any = None) -> HypergradientResult:
        return _once(k, th, plain.evolve(eps=eps, delta=delta, refine_iter=refine), x0, q0,
                     keep_basis=True, companion=companion, dense=dense, sharpen=False)

    return corrected(k, th, opts, chosen, run, x0, q0, dense)


def _past_the_floor(k: Any, th: np.ndarray, opts: HypergradientOptions,
                    res: HypergradientResult) -> HypergradientResult:
    """res, auto's E&R rounds (taken for their solvers: the direct ones), or where those stopped
    at their accuracy floor short of the target the tight correction (block above
    MAX_COMPONENTS) warm-started from res, when it applies and its bound is smaller. E&R's bound
    is first order in e, which stalls near eps_machine ||x|| / mu; the correction's terms are
    products, so at a small mu it certifies what E&R's cannot (docs/bounds.md 15.6). The work
    of both is counted."""
    if not any(r.kind is ReasonKind.ACCURACY_FLOOR for r in res.reasons):
        return res
    chosen = resolved_certificate(opts.evolve(certificate="tight"), th.size)
    if certificate_refused(k, th, opts.evolve(certificate=chosen), chosen) is not None:
        return res
    try:
        alt = _corrected(k, th, opts, chosen, res.x, res.q)
    except (KernelError, FloatingPointError, OverflowError):
        return res
    work = dict(res.work)
    add_work(work, alt.work)
    better = alt if alt.bound < res.bound else res
    return evolve(better, work=work, notes=tuple(better.notes) + (
        f"auto: E&R's rounds stopped at their accuracy floor (bound {fmt(res.bound)}); the "
        f"{chosen} correction from there: bound {fmt(alt.bound)}",))


def _resolved(k: Any, opts: HypergradientOptions, theta: Any) -> HypergradientOptions:
    """opts with "auto" replaced by the solvers `codegen.hypergrad.auto` chooses for k at theta
    (L/mu there decides between FISTA and Newton-CG on a cheap fused kernel)."""
    if not opts.is_auto:
        return opts
    lower, adjoint = choose_solvers(k, opts.lower, opts.adjoint, theta)
    return opts.evolve(lower=lower, adjoint=adjoint)


def _in_rounds(solve: Callable[[HypergradientOptions, Any, Any], HypergradientResult],
               opts: HypergradientOptions, x0: Any, q0: Any) -> HypergradientResult:
    """solve(options, x0, q0) (one hypergradient, or one over several samples) in rounds until
    its certified bound meets atol + rtol ||grad|| (`codegen.hypergrad.accuracy.to_accuracy`)."""
    def run(eps: float, delta: float, x0: Any, q0: Any, refine: int) -> HypergradientResult:
        return solve(opts.evolve(eps=eps, delta=delta, refine_iter=refine, rtol=None, atol=0.0),
                     x0, q0)

    return to_accuracy(run, 0.0 if opts.rtol is None else float(opts.rtol), float(opts.atol),
                       opts.eps, opts.delta, x0, q0, opts.refine_iter)


def _step_size_constants(k: Any, th: np.ndarray, c: dict[str, Any], lower: str, x0: Any,
                         ledger: _Ledger, adjoint_steps: bool = False) -> dict[str, Any]:
    """c with an infinite L replaced by L on B(x0, 2 G0/mu) for a solver that takes its step
    from L (docs/bounds.md 4; exp / polynomial atoms are infinite globally). The ball holds x0
    and x*; a wrong L can only stall the solver, its G/mu certificate needs mu alone. A lower or
    adjoint solver with a step size from L first asks k to tighten ||K||^2 where block sums
    bounded it (docs/constants.md 4); adjoint_steps: the adjoint solver takes one from L."""
    lower_steps = lower_entry(lower).needs_finite_L
    steps = lower_steps or adjoint_steps
    tighten = getattr(k, "tighten_constants", None)
    if steps and tighten is not None and tighten():
        c = checked_constants(k, th)
        ledger.notes.append("step sizes: ||K||^2 by the Gram matrix instead of block sums")
    if not (lower_steps and hasattr(k, "local_constants") and not math.isfinite(c["L"])):
        return c
    xs = np.zeros(x_size_of(k)) if x0 is None else np.asarray(x0, float).ravel()
    g0, _ = call_kernel(k.lower_grad, xs, th)
    ledger.work["lower_grads"] += 1
    if g0 is None:
        return c
    cl = k.local_constants(xs, th, 2 * norm(g0) / c["mu"])
    if not math.isfinite(cl["L"]):
        return c
    out = dict(c, L=max(float(cl["L"]), c["mu"]))
    ledger.notes.append(f"L = inf globally: step sizes use L = {fmt(out['L'])} on the ball "
                        "B(x0, 2||grad g(x0)||/mu)")
    return out


def _localise(k: Any, x: np.ndarray, th: np.ndarray, c: dict[str, Any], c_global: dict[str, Any],
              radius: float) -> dict[str, Any]:
    """c with L_A, L_B, L_f, L_ft valid on B(x_eps, radius) where smaller (the ball contains
    [x_eps, x*] when radius >= e); mu stays global; certified = AND of the flags. Called only
    where some of them is infinite globally (else the global constants are kept unchanged)."""
    if not (hasattr(k, "local_constants") and math.isfinite(radius)):
        return c
    cl = k.local_constants(x, th, radius)
    out = dict(c)
    for key in _LOCAL_KEYS:
        if key in cl and cl[key] is not None and float(cl[key]) < out.get(key, math.inf):
            out[key] = float(cl[key])
    if not math.isfinite(c_global["L"]) and math.isfinite(cl["L"]):
        out["L"] = max(float(cl["L"]), c["mu"])  # adjoint step sizes: A(x_eps) <= L here
    out["certified"] = bool(c["certified"] and cl.get("certified", False))
    return out


def _localised(k: Any, th: np.ndarray, c: dict[str, Any], c_global: dict[str, Any],
               low: LowerResult, refine_iter: int, backprop: bool,
               ledger: _Ledger) -> tuple[dict[str, Any], float]:
    """(constants on the certified ball around x_eps, e): localised on B(x_eps, G/mu), which
    refined_distance needs (a finite L_A) for a smaller certified e, then on B(x_eps, e);
    with the adjoint backprop, which has no bound, c and G/mu as they are."""
    e = low.bound
    if backprop or low.grad is None:
        return c, e
    local = not all(map(math.isfinite, map(c_global.get, _LOCAL_KEYS, _NO_CONSTANTS)))
    if local:
        c = _localise(k, low.x, th, c, c_global, e)
    e, used = refined_distance(k, low.x, th, c, low.grad, e, refine_iter)
    ledger.work["hvps"] += used
    return (_localise(k, low.x, th, c, c_global, e) if local else c), e


#: The constants `_localise` tightens on a ball (when one of them is infinite globally).
_LOCAL_KEYS = ("L_A", "L_B", "L_f", "L_ft")
_NO_CONSTANTS = (0.0,) * len(_LOCAL_KEYS)  # what a kernel without one of them has (c.get's default)


def _adjoint(k: Any, th: np.ndarray, c: dict[str, Any], low: LowerResult, b: np.ndarray,
             opts: HypergradientOptions, backprop: bool, q0: Any, dense: dict[str, Any],
             ledger: _Ledger, companion: Any = None) -> AdjointResult:
    """The adjoint solve at x_eps (or backprop through the trajectory, `backprop`), with its
    reasons; `companion` rides along a CG adjoint where the forward solve has no Krylov basis
    to start from (docs/bounds.md 15.7 is free; a paired product is not)."""
    if backprop:
        adj = backprop_adjoint(k, low, th, b=b)
        ledger.work["cross"] += adj.n_cross
    else:
        along = companion if opts.adjoint == "cg" and low.krylov is None else None
        adj = run_adjoint(k, low.x, th, c, opts.adjoint, opts.delta, q0, opts.adjoint_cap, b,
                          opts.record, dense, along)
        if along is not None and along.steps:
            ledger.work["paired"] = ledger.work.get("paired", 0) + along.steps
    ledger.work["hvps"] += adj.n_hvp
    if adj.zero_trap:
        ledger.reason(ReasonKind.ZERO_TRAP,
                      f"zero-hypergradient trap: ||grad_x f(x_eps)|| = {fmt(norm(b))} <= delta "
                      f"= {fmt(opts.delta)} with q0 = 0 ({adj.iterations} adjoint iteration(s) "
                      "forced; h may be mostly error: shrink delta or check bound vs ||h||)"
                      if not backprop else
                      "zero-hypergradient trap: 0 lower iterations, backprop gives 0",
                      adj.status)
    elif adj.status is not Status.CONVERGED:
        ledger.reason(ReasonKind.ADJOINT_SOLVE,
                      f"adjoint {adj.solver} {adj.status} (R = {fmt(adj.residual)}, delta = "
                      f"{fmt(opts.delta)}{'; ' + adj.message if adj.message else ''})",
                      adj.status)
    return adj


class _Closing(NamedTuple):
    """What the step after the adjoint solve reads of the kernels at (x_eps, theta): B^T q and
    the direct theta terms as `call_kernel` returns them (None and the reason when not finite),
    and f + r with the exception text of a failed evaluation (None if it did not raise). A
    NamedTuple: a frozen dataclass sets each field through object.__setattr__."""

    btq: tuple[np.ndarray | None, str]
    direct: tuple[np.ndarray | None, str]
    value: float
    value_failure: str | None = None


def _closing(k: Any, th: np.ndarray, x: np.ndarray, adj: AdjointResult) -> _Closing:
    """The closing kernels (cross VJP, theta terms, value) in one C call when k's module has
    `closing` (`fused.closing_for`; the same kernels, the same bits), else one call each."""
    fused = closing_for(k) if adj.solver != "backprop" else None
    if fused is not None:
        btq, direct, value, finite_outputs = fused.close(th, contiguous(x), contiguous(adj.q))
        if finite_outputs:  # the kernels checked every entry: call_kernel's test would pass
            return _Closing((btq, ""), (direct, ""), value, None)
        return _Closing(_checked(btq), _checked(direct), value)
    btq_msg = (None, "") if adj.solver == "backprop" else call_kernel(k.cross_vjp, x, th, adj.q)
    direct_msg = call_kernel(k.upper_theta_grad, x, th)
    try:
        return _Closing(btq_msg, direct_msg, float(k.upper_value(x, th)))
    except (KernelError, FloatingPointError, OverflowError) as exc:
        return _Closing(btq_msg, direct_msg, math.nan, str(exc))


def _checked(out: np.ndarray) -> tuple[np.ndarray | None, str]:
    """A fused kernel output as `call_kernel` returns a kernel's: None if not finite."""
    return (out, "") if finite(out) else (None, "non-finite kernel output")


def _assemble(th: np.ndarray, adj: AdjointResult, closing: _Closing,
              ledger: _Ledger) -> tuple[np.ndarray, np.ndarray]:
    """(h, the direct theta terms): h = -B^T q (one cross VJP) + upper_theta_grad."""
    if adj.solver == "backprop":
        h_impl = adj.h_cross
    else:
        Btq, msg = closing.btq
        ledger.work["cross"] += 1
        h_impl = -Btq if Btq is not None else np.full(th.size, np.nan)
        if Btq is None:
            ledger.reason(ReasonKind.NON_FINITE, f"cross VJP not finite ({msg})")
    direct, msg = closing.direct
    if direct is None:
        ledger.reason(ReasonKind.NON_FINITE, f"upper theta-gradient not finite ({msg})")
        direct = np.full(th.size, np.nan)
    return h_impl + direct, direct


def _bounded(k: Any, th: np.ndarray, c: dict[str, Any], low: LowerResult, adj: AdjointResult,
             b: np.ndarray, e: float, grad: np.ndarray, direct: np.ndarray, closing: _Closing,
             ledger: _Ledger, sharpen: bool) -> HypergradientResult:
    """The bounds (a posteriori with its rounding floor, a priori), the value and the result;
    sharpen: as `_once`'s."""
    x, q, R = low.x, adj.q, adj.residual
    dep_theta = bool(getattr(k, "upper_depends_on_theta", False))
    nB, n_cross = cross_norm(k, x, th)
    ledger.work["cross"] += n_cross
    nb, nq = norm(b), norm(q)
    if adj.solver == "backprop":
        forms: dict[str, float] = {}
        bound, apri, apri_rig = math.inf, math.inf, False
        ledger.reason(ReasonKind.NO_BOUND,
                      "no a posteriori bound: adjoint='backprop' is reverse mode through the "
                      "trajectory (Hessians at every iterate), not covered by E&R's analysis")
    else:
        bound, forms, c, passes = er_bound(k, th, c, x, q, e, R, nB, nb, nq, dep_theta, sharpen)
        ledger.work["hvps"] += passes
        # Floating point: h itself is computed with rounding errors the exact-arithmetic bound
        # does not see; without this floor a converged solve could claim 1e-17 on a 1e-16 error.
        forms["rounding"] = ROUNDING_FLOOR * (nB * nq + norm(direct))
        bound += forms["rounding"]
        apri = apriori_bound(c, low.apriori, adj.apriori, nB, nb, dep_theta)
        apri_rig = low.apriori_rigorous and adj.apriori_rigorous
        if not apri_rig:
            ledger.notes.append("a priori bound uses a heavy-ball rate with C = 1: not rigorous")
        if not math.isfinite(bound):
            inf_consts = [key for key in ("L_A", "L_B", "L_f", "L_ft")
                          if not math.isfinite(c.get(key, 0.0))]
            ledger.reason(ReasonKind.NO_BOUND, "a posteriori bound not finite"
                          + (f" ({', '.join(inf_consts)} = inf)" if inf_consts else ""))
            bound = math.inf
    if not c["certified"]:
        ledger.reason(ReasonKind.UNCERTIFIED, (
            "uncertified constants (stated): the bound is only as good as the stated constants"
            if c["source"] == "stated" else
            f"uncertified constants (source = {c['source']!r}): the derivation could not certify "
            f"them (built with allow_uncertified); the bound rests on them"))
    value = _value(closing, ledger)
    G = low.G
    fc, fc_err = (corrected_value(c, value, x, low.grad, q, e, R, nq, G)
                  if adj.solver != "backprop" and low.grad is not None else (math.nan, math.inf))
    if not finite(grad):
        ledger.reason(ReasonKind.NON_FINITE, "non-finite hypergradient")
    # A bound computed from certified constants stays valid for a capped or diverged solve (it
    # is about the returned point); "not SPD" contradicts mu > 0, so nothing is certified then.
    certified = bool(c["certified"] and math.isfinite(bound) and not (
        ledger.reasons and any(r.solver_status is Status.NOT_SPD for r in ledger.reasons)))
    return HypergradientResult(
        grad=grad, bound=bound, apriori_bound=apri, value=value, x=x, q=q,
        work=ledger.totals(), reasons=tuple(ledger.reasons), lower_solver=low.solver,
        adjoint_solver=adj.solver, constants=c, G=G, R=R, e=e, norm_B=nB, grad_f_norm=nb,
        q_norm=nq, certified=certified, apriori_rigorous=apri_rig, bound_forms=forms,
        lower=low, adjoint=adj, notes=tuple(ledger.notes), theta=th, corrected_value=fc,
        corrected_value_error=fc_err)


def _value(closing: _Closing, ledger: _Ledger) -> float:
    """f(x_eps) + r(theta); a failure is a note and a reason, not an exception."""
    if closing.value_failure is not None:
        ledger.notes.append(f"upper value failed: {closing.value_failure}")
    if not math.isfinite(closing.value):
        ledger.reason(ReasonKind.NON_FINITE, "upper value not finite")
    return closing.value


def _failed(th: np.ndarray, low: LowerResult, c: dict[str, Any], opts: HypergradientOptions,
            ledger: _Ledger) -> HypergradientResult:
    return HypergradientResult(
        grad=np.full(th.size, np.nan), bound=math.inf, apriori_bound=math.inf, value=math.nan,
        x=low.x, q=None, work=ledger.totals(), reasons=tuple(ledger.reasons),
        lower_solver=low.solver, adjoint_solver=opts.adjoint, constants=c, G=low.G,
        e=low.bound, certified=False, apriori_rigorous=False, lower=low,
        notes=tuple(ledger.notes), theta=th)


def hypergradient_samples(ks: Any, theta: Any, options: HypergradientOptions | None = None, *,
                          x0: Any = None, q0: Any = None, per_sample: Any = None,
                          **overrides: Any) -> HypergradientResult:
    """The hypergradient of (1/S) sum_s f_s(x_s*(theta), theta) + r(theta) (pitfall 5).

    Each sample's lower problem and adjoint are solved separately (own mu_s, G_s, R_s, own zero
    trap and NaN guards); grad = mean_s h_s and bound = mean_s bound_s (the error of a mean is at
    most the mean of the errors), apriori_bound likewise, value = mean_s value_s (and the
    corrected value and its error likewise), work summed.
    The regulariser: every kernel's upper_theta_grad is assumed to include grad r(theta), so the
    average counts it exactly once (not S times). x0, q0: None or one entry per sample. G, R,
    e, norm_B, grad_f_norm, q_norm are the worst (largest) over samples; x, q, lower, adjoint,
    constants are per-sample lists. status "ok" iff every sample is "ok"; otherwise the reasons,
    each with the samples it affects. Options and rtol, atol: as for `hypergradient`, on the mean.
    per_sample: None (each sample's `hypergradient` in turn, here) or a callable (theta, opts,
    x0, q0) -> the per-sample results in sample order, each `hypergradient(ks[s], theta, opts,
    x0=x0[s], q0=q0[s])` computed elsewhere (codegen/runtime/executors.py runs them on worker
    processes); the mean is formed here either way, in the same order, so the bits agree.
    """
    ks = list(ks)
    opts = HypergradientOptions.make(options, **overrides)
    if ks:  # one choice for all samples (they share a problem, hence its structure and size)
        opts = _resolved(ks[0], opts, theta)
    if opts.targets_accuracy and opts.certificate == "er":
        return _in_rounds(lambda o, x, q: hypergradient_samples(
            ks, theta, o, x0=x, q0=q, per_sample=per_sample), opts, x0, q0)
    if opts.targets_accuracy:
        return _samples_to_accuracy(ks, theta, opts, x0, q0, per_sample)
    return _mean_over_samples(ks, theta, opts, x0, q0, per_sample)


def _samples_to_accuracy(ks: list[Any], theta: Any, opts: HypergradientOptions, x0: Any,
                         q0: Any, per_sample: Any) -> HypergradientResult:
    """rtol / atol on the mean with each sample's own correction ("tight", "block", "dwr", or
    what "auto" picks for it; docs/bounds.md 15.4): every sample runs its rounds to atol + rtol
    ||h_s||, and where the mean of their bounds then misses atol + rtol ||mean h|| (the samples'
    h partly cancel), every sample runs again, warm-started, to SAMPLES_MARGIN times that target
    as an absolute one, so that the mean of the bounds meets it. The work of both is summed."""
    check_targets(0.0 if opts.rtol is None else float(opts.rtol), float(opts.atol))
    res = _mean_over_samples(ks, theta, opts, x0, q0, per_sample)
    target = float(opts.atol) + float(opts.rtol or 0.0) * grad_norm(res.grad)
    if res.bound <= target or not target > 0 or not res.ok:
        return res
    again = _mean_over_samples(ks, theta, opts.evolve(rtol=None, atol=SAMPLES_MARGIN * target),
                               res.x, res.q, per_sample)
    work = dict(res.work)
    add_work(work, again.work)
    note = (f"several samples: each sample's rounds to its own rtol ||h_s|| gave a mean bound "
            f"{fmt(res.bound)} > atol + rtol ||grad|| = {fmt(target)}; every sample again to "
            f"{fmt(SAMPLES_MARGIN * target)}")
    reasons = again.reasons
    final = float(opts.atol) + float(opts.rtol or 0.0) * grad_norm(again.grad)
    if again.ok and not again.bound <= final:
        reasons += (Reason(ReasonKind.ACCURACY, f"the mean bound {fmt(again.bound)} is above atol "
                           f"+ rtol ||grad|| = {fmt(final)}"),)
    return evolve(again, work=work, reasons=reasons, notes=tuple(again.notes) + (note,))


#: The second pass of `_samples_to_accuracy` aims every sample at this share of the mean's
#: target: the mean h moves a little between the passes, and with it the target.
SAMPLES_MARGIN = 0.9


def _mean_over_samples(ks: list[Any], theta: Any, opts: HypergradientOptions, x0: Any, q0: Any,
                       per_sample: Any) -> HypergradientResult:
    """Each sample's hypergradient with opts (its own rounds when opts has rtol / atol), and
    their mean (`hypergradient_samples`)."""
    S = len(ks)
    if S == 0:
        raise SolverError("hypergradient_samples needs at least one sample")
    for name, v in (("x0", x0), ("q0", q0)):
        if v is not None and len(v) != S:
            raise SolverError(f"{name} must have one entry per sample ({S}), got {len(v)}")
    res = (list(per_sample(theta, opts, x0, q0)) if per_sample is not None else
           [hypergradient(k, theta, opts, x0=None if x0 is None else x0[s],
                          q0=None if q0 is None else q0[s])
            for s, k in enumerate(ks)])
    work = {key: sum(r.work.get(key, 0) for r in res)
            for key in ("lower_grads", "hvps", "cross", "units")}

    def worst(attr: str) -> float:
        vals = [getattr(r, attr) for r in res]
        return math.nan if any(math.isnan(v) for v in vals) else max(vals)

    return HypergradientResult(
        grad=np.mean([r.grad for r in res], axis=0), bound=float(np.mean([r.bound for r in res])),
        apriori_bound=float(np.mean([r.apriori_bound for r in res])),
        value=float(np.mean([r.value for r in res])), x=[r.x for r in res],
        q=[r.q for r in res], work=work, reasons=_merged_reasons(res),
        lower_solver=res[0].lower_solver, adjoint_solver=res[0].adjoint_solver,
        constants=[r.constants for r in res], G=worst("G"), R=worst("R"), e=worst("e"),
        norm_B=worst("norm_B"), grad_f_norm=worst("grad_f_norm"), q_norm=worst("q_norm"),
        certified=all(r.certified for r in res),
        apriori_rigorous=all(r.apriori_rigorous for r in res),
        lower=[r.lower for r in res], adjoint=[r.adjoint for r in res],
        notes=tuple(sorted({n for r in res for n in r.notes})), samples=res,
        theta=res[0].theta, certificate="+".join(sorted({r.certificate for r in res})),
        corrected_value=float(np.mean([r.corrected_value for r in res])),
        corrected_value_error=float(np.mean([r.corrected_value_error for r in res])))


def _merged_reasons(res: list[Any]) -> tuple[Reason, ...]:
    """The samples' reasons, each once, with the samples it affects (in order of appearance)."""
    by_reason: dict[tuple[ReasonKind, str, Status | None], list[int]] = {}
    for s, r in enumerate(res):
        for reason in r.reasons:
            key = (reason.kind, reason.text, reason.solver_status)
            if s not in by_reason.setdefault(key, []):
                by_reason[key].append(s)
    return tuple(Reason(kind, text, status, tuple(idx))
                 for (kind, text, status), idx in by_reason.items())
