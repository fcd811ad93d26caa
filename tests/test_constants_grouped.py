"""Per-group weights: theta[c] weighting every row of its group c (one ridge weight per class of a
multinomial logistic regression, x[j, c]). Only weights indexed one-to-one by the rows had an L_B
rule; a weight shared by a group gave L_B = inf and no bound. With the rows grouped by the
weight's index, B(x) u = c K^T D_u psi'(K x + b), D_u the rows' u_{I(r)} v'(theta_{I(r)}), so
||B(x) u - B(y) u|| <= |c| max|v'| sup|psi''| ||K||^2 ||u|| ||x - y||."""
from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

from codegen import Problem, softplus
from codegen.pipeline import build_problem

from support import largest_B_quotient

m, n, C, p = sp.symbols("m n C p", integer=True, positive=True)
i, j, c, k = sp.Idx("i", m), sp.Idx("j", n), sp.Idx("c", C), sp.Idx("k", p)
A, Y = sp.IndexedBase("A", shape=(m, n)), sp.IndexedBase("Y", shape=(m, C))
Av, Yv = sp.IndexedBase("Av", shape=(p, n)), sp.IndexedBase("Yv", shape=(p, C))
x = sp.IndexedBase("x", shape=(n, C))
theta = sp.IndexedBase("theta", shape=(C,))
THETA = np.array([-2.0, -1.0, -1.5])


def _cross_entropy(M, Yo, r, N):
    z = sp.Sum(M[r, j] * x[j, c], (j, 0, n - 1))
    return sp.Sum(sp.log(sp.Sum(sp.exp(z), (c, 0, C - 1))) - sp.Sum(Yo[r, c] * z, (c, 0, C - 1)),
                  (r, 0, N - 1)) / N


@pytest.fixture(scope="module")
def per_class(tmp_path_factory):
    """Multinomial logistic regression with a ridge weight e^theta[c] per class, and a softplus
    term weighted per class too (a non-quadratic atom under a group weight)."""
    problem = Problem(
        name="per_class", x=x, theta=theta,
        lower=_cross_entropy(A, Y, i, m)
        + sp.Sum(sp.exp(theta[c]) * sp.Sum(x[j, c] ** 2, (j, 0, n - 1)), (c, 0, C - 1)) / 2
        + sp.Sum(sp.exp(theta[c]) * sp.Sum(softplus(x[j, c]), (j, 0, n - 1)), (c, 0, C - 1)) / 4,
        upper=_cross_entropy(Av, Yv, k, p))
    rng = np.random.default_rng(0)
    W = rng.standard_normal((5, 3))

    def labels(M):
        return np.eye(3)[np.argmax(M @ W + 0.5 * rng.standard_normal((M.shape[0], 3)), 1)]
    A_, Av_ = rng.standard_normal((40, 5)), rng.standard_normal((30, 5))
    return build_problem(problem, tmp_path_factory.mktemp("per_class")).bind(
        A=A_, Y=labels(A_), Av=Av_, Yv=labels(Av_))


def test_group_weight_L_B_bounds_the_measured_quotients(per_class):
    """The ridge part's B column is e^theta[c] x[:, c]: its quotient reaches max_c e^theta[c];
    the softplus part adds at most max e^theta[c] / 4 sup softplus'' = max e^theta[c] / 16."""
    cst = per_class.constants(THETA)
    assert np.isfinite(cst["L_B"]) and cst["certified_flags"]["L_B"]
    top = float(np.exp(THETA.max()))
    assert top <= cst["L_B"] <= top * (1 + 1 / 16) * (1 + 1e-9)
    worst = largest_B_quotient(per_class, THETA, seed=1)
    print(f"largest quotient {worst:.4g} of L_B = {cst['L_B']:.4g}")
    assert 0.9 * top <= worst <= cst["L_B"]


def test_group_weight_problem_is_certified(per_class):
    xs = np.zeros(15)
    for _ in range(60):
        step = np.linalg.solve(per_class.lower_hessian(xs, THETA), per_class.lower_grad(xs, THETA))
        s = 1.0
        while per_class.lower_value(xs - s * step, THETA) > per_class.lower_value(xs, THETA):
            s /= 2
        xs = xs - s * step
    assert np.linalg.norm(per_class.lower_grad(xs, THETA)) < 1e-12
    exact = per_class.upper_theta_grad(xs, THETA) - per_class.cross_matrix(xs, THETA).T @ np.linalg.solve(
        per_class.lower_hessian(xs, THETA), per_class.upper_grad(xs, THETA))
    for rtol in (1e-3, 1e-8):
        for lower in ("auto", "fista"):
            hg = per_class.hypergradient(THETA, rtol=rtol, lower=lower)
            assert hg.ok and hg.certified, hg.status
            assert np.linalg.norm(hg.grad - exact) <= hg.bound <= rtol * np.linalg.norm(hg.grad)


@pytest.fixture(scope="module")
def two_roles(tmp_path_factory):
    """theta (m + n entries) in two roles: a weight per sample theta[i] and per feature
    theta[m + j], which is one-to-one in j (a shift by a size); before, only shifts by a number
    were, and the per-feature weights fell under no rule."""
    mm, nn = sp.symbols("mm nn", integer=True, positive=True)
    ii, jj = sp.Idx("ii", mm), sp.Idx("jj", nn)
    B_, y_ = sp.IndexedBase("B", shape=(mm, nn)), sp.IndexedBase("y", shape=(mm,))
    z = sp.IndexedBase("z", shape=(nn,))
    w = sp.IndexedBase("w", shape=(mm + nn,))
    r = sp.Sum(B_[ii, jj] * z[jj], (jj, 0, nn - 1)) - y_[ii]
    problem = Problem(
        name="two_roles", x=z, theta=w,
        lower=sp.Sum(sp.exp(w[ii]) * r ** 2, (ii, 0, mm - 1)) / 2
        + sp.Sum(sp.exp(w[mm + jj]) * (z[jj] ** 2 / 2 + softplus(z[jj]) / 4), (jj, 0, nn - 1)),
        upper=sp.Sum((z[jj] - 1) ** 2, (jj, 0, nn - 1)) / 2)
    rng = np.random.default_rng(3)
    return build_problem(problem, tmp_path_factory.mktemp("two_roles")).bind(
        B=rng.standard_normal((7, 4)), y=rng.standard_normal(7))


def test_shift_by_a_size_is_one_to_one(two_roles):
    th = np.linspace(-1.0, 0.5, 11)
    cst = two_roles.constants(th)
    assert np.isfinite(cst["L_B"]) and cst["certified_flags"]["L_B"]
    worst = largest_B_quotient(two_roles, th, seed=4)
    print(f"largest quotient {worst:.4g} of L_B = {cst['L_B']:.4g}")
    assert 0.1 * cst["L_B"] <= worst <= cst["L_B"]
    xs = np.zeros(4)
    for _ in range(40):
        xs = xs - np.linalg.solve(two_roles.lower_hessian(xs, th), two_roles.lower_grad(xs, th))
    exact = -two_roles.cross_matrix(xs, th).T @ np.linalg.solve(two_roles.lower_hessian(xs, th),
                                                                two_roles.upper_grad(xs, th))
    hg = two_roles.hypergradient(th, rtol=1e-6)
    assert hg.ok and hg.certified
    assert np.linalg.norm(hg.grad - exact) <= hg.bound <= 1e-6 * np.linalg.norm(hg.grad)


def test_theta_entry_at_an_index_of_sizes(tmp_path_factory):
    """theta of m + 1 entries: a weight per sample theta[i] and one ridge weight theta[m], the
    last entry, whose index is known only once m is bound. Its constants had no rule (a
    symbolic index); they now read theta[m] at bind."""
    mm, nn = sp.symbols("mm nn", integer=True, positive=True)
    ii, jj = sp.Idx("ii", mm), sp.Idx("jj", nn)
    B_, y_ = sp.IndexedBase("B", shape=(mm, nn)), sp.IndexedBase("y", shape=(mm,))
    z = sp.IndexedBase("z", shape=(nn,))
    w = sp.IndexedBase("w", shape=(mm + 1,))
    r = sp.Sum(B_[ii, jj] * z[jj], (jj, 0, nn - 1)) - y_[ii]
    problem = Problem(
        name="last_entry", x=z, theta=w,
        lower=sp.Sum(sp.exp(w[ii]) * r ** 2, (ii, 0, mm - 1)) / 2
        + sp.exp(w[mm]) * sp.Sum(z[jj] ** 2, (jj, 0, nn - 1)) / 2,
        upper=sp.Sum((z[jj] - 1) ** 2, (jj, 0, nn - 1)) / 2)
    rng = np.random.default_rng(5)
    B, y = rng.standard_normal((7, 4)), rng.standard_normal(7)
    prob = build_problem(problem, tmp_path_factory.mktemp("last_entry")).bind(B=B, y=y)
    th = np.linspace(-0.5, 0.5, 8)
    cst = prob.constants(th)
    # mu: the ridge weight e^theta[7] (the last entry) plus lambda_min of B^T diag(e^theta_i) B
    H = B.T @ np.diag(np.exp(th[:7])) @ B + np.exp(th[7]) * np.eye(4)
    assert cst["certified"] and np.exp(th[7]) <= cst["mu"] <= np.linalg.eigvalsh(H)[0]
    xs = np.linalg.solve(H, B.T @ (np.exp(th[:7]) * y))
    exact = -prob.cross_matrix(xs, th).T @ np.linalg.solve(H, xs - 1)
    hg = prob.hypergradient(th, rtol=1e-6)
    assert hg.ok and hg.certified
    assert np.linalg.norm(hg.grad - exact) <= hg.bound <= 1e-6 * np.linalg.norm(hg.grad)
