"""The DWR certificate when B = d_theta grad_x g is not affine in x (docs/bounds.md 15.3):
generated problems with per-sample weights on a log-sum-exp loss (hypercleaning) and with a
weight e^theta on smoothed TV. D_u(x_eps) q comes from the generated cross_hvp kernel and the
bound gains crossB = L_DB ||u|| (||q|| + R/mu) E^2/2, with L_DB and L_3 derived by the constants.

References: x* by damped Newton with dense solves, grad F by dense solves at x*, and the exact
decomposition of Corollary 15.3 with its extra part q_e^T rho_B, term by term.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nonquadratic_kernels import (
    TV_WEIGHT,
    DenseGenerated,
    check_decomposition,
    exact_hypergradient,
    tv_weight_data,
    x_star,
)

from codegen.hypergrad import hypergradient
from codegen.hypergrad.correction import correct, cross_hvp_of, dwr_unavailable
from codegen.pipeline import build_problem

from support import built_example


class NoCrossHvp(DenseGenerated):
    """A bound problem without cross_hvp: neither the runtime's method nor the kernel."""

    def __getattr__(self, name):
        if name == "cross_hvp":
            raise AttributeError(name)
        if name == "kernels":
            return {n: f for n, f in self._prob.kernels.items() if n != "cross_hvp"}
        return getattr(self._prob, name)


@pytest.fixture(scope="module")
def cleaning(build_dir):
    _, module, ns = built_example("hypercleaning", build_dir)
    data = ns["example_data"](seed=2, c=3, n=4, m=8, mv=12, lam=1e-2)
    return DenseGenerated(module.bind(**data)), np.linspace(-1.0, 1.5, 8)


@pytest.fixture(scope="module")
def tv_weight(build_dir):
    module = build_problem(TV_WEIGHT, build_dir)
    data = tv_weight_data(seed=3, n=16)
    return DenseGenerated(module.bind(**data)), np.array([math.log(0.3)])


def _exact_terms(k, theta, hg, part, u):
    """Corollary 15.3's exact decomposition with B not affine (docs/bounds.md 15.3), each part
    named as the bound term that must dominate it; D = D_u(x_eps) assembled from cross_hvp and
    crossB = q_e^T rho_B, rho_B = D e - (B_u(x_eps) - B_u(x*))."""
    x, q, v, lam = hg.x, hg.q, part.v, part.lam
    xs = x_star(k, theta, x)
    e = x - xs
    A, As = k.hessian(x, theta), k.hessian(xs, theta)
    He = k.upper_hessian(x, theta)
    dhvp = cross_hvp_of(k)
    D = np.column_stack([dhvp(x, theta, u, c) for c in np.eye(k.x_size)])
    b, bs = k.upper_grad(x, theta), k.upper_grad(xs, theta)
    r = A @ q - b
    Ainv = np.linalg.inv(A)
    q_e = Ainv @ b
    Be, Bs = k.cross_jvp(x, theta, u), k.cross_jvp(xs, theta, u)
    v_star = np.linalg.solve(As, Bs)
    DAe = np.column_stack([k.lower_tvp(x, theta, e, c) for c in np.eye(k.x_size)])
    rho_v = A @ v - Be
    m = -D @ q - k.upper_hvp(x, theta, v) + k.lower_tvp(x, theta, v, q)
    rho_lam = m - A @ lam
    r_g = k.lower_grad(x, theta)
    return {
        "vR": rho_v @ Ainv @ r,
        "RE": r @ Ainv @ D @ e - v @ DAe @ Ainv @ r,
        "vE+EE": (v_star - v) @ (DAe @ q_e - He @ e),
        "upperH": -v_star @ (b - bs - He @ e),
        "third": -v_star @ (DAe - (A - As)) @ q_e,
        "lamE": rho_lam @ e,
        "lamA": lam @ (A @ e - r_g),
        "crossB": q_e @ (D @ e - (Be - Bs)),
    }, e


def _check_identity_and_terms(k, theta, tol, u, lower="gd"):
    hg = hypergradient(k, theta, lower=lower, adjoint="cg", eps=tol, delta=tol, refine_iter=0)
    assert hg.status == "ok"
    corr = correct(k, hg, [u], [tol], [tol], [None], [None], 500)
    assert corr.corollary == "15.3"
    part = corr.parts[0]
    assert "crossB" in part.terms and part.terms["crossB"] > 0
    exact = float(u @ exact_hypergradient(k, theta))
    terms, e = _exact_terms(k, theta, hg, part, u)
    return part, check_decomposition(part, hg, exact, terms, e)


@pytest.mark.parametrize("tol", [1e-1, 1e-2, 1e-4])
def test_hypercleaning_exact_identity_and_each_inequality(cleaning, tol):
    """Per-sample weights on softmax cross-entropy: the correction applies (Corollary 15.3 with
    L_DB and lse's L_3 finite), the exact decomposition with the crossB part sums to
    u.(h_c - grad F), and each part is below its bound term, along e_j and a random u."""
    k, theta = cleaning
    assert dwr_unavailable(k, theta) is None
    c = k.constants(theta)
    assert 0 < c["L_DB"] < math.inf and 0 < c["L_3"] < math.inf
    rng = np.random.default_rng(int(-math.log10(tol)))
    for u in (np.eye(k.theta_size)[3], rng.standard_normal(k.theta_size)):
        _check_identity_and_terms(k, theta, tol, u)


@pytest.mark.parametrize("tol", [1e-1, 1e-2, 1e-4])
def test_tv_weight_exact_identity_and_each_inequality(tv_weight, tol):
    """A weight e^t on smoothed TV (B = e^t D^T psi'(D x)): as for hypercleaning."""
    k, theta = tv_weight
    assert dwr_unavailable(k, theta) is None
    _check_identity_and_terms(k, theta, tol, np.ones(1))


@settings(max_examples=12, deadline=None)
@given(log_tol=st.floats(-7, -1), lower=st.sampled_from(["gd", "newton"]),
       shift=st.floats(-1.5, 1.5))
def test_bounds_hold_against_tight_solves(cleaning, tv_weight, log_tol, lower, shift):
    """certificate="dwr" at Hypothesis-drawn tolerances, lower solvers and theta: the bound on
    h_c and on the plain h hold against grad F from dense Newton solves, on both problems, and
    the note names Corollary 15.3."""
    for k, theta in (cleaning, tv_weight):
        th = theta + shift
        tol = 10.0 ** log_tol
        exact = exact_hypergradient(k, th)
        hg = hypergradient(k, th, lower=lower, adjoint="cg", eps=tol, delta=tol,
                           certificate="dwr")
        assert hg.status == "ok" and hg.certificate == "dwr", hg.notes[-1]
        assert "Corollary 15.3" in hg.notes[-1]
        assert np.linalg.norm(hg.grad - exact) <= hg.bound
        assert np.linalg.norm(hg.uncorrected_grad - exact) <= hg.uncorrected_bound


@pytest.mark.parametrize("rtol", [1e-3, 1e-6])
def test_rtol_rounds_certify_and_stay_close_to_the_true_error(cleaning, tv_weight, rtol):
    """rtol rounds with certificate="dwr": the target is met, the bound holds, and the plain
    h's bound is within a few times its true error (the correction estimates the error)."""
    for k, theta in (cleaning, tv_weight):
        exact = exact_hypergradient(k, theta)
        hg = hypergradient(k, theta, lower="gd", adjoint="cg", rtol=rtol, certificate="dwr")
        assert hg.status == "ok" and hg.certificate == "dwr", hg.notes
        assert hg.bound <= rtol * np.linalg.norm(hg.grad)
        assert np.linalg.norm(hg.grad - exact) <= hg.bound
        true_plain = np.linalg.norm(hg.uncorrected_grad - exact)
        assert true_plain <= hg.uncorrected_bound


def test_direction_only_with_many_weights(build_dir):
    """Hypercleaning with more weights than MAX_COMPONENTS: the component along h is certified
    (one pair of solves) and its bound holds against the dense reference."""
    _, module, ns = built_example("hypercleaning", build_dir)
    k = DenseGenerated(module.bind(**ns["example_data"](seed=5, c=3, n=4, m=30, mv=12, lam=1e-2)))
    theta = np.zeros(k.theta_size)
    exact = exact_hypergradient(k, theta)
    hg = hypergradient(k, theta, lower="gd", adjoint="cg", rtol=1e-4, certificate="dwr",
                       components=False)
    d = hg.directional
    assert hg.status == "ok" and hg.certificate == "dwr-direction"
    assert d["bound"] <= 1e-4 * np.linalg.norm(hg.grad)
    assert abs(d["value"] - d["direction"] @ exact) <= d["bound"]
    assert abs(d["plain"] - d["direction"] @ exact) <= d["plain_bound"]


def test_missing_pieces_are_named(cleaning):
    """Without theta the constants are unread, and a problem without cross_hvp (B not affine)
    keeps E&R's bound with the reason."""
    k, theta = cleaning
    assert "not known to be affine" in dwr_unavailable(k)

    bare = NoCrossHvp(k._prob)
    assert "no cross_hvp kernel" in dwr_unavailable(bare, theta)
    hg = hypergradient(bare, theta, lower="gd", adjoint="cg", eps=1e-3, delta=1e-3,
                       certificate="dwr")
    assert hg.certificate == "er" and "no cross_hvp kernel" in hg.notes[-1]


def test_correct_refuses_non_affine_B_without_cross_hvp(cleaning):
    """Called directly (past dwr_unavailable), correct names the missing kernel instead of
    forming D_u q from B's differences, which would be wrong for B not affine in x."""
    k, theta = cleaning

    bare = NoCrossHvp(k._prob)
    hg = hypergradient(bare, theta, lower="gd", adjoint="cg", eps=1e-2, delta=1e-2)
    u = np.eye(k.theta_size)[0]
    with pytest.raises(ValueError, match="no cross_hvp kernel"):
        correct(bare, hg, [u], [1e-2], [1e-2], [None], [None], 200)
