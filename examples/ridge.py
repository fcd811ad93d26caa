"""Ridge regression with a learned weight: theta = log alpha (docs/interface.md section 1)."""
import numpy as np
import sympy as sp
from codegen import Problem

m, n, p = sp.symbols("m n p", integer=True, positive=True)   # sizes: bound from data at run time
i, j, k = sp.Idx("i", m), sp.Idx("j", n), sp.Idx("k", p)
A, b = sp.IndexedBase("A", shape=(m, n)), sp.IndexedBase("b", shape=(m,))     # training data
Av, bv = sp.IndexedBase("Av", shape=(p, n)), sp.IndexedBase("bv", shape=(p,)) # validation data
x = sp.IndexedBase("x", shape=(n,))                                          # lower-level variable
theta = sp.Symbol("theta")                                                   # log of the ridge weight

ridge = Problem(
    name="ridge",
    x=x,
    theta=theta,
    lower=sp.Sum((sp.Sum(A[i, j] * x[j], (j, 0, n - 1)) - b[i]) ** 2, (i, 0, m - 1)) / 2
          + sp.exp(theta) / 2 * sp.Sum(x[j] ** 2, (j, 0, n - 1)),
    upper=sp.Sum((sp.Sum(Av[k, j] * x[j], (j, 0, n - 1)) - bv[k]) ** 2, (k, 0, p - 1)) / (2 * p),
)

THETA0 = 0.0  # alpha = 1


def example_data(seed=0, m=50, n=10, p=30):
    """Gaussian design, a planted x_true, noise 0.5 on training and validation targets."""
    rng = np.random.default_rng(seed)
    x_true = rng.standard_normal(n)
    A = rng.standard_normal((m, n))
    Av = rng.standard_normal((p, n))
    return {
        "A": A, "b": A @ x_true + 0.5 * rng.standard_normal(m),
        "Av": Av, "bv": Av @ x_true + 0.5 * rng.standard_normal(p),
    }
