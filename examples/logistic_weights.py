"""l2-logistic regression with one learned weight per feature: theta_j = log alpha_j.

    g(x, theta) = (1/m) sum_i log(1 + exp(-y_i a_i.x)) + (1/2) sum_j exp(theta_j) x_j^2
    f(x)        = (1/p) sum_k log(1 + exp(-yv_k av_k.x))          (validation loss)
    r(theta)    = (rho/2) sum_j theta_j^2

Labels are data in {-1, +1}. Without r the problem has no minimiser: the weight of a feature that
does not help the validation loss drifts to +infinity with a vanishing hypergradient. The small
ridge rho = RHO = 1e-4 keeps theta bounded so that "F* + 1e-6 |F*|" is a target
every method can reach (benchmarks/bench_learning.py, case "weights").
"""
import numpy as np
import sympy as sp
from codegen import Problem

m, n, p = sp.symbols("m n p", integer=True, positive=True)   # training samples, features, validation
i, j, k = sp.Idx("i", m), sp.Idx("j", n), sp.Idx("k", p)
A, y = sp.IndexedBase("A", shape=(m, n)), sp.IndexedBase("y", shape=(m,))     # training data
Av, yv = sp.IndexedBase("Av", shape=(p, n)), sp.IndexedBase("yv", shape=(p,)) # validation data
RHO = 1e-4                                                                   # ridge on theta
x = sp.IndexedBase("x", shape=(n,))                                          # weights
theta = sp.IndexedBase("theta", shape=(n,))                                  # log of each l2 weight

logistic_weights = Problem(
    name="logistic_weights",
    x=x,
    theta=theta,
    lower=sp.Sum(sp.log(1 + sp.exp(-y[i] * sp.Sum(A[i, j] * x[j], (j, 0, n - 1)))), (i, 0, m - 1)) / m
          + sp.Sum(sp.exp(theta[j]) * x[j] ** 2, (j, 0, n - 1)) / 2,
    upper=sp.Sum(sp.log(1 + sp.exp(-yv[k] * sp.Sum(Av[k, j] * x[j], (j, 0, n - 1)))), (k, 0, p - 1)) / p,
    regulariser=sp.Rational(1, 2) * sp.Float(RHO) * sp.Sum(theta[j] ** 2, (j, 0, n - 1)),
)

THETA0 = 0.0  # alpha_j = 1 for every feature; a float means every entry


def example_data(seed=0, m=2000, n=200, p=1000, informative=20):
    """Gaussian features; labels from a planted model through a logistic link that uses only the
    first `informative` features, so the learned weights have something to find (large alpha_j
    on the noise features, small on the informative ones)."""
    rng = np.random.default_rng(seed)
    w = np.zeros(n)
    w[:informative] = rng.standard_normal(min(informative, n)) * 2.0

    def sample(count):
        feats = rng.standard_normal((count, n))
        prob = 1.0 / (1.0 + np.exp(-feats @ w))
        return feats, np.where(rng.random(count) < prob, 1.0, -1.0)

    A, y = sample(m)
    Av, yv = sample(p)
    return {"A": A, "y": y, "Av": Av, "yv": yv}
