"""The oracle of benchmarks/bench_learning.py: F(theta) = f(x*(theta)) + r(theta) and its exact
gradient in NumPy/SciPy, independent of hypergen (none of its kernels, solvers or constants).

x* comes from damped Newton with a Cholesky factorisation, warm-started from the last solution,
until its certified error ||grad g|| / mu * (||grad f|| + ||grad g|| / mu) on F is <= ORACLE_TOL
(or at round-off, <= 1e3 ORACLE_TOL); the adjoint q = H^-1 grad f by the same factorisation. The
models state the benchmark's problems (examples/logistic.py, logistic_weights.py,
hypercleaning.py) by hand, so a mistake in hypergen's generated kernels cannot reach the verdict.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.linalg
from scipy.special import expit, logsumexp

#: The oracle's accuracy: its certified |F_oracle - F| is at most about this.
ORACLE_TOL = 1e-12




class LogisticModel:
    """l2-logistic lower level, alpha = exp(theta) (one, or one per feature), validation logistic
    loss, r = rho/2 ||theta||^2: values, gradients, the Hessian and B^T q in NumPy."""

    def __init__(self, data: dict, per_feature: bool, rho: float = 0.0):
        self.A, self.y, self.Av, self.yv = (data[k] for k in ("A", "y", "Av", "yv"))
        self.per_feature, self.rho = per_feature, rho
        self.size = self.A.shape[1]

    def alpha(self, theta: np.ndarray) -> np.ndarray:
        return np.exp(theta) if self.per_feature else np.full(self.size, math.exp(theta[0]))

    def lower(self, x, theta) -> tuple:
        al, m = self.alpha(theta), self.A.shape[0]
        z = self.y * (self.A @ x)
        val = np.logaddexp(0.0, -z).mean() + 0.5 * al @ (x * x)
        return val, -(self.A.T @ (self.y * expit(-z))) / m + al * x

    def hessian(self, x, theta) -> np.ndarray:
        s = expit(self.A @ x)
        H = (self.A.T * (s * (1 - s) / self.A.shape[0])) @ self.A
        H[np.diag_indices_from(H)] += self.alpha(theta)
        return H

    def mu(self, theta) -> float:
        return float(self.alpha(theta).min())

    def upper(self, x, theta) -> tuple:
        z = self.yv * (self.Av @ x)
        grad = -(self.Av.T @ (self.yv * expit(-z))) / self.Av.shape[0]
        return np.logaddexp(0.0, -z).mean() + 0.5 * self.rho * theta @ theta, grad

    def theta_grad(self, x, theta, q) -> np.ndarray:
        """-B^T q + grad r, B = d/dtheta grad_x g."""
        bq = self.alpha(theta) * x * q
        return -(bq if self.per_feature else np.array([bq.sum()])) + self.rho * theta


class CleaningModel:
    """Hypercleaning (examples/hypercleaning.py) in NumPy: W is c x n, flattened in C order."""

    def __init__(self, data: dict):
        self.A, self.Y, self.Av, self.Yv = (data[k] for k in ("A", "Y", "Av", "Yv"))
        self.lam = float(data["lam"])
        (m, n), c = self.A.shape, self.Y.shape[1]
        self.c, self.n, self.size = c, n, c * n
        self.AA = (self.A[:, :, None] * self.A[:, None, :]).reshape(m, n * n)

    def _probs(self, W, F):
        z = F @ W.T
        lse = logsumexp(z, axis=1)
        return z, lse, np.exp(z - lse[:, None])

    def lower(self, x, theta) -> tuple:
        W, w, m = x.reshape(self.c, self.n), expit(theta), self.A.shape[0]
        z, lse, P = self._probs(W, self.A)
        val = np.mean(w * (lse - np.sum(self.Y * z, axis=1))) + self.lam * x @ x
        grad = ((w[:, None] * (P - self.Y)).T @ self.A) / m + 2 * self.lam * W
        return val, grad.ravel()

    def hessian(self, x, theta) -> np.ndarray:
        c, n, m = self.c, self.n, self.A.shape[0]
        _, _, P = self._probs(x.reshape(c, n), self.A)
        G = (expit(theta) / m)[:, None, None] * (P[:, :, None] * np.eye(c) - P[:, :, None] * P[:, None, :])
        H = (G.reshape(m, c * c).T @ self.AA).reshape(c, c, n, n).transpose(0, 2, 1, 3)
        H = H.reshape(c * n, c * n).copy()
        H[np.diag_indices_from(H)] += 2 * self.lam
        return H

    def mu(self, theta) -> float:
        return 2 * self.lam

    def upper(self, x, theta) -> tuple:
        z, lse, P = self._probs(x.reshape(self.c, self.n), self.Av)
        mv = self.Av.shape[0]
        return np.mean(lse - np.sum(self.Yv * z, axis=1)), (((P - self.Yv).T @ self.Av) / mv).ravel()

    def theta_grad(self, x, theta, q) -> np.ndarray:
        W, Q, w, m = x.reshape(self.c, self.n), q.reshape(self.c, self.n), expit(theta), self.A.shape[0]
        _, _, P = self._probs(W, self.A)
        return -(w * (1 - w) / m) * np.sum((P - self.Y) * (self.A @ Q.T), axis=1)


class Oracle:
    """F(theta) and its exact gradient from a tight Newton solve (warm-started from the last x)
    and a Cholesky adjoint; `worst` is the largest certified |F_oracle - F| it has returned at a
    point with F <= `watch` (near the target: where its verdicts matter)."""

    def __init__(self, model):
        self.model, self.x, self.calls = model, np.zeros(model.size), 0
        self.worst, self.watch, self.error = 0.0, math.inf, 0.0

    def solve(self, theta: np.ndarray) -> np.ndarray:
        md, x = self.model, self.x.copy()
        mu, prev = md.mu(theta), math.inf
        for _ in range(100):
            val, grad = md.lower(x, theta)
            e = np.linalg.norm(grad) / mu
            err = e * (np.linalg.norm(md.upper(x, theta)[1]) + e)
            if err <= ORACLE_TOL or (e >= 0.5 * prev and err <= 1e3 * ORACLE_TOL):
                break                                        # converged, or at round-off
            prev, cho = e, scipy.linalg.cho_factor(md.hessian(x, theta))
            step, t, slope = scipy.linalg.cho_solve(cho, grad), 1.0, grad @ scipy.linalg.cho_solve(cho, grad)
            while md.lower(x - t * step, theta)[0] > val - 1e-4 * t * slope and t > 1e-8:
                t *= 0.5
            x = x - t * step
        self.x, self.error, self.calls = x, err, self.calls + 1
        return x

    def _checked(self, val: float) -> float:
        if val <= self.watch:
            self.worst = max(self.worst, self.error)
        return float(val)

    def value(self, theta) -> float:
        theta = np.asarray(theta, dtype=float).ravel()
        return self._checked(self.model.upper(self.solve(theta), theta)[0])

    def value_grad(self, theta) -> tuple:
        theta = np.asarray(theta, dtype=float).ravel()
        md, x = self.model, self.solve(theta)
        val, gf = md.upper(x, theta)
        self._checked(val)
        q = scipy.linalg.cho_solve(scipy.linalg.cho_factor(md.hessian(x, theta)), gf)
        return float(val), md.theta_grad(x, theta, q)
