"""Certificates at the edges of floating point. Norms were sqrt(v . v), which is 0 for a vector
of 1e-160s: ||B|| and ||grad g|| vanished, and bounds made of them fell below the true error
with status "ok" (ridge at theta = -600: bound 20 times below it), solve_lower stopped at x0
with bound 0, and optimize claimed ||grad F|| <= 1e-188 where it was 1e-175. mu ** 2 raised a raw
OverflowError (mu > 1e154) or ZeroDivisionError (mu < 1e-162). Each case against an exact
reference."""
from __future__ import annotations

import math
import threading

import mpmath as mp
import numpy as np
import pytest

from codegen.hypergrad.bounds import certified_product
from codegen.hypergrad.common import grad_norm, norm

from support import built_example


@pytest.mark.parametrize("scale", [1e-160, 1e-200, 1e-300, 1e160, 1e200])
def test_norms_neither_underflow_nor_overflow(scale):
    v = scale * np.array([3.0, -4.0, 0.0])
    for f in (norm, grad_norm):
        assert f(v) == pytest.approx(5 * scale, rel=1e-15)
    assert norm(np.zeros(4)) == 0.0 and math.isnan(norm(np.array([1.0, np.nan])))
    assert norm(np.array([1.0, np.inf])) == math.inf


def test_certified_product_keeps_its_scale():
    assert certified_product(1e-200, 1e-200, 1e300) == pytest.approx(1e-100, rel=1e-15)
    assert certified_product(1e200, 1e200, 1e-300) == pytest.approx(1e100, rel=1e-15)
    assert 0 < certified_product(1e-200, 1e-200) <= 1e-320  # an upper bound is never 0
    assert certified_product(0.0, math.inf) == 0.0 and certified_product(1e300, 1e300) == math.inf
    assert certified_product(2.0, 3.0) == 6.0


@pytest.fixture(scope="module")
def ridge(build_dir):
    _, module, ns = built_example("ridge", build_dir)
    return module, ns["example_data"](0, m=20, n=8, p=12)


@pytest.mark.parametrize("theta", [-600.0, -700.0])
def test_tiny_B_keeps_a_valid_bound(ridge, theta):
    """grad F = e^theta c with c = -x*^T H^-1 grad f(x*) at full relative accuracy."""
    module, d = ridge
    prob = module.bind(**d)
    A, b, Av, bv = d["A"], d["b"], d["Av"], d["bv"]
    H = A.T @ A + math.exp(theta) * np.eye(A.shape[1])
    xs = np.linalg.solve(H, A.T @ b)
    c = -(xs @ np.linalg.solve(H, Av.T @ (Av @ xs - bv) / Av.shape[0]))
    for kw in (dict(lower="fista", adjoint="cg", eps=1e-3, delta=1e-1), dict(rtol=1e-6)):
        hg = prob.hypergradient(theta, **kw)
        err = abs(float(hg.grad[0]) - math.exp(theta) * c)
        assert hg.ok and err <= hg.bound, (kw, err, hg.bound)
        assert hg.norm_B == pytest.approx(math.exp(theta) * float(np.linalg.norm(hg.x)), rel=1e-12)


def test_tiny_data_solve_lower_bound_holds(ridge):
    """Data scaled by 1e-150: ||grad g(0)|| ~ 1e-300 normed to 0, and the solvers stopped at x0
    with bound 0. x* from a 50-digit solve."""
    module, d = ridge
    small = {k: v * 1e-150 for k, v in d.items()}
    prob = module.bind(**small)
    mp.mp.dps = 50
    M = mp.matrix(small["A"].tolist())
    xs = mp.lu_solve(M.T * M + mp.eye(8), M.T * mp.matrix(small["b"].tolist()))
    for solver in ("newton", "fista", "direct"):
        sol = prob.solve_lower(0.0, solver=solver, tol=1e-8)
        dist = float(mp.sqrt(mp.fsum((mp.mpf(float(a)) - e) ** 2 for a, e in zip(sol.x, xs))))
        assert sol.success and 0 < dist <= sol.bound, (solver, dist, sol.bound)


def _ridge_grad(d: dict, theta: float) -> float:
    """ridge's grad F = -e^theta x*^T H^-1 grad f(x*), H = A^T A + e^theta I, in NumPy."""
    A, b, Av, bv = d["A"], d["b"], d["Av"], d["bv"]
    H = A.T @ A + math.exp(theta) * np.eye(A.shape[1])
    xs = np.linalg.solve(H, A.T @ b)
    return -math.exp(theta) * float(xs @ np.linalg.solve(H, Av.T @ (Av @ xs - bv) / Av.shape[0]))


def test_huge_and_tiny_mu_give_no_raw_exception(ridge, build_dir):
    """mu = e^700 or data * 1e150 (mu ~ 1e300), and logistic at theta = -400 (mu ~ 1e-174):
    every call returns a result or a hypergen error, no OverflowError or ZeroDivisionError;
    where the ridge's closed form gives grad F, an "ok" bound holds against it (up to the
    closed form's own 1e-12 relative)."""
    from codegen import HypergenError

    module, d = ridge
    _, logistic, ns = built_example("logistic", build_dir)
    big = {k: v * 1e150 for k, v in d.items()}
    cases = [(module.bind(**d), 700.0, _ridge_grad(d, 700.0)),
             (module.bind(**big), 0.0, _ridge_grad(big, 0.0)),
             (logistic.bind(**ns["example_data"](0, m=30, n=6, p=30)), -400.0, None)]
    checked = 0
    for prob, theta, exact in cases:
        for kw in (dict(rtol=1e-6), dict(eps=1e-8, delta=1e-8)):
            try:
                hg = prob.hypergradient(theta, **kw)
            except HypergenError:
                continue
            assert hg.bound >= 0 and not math.isnan(hg.bound)
            if exact is not None and hg.ok:
                err = abs(float(hg.grad[0]) - exact)
                assert err <= hg.bound + 1e-12 * abs(exact), (theta, kw, err, hg.bound)
                checked += 1
    assert checked >= 2, checked  # the two ridge cases certify at least once each


def test_overflowing_mu_is_the_largest_float(ridge):
    """e^745 overflows: mu, a certified lower bound, is the largest float, not inf."""
    module, d = ridge
    assert module.bind(**d).constants(745.0)["mu"] == np.finfo(float).max


def test_optimize_claims_hold_at_tiny_gradients(ridge):
    """Ridge from theta0 = -400 (grad F ~ 1e-175): the certified ||grad F|| <= ||h|| + bound held
    1e-188 when ||h|| normed to 0."""
    module, d = ridge
    prob = module.bind(**d)
    A, b, Av, bv = d["A"], d["b"], d["Av"], d["bv"]
    for method in ("maid", "gd", None):
        res = prob.optimize(-400.0, method=method, max_iter=3)
        th = float(np.ravel(res.theta)[0])
        H = A.T @ A + math.exp(th) * np.eye(8)
        xs = np.linalg.solve(H, A.T @ b)
        true = abs(math.exp(th) * (xs @ np.linalg.solve(H, Av.T @ (Av @ xs - bv) / Av.shape[0])))
        last = res.history[-1]
        assert math.isfinite(res.value) and true <= last["grad_norm"] + last["bound"], (method, true)


def test_cg_at_underflowing_residuals_returns(ridge):
    """Data * 1e-150: the C loop's residual sqrt(s . s) underflows to 0 and met its test at
    once, while the true gradient (normed scaled) did not: the segments restarted for ever."""
    module, d = ridge
    prob = module.bind(**{k: v * 1e-150 for k, v in d.items()})
    out: dict = {}

    def calls() -> None:
        out["sol"] = prob.solve_lower(0.0, solver="cg", tol=0.0)
        out["hg"] = prob.hypergradient(0.0, rtol=1e-6, lower="cg", adjoint="cg")

    worker = threading.Thread(target=calls, daemon=True)  # a hang fails here, not the CI
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "solve_lower / hypergradient did not return in 120 s"
    assert out["sol"].status == "rounding floor" and out["sol"].bound > 0
    assert "hg" in out  # returns, whatever it says


def test_tight_bound_over_components_does_not_underflow(ridge):
    """The per-component bounds (2.7e-180) were combined as sqrt(sum b_j^2): 0."""
    module, d = ridge
    prob = module.bind(**d)
    theta = -400.0
    A, b, Av, bv = d["A"], d["b"], d["Av"], d["bv"]
    H = A.T @ A + math.exp(theta) * np.eye(8)
    xs = np.linalg.solve(H, A.T @ b)
    exact = -math.exp(theta) * (xs @ np.linalg.solve(H, Av.T @ (Av @ xs - bv) / Av.shape[0]))
    for lower in ("fista", "newton"):
        hg = prob.hypergradient(theta, rtol=1e-6, lower=lower, adjoint="cg", certificate="tight")
        assert hg.certificate == "tight" and 0 < abs(float(hg.grad[0]) - exact) <= hg.bound


def test_optimize_without_a_certified_point_is_no_success(ridge):
    """Ridge from theta0 = 700: h underflows to 0 inside the cross kernel and the run stops at
    its floor before accepting any point; it reported success with value nan."""
    module, d = ridge
    res = module.bind(**d).optimize(700.0, max_iter=2)
    assert not res.success and math.isnan(res.value) and "no point was certified" in res.message


def test_solve_lower_margin_with_an_infinite_L(build_dir):
    """Poisson-type exp atoms have L = inf: the rounding margin of solve_lower's bound was 0, and
    at tol = 0 the bound was 0 against a true distance of 8e-24. L is taken on the ball now."""
    import sympy as sp

    from codegen import Problem
    from codegen.pipeline import build_problem

    n = sp.Symbol("n", integer=True, positive=True)
    j = sp.Idx("j", n)
    x, y = sp.IndexedBase("x", shape=(n,)), sp.IndexedBase("y", shape=(n,))
    t = sp.Symbol("t")
    problem = Problem(name="poisson_entries", x=x, theta=t,
                      lower=sp.Sum(sp.exp(x[j]) - y[j] * x[j], (j, 0, n - 1))
                      + sp.exp(t) * sp.Sum(x[j] ** 2, (j, 0, n - 1)) / 2,
                      upper=sp.Sum(x[j] ** 2, (j, 0, n - 1)) / 2)
    prob = build_problem(problem, build_dir).bind(y=np.array([0.5, 1.0, 2.0, 3.0]))
    assert prob.constants(0.0)["L"] == math.inf
    mp.mp.dps = 50  # x*_j solves e^z - y_j + z = 0 (theta = 0)
    xs = [mp.findroot(lambda z, yj=yj: mp.exp(z) - yj + z, 0) for yj in (0.5, 1.0, 2.0, 3.0)]
    for solver in ("newton", "direct"):
        sol = prob.solve_lower(0.0, solver=solver, tol=0.0)
        dist = float(mp.sqrt(mp.fsum((mp.mpf(float(a)) - e) ** 2 for a, e in zip(sol.x, xs))))
        assert 0 < dist <= sol.bound, (solver, dist, sol.bound)  # tol = 0: the floor, not success
