"""Fields-of-Experts denoising on 2-D images with learned filter coefficients: theta holds the
3 x 3 coefficients of each filter, so the operator K_theta = sum_k theta_k S_k (S_k a shift of
the image) sits inside the expert (docs/constants.md section 8).

    g(X) = 1/2 ||X - Y||^2 + sum_f sum_{i,j} sqrt((k_f * X)_{ij}^2 + nu^2)
    (k_f * X)_{ij} = sum_{a,b} theta[9 f + 3 a + b] X[i + a, j + b]
    f(X) = 1/2 ||X - Xt||^2

theta is 1-D (flat index 9 f + 3 a + b for tap (a, b) of filter f). A fixed per-filter weight
goes in front of the inner Sum as a number, a learned one as exp(theta[...]) of another entry.
"""
import numpy as np
import sympy as sp

from codegen import Problem

NF, KS = 2, 3
h, w = sp.symbols("h w", integer=True, positive=True)
i, j = sp.symbols("i j", integer=True)
a, b = sp.symbols("a b", integer=True)
Y, Xt = sp.IndexedBase("Y", shape=(h, w)), sp.IndexedBase("Xt", shape=(h, w))
X = sp.IndexedBase("X", shape=(h, w))
theta = sp.IndexedBase("theta", shape=(NF * KS * KS,))         # filter coefficients
NU = sp.Rational(1, 10)


def response(f: int) -> sp.Expr:
    """(k_f * X)[i, j] with the learned coefficients of filter f."""
    return sp.Sum(theta[KS * KS * f + KS * a + b] * X[i + a, j + b], (a, 0, KS - 1), (b, 0, KS - 1))


data_term = sp.Sum((X[i, j] - Y[i, j]) ** 2, (i, 0, h - 1), (j, 0, w - 1)) / 2
experts = sum(sp.Sum(sp.sqrt(response(f) ** 2 + NU ** 2), (i, 0, h - KS), (j, 0, w - KS))
              for f in range(NF))
foe_learned = Problem(
    name="foe_learned",
    x=X,
    theta=theta,
    lower=data_term + experts / 10,
    upper=sp.Sum((X[i, j] - Xt[i, j]) ** 2, (i, 0, h - 1), (j, 0, w - 1)) / 2,
)

# horizontal and vertical differences
THETA0 = [0.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0,
          0.0, -1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def example_data(seed: int = 0, h: int = 8, w: int = 8, noise: float = 0.1) -> dict:
    """A smooth image with an edge and its noisy copy."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    xt = np.sin(3 * xx) * np.cos(2 * yy) + (xx > 0.5)
    return {"Y": xt + noise * rng.standard_normal((h, w)), "Xt": xt}
