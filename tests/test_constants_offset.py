"""theta in the offset of an atom's argument (a learned shift: softplus(x_j - t), log cosh(a_i.x -
b_i - t)): L_B and L_DB had no rule (infinite), so such problems got no bound at all. Column l of
B is c K^T diag(w psi''(K x + b)) db/dtheta_l, which moves by at most |c| max w sup|psi'''|
|db/dtheta_l| ||K||^2 per ||x - y|| (L_B); its x-derivative by |c| max w sup|psi''''|
|db/dtheta_l| ||K||^2 max_I ||K_I|| (L_DB). Both are checked against measured quotients."""
from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

from codegen import Problem, softplus
from codegen.pipeline import build_problem

from support import largest_B_quotient

m, n = sp.symbols("m n", integer=True, positive=True)
i, j = sp.Idx("i", m), sp.Idx("j", n)
A, b = sp.IndexedBase("A", shape=(m, n)), sp.IndexedBase("b", shape=(m,))
y = sp.IndexedBase("y", shape=(n,))
x = sp.IndexedBase("x", shape=(n,))
t = sp.symbols("t0:3")
THETA = np.array([0.3, -0.2, -0.5])


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """softplus(x_j - e^t2) and e^t1 log cosh(a_i.x - b_i - t0): slopes e^t2 and 1."""
    problem = Problem(
        name="shifted", x=x, theta=list(t),
        lower=sp.Sum((x[j] - y[j]) ** 2, (j, 0, n - 1)) / 2
        + sp.exp(t[1]) * sp.Sum(sp.log(sp.cosh(sp.Sum(A[i, j] * x[j], (j, 0, n - 1)) - b[i] - t[0])), (i, 0, m - 1))
        + sp.Sum(softplus(x[j] - sp.exp(t[2])), (j, 0, n - 1)),
        upper=sp.Sum((x[j] - 1) ** 2, (j, 0, n - 1)) / 2)
    rng = np.random.default_rng(0)
    data = {"A": rng.standard_normal((8, 6)) / 2, "b": rng.standard_normal(8),
            "y": rng.standard_normal(6)}
    return build_problem(problem, tmp_path_factory.mktemp("shifted")).bind(**data)


def _pairs(rng, size, count=200):
    """Random pairs of points, far apart and close together, around where the atoms bend."""
    for k in range(count):
        a = 2 * rng.standard_normal(size)
        yield a, a + (10.0 ** -(k % 4)) * rng.standard_normal(size)


def test_L_B_bounds_the_measured_quotients(shifted):
    c = shifted.constants(THETA)
    assert np.isfinite(c["L_B"]) and c["certified_flags"]["L_B"]
    worst = largest_B_quotient(shifted, THETA, seed=1)
    print(f"largest quotient {worst:.4g} of L_B = {c['L_B']:.4g}")
    assert worst <= c["L_B"] and worst >= 0.05 * c["L_B"]


def test_L_DB_bounds_the_measured_quotients(shifted):
    """d(B(x) u)/dx = d/ds A(x, theta + s u), by central differences of the Hessian kernel."""
    c = shifted.constants(THETA)
    assert np.isfinite(c["L_DB"])
    rng = np.random.default_rng(2)
    h = 1e-5

    def D(point, u):
        return (shifted.lower_hessian(point, THETA + h * u)
                - shifted.lower_hessian(point, THETA - h * u)) / (2 * h)
    worst = 0.0
    for a, e in _pairs(rng, 6, 100):
        u = rng.standard_normal(3)
        u /= np.linalg.norm(u)
        worst = max(worst, np.linalg.norm(D(a, u) - D(e, u), 2) / np.linalg.norm(a - e))
    print(f"largest quotient {worst:.4g} of L_DB = {c['L_DB']:.4g}")
    assert worst <= c["L_DB"] * (1 + 1e-6) and worst >= 0.01 * c["L_DB"]


def test_shifted_problem_is_certified(shifted):
    """The hypergradient now has a finite bound, valid against a dense reference."""
    xs = np.zeros(6)
    for _ in range(50):
        xs = xs - np.linalg.solve(shifted.lower_hessian(xs, THETA), shifted.lower_grad(xs, THETA))
    assert np.linalg.norm(shifted.lower_grad(xs, THETA)) < 1e-12
    exact = shifted.upper_theta_grad(xs, THETA) - shifted.cross_matrix(xs, THETA).T @ np.linalg.solve(
        shifted.lower_hessian(xs, THETA), shifted.upper_grad(xs, THETA))
    for rtol in (1e-3, 1e-8):
        for lower in ("auto", "fista", "newton"):
            hg = shifted.hypergradient(THETA, rtol=rtol, lower=lower)
            assert hg.ok and hg.certified and np.isfinite(hg.bound), hg.status
            assert np.linalg.norm(hg.grad - exact) <= hg.bound <= rtol * np.linalg.norm(hg.grad)
