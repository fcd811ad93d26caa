"""Plain-NumPy kernels of test problems with exact hypergradients, for tests/test_framework.py.

Each class implements the abstract kernel interface the solvers program against (see
docs/interface.md section 3.1): lower_value/grad/hvp, cross_vjp/jvp, upper_value/grad/theta_grad,
constants(theta), x_size, theta_size, is_quadratic, upper_depends_on_theta; plus, for testing,
x_star(theta) and exact_hypergradient(theta).

* PaperQuadratic: docs/framework.md 10.1 (Li, Gu & Huang), f = ||M x - b||^2,
  g = ||C theta + D x - e||^2, closed forms for everything.
* Ridge: g = 1/2||K x - y||^2 + e^theta/2 ||x||^2, f = 1/(2p)||Kv x - yv||^2; optionally
  f += c e^theta w.x (f depends on theta: L_ft) and r(theta) = rho/2 theta^2.
* Logistic: g = (1/m) sum softplus(-y_i k_i.x) + e^theta/2 ||x||^2, f = validation logistic
  loss; exact hypergradient from a tight Newton solve and dense linear algebra.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import expit

# Norms below come from dense SVDs; a relative margin keeps them upper bounds despite rounding.
_UP = 1.0 + 1e-12


def _spec2(K):
    """||K||_2^2 (dense, with a rounding margin)."""
    return float(np.linalg.norm(K, 2)) ** 2 * _UP


class PaperQuadratic:
    is_quadratic = True
    upper_depends_on_theta = False

    def __init__(self, M, b, C, D, e):
        self.M, self.b, self.C, self.D, self.e = (np.asarray(a, dtype=float)
                                                   for a in (M, b, C, D, e))
        self.x_size = self.D.shape[1]
        self.theta_size = self.C.shape[1]
        self.A = 2.0 * self.D.T @ self.D
        self.B = 2.0 * self.D.T @ self.C
        s = np.linalg.svd(self.D, compute_uv=False)
        self._mu = 2.0 * s[-1] ** 2 / _UP
        self._L = 2.0 * s[0] ** 2 * _UP
        self._Lf = 2.0 * _spec2(self.M)

    @classmethod
    def generate(cls, seed=0, m1=1000, m2=1000, d=10, p=10):
        """docs/framework.md 10.1 generator (NumPy legacy RandomState; draw order is ours)."""
        rs = np.random.RandomState(seed)
        M, C, D = rs.rand(m1, d), rs.rand(m2, p), rs.rand(m2, d)
        u1, u2, u3 = rs.rand(d), rs.rand(p), rs.rand(d)
        b = M @ u1 + 0.01 * rs.randn(m1)
        e = C @ u2 + D @ u3 + 0.01 * rs.randn(m2)
        return cls(M, b, C, D, e)

    def lower_value(self, x, theta):
        r = self.C @ theta + self.D @ x - self.e
        return float(r @ r)

    def lower_grad(self, x, theta):
        return 2.0 * self.D.T @ (self.C @ theta + self.D @ x - self.e)

    def lower_hvp(self, x, theta, v):
        return self.A @ v

    def cross_vjp(self, x, theta, q):
        return self.B.T @ q

    def cross_jvp(self, x, theta, t):
        return self.B @ t

    def upper_value(self, x, theta):
        r = self.M @ x - self.b
        return float(r @ r)

    def upper_grad(self, x, theta):
        return 2.0 * self.M.T @ (self.M @ x - self.b)

    def upper_theta_grad(self, x, theta):
        return np.zeros(self.theta_size)

    def constants(self, theta):
        return {"mu": self._mu, "L": self._L, "L_A": 0.0, "L_B": 0.0, "L_f": self._Lf,
                "certified": True, "source": "derived"}

    def x_star(self, theta):
        return np.linalg.lstsq(self.D, self.e - self.C @ theta, rcond=None)[0]

    def exact_hypergradient(self, theta):
        """grad F = 2 (M D^+ C)^T (b - M x*)."""
        xs = self.x_star(theta)
        DpC = np.linalg.lstsq(self.D, self.C, rcond=None)[0]
        return 2.0 * (self.M @ DpC).T @ (self.b - self.M @ xs)


class Ridge:
    """theta = log alpha (p = 1). B = alpha x, L_B = alpha, mu = alpha (certified, data-free).

    With c != 0 the upper level gains c e^theta w.x (so grad_x f += c e^theta w,
    grad_theta f = c e^theta w.x, L_ft = c e^theta ||w||); rho adds r(theta) = rho/2 theta^2.
    """

    is_quadratic = True

    def __init__(self, K, y, Kv, yv, c=0.0, w=None, rho=0.0):
        self.K, self.y, self.Kv, self.yv = (np.asarray(a, dtype=float) for a in (K, y, Kv, yv))
        self.x_size = self.K.shape[1]
        self.theta_size = 1
        self.KtK = self.K.T @ self.K
        self.Kty = self.K.T @ self.y
        self.pv = self.Kv.shape[0]
        self._K2 = _spec2(self.K)
        self._Lf = _spec2(self.Kv) / self.pv
        self.c = float(c)
        self.w = np.zeros(self.x_size) if w is None else np.asarray(w, dtype=float)
        self.rho = float(rho)
        self.upper_depends_on_theta = self.c != 0.0

    @classmethod
    def generate(cls, seed=0, m=50, d=10, pv=30, scale=2.0, **kw):
        rs = np.random.RandomState(seed)
        K = scale * rs.randn(m, d) / math.sqrt(m)
        xt = rs.randn(d)
        y = K @ xt + 0.1 * rs.randn(m)
        Kv = scale * rs.randn(pv, d) / math.sqrt(pv)
        yv = Kv @ xt + 0.1 * rs.randn(pv)
        if kw.get("c"):
            kw.setdefault("w", rs.randn(d))
        return cls(K, y, Kv, yv, **kw)

    def _alpha(self, theta):
        return math.exp(float(theta[0]))

    def lower_value(self, x, theta):
        r = self.K @ x - self.y
        return 0.5 * float(r @ r) + 0.5 * self._alpha(theta) * float(x @ x)

    def lower_grad(self, x, theta):
        return self.K.T @ (self.K @ x - self.y) + self._alpha(theta) * x

    def lower_hvp(self, x, theta, v):
        return self.KtK @ v + self._alpha(theta) * v

    def cross_vjp(self, x, theta, q):
        return np.array([self._alpha(theta) * float(x @ q)])

    def cross_jvp(self, x, theta, t):
        return self._alpha(theta) * float(t[0]) * x

    def upper_value(self, x, theta):
        r = self.Kv @ x - self.yv
        a = self._alpha(theta)
        return (0.5 * float(r @ r) / self.pv + self.c * a * float(self.w @ x)
                + 0.5 * self.rho * float(theta[0]) ** 2)

    def upper_grad(self, x, theta):
        return self.Kv.T @ (self.Kv @ x - self.yv) / self.pv + self.c * self._alpha(theta) * self.w

    def upper_theta_grad(self, x, theta):
        return np.array([self.c * self._alpha(theta) * float(self.w @ x)
                         + self.rho * float(theta[0])])

    def constants(self, theta):
        a = self._alpha(theta)
        out = {"mu": a, "L": self._K2 + a, "L_A": 0.0, "L_B": a, "L_f": self._Lf,
               "certified": True, "source": "derived"}
        if self.upper_depends_on_theta:
            out["L_ft"] = abs(self.c) * a * float(np.linalg.norm(self.w)) * _UP
        return out

    def x_star(self, theta):
        return np.linalg.solve(self.KtK + self._alpha(theta) * np.eye(self.x_size), self.Kty)

    def exact_hypergradient(self, theta):
        a = self._alpha(theta)
        xs = self.x_star(theta)
        A = self.KtK + a * np.eye(self.x_size)
        q = np.linalg.solve(A, self.upper_grad(xs, theta))
        return -a * float(xs @ q) + self.upper_theta_grad(xs, theta)


class Logistic:
    """l2-regularised logistic regression, labels folded into the rows (Z = y * K).
    Constants (docs/constants.md 2): mu = e^theta, L = ||K||^2/(4m) + e^theta,
    L_A = (sqrt3/18)||K||^2 max_i||k_i||/m, L_B = e^theta, L_f = ||Kv||^2/(4 p)."""

    is_quadratic = False
    upper_depends_on_theta = False

    def __init__(self, K, y, Kv, yv):
        self.Z = np.asarray(y, dtype=float)[:, None] * np.asarray(K, dtype=float)
        self.Zv = np.asarray(yv, dtype=float)[:, None] * np.asarray(Kv, dtype=float)
        self.m, self.x_size = self.Z.shape
        self.pv = self.Zv.shape[0]
        self.theta_size = 1
        K2 = _spec2(self.Z)
        self._L0 = K2 / (4.0 * self.m)
        self._LA = (math.sqrt(3.0) / 18.0) * K2 * float(np.max(np.linalg.norm(self.Z, axis=1))) \
            / self.m * _UP
        self._Lf = _spec2(self.Zv) / (4.0 * self.pv)

    @classmethod
    def generate(cls, seed=0, m=200, d=8, pv=100):
        rs = np.random.RandomState(seed)
        w = rs.randn(d)
        K = rs.randn(m, d)
        y = np.where(K @ w + 0.5 * rs.randn(m) > 0, 1.0, -1.0)
        Kv = rs.randn(pv, d)
        yv = np.where(Kv @ w + 0.5 * rs.randn(pv) > 0, 1.0, -1.0)
        return cls(K, y, Kv, yv)

    def _alpha(self, theta):
        return math.exp(float(theta[0]))

    def lower_value(self, x, theta):
        return float(np.mean(np.logaddexp(0.0, -self.Z @ x))) + 0.5 * self._alpha(theta) * float(x @ x)

    def lower_grad(self, x, theta):
        return -self.Z.T @ expit(-self.Z @ x) / self.m + self._alpha(theta) * x

    def _hess(self, x, theta):
        z = self.Z @ x
        w = expit(z) * expit(-z)
        return (self.Z.T * w) @ self.Z / self.m + self._alpha(theta) * np.eye(self.x_size)

    def lower_hvp(self, x, theta, v):
        z = self.Z @ x
        w = expit(z) * expit(-z)
        return self.Z.T @ (w * (self.Z @ v)) / self.m + self._alpha(theta) * v

    def cross_vjp(self, x, theta, q):
        return np.array([self._alpha(theta) * float(x @ q)])

    def cross_jvp(self, x, theta, t):
        return self._alpha(theta) * float(t[0]) * x

    def upper_value(self, x, theta):
        return float(np.mean(np.logaddexp(0.0, -self.Zv @ x)))

    def upper_grad(self, x, theta):
        return -self.Zv.T @ expit(-self.Zv @ x) / self.pv

    def upper_theta_grad(self, x, theta):
        return np.zeros(1)

    def constants(self, theta):
        a = self._alpha(theta)
        return {"mu": a, "L": self._L0 + a, "L_A": self._LA, "L_B": a, "L_f": self._Lf,
                "certified": True, "source": "derived"}

    def x_star(self, theta):
        x = np.zeros(self.x_size)
        for _ in range(100):
            g = self.lower_grad(x, theta)
            if np.linalg.norm(g) < 1e-15:
                break
            x = x - np.linalg.solve(self._hess(x, theta), g)
        return x

    def exact_hypergradient(self, theta):
        xs = self.x_star(theta)
        q = np.linalg.solve(self._hess(xs, theta), self.upper_grad(xs, theta))
        return np.array([-self._alpha(theta) * float(xs @ q)])
