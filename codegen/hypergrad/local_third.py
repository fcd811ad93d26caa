"""The data-local third derivative in the DWR corrections (docs/bounds.md 15.10) and in E&R's
bound (docs/bounds.md 3, `er_bound`).

Corollary 15.3 and Theorem 15.8 bound ||DA(x_eps)[e] u|| by L_A ||u|| E: sup |psi'''| over every
argument and Cauchy-Schwarz over every row. The bound problem's `third_contraction(x, theta, u)`
bounds the matrix DA(x_eps)[u] itself from the data at x_eps (||DA[e] u|| = ||DA[u] e||), and on
smoothed TV it is 500 times smaller for the adjoint q. It costs a pass over the data per
vector, so it is asked for only where the L_A terms matter: for the block rounds' q where
L_A ||q|| is most of w's factor (`with_local_q`, kept in the result's constants as "LA_q"), for the
per-direction v and lam where Corollary 15.3's L_A terms are more than half the first-order
correction, which is what h's true error is close to (docs/bounds.md 15.6).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import HypergenError
from .bounds import aposteriori_bound, certified_product
from .common import norm
from .results import HypergradientResult, evolve

__all__ = ["available", "local_contractions", "worth_local", "with_local_q", "q_curvature",
           "higher_constants", "ball_q_curvature", "LOCAL_SHARE", "LOCAL_Q", "ER_LOCAL_SHARE"]

#: The L_A terms' share of |first-order correction| above which v and lam get local bounds.
LOCAL_SHARE = 0.5
#: The constants' key of the bound on ||DA(x_eps)[q]|| at the result's x_eps and q.
LOCAL_Q = "LA_q"
_L_A_TERMS = ("RE", "vE", "EE", "lamA")
#: E&R's bound reads ||DA[q]|| from the data (`ball_q_curvature`) only where its L_A ||q|| term is
#: more than this share of the bound (else the pass buys less than it costs).
ER_LOCAL_SHARE = 0.25


def available(k: Any) -> bool:
    """Whether k bounds ||DA(x)[u]|| locally: every term of g with a third derivative has a row
    kernel (`BoundProblem.has_third_contraction`)."""
    return bool(getattr(k, "has_third_contraction", False))


def _contraction(k: Any, hg: HypergradientResult, u: np.ndarray) -> float:
    """k's bound on ||DA(x_eps)[u]|| (inf where it fails)."""
    try:
        return float(k.third_contraction(hg.x, hg.theta, u))
    except (HypergenError, ValueError, FloatingPointError, OverflowError):
        return math.inf


def with_local_q(k: Any, hg: HypergradientResult) -> tuple[HypergradientResult, int]:
    """(hg with constants[LOCAL_Q] >= ||DA(x_eps)[q]||, passes spent) for the block rounds: one
    pass where g is not quadratic, k has the local rule and L_A ||q|| is more than the rest of
    w's factor c_w mu / ||B|| = L_f + L_A ||q|| + L_B ||q|| mu / ||B|| (docs/bounds.md 15.8: on
    the per-feature logistic example it is not, and the pass would buy 3% of the bound); hg as
    it is otherwise, and where the bound came out infinite."""
    c = hg.constants if isinstance(hg.constants, dict) else None
    if c is None or LOCAL_Q in c or bool(getattr(k, "is_quadratic", False)) or not available(k):
        return hg, 0
    nq, nB, mu = float(hg.q_norm), float(hg.norm_B), float(c.get("mu", 0.0))
    if not (nB > 0 and mu > 0):
        return hg, 0
    rest = float(c.get("L_f", math.inf)) + certified_product(float(c.get("L_B", math.inf)), nq) * mu / nB
    if not certified_product(float(c.get("L_A", 0.0)), nq) > rest:
        return hg, 0
    value = _contraction(k, hg, np.asarray(hg.q))
    if not math.isfinite(value):  # a kernel's rows were not finite: L_A stands
        return hg, 1
    return evolve(hg, constants=dict(c, **{LOCAL_Q: value})), 1


def q_curvature(c: dict[str, Any], norm_q: float) -> float:
    """A bound on ||DA(x_eps)[q]||: the smaller of L_A ||q|| and the local one when c has it."""
    return min(certified_product(float(c.get("L_A", 0.0)), norm_q),
               float(c.get(LOCAL_Q, math.inf)))


def worth_local(terms: dict[str, float], delta: float) -> bool:
    """Whether the L_A terms of Corollary 15.3 exceed LOCAL_SHARE |delta| (delta: the
    correction along u, h_c - h)."""
    return _L_A_sum(terms) > LOCAL_SHARE * abs(delta)


def _L_A_sum(terms: dict[str, float]) -> float:
    return math.fsum(terms.get(t, 0.0) for t in _L_A_TERMS)


def local_contractions(k: Any, hg: HypergradientResult, v: np.ndarray, lam: np.ndarray,
                       terms: dict[str, float], energy: tuple[float, float] | None,
                       kept: dict[str, float]
                       ) -> tuple[tuple[float, float] | None, float | None, int]:
    """((a_q, a_v), a_lam, passes): a_w >= ||DA(x_eps)[e] w|| for every ||e|| <= E, the smaller
    of the local form Lambda_w E and the energy-norm one where `energy` gives it (a_q, a_v);
    energy and None where k has no local rule. One pass over the data per vector: q's only
    where neither hg's constants nor `kept` (the caller's, shared by a correction's
    directions; Lambda_q goes there under LOCAL_Q) has it, lam's only where lamA is a tenth of
    the L_A terms (None otherwise: lamA keeps its form)."""
    c = hg.constants if isinstance(hg.constants, dict) else {}
    E, passes = float(hg.e), 0
    if not available(k):
        return energy, None, 0
    if LOCAL_Q in c:
        lam_q = float(c[LOCAL_Q])
    elif LOCAL_Q in kept:
        lam_q = kept[LOCAL_Q]
    else:
        lam_q, passes = _contraction(k, hg, np.asarray(hg.q)), 1
        if math.isfinite(lam_q):
            kept[LOCAL_Q] = lam_q
    if not math.isfinite(lam_q):
        return energy, None, passes
    lam_v = _contraction(k, hg, v)
    passes += 1
    if not math.isfinite(lam_v):
        return energy, None, passes
    a_q, a_v = certified_product(lam_q, E), certified_product(lam_v, E)
    if energy is not None:
        a_q, a_v = min(a_q, energy[0]), min(a_v, energy[1])
    a_lam = None
    if terms.get("lamA", 0.0) > 0.1 * _L_A_sum(terms):
        lam_lam = _contraction(k, hg, lam)
        passes += 1
        a_lam = certified_product(lam_lam, E) if math.isfinite(lam_lam) else None
    return (a_q, a_v), a_lam, passes


def higher_constants(k: Any, th: np.ndarray, x: Any = None,
                     radius: float = math.inf) -> tuple[float, float]:
    """(L_3, L_Hf): Lipschitz constants of x -> DA(x) (fourth derivative of g) and of
    x -> H_f(x) (third derivative of f), from k.constants(theta), or where that is infinite
    (exp and polynomial atoms) from k.local_constants on B(x, radius), which must hold x* and
    x_eps (docs/bounds.md 15.3); 0 where g (f) is quadratic in x, inf where missing (the bound
    is then infinite, never wrong)."""
    raw = dict(k.constants(th))
    local = getattr(k, "local_constants", None)
    if (not all(math.isfinite(float(raw.get(key, math.inf))) for key in ("L_3", "L_Hf"))
            and x is not None and math.isfinite(radius) and local is not None):
        ball = local(np.asarray(x, dtype=np.float64), th, radius)
        raw = {key: min(float(raw.get(key, math.inf)), float(ball.get(key, math.inf)))
               for key in ("L_3", "L_Hf")}

    def read(key: str, zero: bool) -> float:
        if zero:
            return 0.0
        value = float(raw.get(key, math.inf))
        if math.isnan(value) or value < 0:
            raise ValueError(f"constant {key} = {raw.get(key)!r} is not >= 0")
        return value

    return (read("L_3", bool(getattr(k, "is_quadratic", False))),
            read("L_Hf", bool(getattr(k, "upper_is_quadratic", False))))


def er_bound(k: Any, th: np.ndarray, c: dict[str, Any], x: np.ndarray, q: np.ndarray, e: float,
             R: float, norm_B: float, norm_b: float, norm_q: float, depends_on_theta: bool,
             sharpen: bool) -> tuple[float, dict[str, float], dict[str, Any], int]:
    """(E&R's a posteriori bound (`aposteriori_bound`), its forms, the constants, passes spent):
    with `sharpen` (E&R's is the certificate the caller reports: a correction's own bound
    makes the pass a waste), where the q form's L_A ||q|| terms are more than ER_LOCAL_SHARE
    of the bound, the q form reads `ball_q_curvature` instead (one pass over the data), and
    the constants returned are a copy of c with Lambda_q under LOCAL_Q (the block rounds read
    it there); else c itself."""
    nq = norm_q
    bound, forms = aposteriori_bound(c, e, R, norm_B, norm_b, nq, depends_on_theta)
    mul, mu = certified_product, float(c["mu"])
    la_terms = mul(norm_B, nq, float(c["L_A"]), e) / mu if mu > 0 else math.inf
    if not (sharpen and math.isfinite(bound) and la_terms > ER_LOCAL_SHARE * bound):
        return bound, forms, c, 0
    lam_q, a, passes = ball_q_curvature(k, th, x, q, e)
    if a is None:
        return bound, forms, c, passes
    local, local_forms = aposteriori_bound(c, e, R, norm_B, norm_b, nq, depends_on_theta, a)
    kept = dict(c, **{LOCAL_Q: lam_q})
    return (local, local_forms, kept, passes) if local < bound else (bound, forms, kept, passes)


def ball_q_curvature(k: Any, th: np.ndarray, x: np.ndarray, q: np.ndarray,
                     e: float) -> tuple[float, float | None, int]:
    """(Lambda_q, a, passes) with ||(A(x*) - A(x_eps)) q|| <= a e for every x* in B(x_eps, e)
    (docs/bounds.md 3): a = Lambda_q + L_3 ||q|| e / 2, Lambda_q >= ||DA(x_eps)[q]|| from the
    data at x_eps (Lemma 15.10, one pass) and L_3 the Lipschitz constant of DA on the ball, since
    A(x*) - A(x_eps) integrates DA(x_s)[x* - x_eps] over the segment and ||DA(x_s)[q]|| <=
    Lambda_q + L_3 s e ||q||. a is None where k has no row kernels, g is quadratic (DA = 0: the
    L_A terms vanish anyway), L_3 is infinite or a row is not finite."""
    if not available(k) or bool(getattr(k, "is_quadratic", False)) or not math.isfinite(e):
        return math.inf, None, 0
    L3, _ = higher_constants(k, th, x, e)
    if not math.isfinite(L3):
        return math.inf, None, 0
    try:
        lam_q = float(k.third_contraction(x, th, q))
    except (HypergenError, ValueError, FloatingPointError, OverflowError):
        return math.inf, None, 1
    if not math.isfinite(lam_q):
        return math.inf, None, 1
    return lam_q, lam_q + 0.5 * certified_product(L3, norm(q), e), 1

