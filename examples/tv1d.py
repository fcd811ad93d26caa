"""1-D denoising with smoothed total variation; theta = (log alpha, log nu).

    g(x) = 1/2 ||x - y||^2 + alpha sum_i sqrt((x[i+1] - x[i])^2 + nu^2),   f(x) = 1/2 ||x - x_true||^2.
g is 1-strongly convex (mu = 1). Signals follow docs/framework.md 10.3: 64 pixels, piecewise linear.
"""
import numpy as np
import sympy as sp
from codegen import Problem

n = sp.Symbol("n", integer=True, positive=True)                             # number of pixels
i = sp.Idx("i", n)
y, xt = sp.IndexedBase("y", shape=(n,)), sp.IndexedBase("xt", shape=(n,))  # noisy / clean signal
x = sp.IndexedBase("x", shape=(n,))                                        # the denoised signal
la, lnu = sp.symbols("la lnu")                                             # log alpha, log nu

tv1d = Problem(
    name="tv1d",
    x=x,
    theta=[la, lnu],
    lower=sp.Sum((x[i] - y[i]) ** 2, (i, 0, n - 1)) / 2
          + sp.exp(la) * sp.Sum(sp.sqrt((x[i + 1] - x[i]) ** 2 + sp.exp(2 * lnu)), (i, 0, n - 2)),
    upper=sp.Sum((x[i] - xt[i]) ** 2, (i, 0, n - 1)) / 2,
)

THETA0 = [float(np.log(0.1)), float(np.log(0.05))]  # alpha = 0.1, nu = 0.05


def example_data(seed=0, n=64, noise=0.2):
    """A piecewise-linear signal on [0, 1] (4 segments, slopes U(-10, 10), jumps U(-1, 1)) and a
    noisy copy (Gaussian, std noise * max(mean |signal|, 1))."""
    rng = np.random.default_rng(seed)
    t = (np.arange(n) + 0.5) / n                      # pixel centres
    breaks = np.sort(rng.random(3))
    slopes = rng.uniform(-10, 10, 4)
    jumps = rng.uniform(-1, 1, 3)
    seg = np.searchsorted(breaks, t)                  # segment of each pixel, 0..3
    knots = np.concatenate(([0.0], breaks))
    start = np.empty(4)                               # signal value at each segment's left end
    start[0] = rng.uniform(-1, 1)
    for s in range(1, 4):
        start[s] = start[s - 1] + slopes[s - 1] * (knots[s] - knots[s - 1]) + jumps[s - 1]
    xt = start[seg] + slopes[seg] * (t - knots[seg])
    scale = max(np.mean(np.abs(xt)), 1.0)
    y = xt + noise * scale * rng.standard_normal(n)
    return {"y": y, "xt": xt}
