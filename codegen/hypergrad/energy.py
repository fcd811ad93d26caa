"""The third derivative of a Gram-form g measured in the energy norm of the lower error
(docs/bounds.md 15.9).

Corollary 15.3 bounds ||DA(x_eps)[e] u|| by L_A ||u|| E: a worst case over every direction of e
and every row of the data, with the global ||K||^2 inside L_A (44 times ||K||^2 where block sums
certify it at 20000 x 2000). Where d2g/dx2 = K^T diag(w(x)) K + R, R constant in x and positive
semidefinite, the same quantity is

    DA[e] u = K^T diag(w'[u]) K e = (W^1/2 K)^T diag(w'[u] / w) (W^1/2 K e)
    ||DA[e] u|| <= rho_u sqrt(L) eps_A,   rho_u = max_i |w'_i[u]| / w_i,

since ||W^1/2 K||^2 = ||K^T W K|| <= ||A_e|| <= L and ||W^1/2 K e||^2 <= e^T A_e e <= eps_A^2 =
||grad g(x_eps)||^2 / mu + L_A E^3 / 2 (e^T A_bar e = r_g^T A_bar^-1 r_g with A_bar the mean Hessian
on the segment, and A_e - A_bar at most L_A E / 2). rho_u reads the data row by row at x_eps
(w = `lower_gram_weights`, w'[u] = `lower_gram_weights_jvp`, one pass each), and eps_A / E is
about sqrt(mu) where L_A ||u|| has ||K||^2 max_i ||k_i||: on l2-logistic regression at 20000 x 2000
the term is about 190 times smaller.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import KernelError
from .bounds import ROUNDING_FLOOR
from .common import norm
from .dense import theta_part
from .gram import gram_info
from .results import HypergradientResult

__all__ = ["Energy", "energy_at"]


@dataclass(frozen=True)
class Energy:
    """What the energy-norm terms need at one x_eps: eps_A >= sqrt(e^T A_e e), scale =
    sqrt(L) eps_A, and rho_u for u = q (`rho` gives it for other vectors, one pass each), so that
    ||DA(x_eps)[e] u|| <= rho_u * scale (`bound`)."""

    eps_A: float
    scale: float
    rho_q: float
    k: Any
    x: np.ndarray
    theta: np.ndarray
    weights: np.ndarray

    def rho(self, u: np.ndarray) -> float:
        """rho_u at this x_eps (`_rho`)."""
        return _rho(self.k, self.x, self.theta, self.weights, u)

    def bound(self, rho: float) -> float:
        """rho * scale: >= ||DA(x_eps)[e] u|| for the u whose rho it is."""
        return 0.0 if rho == 0.0 else rho * self.scale


def _rho(k: Any, x: np.ndarray, theta: np.ndarray, weights: np.ndarray, u: np.ndarray) -> float:
    """max_i |w'_i[u]| / w_i (inf where a zero weight has a nonzero tangent, or the kernel
    fails or its output is not finite), rounded up: one pass over the data."""
    tangent = np.empty_like(weights)
    try:
        k.kernels["lower_gram_weights_jvp"](
            {k.x_name: x, k.theta_name: theta, "v": np.ascontiguousarray(u, dtype=np.float64)},
            tangent)
    except (KernelError, FloatingPointError, OverflowError):
        return math.inf
    return _ratio(tangent, weights)


def _ratio(tangent: np.ndarray, weights: np.ndarray) -> float:
    """max |tangent_i| / weights_i over the rows (0 / 0 counts 0), times (1 + ROUNDING_FLOOR)."""
    if not np.isfinite(tangent).all():
        return math.inf
    size = np.abs(tangent)
    live = size > 0
    if not live.any():
        return 0.0
    if (weights[live] <= 0).any():
        return math.inf
    return float(np.max(size[live] / weights[live])) * (1 + ROUNDING_FLOOR)


def energy_at(k: Any, hg: HypergradientResult) -> tuple[Energy | None, int]:
    """(Energy at hg's x_eps and q, or None where its conditions fail; the passes over the data
    spent: the weights and w'[q]). The conditions: k's module has the Gram form with R constant
    in x (meta "rest_reads_x" false) and both kernels, every weight is >= 0, R (when g has
    theta terms) is positive semidefinite by Gershgorin's theorem, and mu, L, E are finite."""
    info = _gram_info(k)
    c = hg.constants if isinstance(hg.constants, dict) else {}
    mu, L, E = float(c.get("mu", 0.0)), float(c.get("L", math.inf)), float(hg.e)
    lower_grad = getattr(hg.lower, "grad", None)
    if (info is None or lower_grad is None or not mu > 0 or not math.isfinite(L)
            or not math.isfinite(E)):
        return None, 0
    x = np.ascontiguousarray(hg.x, dtype=np.float64)
    th = np.ascontiguousarray(hg.theta, dtype=np.float64)
    weights = np.empty(k.data[info["data"]].shape[0])
    try:
        k.kernels["lower_gram_weights"]({k.x_name: x, k.theta_name: th}, weights)
    except (KernelError, FloatingPointError, OverflowError):
        return None, 1
    if not np.isfinite(weights).all() or weights.min() < 0:
        return None, 1
    if info["rest"] and not _rest_semidefinite(k, x, th):
        return None, 1
    L_A = float(c.get("L_A", math.inf))
    G = norm(np.asarray(lower_grad))
    eps_A = math.sqrt(G * G / mu + (0.5 * L_A * E ** 3 if E > 0 else 0.0))
    scale = math.sqrt(L) * eps_A * (1 + ROUNDING_FLOOR)
    if not math.isfinite(scale):  # an infinite L_A on the ball: no pass for w'[q]
        return None, 1
    rho_q = _rho(k, x, th, weights, np.asarray(hg.q))
    if not math.isfinite(rho_q):
        return None, 2
    return Energy(eps_A, scale, rho_q, k, x, th, weights), 2


def _gram_info(k: Any) -> dict[str, Any] | None:
    """k's Gram form (`gram.gram_info`) where its R reads no x and the weights' tangent kernel
    is there, else None."""
    info = gram_info(k)
    if info is None or info.get("rest_reads_x", True) or "lower_gram_weights_jvp" not in k.kernels:
        return None
    return info


def _rest_semidefinite(k: Any, x: np.ndarray, th: np.ndarray) -> bool:
    """Whether R, the Hessian of g's theta terms at theta, is positive semidefinite: every
    Gershgorin disc of the dense R (`dense.theta_part`, one kernel call) lies in [0, inf)."""
    part = theta_part(k)
    R = None if part is None else part(x, th)
    if R is None:
        return False
    R = 0.5 * (R + R.T)
    off = np.abs(R).sum(axis=1) - np.abs(np.diag(R))
    return bool((np.diag(R) - off * (1 + ROUNDING_FLOOR) >= 0).all())
