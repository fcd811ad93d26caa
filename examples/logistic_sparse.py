"""l2-regularised logistic regression on sparse features (CSR): theta = log of the l2 weight.

Declaring A and Av sparse makes every contraction over their columns loop over the stored
non-zeros only (bind scipy.sparse matrices; dense arrays are converted). The problem is otherwise
the same as examples/logistic.py.
"""
import numpy as np
import scipy.sparse as sps
import sympy as sp
from codegen import Problem

m, n, p = sp.symbols("m n p", integer=True, positive=True)     # training rows, features, validation rows
i, j, k = sp.Idx("i", m), sp.Idx("j", n), sp.Idx("k", p)
A, y = sp.IndexedBase("A", shape=(m, n)), sp.IndexedBase("y", shape=(m,))      # training data, labels +-1
Av, yv = sp.IndexedBase("Av", shape=(p, n)), sp.IndexedBase("yv", shape=(p,))  # validation data
x = sp.IndexedBase("x", shape=(n,))
theta = sp.Symbol("theta")

logistic_sparse = Problem(
    name="logistic_sparse",
    x=x,
    theta=theta,
    sparse=("A", "Av"),
    lower=sp.Sum(sp.log(1 + sp.exp(-y[i] * sp.Sum(A[i, j] * x[j], (j, 0, n - 1)))), (i, 0, m - 1)) / m
          + sp.exp(theta) / 2 * sp.Sum(x[j] ** 2, (j, 0, n - 1)),
    upper=sp.Sum(sp.log(1 + sp.exp(-yv[k] * sp.Sum(Av[k, j] * x[j], (j, 0, n - 1)))), (k, 0, p - 1)) / p,
)

THETA0 = float(np.log(0.01))


def example_data(seed=0, m=2000, n=100000, p=1000, density=0.001):
    """Random sparse features; labels from a planted sparse linear model."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n) * (rng.random(n) < 0.05)
    A = sps.random(m, n, density=density, format="csr", random_state=rng)
    Av = sps.random(p, n, density=density, format="csr", random_state=rng)
    label = lambda M: np.where(M @ w + 0.1 * rng.standard_normal(M.shape[0]) >= 0, 1.0, -1.0)  # noqa: E731
    return {"A": A, "y": label(A), "Av": Av, "yv": label(Av)}
