"""l2-regularised logistic regression with a learned weight: theta = log alpha.

Labels are data in {-1, +1}; the upper level is the mean validation logistic loss.
log(1 + exp(.)) is written plainly: the generator rewrites it into a stable softplus.
"""
import numpy as np
import sympy as sp
from codegen import Problem

m, n, p = sp.symbols("m n p", integer=True, positive=True)   # training samples, features, validation
i, j, k = sp.Idx("i", m), sp.Idx("j", n), sp.Idx("k", p)
A, y = sp.IndexedBase("A", shape=(m, n)), sp.IndexedBase("y", shape=(m,))     # training data
Av, yv = sp.IndexedBase("Av", shape=(p, n)), sp.IndexedBase("yv", shape=(p,)) # validation data
x = sp.IndexedBase("x", shape=(n,))                                          # weights
theta = sp.Symbol("theta")                                                   # log of the l2 weight

logistic = Problem(
    name="logistic",
    x=x,
    theta=theta,
    lower=sp.Sum(sp.log(1 + sp.exp(-y[i] * sp.Sum(A[i, j] * x[j], (j, 0, n - 1)))), (i, 0, m - 1)) / m
          + sp.exp(theta) / 2 * sp.Sum(x[j] ** 2, (j, 0, n - 1)),
    upper=sp.Sum(sp.log(1 + sp.exp(-yv[k] * sp.Sum(Av[k, j] * x[j], (j, 0, n - 1)))), (k, 0, p - 1)) / p,
)

THETA0 = float(np.log(1e-2))  # alpha = 0.01


def example_data(seed=0, m=200, n=10, p=200):
    """Gaussian features, labels from a planted linear model through a logistic link."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n)

    def sample(count):
        feats = rng.standard_normal((count, n))
        prob = 1.0 / (1.0 + np.exp(-feats @ w))
        return feats, np.where(rng.random(count) < prob, 1.0, -1.0)

    A, y = sample(m)
    Av, yv = sample(p)
    return {"A": A, "y": y, "Av": Av, "yv": yv}
