"""1-D denoising with a learned filter: the 3 taps of the filter inside a Charbonnier expert.

    g(x) = 1/2 ||x - y||^2 + exp(theta[0]) sum_i sqrt((sum_k theta[1 + k] x[i + k])^2 + nu^2)
    f(x) = 1/2 ||x - xt||^2,                     theta = (log weight, taps k_0, k_1, k_2)

The operator K_theta = sum_k theta[1 + k] S_k (S_k x = x[. + k]) sits inside the atom, so L, L_A
grow with |theta| (certified for every x) and L_B holds on the ball around the lower solution
(docs/constants.md 8; `hypergen audit examples/learned_filter_1d.py` shows both). g is
1-strongly convex (the data term) whatever the taps.

The data names are tv1d.py's (y noisy, xt clean), so the same files serve both: on the
piecewise-linear signals of examples/data/tv1d.npz, TV's first difference (taps -1, 1, 0) favours
staircases, and the learned taps move towards a second difference (1, -2, 1), which is zero on
every linear piece:

    hypergen optimize examples/learned_filter_1d.py --data examples/data/tv1d.npz
"""
import numpy as np
import sympy as sp

from codegen import Problem

KS = 3                                                         # filter taps
NU = sp.Rational(1, 20)                                        # smoothing of the Charbonnier
n = sp.Symbol("n", integer=True, positive=True)                # number of samples of the signal
i, k = sp.symbols("i k", integer=True)
x, y, xt = (sp.IndexedBase(s, shape=(n,)) for s in ("x", "y", "xt"))   # denoised, noisy, clean
theta = sp.IndexedBase("theta", shape=(1 + KS,))               # log weight, KS taps

response = sp.Sum(theta[1 + k] * x[i + k], (k, 0, KS - 1))     # (k * x)[i], every tap inside
learned_filter_1d = Problem(
    name="learned_filter_1d",
    x=x,
    theta=theta,
    lower=sp.Sum((x[i] - y[i]) ** 2, (i, 0, n - 1)) / 2
          + sp.exp(theta[0]) * sp.Sum(sp.sqrt(response ** 2 + NU ** 2), (i, 0, n - KS)),
    upper=sp.Sum((x[i] - xt[i]) ** 2, (i, 0, n - 1)) / 2,
)

#: Start from TV's forward difference with weight 0.1.
THETA0 = [float(np.log(0.1)), -1.0, 1.0, 0.0]
