"""NumPy test problems for tests/test_upper.py: ridge data with an interior optimal theta, a
samples container, and the exact upper objective / its minimiser.

The Ridge kernel of quadratic_kernels.py is reused; only the data generator differs (fewer,
noisier training points, so that the validation loss has an interior minimum in theta = log
alpha instead of preferring alpha -> 0).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from quadratic_kernels import Logistic, Ridge

__all__ = ["noisy_ridge", "Samples", "exact_F", "exact_grad", "optimal_theta", "Ridge", "Logistic"]


def noisy_ridge(seed=0, m=30, d=20, pv=40, noise=1.0) -> Ridge:
    rs = np.random.RandomState(seed)
    K = rs.randn(m, d) / math.sqrt(m)
    xt = rs.randn(d)
    y = K @ xt + noise * rs.randn(m)
    Kv = rs.randn(pv, d) / math.sqrt(pv)
    yv = Kv @ xt + noise * rs.randn(pv)
    return Ridge(K, y, Kv, yv)


class Samples:
    """Several kernels sharing theta: what `module.bind_samples` returns, in NumPy."""

    def __init__(self, ks):
        self.samples = list(ks)
        self.theta_size = self.samples[0].theta_size

    def __len__(self):
        return len(self.samples)


def exact_F(k, theta) -> float:
    """The exact upper objective (mean over samples) from closed-form / Newton lower solves."""
    ks = k.samples if hasattr(k, "samples") else [k]
    th = np.atleast_1d(np.asarray(theta, dtype=float))
    return float(np.mean([s.upper_value(s.x_star(th), th) for s in ks]))


def exact_grad(k, theta) -> np.ndarray:
    ks = k.samples if hasattr(k, "samples") else [k]
    th = np.atleast_1d(np.asarray(theta, dtype=float))
    return np.mean([np.atleast_1d(s.exact_hypergradient(th)) for s in ks], axis=0)


def optimal_theta(k, lo=-10.0, hi=6.0) -> float:
    """Scalar theta: a tight bounded minimisation of the exact F, polished by a root of the
    exact hypergradient when it changes sign around the minimiser."""
    r = minimize_scalar(lambda t: exact_F(k, t), bounds=(lo, hi), method="bounded",
                        options={"xatol": 1e-12})
    t = float(r.x)
    g = lambda s: float(exact_grad(k, s)[0])  # noqa: E731
    a, b = t - 1e-3, t + 1e-3
    if g(a) < 0 < g(b):
        t = brentq(g, a, b, xtol=1e-14, rtol=1e-15)
    return t
