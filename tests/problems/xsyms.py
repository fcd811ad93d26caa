"""x and theta as lists of Symbols, scalar data only (a new user's small problem).

x = [u, v, w], theta = [a, c], data scalars P, Q, R, D:
  g = e^a/2 (u^2 + v^2 + w^2) + logcosh(u - v + P) + softplus(v + w - Q) + e^c (w - R)^2/2
      + 3/10 atan(u + w)
  f = (u - D)^2 + sin(v + 2w)/2 + e^-a logcosh(u) + c^2/2 - a/10
With three entries, the adjoint CG ends at a residual of 1e-16 (or exactly 0): what the block
rounds planned their next delta from.
"""
import numpy as np
import sympy as sp

from codegen import Problem

u, v, w = sp.symbols("u v w")
a, c = sp.symbols("a c")
P, Q, R, D = sp.symbols("P Q R D")

xsyms = Problem(
    name="xsyms",
    x=[u, v, w],
    theta=[a, c],
    lower=sp.exp(a) / 2 * (u ** 2 + v ** 2 + w ** 2) + sp.log(sp.cosh(u - v + P))
    + sp.log(1 + sp.exp(v + w - Q)) + sp.exp(c) * (w - R) ** 2 / 2
    + sp.Rational(3, 10) * sp.atan(u + w),
    upper=(u - D) ** 2 + sp.sin(v + 2 * w) / 2 + sp.exp(-a) * sp.log(sp.cosh(u)) + c ** 2 / 2
    - a / 10,
)


def example_data(seed=0):
    rng = np.random.default_rng(seed)
    P, Q, R, D = rng.standard_normal(4)
    return {"P": float(P), "Q": float(Q), "R": float(R), "D": float(D)}
