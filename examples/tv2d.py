"""2-D denoising with isotropic smoothed total variation; theta = (log alpha, log nu).

    g(X) = 1/2 ||X - Y||^2 + alpha sum_{i,j} sqrt((X[i+1,j] - X[i,j])^2 + (X[i,j+1] - X[i,j])^2 + nu^2)
    f(X) = 1/2 ||X - X_true||^2
X is a 2-D lower variable (h x w, flattened in C order by the kernels); the stencil runs over the
pixels that have both a lower and a right neighbour. g is 1-strongly convex.
"""
import numpy as np
import sympy as sp
from codegen import Problem

h, w = sp.symbols("h w", integer=True, positive=True)                         # image height, width
i, j = sp.Idx("i", h), sp.Idx("j", w)
Y, Xt = sp.IndexedBase("Y", shape=(h, w)), sp.IndexedBase("Xt", shape=(h, w))  # noisy / clean image
X = sp.IndexedBase("X", shape=(h, w))                                        # the denoised image
la, lnu = sp.symbols("la lnu")                                               # log alpha, log nu

grad_sq = (X[i + 1, j] - X[i, j]) ** 2 + (X[i, j + 1] - X[i, j]) ** 2
tv2d = Problem(
    name="tv2d",
    x=X,
    theta=[la, lnu],
    lower=sp.Sum((X[i, j] - Y[i, j]) ** 2, (i, 0, h - 1), (j, 0, w - 1)) / 2
          + sp.exp(la) * sp.Sum(sp.sqrt(grad_sq + sp.exp(2 * lnu)), (i, 0, h - 2), (j, 0, w - 2)),
    upper=sp.Sum((X[i, j] - Xt[i, j]) ** 2, (i, 0, h - 1), (j, 0, w - 1)) / 2,
)

THETA0 = [float(np.log(0.1)), float(np.log(0.05))]


def example_data(seed=0, h=32, w=32, noise=0.1):
    """A piecewise-constant image of a few rectangles and its noisy copy."""
    rng = np.random.default_rng(seed)
    xt = np.zeros((h, w))
    for _ in range(4):
        r0, c0 = rng.integers(0, h), rng.integers(0, w)
        xt[r0:r0 + max(1, h // 3), c0:c0 + max(1, w // 3)] += rng.uniform(-1, 1)
    return {"Y": xt + noise * rng.standard_normal((h, w)), "Xt": xt}
