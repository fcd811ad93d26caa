"""2-D denoising with a Fields-of-Experts regulariser: 3 fixed 3x3 filters, learned weights.

    g(X) = 1/2 ||X - Y||^2 + sum_f exp(t_f) sum_{i,j} sqrt((k_f * X)[i,j]^2 + nu^2)
    f(X) = 1/2 ||X - Xt||^2,                         theta = (t_0, t_1, t_2),  nu = 1e-3

(k_f * X)[i,j] = sum_{a,b} k_f[a,b] X[i+a, j+b] over the 3x3 windows that fit in the image; the
filters `FILTERS` are fixed numbers (a horizontal and a vertical forward difference and the
mixed second difference, a 3x3 DCT basis filter), their weights exp(t_f) are learned. g is
1-strongly convex (the data term), the potential's curvature is in (0, 1/nu], so every constant
is certified (`hypergen audit examples/foe_denoise.py`).

nu is fixed near the total-variation limit: learned as a fourth entry log nu, it runs to about
2.5e-4 for 0.03 dB more on the held-out crops, the lower problems' L grows fourfold and the
default L-BFGS ends at the lower solves' round-off floor (examples/README.md).

Data: Y (noisy) and Xt (clean), h x w, grey values in [0, 1]. `hypergen optimize
examples/foe_denoise.py --data examples/data/foe_train` reads a directory of clean images and adds
Gaussian noise of standard deviation 0.1, seed 0 (codegen/cli/data.py); an .npz of Y__s, Xt__s
pairs works too (examples/data/foe_test.npz, the held-out crops). examples/make_data.py writes
both; examples/foe_figure.py compares the learned model with tuned TV on the held-out crops.
"""
import numpy as np
import sympy as sp

from codegen import Problem

#: The fixed filter bank: rows a = 0..2, columns b = 0..2 of each 3x3 filter.
FILTERS = np.array([
    [[0, 0, 0], [0, -1, 1], [0, 0, 0]],          # horizontal forward difference
    [[0, 0, 0], [0, -1, 0], [0, 1, 0]],          # vertical forward difference
    [[1, -2, 1], [-2, 4, -2], [1, -2, 1]],       # mixed second difference (3x3 DCT-like, /4 below)
], dtype=float)
FILTER_SCALE = (1.0, 1.0, 0.25)

h, w = sp.symbols("h w", integer=True, positive=True)                         # image height, width
i, j = sp.Idx("i", h), sp.Idx("j", w)
Y, Xt = sp.IndexedBase("Y", shape=(h, w)), sp.IndexedBase("Xt", shape=(h, w))  # noisy / clean image
X = sp.IndexedBase("X", shape=(h, w))                                        # the denoised image
t = sp.symbols("t0:3")                                                       # log filter weights
NU = sp.Rational(1, 1000)                                                    # smoothing


def filter_response(k: np.ndarray, scale: float) -> sp.Expr:
    """(k * X)[i, j] as a SymPy expression with the filter's numbers written out."""
    return sum(sp.Rational(scale).limit_denominator(1000) * int(k[a, b]) * X[i + a, j + b]
               for a in range(3) for b in range(3) if k[a, b] != 0)


expert = sum(sp.exp(t[f]) * sp.Sum(sp.sqrt(filter_response(FILTERS[f], FILTER_SCALE[f]) ** 2
                                           + NU ** 2), (i, 0, h - 3), (j, 0, w - 3))
             for f in range(3))

foe_denoise = Problem(
    name="foe_denoise",
    x=X,
    theta=list(t),
    lower=sp.Sum((X[i, j] - Y[i, j]) ** 2, (i, 0, h - 1), (j, 0, w - 1)) / 2 + expert,
    upper=sp.Sum((X[i, j] - Xt[i, j]) ** 2, (i, 0, h - 1), (j, 0, w - 1)) / 2,
)

THETA0 = [float(np.log(0.02))] * 3
