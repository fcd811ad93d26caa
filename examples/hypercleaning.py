"""Data hypercleaning (docs/framework.md 10.2): one weight per training sample, theta_i, scales its loss.

Lower: multinomial logistic regression W (c classes x n features) on corrupted labels,
    g(W, theta) = (1/m) sum_i sigmoid(theta_i) CE(W a_i, y_i) + lam ||W||_F^2,
with CE(z, y) = log sum_k exp(z_k) - z_y and one-hot labels Y. Upper: mean CE on clean validation data.
"""
import numpy as np
import sympy as sp
from codegen import Problem, sigmoid

c, n, m, mv = sp.symbols("c n m mv", integer=True, positive=True)  # classes, features, train, valid
i, l = sp.Idx("i", m), sp.Idx("l", mv)
j, k = sp.Idx("j", n), sp.Idx("k", c)
A, Y = sp.IndexedBase("A", shape=(m, n)), sp.IndexedBase("Y", shape=(m, c))      # training (noisy)
Av, Yv = sp.IndexedBase("Av", shape=(mv, n)), sp.IndexedBase("Yv", shape=(mv, c))  # validation
lam = sp.Symbol("lam", positive=True)                                            # l2 weight (data)
W = sp.IndexedBase("W", shape=(c, n))                                            # lower variable
theta = sp.IndexedBase("theta", shape=(m,))                                      # per-sample weights


def mean_ce(F, L, s, count):
    """(1/count) sum_s CE(W F[s, :], L[s, :]) with one-hot labels L."""
    z = sp.Sum(W[k, j] * F[s, j], (j, 0, n - 1))  # logit of class k for sample s
    return sp.Sum(sp.log(sp.Sum(sp.exp(z), (k, 0, c - 1))) - sp.Sum(L[s, k] * z, (k, 0, c - 1)),
                  (s, 0, count - 1)) / count


z_i = sp.Sum(W[k, j] * A[i, j], (j, 0, n - 1))
hypercleaning = Problem(
    name="hypercleaning",
    x=W,
    theta=theta,
    lower=sp.Sum(sigmoid(theta[i]) * (sp.log(sp.Sum(sp.exp(z_i), (k, 0, c - 1)))
                                      - sp.Sum(Y[i, k] * z_i, (k, 0, c - 1))), (i, 0, m - 1)) / m
          + lam * sp.Sum(W[k, j] ** 2, (k, 0, c - 1), (j, 0, n - 1)),
    upper=mean_ce(Av, Yv, l, mv),
)

THETA0 = 0.0  # every sample weighted sigmoid(0) = 1/2; a float means every entry


def _corrupt(labels, c, rng, fraction=0.1):
    """Replace a fraction of the labels by (y + U{1..c-1}) mod c."""
    labels = labels.copy()
    bad = rng.choice(labels.size, size=int(fraction * labels.size), replace=False)
    labels[bad] = (labels[bad] + rng.integers(1, c, size=bad.size)) % c
    return labels


def example_data(seed=0, source="blobs", c=None, n=None, m=None, mv=None, lam=1e-3):
    """Training data with 10% corrupted labels, clean validation data, one-hot labels.

    source="blobs" (default): Gaussian blobs, c classes in n - 1 dimensions plus a bias column
    (defaults c=10, n=20, m=1000, mv=500). source="digits": scikit-learn's 8x8 digits, pixels
    in [0, 1] plus a bias column (c=10, n=65 fixed; m + mv <= 1797); needs scikit-learn.
    """
    rng = np.random.default_rng(seed)
    m = 1000 if m is None else m
    mv = 500 if mv is None else mv
    if source == "digits":
        from sklearn.datasets import load_digits  # optional; not a hypergen dependency

        if c not in (None, 10) or n not in (None, 65):
            raise ValueError("digits data has c=10 classes and n=65 features (64 pixels + bias)")
        c, n = 10, 65
        feats, labels = load_digits(return_X_y=True)
        if m + mv > labels.size:
            raise ValueError(f"digits has {labels.size} samples, asked for m + mv = {m + mv}")
        order = rng.permutation(labels.size)[: m + mv]
        feats, labels = feats[order] / 16.0, labels[order]
    elif source == "blobs":
        c = 10 if c is None else c
        n = 20 if n is None else n
        centres = rng.standard_normal((c, n - 1))
        labels = rng.integers(0, c, size=m + mv)
        feats = centres[labels] + rng.standard_normal((m + mv, n - 1))
    else:
        raise ValueError(f"unknown source {source!r}: 'blobs' or 'digits'")
    feats = np.hstack([feats, np.ones((m + mv, 1))])  # bias column
    labels = np.concatenate([_corrupt(labels[:m], c, rng), labels[m:]])
    onehot = np.eye(c)[labels]
    return {"A": feats[:m], "Y": onehot[:m], "Av": feats[m:], "Yv": onehot[m:],
            "lam": np.float64(lam)}
