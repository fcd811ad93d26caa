"""The quadratic test problem of Li, Gu & Huang (AAAI 2022, Sec. 6.1); docs/framework.md 10.1.

    g(x, theta) = ||C theta + D x - e||^2,   f(x) = ||M x - b||^2.
Closed forms: Hessian 2 D^T D, cross derivative B = 2 D^T C, x* = D^+ (e - C theta).
"""
import numpy as np
import sympy as sp
from codegen import Problem

m1, m2, d, p = sp.symbols("m1 m2 d p", integer=True, positive=True)  # rows of M, rows of C/D, dims
i, l = sp.Idx("i", m2), sp.Idx("l", m1)
j, k = sp.Idx("j", d), sp.Idx("k", p)
M, b = sp.IndexedBase("M", shape=(m1, d)), sp.IndexedBase("b", shape=(m1,))    # upper data
C, D = sp.IndexedBase("C", shape=(m2, p)), sp.IndexedBase("D", shape=(m2, d))  # lower data
e = sp.IndexedBase("e", shape=(m2,))
x = sp.IndexedBase("x", shape=(d,))                                           # lower variable
theta = sp.IndexedBase("theta", shape=(p,))                                   # hyperparameters

quadratic = Problem(
    name="quadratic",
    x=x,
    theta=theta,
    lower=sp.Sum((sp.Sum(C[i, k] * theta[k], (k, 0, p - 1)) + sp.Sum(D[i, j] * x[j], (j, 0, d - 1))
                  - e[i]) ** 2, (i, 0, m2 - 1)),
    upper=sp.Sum((sp.Sum(M[l, j] * x[j], (j, 0, d - 1)) - b[l]) ** 2, (l, 0, m1 - 1)),
)

THETA0 = 1.0  # theta = (1, ..., 1); a float means every entry


def example_data(seed=0, m1=1000, m2=1000, d=10, p=10):
    """U[0,1] matrices; b = M u1 + 0.01 n1, e = C u2 + D u3 + 0.01 n2 (u uniform, n normal)."""
    rng = np.random.default_rng(seed)
    M = rng.random((m1, d))
    C = rng.random((m2, p))
    D = rng.random((m2, d))
    u1, u2, u3 = rng.random(d), rng.random(p), rng.random(d)
    b = M @ u1 + 0.01 * rng.standard_normal(m1)
    e = C @ u2 + D @ u3 + 0.01 * rng.standard_normal(m2)
    return {"M": M, "b": b, "C": C, "D": D, "e": e}
