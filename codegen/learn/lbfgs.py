"""The default method, "lbfgs": a certified inexact L-BFGS (docs/framework.md 9).

What a user of SciPy expects from `minimize(method="L-BFGS-B")`, on certified numbers:

* **Steps at the right scale.** The direction is L-BFGS's two-loop product -H h with the last
  `memory` pairs (s, y) of accepted steps and hypergradient changes; the first move has length
  min(1, ||h||) (SciPy's first step), after which the pairs set the scale. Every trial point gets
  a full hypergradient, so a rejected trial still yields the slope for an interpolated retry.
* **Each hypergradient only as accurate as its own test needs.** At every point the lower and
  adjoint solves run until the certified bound w <= grad_rtol ||h|| (hypergradient's rtol), so
  -h is a certified descent direction, and until the certified value error (||grad f(x_eps)|| e
  + L_f/2 e^2, L_f valid on the ball B(x_eps, e)) is below `value_share` of the decrease the
  line search tests. Near the end the stopping rule needs less than grad_rtol ||h||: a trial
  point whose ||h|| is expected to be small enough to stop is first solved only until
  w <= the rule's own absolute need (`_stop_atol`), and solved on to grad_rtol ||h|| only if
  the rule then does not stop there; a point whose ||h|| alone already meets the rule is
  instead solved further at the same theta until the rule passes (`_tightened_to_stop`). The
  first round's eps and delta at a trial point are scaled from the base point's bound parts to
  the ||h|| expected there (the last rate at which ||h|| fell; for a scalar theta the product
  of the last two, the secant method's rate), so that one round usually suffices. The Armijo
  test is certified:

      f(x'_eps) + err' + err <= f(x_eps) - armijo * h.(theta - theta')
      implies F(theta') <= F(theta) - armijo * h.(theta - theta'),

  so the accepted chain is monotone in the true F and the returned point is the last accepted.
  When the inexact values pass but the errors hide the decrease, the values are tightened, not
  the step shortened.
* **Warm starts** of x and q from the previous point (the runner keeps both).
* **Stopping rule (a relative tolerance on F, on certified gradients).** "converged" once the
  decrease still possible, estimated with the certified gradient bound c = ||h|| + w as the
  larger of the quasi-Newton model's 1/2 c^2 h.Hh/||h||^2 and c^2 / (2 c_min) (c_min the
  smallest curvature s.y/s.s of the stored pairs), is at most ftol |F| (ftol = 1e-7: F to
  about seven digits, far below the statistical meaning of a validation loss; |F| at least
  1e-6 |F(theta0)|). Also "converged" when the certified ||grad F|| <= ||h|| + w <= gtol. The
  result states the certificate ||grad F(theta)|| <= ||h|| + w at the returned point.
* **The accuracy floor.** A hypergradient whose rounds end at the solvers' rounding floor
  (`at_accuracy_floor`), at the base or a trial point, ends the run with "accuracy floor" and
  the last accepted point's certificate (`_floor_end`), not "failed".
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..hypergrad import aposteriori_bound
from ..hypergrad.common import grad_norm
from ..hypergrad.lower.stopping import solution_floor
from .options import QuasiNewtonOptions
from .result import OptimizeStatus
from .runner import Runner, StopRun, floor_stop

__all__ = ["run_lbfgs"]

#: Share of grad_rtol ||h|| each part of the bound aims at when the tolerances are predicted.
SHARE = 0.4
#: A tolerance predicted from the previous point is at most this many times looser.
MAX_LOOSEN = 100.0
#: Notes kept about failed trial points.
MAX_TRIAL_NOTES = 20
#: Interpolated retries stay within [INTERP_LOW, INTERP_HIGH] times the rejected step.
INTERP_LOW, INTERP_HIGH = 0.1, 0.5
#: Without a pair of positive curvature the next steepest-descent step is this much longer.
EXPAND = 4.0
#: A trial move is at most this many times as long as the last accepted one.
MOVE_GROWTH = 4.0
#: A pair (s, y) enters the memory only with s.y > CURVATURE_MIN ||s|| ||y||.
CURVATURE_MIN = 1e-10
#: Share of the stopping rule's allowed cert = ||h|| + bound given to the bound (`_stop_atol`).
STOP_SHARE = 0.5
#: A point whose ||h|| alone is below this share of the rule's allowed cert is re-solved at the
#: same theta until the rule can pass there, instead of stepping on (`_tightened_to_stop`): the
#: bound it then needs, (1 - share) / 2 of the allowed cert, is about one digit below
#: grad_rtol ||h||, a fraction of a new point's solve.
TIGHTEN_SHARE = 0.95
#: ftol is relative to |F|, or to this share of |F(theta0)| when |F| is smaller.
FLOOR_SHARE = 1e-6
#: How the end at the accuracy floor begins its message.
FLOOR_LEAD = "the certified accuracy needed is below what the solvers reach"
#: The ||h|| expected at the next point is at least this fraction of the current one.
MIN_RATE = 0.01
#: A scalar theta's cubic step is used only when the certified value errors of its two points,
#: divided by their distance, are at most this share of the smaller |h| (else it is noise).
CUBIC_VALUE_SHARE = 0.01
#: ... and only when it is between CUBIC_LOW and CUBIC_HIGH times the quasi-Newton step.
CUBIC_LOW, CUBIC_HIGH = 0.1, 10.0


#: One curvature pair of the memory: (s, y, 1 / s.y).
Pair = tuple[np.ndarray, np.ndarray, float]


@dataclass
class Point:
    """An evaluated point: its hypergradient and certified value, and the tolerances used."""

    theta: np.ndarray
    hg: Any
    h: np.ndarray
    hn: float
    bound: float
    value: float
    err: float
    eps: float
    delta: float
    entry: dict[str, Any]
    #: bound <= grad_rtol ||h||: -h (and the L-BFGS direction, when the line search's test
    #: passes) is a certified descent direction. False when only the stopping rule's absolute
    #: tolerance was met (enough to stop, not to step).
    steers: bool = True


def _distance_for_value(hg: Any, target: float) -> float:
    """The e that brings the certified value error (`Runner.certified_value`) to target at hg's
    point, for every sample: the larger of the plain bound's root, ||grad f|| e + L_f/2 e^2 =
    target, and the corrected value's, R e + (L_f + L_A ||q||)/2 e^2 = target with the adjoint
    residual R met there (its rounding floor left to the test); 0 when neither is finite."""
    parts = hg.samples if hg.samples is not None else [hg]
    needs = []
    for r in parts:
        L_f, L_A = float(r.constants["L_f"]), float(r.constants["L_A"])
        plain = _root(float(r.grad_f_norm), L_f / 2, target)
        corrected = (_root(float(r.R), (L_f + L_A * float(r.q_norm)) / 2, target)
                     if math.isfinite(r.corrected_value_error) else 0.0)
        needs.append(max(plain, corrected))
    return min(needs)


def _root(a: float, b: float, target: float) -> float:
    """The e >= 0 with a e + b e^2 = target (a, b >= 0); 0 when a or b is not finite."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return 0.0
    denominator = a + math.sqrt(a * a + 4 * b * target)
    return 2 * target / denominator if denominator > 0 else math.inf


def _evaluate(run: Runner, theta: np.ndarray, eps: float, delta: float, o: QuasiNewtonOptions,
              value_tol: float | None, step: float, atol: float = 0.0,
              rtol: float | None = None) -> Point:
    """The hypergradient at theta with bound <= atol + rtol ||h|| (rtol: grad_rtol unless
    given) and, with value_tol, the certified value error <= value_tol (eps shrinks until it
    is; the accuracy floor stops). atol > 0 is the stopping rule's own need (`_stop_atol`,
    `_tightened_to_stop`)."""
    rtol = o.grad_rtol if rtol is None else rtol
    while True:
        hg = run.hypergradient(theta, eps, delta, rtol=rtol, atol=atol)
        h = np.array(hg.grad, dtype=float)
        hn = grad_norm(h)
        value, err = run.certified_value(hg)
        used_eps = float(hg.e) if math.isfinite(hg.e) and hg.e > 0 else eps
        entry = run.record(theta, value, err, hn, hg.bound, used_eps, delta, step)
        if not math.isfinite(err):
            note = "value error bound not finite (L_f = inf): the line search is not certified"
            if note not in run.notes:
                run.notes.append(note)
        if not math.isfinite(hg.bound):
            raise StopRun(OptimizeStatus.FAILED, f"the a posteriori bound is not finite "
                                                 f"({hg.status}): no step can be certified")
        if getattr(hg, "at_accuracy_floor", False) and not hg.bound <= atol + rtol * hn:
            raise _floor_end(run, hn + float(hg.bound), f"{FLOOR_LEAD} ({hg.status})")
        if not hg.bound <= atol + rtol * hn:   # a zero trap or a capped round: tighten
            eps, delta = min(eps, used_eps) * o.tau, delta * o.tau
            _check_floors(run, hg, eps, o, f"the bound {hg.bound:.3g} was still above "
                          f"atol + rtol ||h|| = {atol + rtol * hn:.3g}")
            continue
        if value_tol is None or not math.isfinite(err) or err <= value_tol:
            return Point(theta, hg, h, hn, float(hg.bound), value, err,
                         used_eps, max(float(hg.R), o.min_eps) if math.isfinite(hg.R) else delta,
                         entry, bool(hg.bound <= o.grad_rtol * hn))
        need = _distance_for_value(hg, 0.8 * value_tol)
        eps = min(used_eps * o.tau, need) if need > 0 else used_eps * o.tau
        _check_floors(run, hg, eps, o, f"the value error {err:.3g} was still above "
                      f"{value_tol:.3g}, the share of the decrease the line search tests")


def _check_floors(run: Runner, hg: Any, eps: float, o: QuasiNewtonOptions, why: str) -> None:
    """Stop when the next eps falls below min_eps (`floor_stop`) or below eps_machine ||x||,
    the accuracy floating point lets the lower solve reach (`_floor_end`)."""
    if eps < o.min_eps:
        raise floor_stop(run, hg, eps, why)
    xs = hg.x if hg.samples is not None else [hg.x]
    lowest = max(solution_floor(x) for x in xs)
    if eps < lowest:
        raise _floor_end(run, grad_norm(hg.grad) + float(hg.bound),
                         f"{FLOOR_LEAD} (eps = {eps:.3g} < eps_machine ||x|| = "
                         f"{lowest:.3g}: {why})")


def _floor_end(run: Runner, cert: float, why: str) -> StopRun:
    """The end of useful progress: the accuracy a test needs is below what floating point lets
    the solvers reach. "converged" when the certificate ||grad F|| <= cert meets gtol anyway,
    else "accuracy floor" (success, as for min_eps: the returned point and its certificate
    hold), never "failed"."""
    if cert <= run.options.gtol:
        return StopRun(OptimizeStatus.CONVERGED, f"||grad F|| <= ||h|| + bound = {cert:.3g}")
    return StopRun(OptimizeStatus.ACCURACY_FLOOR,
                   f"{why}; certified ||grad F|| <= ||h|| + bound = {cert:.3g}")


def _direction(h: np.ndarray, pairs: deque[Pair], gamma: float) -> np.ndarray:
    """-H h by L-BFGS's two-loop recursion; H0 = gamma I."""
    q = h.copy()
    alphas = []
    for s, y, rho in reversed(pairs):
        a = rho * float(s @ q)
        q -= a * y
        alphas.append(a)
    r = gamma * q
    for (s, y, rho), a in zip(pairs, reversed(alphas)):
        b = rho * float(y @ r)
        r += s * (a - b)
    direction: np.ndarray = -r
    return direction


def _interpolate(t: float, slope0: float, value0: float, value_t: float) -> float:
    """The minimiser of the quadratic through (0, value0) with slope slope0 and (t, value_t),
    kept within [INTERP_LOW t, INTERP_HIGH t]."""
    curv = value_t - value0 - slope0 * t
    guess = -slope0 * t * t / (2 * curv) if curv > 0 else INTERP_LOW * t
    return min(max(guess, INTERP_LOW * t), INTERP_HIGH * t)


def _bound_parts(hg: Any) -> tuple[float, float]:
    """(R part, e part) of hg.bound, mean over samples: the bound at e = 0 (the adjoint
    residual's share), and the rest (every term with e)."""
    if hg.samples is not None:
        parts = np.array([_bound_parts(r) for r in hg.samples])
        return float(parts[:, 0].mean()), float(parts[:, 1].mean())
    r_part, _ = aposteriori_bound(hg.constants, 0.0, hg.R, hg.norm_B, hg.grad_f_norm,
                                  hg.q_norm)
    rounding = hg.bound_forms.get("rounding", 0.0)
    return float(r_part), max(float(hg.bound) - rounding - float(r_part), 0.0)


def _tolerances(base: Point, value_tol: float, grad_target: float,
                o: QuasiNewtonOptions) -> tuple[float, float]:
    """First-round eps, delta at a nearby point whose bound must meet grad_target: the values'
    need, and the gradient's need scaled from the base point part by part (the R part is linear
    in the adjoint residual, the e part about linear in e), so that one round usually passes;
    they may loosen again from one point to the next."""
    target = SHARE * grad_target
    r_part, e_part = _bound_parts(base.hg)
    eps = base.eps * min(target / e_part, MAX_LOOSEN) if e_part > 0 else base.eps
    delta = base.delta * min(target / r_part, MAX_LOOSEN) if r_part > 0 else base.delta
    need = _distance_for_value(base.hg, value_tol)
    if need > 0:
        eps = min(eps, need)
    return max(eps, o.min_eps), max(delta, o.min_eps)


def _line_search(run: Runner, base: Point, d: np.ndarray, max_move: float, next_hn: float,
                 atol: float, o: QuasiNewtonOptions) -> tuple[Point | None, Point]:
    """Trial points base.theta + t d, t = 1 first (shortened to a move of max_move), until one
    passes the certified Armijo test: (accepted point or None, the base point, possibly
    re-evaluated with tighter values). next_hn is the ||h|| expected at the trial point, atol
    the stopping rule's absolute need there (their sum sets the first round's tolerances)."""
    length = grad_norm(d)
    t, share = min(1.0, max_move / length) if length > 0 else 1.0, o.value_share
    for _ in range(o.max_backtracks):
        new = run.project(base.theta + t * d)
        move = new - base.theta
        dec = -float(base.h @ move)
        if dec <= base.bound * grad_norm(move):
            return None, base                   # not a certified descent move (or none)
        target = share * dec
        if math.isfinite(base.err) and base.err > target:
            base = _evaluate(run, base.theta, min(base.eps, _distance_for_value(base.hg, target)
                                                  or base.eps), base.delta, o, target, 0.0)
            continue
        eps, delta = _tolerances(base, target, atol + o.grad_rtol * next_hn, o)
        try:
            trial = _evaluate(run, new, eps, delta, o, target, t, atol)
        except StopRun as stop:                 # no usable number there: a shorter step
            if stop.status == OptimizeStatus.ACCURACY_FLOOR:    # the end of useful progress
                raise _floor_end(run, base.hn + base.bound,
                                 f"at a trial point, {stop.message}; at the returned point"
                                 ) from None
            if stop.status != OptimizeStatus.FAILED:
                raise
            note = f"a trial point failed and was stepped back from: {stop.message}"
            if len(run.notes) < MAX_TRIAL_NOTES:
                run.notes.append(note)
            run.x, run.q = base.hg.x, base.hg.q
            t *= INTERP_LOW
            continue
        errors = trial.err + base.err
        if not math.isfinite(errors):
            errors = 0.0                        # L_f = inf even on the ball: said in the notes
        if trial.value + errors <= base.value - o.armijo * dec:
            return trial, base
        if trial.value <= base.value - o.armijo * dec:
            share *= 0.25                       # the errors hide a real decrease: tighten
            continue
        slope0 = -dec
        t = _interpolate(t, slope0, base.value, trial.value)
    return None, base


def _cubic_step(previous: Point | None, base: Point, d: np.ndarray) -> np.ndarray:
    """For a scalar theta, the step to the minimiser of the cubic through the values and slopes
    of the last two accepted points (Hermite interpolation, as in 1-D line searches), in place
    of the quasi-Newton step d, which in 1-D is the secant step on the slopes alone. The values
    carry what the slopes miss: where h falls slowly far from the minimiser, the secant
    extrapolates its zero far out (on the learning benchmark's case (a) from theta0 = 2 to
    log alpha = -13.7, a trial whose lower problem at tiny alpha cost more than the rest of the
    run), the cubic to a moderate step; near the minimiser it converges with order 2, the
    secant with order 1.6. Only a step: the certified Armijo test decides as for any step, and
    the stopping rule keeps the quasi-Newton model. d when theta is a vector, the values' errors
    (over the distance) exceed CUBIC_VALUE_SHARE of the slopes, the cubic has no minimiser, or
    its step is not a descent step within [CUBIC_LOW, CUBIC_HIGH] times d."""
    if previous is None or base.theta.size != 1:
        return d
    a, b = float(previous.theta[0]), float(base.theta[0])
    ha, hb = float(previous.h[0]), float(base.h[0])
    errors = previous.err + base.err
    if a == b or not errors <= CUBIC_VALUE_SHARE * min(abs(ha), abs(hb)) * abs(b - a):
        return d
    d1 = ha + hb - 3 * (previous.value - base.value) / (a - b)
    disc = d1 * d1 - ha * hb
    if disc < 0:
        return d
    d2 = math.copysign(math.sqrt(disc), b - a)
    denom = hb - ha + 2 * d2
    step = -(b - a) * (hb + d2 - d1) / denom if denom != 0 else math.nan
    ratio = step / float(d[0]) if d[0] != 0 else math.nan
    if not CUBIC_LOW <= ratio <= CUBIC_HIGH:     # nan, the wrong side, or far from d
        return d
    return np.array([step])


def _expected_rate(base: Point, cubic: bool, rate: float, rate_before: float) -> float:
    """The factor by which ||h|| is expected to fall in the next step, from the last two: it
    goes on at its last rate; for a scalar theta the error e of theta falls as the step's
    interpolation dictates, and ||h|| ~ e near the minimiser: the secant step (L-BFGS in 1-D)
    has e_k+1 ~ C e_k e_k-1, so r_k+1 ~ r_k r_k-1, the cubic step (`_cubic_step`)
    e_k+1 ~ C e_k e_k-1^2, so r_k+1 ~ r_k r_k-1^2 (`cubic`: applied only when the last two
    steps were cubic too, so that both rates come from steps that interpolate; a capped move
    before them falls at a rate that says nothing about the next)."""
    if base.theta.size != 1:
        return rate
    return rate * rate_before ** 2 if cubic else rate * rate_before


def _scale(base: Point, f0: float) -> float:
    """What ftol is relative to: |F|, but at least FLOOR_SHARE |F(theta0)| (an F whose
    infimum is 0 would otherwise ask for ever more digits)."""
    return max(abs(base.value), FLOOR_SHARE * abs(f0))


def _curvature(base: Point, d: np.ndarray, pairs: deque[Pair]) -> float:
    """c such that cert^2 c estimates the decrease still possible with ||grad F|| <= cert: the
    larger of the quasi-Newton model's (1/2 h.Hh / ||h||^2) and 1 / (2 c_min), c_min the smallest
    curvature s.y/s.s of the stored pairs (the model alone misses directions of small curvature
    it has not met yet). 0 without pairs (no estimate yet)."""
    if not pairs or base.hn == 0:
        return 0.0
    c_min = min(1.0 / (rho * float(s @ s)) for s, _, rho in pairs)
    return max(0.5 * float(-(base.h @ d)) / base.hn ** 2, 1.0 / (2 * c_min))


def _stationary(base: Point, d: np.ndarray, pairs: deque[Pair], f0: float,
                o: QuasiNewtonOptions) -> str | None:
    """The stopping rule's message when it holds at base, else None: the decrease still
    possible, estimated with the certified gradient bound cert = ||h|| + bound, is at most
    ftol * scale (`_scale`), or cert <= gtol."""
    cert = base.hn + base.bound
    if cert <= o.gtol:
        return f"||grad F|| <= ||h|| + bound = {cert:.3g} <= gtol"
    coef = _curvature(base, d, pairs)
    if coef == 0:
        return None
    predicted, limit = cert * cert * coef, o.ftol * _scale(base, f0)
    if predicted <= limit:
        return (f"F can decrease by about {predicted:.3g} more <= ftol |F| = {limit:.3g} (an "
                f"estimate from the certified gradient and the curvature the steps have met, not "
                f"a bound: a direction of smaller curvature can hold more); ||grad F|| <= "
                f"||h|| + bound = {cert:.3g} (certified)")
    return None


def _stop_atol(base: Point, d: np.ndarray, pairs: deque[Pair], f0: float, next_hn: float,
               o: QuasiNewtonOptions) -> float:
    """The absolute bound at the next point that lets the stopping rule pass there if its
    ||h|| is about next_hn (the rule needs cert = ||h|| + bound below sqrt(ftol scale / c),
    which near the end is far looser than grad_rtol ||h||); 0 when the rule is not expected
    to pass there (grad_rtol alone then sets the accuracy)."""
    coef = _curvature(base, d, pairs)
    if coef == 0:
        return 0.0
    allowed = math.sqrt(o.ftol * _scale(base, f0) / coef)
    return STOP_SHARE * allowed if next_hn <= STOP_SHARE * allowed else 0.0


def _allowed_cert(base: Point, d: np.ndarray, pairs: deque[Pair], f0: float,
                  o: QuasiNewtonOptions) -> float:
    """The certified gradient c = ||h|| + bound below which the stopping rule passes at base
    (`_stationary`): sqrt(ftol scale / curvature factor); 0 without a curvature estimate."""
    coef = _curvature(base, d, pairs)
    return math.sqrt(o.ftol * _scale(base, f0) / coef) if coef > 0 else 0.0


def _tightened_to_stop(run: Runner, base: Point, d: np.ndarray, pairs: deque[Pair], f0: float,
                       o: QuasiNewtonOptions) -> Point | None:
    """base re-solved at the same theta until bound <= allowed - ||h|| when ||h|| alone is
    already below TIGHTEN_SHARE of what the stopping rule allows and only the bound keeps it
    from passing: a warm-started round at the same theta costs a fraction of a new point. None
    when that does not apply (the caller steps on)."""
    allowed = _allowed_cert(base, d, pairs, f0, o)
    if not 0 < base.hn <= TIGHTEN_SHARE * allowed:
        return None
    return _evaluate(run, base.theta, base.eps, base.delta, o, None, 0.0,
                     STOP_SHARE * (allowed - base.hn), rtol=0.0)


def _resolved_to_steer(run: Runner, base: Point, d: np.ndarray, pairs: deque[Pair], f0: float,
                       o: QuasiNewtonOptions) -> Point | None:
    """base re-solved at the same theta to bound <= grad_rtol ||h|| when it was solved only as
    far as the stopping rule needed and the rule did not pass: every step leaves from a point
    whose -h is a certified descent direction. None when base steers already."""
    if base.steers:
        return None
    return _evaluate(run, base.theta, base.eps, base.delta, o, None, 0.0)


def _remember(pairs: deque[Pair], new: Point, old: Point, gamma: float) -> tuple[float, bool]:
    """Store the pair (s, y) of the step old -> new when its curvature is positive: (the next
    H0 scale gamma, whether a pair was stored). Without any pair, F is not convex along the
    steps so far: the next steepest-descent step is EXPAND times longer."""
    s, y = new.theta - old.theta, new.h - old.h
    sy = float(s @ y)
    if sy > CURVATURE_MIN * grad_norm(s) * grad_norm(y):
        pairs.append((s, y, 1.0 / sy))
        return sy / float(y @ y), True
    return (gamma if pairs else gamma * EXPAND), False


def run_lbfgs(run: Runner, theta: np.ndarray, o: QuasiNewtonOptions
              ) -> tuple[OptimizeStatus, str]:
    """The loop (see the module docstring): (status, message) when its own rule ends it."""
    base = _evaluate(run, theta, o.eps0, o.delta0, o, None, math.nan)
    run.accept(theta, base.entry)
    f0 = base.value
    pairs: deque[Pair] = deque(maxlen=o.memory)
    first = o.first_step if o.first_step is not None else min(1.0, base.hn)
    gamma = first / base.hn if base.hn > 0 else 1.0
    max_move, rate, rate_before = math.inf, 1.0, 1.0
    cubics = 0                               # cubic steps in a row, the next one included
    previous: Point | None = None            # the point before base (its pair not stored yet)
    for _ in range(o.max_iter):
        gamma_before = gamma
        stored = False
        if previous is not None:
            gamma, stored = _remember(pairs, base, previous, gamma)
        d = _direction(base.h, pairs, gamma)
        done = _stationary(base, d, pairs, f0, o)
        for resolve in (_tightened_to_stop, _resolved_to_steer):
            again = resolve(run, base, d, pairs, f0, o) if done is None else None
            if again is None:
                continue
            base = again                            # the same theta, solved further
            run.accept(base.theta, base.entry)
            if stored:
                pairs.pop()
            gamma, stored = gamma_before, False
            if previous is not None:
                gamma, stored = _remember(pairs, base, previous, gamma)
            d = _direction(base.h, pairs, gamma)
            done = _stationary(base, d, pairs, f0, o)
        if done is not None:
            return OptimizeStatus.CONVERGED, done
        step = _cubic_step(previous, base, d) if stored else d
        cubics = cubics + 1 if step is not d else 0
        next_hn = base.hn * max(_expected_rate(base, cubics >= 3, rate, rate_before), MIN_RATE)
        atol = _stop_atol(base, d, pairs, f0, next_hn, o)
        trial, base = _line_search(run, base, step, max_move, next_hn, atol, o)
        if trial is None and pairs:             # the quasi-Newton step failed: steepest descent
            pairs.clear()
            trial, base = _line_search(run, base, _direction(base.h, pairs, gamma), max_move,
                                       next_hn, 0.0, o)
        if trial is None:
            raise StopRun(OptimizeStatus.STALLED,
                          f"no trial step passed the certified decrease test; ||grad F|| <= "
                          f"||h|| + bound = {base.hn + base.bound:.3g} (certified)")
        max_move = MOVE_GROWTH * grad_norm(trial.theta - base.theta)
        rate_before, rate = rate, (min(1.0, trial.hn / base.hn) if base.hn > 0 else 1.0)
        previous, base = base, trial
        run.accept(base.theta, base.entry)
        run.iterations += 1
    return OptimizeStatus.MAX_ITER, f"{o.max_iter} iterations"
