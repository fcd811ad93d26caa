"""The unified hypergradient framework (codegen.hypergrad: its solvers and hypergradient) on plain-NumPy
kernels with exact hypergradients (tests/quadratic_kernels.py). Run with -s for the numbers."""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from codegen.hypergrad import (  # noqa: E402
    HypergradientResult,
    SolverError,
    backprop_adjoint,
    cross_norm,
    hypergradient,
    hypergradient_samples,
    solve_adjoint,
    solve_lower,
)
from codegen.hypergrad.lower.fista import fista_coefficients  # noqa: E402
from codegen.hypergrad.rates import cg_rate_bound  # noqa: E402

from quadratic_kernels import Logistic, PaperQuadratic, Ridge  # noqa: E402

# ----------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def quad():
    return PaperQuadratic.generate(seed=1)


@pytest.fixture(scope="module")
def ridge():
    return Ridge.generate(seed=0)


@pytest.fixture(scope="module")
def logistic():
    return Logistic.generate(seed=0)


class Faulty:
    """Wraps a kernel; `method` returns `value` (NaN by default) from call number `after` on, or
    `fn(kernel, *args)` if given. `consts` overrides entries of constants(theta)."""

    def __init__(self, k, method=None, after=0, value=np.nan, fn=None, consts=None):
        self._k, self._method, self._after, self._value, self._fn = k, method, after, value, fn
        self._consts = consts or {}
        self.calls = 0

    def __getattr__(self, name):
        attr = getattr(self._k, name)
        if name != self._method:
            return attr

        def wrapped(*args):
            self.calls += 1
            if self._fn is not None:
                return self._fn(self._k, *args)
            out = attr(*args)
            if self.calls > self._after:
                return np.full_like(np.asarray(out, dtype=float), self._value)
            return out
        return wrapped

    def constants(self, theta):
        c = dict(self._k.constants(theta))
        c.update(self._consts)
        return c


def frozen_reverse(k, xK, th, K, a, b=0.0):
    """Reverse mode over K GD (b = 0) or heavy-ball steps with every Hessian and cross derivative
    frozen at x_K, written from docs/framework.md section 3 (independently of codegen.hypergrad):
    xt_0 = grad f(x_K), xt_{-1} = 0; repeat K times: h -= a B^T xt_k;
    xt_{k+1} = (1 + b) xt_k - a A xt_k - b xt_{k-1}."""
    xt = k.upper_grad(xK, th)
    xt_prev = np.zeros_like(xt)
    h = np.zeros(k.theta_size)
    for _ in range(K):
        h = h - a * k.cross_vjp(xK, th, xt)
        xt, xt_prev = (1 + b) * xt - a * k.lower_hvp(xK, th, xt) - b * xt_prev, xt
    return h


def steps(k, th):
    c = k.constants(th)
    mu, L = c["mu"], c["L"]
    a_gd = 2 / (L + mu)
    a_hb = 4 / (math.sqrt(L) + math.sqrt(mu)) ** 2
    b_hb = ((math.sqrt(L) - math.sqrt(mu)) / (math.sqrt(L) + math.sqrt(mu))) ** 2
    return a_gd, a_hb, b_hb


# ----------------------------------------------------------------------------------------------
# the central claim: the a posteriori bound is never below the true error


def test_bound_valid_over_grid(quad, ridge, logistic):
    problems = [
        ("quadratic", quad, [np.ones(10), 0.5 * np.ones(10)]),
        ("ridge", ridge, [np.array([-1.5]), np.array([0.5])]),
        ("ridge+f(theta)+r", Ridge.generate(seed=2, c=0.5, rho=0.1), [np.array([-0.5])]),
        ("logistic", logistic, [np.array([-1.5]), np.array([0.5])]),
    ]
    tols = (1e-2, 1e-4, 1e-8)
    n = n_valid = 0
    worst = 0.0
    tight = {}
    apri_viol = []
    hb_apri = [0, 0]  # non-rigorous (HB, C = 1) a priori values: how many, how many below true
    for name, k, thetas in problems:
        lowers = ["gd", "hb", "fista", "newton", "direct"] + (["cg"] if k.is_quadratic else [])
        for th in thetas:
            exact = k.exact_hypergradient(th)
            for lo in lowers:
                for ad in ("cg", "gd", "hb", "direct"):
                    for eps in tols:
                        for delta in tols:
                            hg = hypergradient(k, th, lower=lo, adjoint=ad, eps=eps, delta=delta)
                            err = float(np.linalg.norm(hg.grad - exact))
                            n += 1
                            assert hg.usable, hg
                            assert hg.lower.bound <= eps and hg.R <= delta, hg
                            assert math.isfinite(hg.bound) and hg.certified
                            forms = {key: v for key, v in hg.bound_forms.items() if key != "rounding"}
                            ok = all(v + hg.bound_forms["rounding"] >= err for v in forms.values())
                            n_valid += ok
                            assert ok, (name, th, lo, ad, eps, delta, err, hg)
                            assert hg.bound == min(forms.values()) + hg.bound_forms["rounding"]
                            worst = max(worst, err / hg.bound)
                            if ad == "cg" and delta <= 1e-6:
                                tight.setdefault(name, {}).setdefault(eps, []).append(
                                    hg.bound / err)
                            if hg.apriori_rigorous and hg.apriori_bound < err:
                                apri_viol.append((name, lo, ad, eps, delta))
                            if not hg.apriori_rigorous:
                                hb_apri[0] += 1
                                hb_apri[1] += hg.apriori_bound < err
    print(f"\n[grid] a posteriori validity: {n_valid}/{n} "
          f"({100.0 * n_valid / n:.1f}%), max true/bound = {worst:.3g}")
    for name, by_eps in tight.items():
        r = [v for vals in by_eps.values() for v in vals]
        per_eps = ", ".join(f"eps {e:.0e}: {np.median(v):.3g}" for e, v in by_eps.items())
        print(f"[grid] {name:18s} CG adjoint, delta <= 1e-6: median bound/true = "
              f"{np.median(r):.3g} (min {min(r):.3g}, max {max(r):.3g}, n = {len(r)}; {per_eps})")
    print(f"[grid] rigorous a priori bounds below the true error: {len(apri_viol)}; "
          f"HB (C = 1, flagged not rigorous) a priori below the true error: "
          f"{hb_apri[1]}/{hb_apri[0]}")
    assert n_valid == n
    assert not apri_viol, apri_viol[:5]


def test_paper_quadratic_cg_10_iterations(quad):
    """docs/framework.md 10.1: exact x*, CG adjoint for 10 iterations from q0 = 0."""
    th = np.ones(10)
    xs = quad.x_star(th)
    exact = quad.exact_hypergradient(th)
    out = []
    for its in (10, 11):
        hg = hypergradient(quad, th, lower="cg", adjoint="cg", x0=xs, eps=1e-6, delta=0.0,
                           adjoint_max_iter=its)
        err = float(np.linalg.norm(hg.grad - exact))
        assert hg.lower.iterations == 0 and hg.adjoint.iterations == its
        assert hg.bound >= err
        out.append((its, err, hg.bound, hg.apriori_bound, hg.R))
        if its == 10:
            assert hg.bound <= 1e-6
            assert "capped" in hg.status  # delta = 0 is never met: honest status
    for its, err, b, a, R in out:
        print(f"\n[paper quadratic] ||grad F|| = {np.linalg.norm(exact):.3g}, CG {its} its: "
              f"true {err:.2e}, a posteriori {b:.2e}, a priori {a:.2e}, R = {R:.2e}", end="")
    print()


def test_bound_at_every_cg_iterate_logistic(logistic):
    """docs/framework.md 7 test: logistic lower level, the bound holds at every CG iterate."""
    th = np.array([-1.5])
    exact = logistic.exact_hypergradient(th)
    x_eps = solve_lower(logistic, th, "fista", tol=1e-3).x
    ratios = []
    for its in range(0, 9):
        hg = hypergradient(logistic, th, lower="fista", adjoint="cg", eps=1e-3, delta=0.0,
                           x0=x_eps, adjoint_max_iter=its)
        assert hg.lower.iterations == 0
        err = float(np.linalg.norm(hg.grad - exact))
        assert hg.bound >= err
        ratios.append(err / hg.bound)
    print(f"\n[logistic] true/bound over CG iterates 0..8: "
          f"{', '.join(f'{r:.2g}' for r in ratios)}")


# ----------------------------------------------------------------------------------------------
# backpropagation is a linear solve (docs/framework.md 3)


@pytest.mark.parametrize("method", ["gd", "hb"])
def test_frozen_backprop_equals_adjoint_solver(logistic, method):
    th = np.array([-1.5])
    a_gd, a_hb, b_hb = steps(logistic, th)
    xK = solve_lower(logistic, th, "gd", tol=0.0, max_iter=12).x  # some non-optimal point
    for K in (1, 7, 25):
        adj = solve_adjoint(logistic, xK, th, method, delta=0.0, max_iter=K)
        assert adj.iterations == K and adj.status == "capped"
        h_solver = -logistic.cross_vjp(xK, th, adj.q)
        h_sweep = frozen_reverse(logistic, xK, th, K, *((a_gd,) if method == "gd"
                                                        else (a_hb, b_hb)))
        np.testing.assert_allclose(h_solver, h_sweep, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", ["gd", "hb"])
def test_full_backprop_vs_frozen(quad, logistic, method):
    # few steps at small alpha: the Hessian changes a lot along the logistic trajectory
    for k, th, K, same in ((logistic, np.array([-3.0]), 5, False),
                           (quad, np.ones(10), 15, True)):
        hg = hypergradient(k, th, lower=method, adjoint="backprop", eps=0.0, max_iter=K)
        assert hg.lower.iterations == K and hg.adjoint.iterations == K
        assert hg.bound == math.inf and not hg.certified and "backprop" in hg.status
        assert hg.usable and hg.work["cross"] >= K
        a_gd, a_hb, b_hb = steps(k, th)
        frozen = frozen_reverse(k, hg.x, th, K, *((a_gd,) if method == "gd" else (a_hb, b_hb)))
        frozen = frozen + k.upper_theta_grad(hg.x, th)
        rel = np.linalg.norm(hg.grad - frozen) / np.linalg.norm(frozen)
        if same:
            assert rel < 1e-10, rel
        else:
            assert rel > 1e-2, rel
        # the framework's GD/HB adjoint with K steps from q0 = 0 is the frozen version
        fw = hypergradient(k, th, lower=method, adjoint=method, eps=0.0, delta=0.0,
                           max_iter=K, adjoint_max_iter=K)
        np.testing.assert_allclose(fw.grad, frozen, rtol=1e-9)
    with pytest.raises(SolverError):
        hypergradient(logistic, np.array([0.0]), lower="fista", adjoint="backprop")


# ----------------------------------------------------------------------------------------------
# statuses and guards


def test_lower_statuses(ridge, logistic, quad):
    th = np.array([-1.5])
    xs = ridge.x_star(th)
    for solver in ("gd", "hb", "fista", "cg"):
        warm = solve_lower(ridge, th, solver, tol=1e-8, x0=xs)
        assert warm.status == "converged" and warm.iterations == 0 and warm.work == 1
        capped = solve_lower(ridge, th, solver, tol=1e-14, max_iter=3)
        assert capped.status == "capped" and capped.iterations == 3
        assert capped.bound == pytest.approx(np.linalg.norm(ridge.lower_grad(capped.x, th))
                                             / math.exp(-1.5), rel=1e-12)
        # the certificate: ||x - x*|| <= G/mu, at the returned point
        assert np.linalg.norm(capped.x - xs) <= capped.bound
        conv = solve_lower(ridge, th, solver, tol=1e-6, record=True)
        assert conv.status == "converged" and conv.bound <= 1e-6
        assert np.linalg.norm(conv.x - xs) <= conv.bound
        assert len(conv.history) >= conv.iterations
        assert "LowerResult(" in repr(conv) and "converged" in repr(conv)
    # a priori rate: rigorous for GD, FISTA, CG; HB's C = 1 is flagged
    assert solve_lower(ridge, th, "hb", tol=1e-6).apriori_rigorous is False
    for solver in ("gd", "fista", "cg"):
        r = solve_lower(ridge, th, solver, tol=1e-6)
        assert r.apriori_rigorous and r.apriori >= np.linalg.norm(r.x - xs)
    # mu, L re-evaluated at every theta (pitfall 3)
    for t in (-2.0, 0.0, 1.0):
        assert solve_lower(ridge, np.array([t]), "gd", tol=1e-4).mu == pytest.approx(math.exp(t))
    # CG needs a quadratic lower level; invalid mu raises
    with pytest.raises(SolverError):
        solve_lower(logistic, th, "cg")
    with pytest.raises(SolverError):
        solve_lower(Faulty(ridge, consts={"mu": 0.0}), th, "gd")
    # too small an L (stated): GD with step 2/(L + mu) diverges, and says so
    bad = solve_lower(Faulty(ridge, consts={"L": math.exp(-1.5)}), th, "gd", tol=1e-8)
    assert bad.status in ("diverged", "non-finite") and np.all(np.isfinite(bad.x))
    # non-finite gradient after 5 evaluations: the last finite iterate is kept
    for solver in ("gd", "hb", "fista"):
        nf = solve_lower(Faulty(logistic, "lower_grad", after=5), th, solver, tol=1e-12)
        assert nf.status == "non-finite" and nf.iterations == 4
        assert np.all(np.isfinite(nf.x)) and math.isfinite(nf.bound)
        assert nf.bound == pytest.approx(np.linalg.norm(logistic.lower_grad(nf.x, th))
                                         / math.exp(-1.5), rel=1e-12)
    nsp = solve_lower(Faulty(quad, "lower_hvp", fn=lambda k, x, t, v: -k.lower_hvp(x, t, v)),
                      np.ones(10), "cg", tol=1e-8)
    assert nsp.status == "not SPD"


def test_fista_coefficients():
    q = 0.01
    coef = fista_coefficients(q, 400)
    t_last, beta_last = coef[-1]
    assert t_last == pytest.approx(1 / math.sqrt(q), rel=1e-6)
    assert beta_last == pytest.approx((1 - math.sqrt(q)) / (1 + math.sqrt(q)), rel=1e-6)


def test_adjoint_statuses(ridge, quad):
    th = np.array([-1.5])
    x = ridge.x_star(th)
    b = ridge.upper_grad(x, th)
    A = ridge.KtK + math.exp(-1.5) * np.eye(ridge.x_size)
    qe = np.linalg.solve(A, b)
    for solver in ("cg", "gd", "hb"):
        r = solve_adjoint(ridge, x, th, solver, delta=1e-9)
        assert r.status == "converged" and r.residual <= 1e-9
        assert r.residual == pytest.approx(np.linalg.norm(A @ r.q - b), rel=1e-6, abs=1e-15)
        assert np.linalg.norm(r.q - qe) <= r.bound
        warm = solve_adjoint(ridge, x, th, solver, delta=1e-9, q0=r.q)
        assert warm.iterations == 0 and warm.status == "converged"
        capped = solve_adjoint(ridge, x, th, solver, delta=1e-14, max_iter=2)
        assert capped.status == "capped" and capped.iterations == 2
        # non-finite HVP from call 3 on: last finite q kept, true residual unknown -> inf
        nf = solve_adjoint(Faulty(ridge, "lower_hvp", after=2), x, th, solver, delta=1e-12)
        assert nf.status == "non-finite" and np.all(np.isfinite(nf.q))
        hg = hypergradient(Faulty(ridge, "lower_hvp", after=2), th, lower="fista",
                           adjoint=solver, eps=1e-8, delta=1e-12)
        assert "non-finite" in hg.status and not hg.usable and hg.bound == math.inf
    neg = Faulty(quad, "lower_hvp", fn=lambda k, x, t, v: -k.lower_hvp(x, t, v))
    xs = quad.x_star(np.ones(10))
    r = solve_adjoint(neg, xs, np.ones(10), "cg", delta=1e-8)
    assert r.status == "not SPD"
    hg = hypergradient(neg, np.ones(10), lower="fista", adjoint="cg", x0=xs)
    assert "not SPD" in hg.status and not hg.certified and not hg.usable


def test_zero_hypergradient_trap(ridge):
    """||grad f(x_eps)|| <= delta with q0 = 0 (pitfall 2): at least one adjoint iteration and a
    non-"ok" status; the bound stays valid."""
    th = np.array([-0.5])
    xs = ridge.x_star(th)
    k = Ridge(ridge.K, ridge.y, ridge.Kv, ridge.Kv @ xs)  # validation fits x* exactly
    for ad in ("cg", "gd", "hb"):
        hg = hypergradient(k, th, lower="fista", adjoint=ad, eps=1e-10, delta=1e-6)
        assert hg.grad_f_norm <= 1e-6
        assert "zero-hypergradient trap" in hg.status and not hg.ok and hg.usable
        assert hg.adjoint.iterations >= 1 and hg.adjoint.zero_trap
        assert hg.bound >= np.linalg.norm(hg.grad - k.exact_hypergradient(th))
    # exactly zero right-hand side: q = 0 is exact, still flagged
    r = solve_adjoint(k, xs, th, "cg", delta=1e-6, b=np.zeros(k.x_size))
    assert r.status == "zero trap" and r.residual == 0.0 and not np.any(r.q)


def test_uncertified_constants_and_bad_input(ridge):
    th = np.array([0.0])
    k = Faulty(ridge, consts={"certified": False, "source": "stated"})
    hg = hypergradient(k, th)
    assert not hg.certified and "uncertified constants" in hg.status and hg.usable
    hg = hypergradient(Faulty(ridge, consts={"L_B": math.inf}), th)
    assert hg.bound == math.inf and "bound not finite" in hg.status and "L_B = inf" in hg.status
    with pytest.raises(SolverError):
        hypergradient(ridge, np.array([0.0, 1.0]))  # wrong theta size
    with pytest.raises(SolverError):
        hypergradient(ridge, th, lower="bfgs")  # not a solver


def test_multi_sample_average():
    ks = [Ridge.generate(seed=s, rho=0.3) for s in (3, 4, 5)]
    th = np.array([-0.7])
    exact = np.mean([k.exact_hypergradient(th) for k in ks], axis=0)  # r counted once
    hg = hypergradient_samples(ks, th, lower="fista", adjoint="cg", eps=1e-5, delta=1e-5)
    singles = [hypergradient(k, th, lower="fista", adjoint="cg", eps=1e-5, delta=1e-5)
               for k in ks]
    assert hg.ok and hg.certified
    np.testing.assert_allclose(hg.grad, np.mean([s.grad for s in singles], axis=0), rtol=1e-14)
    assert hg.bound == pytest.approx(np.mean([s.bound for s in singles]))
    assert hg.work["units"] == sum(s.work["units"] for s in singles)
    assert np.linalg.norm(hg.grad - exact) <= hg.bound
    assert "samples=3" in repr(hg)
    # per-sample guards: one faulty sample is named, the others are not
    bad = hypergradient_samples([ks[0], Faulty(ks[1], "lower_hvp", after=1)], th)
    assert "[sample 1]" in bad.status and "sample 0" not in bad.status and not bad.usable


def test_cross_norm_and_repr(quad, ridge):
    th = np.ones(10)
    x = quad.x_star(th)
    nB, cost = cross_norm(quad, x, th)
    assert cost == 10 and nB >= np.linalg.norm(quad.B, 2)
    # the spectral norm by SVD, with its margin: certified, and sharper than Frobenius
    assert nB == pytest.approx(np.linalg.norm(quad.B, 2), rel=1e-9)
    assert nB < np.linalg.norm(quad.B, "fro")
    nB1, cost1 = cross_norm(ridge, x[: ridge.x_size], np.array([0.0]))
    assert cost1 == 1 and nB1 == pytest.approx(np.linalg.norm(x[: ridge.x_size]))
    hg = hypergradient(ridge, np.array([0.0]))
    assert isinstance(hg, HypergradientResult)
    text = repr(hg)
    assert text.startswith("HypergradientResult(status='ok'") and "bound=" in text
    assert "LowerResult(" in text and "AdjointResult(" in text


def test_cross_norm_many_thetas():
    """p > 64: a structural bound from the kernel when it has one, else Frobenius from p JVPs."""
    k = PaperQuadratic.generate(seed=0, m1=80, m2=80, d=5, p=70)
    th = np.ones(70)
    x = np.zeros(5)
    nB, cost = cross_norm(k, x, th)
    assert cost == 70 and nB >= np.linalg.norm(k.B, 2)

    class WithBound(PaperQuadratic):
        def cross_norm_bound(self, x, theta):
            return float(np.linalg.norm(self.B, "fro"))

    kb = WithBound(k.M, k.b, k.C, k.D, k.e)
    nB2, cost2 = cross_norm(kb, x, th)
    assert cost2 == 0 and nB2 == pytest.approx(nB)
    hg = hypergradient(kb, th, lower="cg", adjoint="cg", eps=1e-8, delta=1e-8)
    assert hg.ok and hg.work["cross"] == 1
    assert np.linalg.norm(hg.grad - k.exact_hypergradient(th)) <= hg.bound


def test_backprop_adjoint_direct(ridge):
    th = np.array([0.0])
    low = solve_lower(ridge, th, "gd", tol=1e-6, store_trajectory=True)
    assert len(low.trajectory) == low.iterations + 1
    adj = backprop_adjoint(ridge, low, th)
    assert adj.bound == math.inf and adj.iterations == low.iterations
    with pytest.raises(SolverError):
        backprop_adjoint(ridge, solve_lower(ridge, th, "gd", tol=1e-6), th)


def test_cg_apriori_rate_survives_many_restarts():
    """(2 sqrt kappa)^S q^K r0 in logarithms: S = 2000 restart segments overflowed a float."""

    assert cg_rate_bound(100.0, 2000, 0.8, 10, 1.0) == math.inf
    small = cg_rate_bound(100.0, 300, 0.5, 3000, 1.0)  # 20^300 * 0.5^3000: finite, tiny
    assert small == pytest.approx(math.exp(300 * math.log(20.0) + 3000 * math.log(0.5)), rel=1e-9)
    assert cg_rate_bound(4.0, 1, 0.5, 2, 3.0) == pytest.approx(4.0 * 0.25 * 3.0, rel=1e-12)
    assert cg_rate_bound(4.0, 1, 0.0, 0, 3.0) == pytest.approx(12.0)  # q^0 = 1
    assert cg_rate_bound(4.0, 1, 0.0, 5, 3.0) == 0.0
