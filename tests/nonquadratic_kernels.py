"""Plain-NumPy test problems for the DWR certificate's non-quadratic case (docs/bounds.md 15.3):
g not quadratic in x, B = d_theta grad_x g affine in x (a weight on a quadratic term), with the
third-derivative kernel lower_tvp, the upper HVP and the constants Corollary 15.3 reads
(L_A, L_3 = Lipschitz constant of x -> DA(x), L_Hf = of x -> H_f), each from the atoms' sups.

* AffineLogistic: tests/quadratic_kernels.Logistic (l2 weight e^theta, validation logistic loss),
  B = e^theta x. Atom l(t) = log(1 + e^-t): sup|l'''| = sqrt(3)/18, sup|l''''| = 1/8.
* SmoothTV1D: g = e^theta/2 ||x - y||^2 + beta sum_i psi((D x)_i), psi(t) = sqrt(t^2 + gamma^2),
  D the forward difference; f = 1/2 ||x - x_true||^2. B = e^theta (x - y). sup|psi''| = 1/gamma,
  sup|psi'''| = 3 gamma^3/2 / (5 gamma^2/4)^(5/2) (at t = gamma/2), sup|psi''''| = 3/gamma^3 (t = 0).

B not affine in x (docs/bounds.md 15.3, the cross_hvp kernel and L_DB from the constants):
* TV_WEIGHT: a generated problem, g = 1/2 ||x - y||^2 + e^t sum_i sqrt((x[i+1] - x[i])^2 + gam^2)
  (B = e^t D^T psi'(D x)); tv_weight_data makes its data.
* DenseGenerated wraps a bound generated problem (hypercleaning, TV_WEIGHT) with the dense
  lower and upper Hessians the references read.

Exact references: x* by Newton with dense solves, grad F by dense solves at x*.
"""
from __future__ import annotations

import math

import numpy as np
import sympy as sp
from scipy.special import expit

from codegen import Problem

from quadratic_kernels import Logistic

_UP = 1.0 + 1e-12


def _spec2(K):
    return float(np.linalg.norm(K, 2)) ** 2 * _UP


class AffineLogistic(Logistic):
    """l2-regularised logistic regression with the kernels and constants of Corollary 15.3.

    DA(x)[e] = (1/m) Z^T diag(l'''(Z x) * Z e) Z, so ||DA(x)[e]|| <= sup|l'''| ||Z||^2 max||z_i||
    ||e||/m (L_A) and ||D^2A[a, e]|| <= sup|l''''| ||Z||^2 max||z_i||^2 ||a|| ||e||/m (L_3); the
    same for the validation loss gives L_Hf."""

    cross_is_affine = True
    upper_is_quadratic = False

    def __init__(self, K, y, Kv, yv):
        super().__init__(K, y, Kv, yv)
        rmax = float(np.max(np.linalg.norm(self.Z, axis=1)))
        self._L3 = 0.125 * _spec2(self.Z) * rmax ** 2 / self.m * _UP
        rvmax = float(np.max(np.linalg.norm(self.Zv, axis=1)))
        self._LHf = (math.sqrt(3.0) / 18.0) * _spec2(self.Zv) * rvmax / self.pv * _UP

    @staticmethod
    def _third(z):
        """l'''(t) for l(t) = log(1 + e^-t): s(1 - s)(1 - 2s) with s = sigmoid(t)."""
        s = expit(z)
        return s * (1.0 - s) * (1.0 - 2.0 * s)

    def lower_tvp(self, x, theta, v, w):
        z = self.Z @ x
        return self.Z.T @ (self._third(z) * (self.Z @ v) * (self.Z @ w)) / self.m

    def upper_hvp(self, x, theta, v):
        z = self.Zv @ x
        return self.Zv.T @ (expit(z) * expit(-z) * (self.Zv @ v)) / self.pv

    def constants(self, theta):
        out = super().constants(theta)
        out.update(L_3=self._L3, L_Hf=self._LHf)
        return out

    def hessian(self, x, theta):
        return self._hess(x, theta)

    def upper_hessian(self, x, theta):
        z = self.Zv @ x
        return (self.Zv.T * (expit(z) * expit(-z))) @ self.Zv / self.pv

    def cross_matrix(self, x, theta):
        return self._alpha(theta) * x[:, None]


class SmoothTV1D:
    """1-D smoothed-TV denoising with the fidelity weight as hyperparameter (B affine in x)."""

    is_quadratic = False
    upper_is_quadratic = True
    upper_depends_on_theta = False
    cross_is_affine = True
    theta_size = 1

    def __init__(self, y, x_true, beta=0.5, gamma=0.1):
        self.y, self.x_true = np.asarray(y, float), np.asarray(x_true, float)
        self.x_size = self.y.size
        self.beta, self.gamma = float(beta), float(gamma)
        n = self.x_size
        self.D = np.eye(n, k=1)[:-1] - np.eye(n)[:-1]  # (n-1) x n forward differences
        g = self.gamma
        s2 = 3.0 * g ** 3 / 2.0 / (1.25 * g * g) ** 2.5  # sup|psi'''|
        s3 = 3.0 / g ** 3                                 # sup|psi''''|
        D2 = _spec2(self.D)
        row = math.sqrt(2.0)  # ||d_i||
        self._L0 = self.beta * D2 / g
        self._LA = self.beta * s2 * D2 * row * _UP
        self._L3 = self.beta * s3 * D2 * row * row * _UP

    @classmethod
    def generate(cls, seed=0, n=40, noise=0.2, beta=0.5, gamma=0.1):
        rs = np.random.RandomState(seed)
        x_true = np.repeat(rs.randn(4), -(-n // 4))[:n]
        return cls(x_true + noise * rs.randn(n), x_true, beta, gamma)

    def _alpha(self, theta):
        return math.exp(float(np.asarray(theta).ravel()[0]))

    def _psi(self, t, order):
        g2 = self.gamma ** 2
        r = t * t + g2
        return {0: np.sqrt(r), 1: t / np.sqrt(r), 2: g2 / r ** 1.5,
                3: -3.0 * g2 * t / r ** 2.5}[order]

    def lower_value(self, x, theta):
        d = x - self.y
        return 0.5 * self._alpha(theta) * float(d @ d) + self.beta * float(
            np.sum(self._psi(self.D @ x, 0)))

    def lower_grad(self, x, theta):
        return self._alpha(theta) * (x - self.y) + self.beta * self.D.T @ self._psi(self.D @ x, 1)

    def hessian(self, x, theta):
        w = self._psi(self.D @ x, 2)
        return self.beta * (self.D.T * w) @ self.D + self._alpha(theta) * np.eye(self.x_size)

    def lower_hvp(self, x, theta, v):
        return (self.beta * self.D.T @ (self._psi(self.D @ x, 2) * (self.D @ v))
                + self._alpha(theta) * v)

    def lower_tvp(self, x, theta, v, w):
        return self.beta * self.D.T @ (self._psi(self.D @ x, 3) * (self.D @ v) * (self.D @ w))

    def cross_matrix(self, x, theta):
        return self._alpha(theta) * (x - self.y)[:, None]

    def cross_vjp(self, x, theta, q):
        return self.cross_matrix(x, theta).T @ q

    def cross_jvp(self, x, theta, t):
        return self.cross_matrix(x, theta) @ np.atleast_1d(np.asarray(t, float))

    def upper_value(self, x, theta):
        d = x - self.x_true
        return 0.5 * float(d @ d)

    def upper_grad(self, x, theta):
        return x - self.x_true

    def upper_hvp(self, x, theta, v):
        return np.array(v, dtype=float)

    def upper_hessian(self, x, theta):
        return np.eye(self.x_size)

    def upper_theta_grad(self, x, theta):
        return np.zeros(1)

    def constants(self, theta):
        a = self._alpha(theta)
        return {"mu": a / _UP, "L": (self._L0 + a) * _UP, "L_A": self._LA, "L_B": a * _UP,
                "L_f": 1.0 * _UP, "L_3": self._L3, "certified": True, "source": "derived"}


def x_star(k, theta, x0=None):
    """Newton with dense solves to ||grad g|| <= 1e-15 (damped by halving while g increases)."""
    x = np.zeros(k.x_size) if x0 is None else np.array(x0, float)
    for _ in range(200):
        g = k.lower_grad(x, theta)
        if np.linalg.norm(g) <= 1e-15:
            break
        step = np.linalg.solve(k.hessian(x, theta), g)
        t, f0 = 1.0, k.lower_value(x, theta)
        while k.lower_value(x - t * step, theta) > f0 + 1e-14 * abs(f0) and t > 1e-8:
            t *= 0.5
        x = x - t * step
    return x


def exact_hypergradient(k, theta):
    xs = x_star(k, theta)
    H = k.hessian(xs, theta)
    q = np.linalg.solve(H, k.upper_grad(xs, theta))
    q -= np.linalg.solve(H, H @ q - k.upper_grad(xs, theta))
    return -k.cross_matrix(xs, theta).T @ q + k.upper_theta_grad(xs, theta)


class GeneratedLogistic:
    """A bound generated `logistic` example (examples/logistic.py: l2 weight e^theta, validation
    logistic loss) with what Corollary 15.3 needs and the generated constants do not derive:
    B = e^theta x is affine in x (cross_is_affine), and L_3, L_Hf from the data and the atom's
    sups, (1/8) ||A||^2 max||a_i||^2/m and (sqrt3/18) ||Av||^2 max||av_i||/p (labels are +-1,
    so they drop out of the norms). Everything else, lower_tvp included, is the generated
    problem's."""

    cross_is_affine = True

    def __init__(self, prob, data):
        self._prob = prob
        A, Av = np.asarray(data["A"], float), np.asarray(data["Av"], float)
        self._L3 = 0.125 * _spec2(A) * float(np.max(np.sum(A * A, axis=1))) / A.shape[0] * _UP
        self._LHf = ((math.sqrt(3.0) / 18.0) * _spec2(Av)
                     * float(np.max(np.linalg.norm(Av, axis=1))) / Av.shape[0] * _UP)

    def __getattr__(self, name):
        return getattr(self._prob, name)

    def constants(self, theta):
        out = dict(self._prob.constants(theta))
        out.update(L_3=self._L3, L_Hf=self._LHf)
        return out

    def hessian(self, x, theta):
        return self._prob.lower_hessian(x, theta)

    def upper_hessian(self, x, theta):
        return np.column_stack([self._prob.upper_hvp(x, theta, c) for c in np.eye(self.x_size)])


class GroupLogistic(AffineLogistic):
    """AffineLogistic with p group weights: g = logistic + sum_k e^theta_k/2 ||x_{G_k}||^2, so
    B[:, k] = e^theta_k x_{G_k} (affine in x; disjoint supports, L_B = max_k e^theta_k)."""

    def __init__(self, K, y, Kv, yv, p):
        super().__init__(K, y, Kv, yv)
        self.theta_size = p
        self.group = np.arange(self.x_size) % p

    @classmethod
    def generate(cls, seed=0, m=60, d=7, pv=40, p=3):
        rs = np.random.RandomState(seed)
        w = rs.randn(d)
        K, Kv = rs.randn(m, d), rs.randn(pv, d)
        y = np.where(K @ w + 0.5 * rs.randn(m) > 0, 1.0, -1.0)
        yv = np.where(Kv @ w + 0.5 * rs.randn(pv) > 0, 1.0, -1.0)
        return cls(K, y, Kv, yv, p)

    def _weights(self, theta):
        return np.exp(np.asarray(theta, dtype=float))[self.group]

    def lower_value(self, x, theta):
        return (float(np.mean(np.logaddexp(0.0, -self.Z @ x)))
                + 0.5 * float(self._weights(theta) @ (x * x)))

    def lower_grad(self, x, theta):
        return -self.Z.T @ expit(-self.Z @ x) / self.m + self._weights(theta) * x

    def _hess(self, x, theta):
        z = self.Z @ x
        return (self.Z.T * (expit(z) * expit(-z))) @ self.Z / self.m + np.diag(self._weights(theta))

    def lower_hvp(self, x, theta, v):
        z = self.Z @ x
        return self.Z.T @ (expit(z) * expit(-z) * (self.Z @ v)) / self.m + self._weights(theta) * v

    def cross_matrix(self, x, theta):
        out = np.zeros((self.x_size, self.theta_size))
        out[np.arange(self.x_size), self.group] = self._weights(theta) * x
        return out

    def cross_vjp(self, x, theta, q):
        return self.cross_matrix(x, theta).T @ q

    def cross_jvp(self, x, theta, t):
        return self.cross_matrix(x, theta) @ np.asarray(t, dtype=float)

    def upper_theta_grad(self, x, theta):
        return np.zeros(self.theta_size)

    def constants(self, theta):
        al = np.exp(np.asarray(theta, dtype=float))
        out = super().constants(np.array([0.0]))
        out.update(mu=float(al.min()) / _UP, L=(self._L0 + float(al.max())) * _UP,
                   L_B=float(al.max()) * _UP)
        return out


class RidgeLogisticUpper:
    """g = 1/(2m) ||K x - y||^2 + e^theta/2 ||x||^2 (quadratic), f = the mean logistic loss of the
    labelled validation rows Zv (not quadratic): Corollary 15.3 with L_A = L_3 = 0 and
    L_Hf = (sqrt3/18) ||Zv||^2 max||zv_i||/pv."""

    is_quadratic = True
    upper_is_quadratic = False
    upper_depends_on_theta = False
    theta_size = 1

    def __init__(self, seed=0, m=50, d=6, pv=40):
        rs = np.random.RandomState(seed)
        w = rs.randn(d)
        self.K = rs.randn(m, d)
        self.y = self.K @ w + 0.3 * rs.randn(m)
        Kv = rs.randn(pv, d)
        yv = np.where(Kv @ w + 0.5 * rs.randn(pv) > 0, 1.0, -1.0)
        self.Zv = yv[:, None] * Kv
        self.m, self.x_size, self.pv = m, d, pv
        self.KtK = self.K.T @ self.K / m
        self._L0 = _spec2(self.K) / m
        self._Lf = _spec2(self.Zv) / (4.0 * pv)
        self._LHf = ((math.sqrt(3.0) / 18.0) * _spec2(self.Zv)
                     * float(np.max(np.linalg.norm(self.Zv, axis=1))) / pv * _UP)

    def _alpha(self, theta):
        return math.exp(float(np.asarray(theta).ravel()[0]))

    def lower_value(self, x, theta):
        r = self.K @ x - self.y
        return 0.5 * float(r @ r) / self.m + 0.5 * self._alpha(theta) * float(x @ x)

    def lower_grad(self, x, theta):
        return self.K.T @ (self.K @ x - self.y) / self.m + self._alpha(theta) * x

    def hessian(self, x, theta):
        return self.KtK + self._alpha(theta) * np.eye(self.x_size)

    def lower_hvp(self, x, theta, v):
        return self.KtK @ v + self._alpha(theta) * v

    def cross_matrix(self, x, theta):
        return self._alpha(theta) * np.asarray(x, float)[:, None]

    def cross_vjp(self, x, theta, q):
        return self.cross_matrix(x, theta).T @ q

    def cross_jvp(self, x, theta, t):
        return self.cross_matrix(x, theta) @ np.atleast_1d(np.asarray(t, float))

    def upper_value(self, x, theta):
        return float(np.mean(np.logaddexp(0.0, -self.Zv @ x)))

    def upper_grad(self, x, theta):
        return -self.Zv.T @ expit(-self.Zv @ x) / self.pv

    def upper_hessian(self, x, theta):
        z = self.Zv @ x
        return (self.Zv.T * (expit(z) * expit(-z))) @ self.Zv / self.pv

    def upper_hvp(self, x, theta, v):
        return self.upper_hessian(x, theta) @ v

    def upper_theta_grad(self, x, theta):
        return np.zeros(1)

    def lower_tvp(self, x, theta, v, w):
        return np.zeros(self.x_size)

    def constants(self, theta):
        a = self._alpha(theta)
        return {"mu": a / _UP, "L": (self._L0 + a) * _UP, "L_A": 0.0, "L_B": a * _UP,
                "L_f": self._Lf, "L_Hf": self._LHf, "certified": True, "source": "derived"}


n_sym = sp.Symbol("n", integer=True, positive=True)
_i = sp.Idx("i", n_sym)
_x, _y = sp.IndexedBase("x", shape=(n_sym,)), sp.IndexedBase("y", shape=(n_sym,))
_xt = sp.IndexedBase("xt", shape=(n_sym,))
_t, _gam = sp.Symbol("t"), sp.Symbol("gam", positive=True)

#: 1-D denoising with a learned TV weight e^t (gam is data): B = e^t D^T psi'(D x), not affine.
TV_WEIGHT = Problem(
    name="tv_weight",
    x=_x,
    theta=_t,
    lower=sp.Sum((_x[_i] - _y[_i]) ** 2, (_i, 0, n_sym - 1)) / 2
          + sp.exp(_t) * sp.Sum(sp.sqrt((_x[_i + 1] - _x[_i]) ** 2 + _gam ** 2),
                                (_i, 0, n_sym - 2)),
    upper=sp.Sum((_x[_i] - _xt[_i]) ** 2, (_i, 0, n_sym - 1)) / 2,
)


def tv_weight_data(seed=3, n=16, noise=0.2, gam=0.2):
    """A piecewise-constant signal of 4 pieces, a noisy copy and gam for TV_WEIGHT."""
    rng = np.random.default_rng(seed)
    xt = np.repeat(rng.uniform(-1, 1, 4), -(-n // 4))[:n]
    return {"y": xt + noise * rng.standard_normal(n), "xt": xt, "gam": np.float64(gam)}


class DenseGenerated:
    """A bound generated problem with the dense matrices the exact references read."""

    def __init__(self, prob):
        self._prob = prob

    def __getattr__(self, name):
        return getattr(self._prob, name)

    def hessian(self, x, theta):
        return self._prob.lower_hessian(x, theta)

    def upper_hessian(self, x, theta):
        return np.column_stack([self._prob.upper_hvp(x, theta, c) for c in np.eye(self.x_size)])


def check_decomposition(part, hg, exact, terms, e, rel=1e-9, tiny=1e-14):
    """The DWR identity and its bounds against exact quantities (docs/bounds.md 15): the
    corrected value's error equals the sum of the exact terms (to rel, tiny), e is within hg.e,
    each exact term is within its bound, and the corrected and plain values within theirs.
    Returns |error of the corrected value|."""
    err = part.value - exact
    assert abs(err - math.fsum(terms.values())) <= rel * (abs(exact) + abs(err)) + tiny, \
        (err, terms)
    assert np.linalg.norm(e) <= hg.e * (1 + 1e-12)
    bound_of = dict(part.terms, **{"vE+EE": part.terms["vE"] + part.terms["EE"]})
    for key, value in terms.items():
        assert abs(value) <= bound_of[key] * (1 + 1e-9) + 1e-15, (key, value, part.terms)
    assert abs(err) <= part.bound
    assert abs(part.plain - exact) <= part.plain_bound
    return abs(err)
