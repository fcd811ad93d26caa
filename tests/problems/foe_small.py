"""Fields-of-Experts denoising on 2-D images: a bank of fixed 3 x 3 filters (data) with learned
weights, in the syntax hypergen certifies (docs/constants.md section 8).

    g(X) = 1/2 ||X - Y||^2 + sum_f exp(theta[f]) sum_{i,j} sqrt((k_f * X)_{ij}^2 + nu^2)
    f(X) = 1/2 ||X - Xt||^2,   (k_f * X)_{ij} = sum_{a,b} Kf[f, a, b] X[i + a, j + b]

One term per filter (a Python loop over f: the filter index is a number in each term), each
filter response a `Sum` over the taps with the coefficients read from the data array Kf, and the
response sums over the "valid" pixels (every tap inside the image). theta[f] is the log weight of
filter f. g is 1-strongly convex (the data term), whatever the filters and weights.
"""
import numpy as np
import sympy as sp

from codegen import Problem

NF, KS = 3, 3                                                  # filters, filter size
h, w = sp.symbols("h w", integer=True, positive=True)           # image height, width
i, j = sp.symbols("i j", integer=True)                          # pixel indices
a, b = sp.symbols("a b", integer=True)                          # tap indices
Y, Xt = sp.IndexedBase("Y", shape=(h, w)), sp.IndexedBase("Xt", shape=(h, w))
X = sp.IndexedBase("X", shape=(h, w))
Kf = sp.IndexedBase("Kf", shape=(NF, KS, KS))                   # fixed filter coefficients (data)
theta = sp.IndexedBase("theta", shape=(NF,))                    # log weight of each filter
NU = sp.Rational(1, 10)                                          # smoothing of the Charbonnier


def response(f: int) -> sp.Expr:
    """(k_f * X)[i, j]: filter f over the 3 x 3 window whose top-left pixel is (i, j)."""
    return sp.Sum(Kf[f, a, b] * X[i + a, j + b], (a, 0, KS - 1), (b, 0, KS - 1))


data_term = sp.Sum((X[i, j] - Y[i, j]) ** 2, (i, 0, h - 1), (j, 0, w - 1)) / 2
experts = sum(sp.exp(theta[f]) * sp.Sum(sp.sqrt(response(f) ** 2 + NU ** 2),
                                        (i, 0, h - KS), (j, 0, w - KS)) for f in range(NF))
foe_small = Problem(
    name="foe_small",
    x=X,
    theta=theta,
    lower=data_term + experts,
    upper=sp.Sum((X[i, j] - Xt[i, j]) ** 2, (i, 0, h - 1), (j, 0, w - 1)) / 2,
)

THETA0 = [float(np.log(0.05))] * NF


def example_data(seed: int = 0, h: int = 8, w: int = 8, noise: float = 0.1) -> dict:
    """A smooth image with an edge, its noisy copy and three zero-mean 3 x 3 filters."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    xt = np.sin(3 * xx) * np.cos(2 * yy) + (xx > 0.5)
    filters = rng.standard_normal((NF, KS, KS))
    filters -= filters.mean(axis=(1, 2), keepdims=True)
    return {"Y": xt + noise * rng.standard_normal((h, w)), "Xt": xt, "Kf": filters}
