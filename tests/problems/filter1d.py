"""A learned 1-D filter inside a Charbonnier expert, with a learned weight (docs/constants.md
section 8):

    g(x) = 1/2 ||x - y||^2 + exp(theta[0]) sum_i sqrt((sum_k theta[1 + k] x[i + k])^2 + nu^2)
    f(x) = 1/2 ||x - xt||^2

K_theta = sum_k theta[1 + k] S_k (S_k x = x[. + k]) sits inside the atom.
"""
import numpy as np
import sympy as sp

from codegen import Problem

KS = 3
n = sp.Symbol("n", integer=True, positive=True)
i, k = sp.symbols("i k", integer=True)
x, y, xt = (sp.IndexedBase(s, shape=(n,)) for s in ("x", "y", "xt"))
theta = sp.IndexedBase("theta", shape=(1 + KS,))               # log weight, KS coefficients
NU = sp.Rational(1, 10)

response = sp.Sum(theta[1 + k] * x[i + k], (k, 0, KS - 1))
filter1d = Problem(
    name="filter1d",
    x=x,
    theta=theta,
    lower=sp.Sum((x[i] - y[i]) ** 2, (i, 0, n - 1)) / 2
          + sp.exp(theta[0]) * sp.Sum(sp.sqrt(response ** 2 + NU ** 2), (i, 0, n - KS)),
    upper=sp.Sum((x[i] - xt[i]) ** 2, (i, 0, n - 1)) / 2,
)

THETA0 = [float(np.log(0.1)), -1.0, 1.0, 0.0]


def example_data(seed: int = 0, n: int = 16, noise: float = 0.1) -> dict:
    """A piecewise-constant signal and its noisy copy."""
    rng = np.random.default_rng(seed)
    xt = np.repeat(rng.uniform(-1, 1, 4), -(-n // 4))[:n]
    return {"y": xt + noise * rng.standard_normal(n), "xt": xt}
