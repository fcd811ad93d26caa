"""L_DB on the ball for theta in a learned filter's taps (docs/constants.md 8.3): the Lipschitz
constant of x -> D_u(x) = d(B(x) u)/dx per ||u|| is infinite over R^n (the tap columns of B grow
with dK_l x along the filter's kernel) but finite on every ball, through
ball_xinf >= sup ||y||_inf.

References are exact kernels: the dense D_l(x) = d B_l/dx (B_l the column of theta_l) assembled
from the generated cross_hvp, and the worst u of ||sum_l u_l (D_l(x) - D_l(y))|| found by
alternating between the top singular pair and u (a lower estimate of the sup, so a measured
quotient above the constant would be a real counterexample).
"""
from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from test_constants_cross import _cross_hvp, _dense, _unit
from test_learned_filters import THETA_LEARNED2D, THETA_STUDENT, learned2d, learned2d_data

from codegen import Problem
from codegen.constants import compute_data_quantities, derive, format_tree
from codegen.pipeline import build_problem

PROBLEMS = Path(__file__).resolve().parent / "problems"
RATIOS: dict = {}


def _from_file(name, **sizes):
    ns = runpy.run_path(str(PROBLEMS / f"{name}.py"))
    return ns[name], ns["example_data"](seed=1, **sizes), np.array(ns["THETA0"])


def tv_learned():
    """Isotropic TV of two learned differences: the group atom sqrt(u_1^2 + u_2^2 + 1/4) over
    stacked filters (d3, d4 the group forms' norms, docs/constants.md 3.11)."""
    h, w = sp.symbols("h w", integer=True, positive=True)
    i, j = sp.symbols("i j", integer=True)
    X, Y = sp.IndexedBase("X", shape=(h, w)), sp.IndexedBase("Y", shape=(h, w))
    th = sp.IndexedBase("th", shape=(4,))
    u1 = th[0] * X[i, j] + th[1] * X[i + 1, j]
    u2 = th[2] * X[i, j] + th[3] * X[i, j + 1]
    return Problem(name="tv_learned_ldb", x=X, theta=th,
                   lower=sp.Sum((X[i, j] - Y[i, j]) ** 2, (i, 0, h - 1), (j, 0, w - 1)) / 2
                   + sp.Sum(sp.sqrt(u1 ** 2 + u2 ** 2 + sp.Rational(1, 4)),
                            (i, 0, h - 2), (j, 0, w - 2)),
                   upper=sp.Sum((X[i, j] - Y[i, j]) ** 2, (i, 0, h - 1), (j, 0, w - 1)))


CASES = {  # name -> (problem, data, theta0): every theta0 has zero-sum taps (constants in ker K)
    "filter1d": lambda: _from_file("filter1d", n=7),
    "foe_learned": lambda: _from_file("foe_learned", h=4, w=4),
    "logcosh2d": lambda: (learned2d("logcosh"), learned2d_data(seed=1), THETA_LEARNED2D),
    "pseudohuber2d": lambda: (learned2d("pseudohuber"), learned2d_data(seed=1), THETA_LEARNED2D),
    "tv_learned": lambda: (tv_learned(), {"Y": np.random.default_rng(4).standard_normal((4, 4))},
                           np.array([-1.0, 1.0, -1.0, 1.0])),
}
_BUILT: dict = {}


def _case(name, build_dir):
    if name not in _BUILT:
        problem, data, theta0 = CASES[name]()
        _BUILT[name] = (problem, build_problem(problem, build_dir).bind(**data), theta0)
    return _BUILT[name]


def _columns(prob, x, theta):
    """[D_l(x)^T for each theta_l]: column j of D_l^T is grad_x (e_j^T B(x) e_l) (cross_hvp)."""
    n, p = prob.x_size, theta.size
    return [_dense(lambda j, l=l: _cross_hvp(prob, x, theta, _unit(p, l), _unit(n, j)), n)
            for l in range(p)]


def _quotient(prob, theta, x, y):
    """max over unit u (alternating maximisation, a lower estimate) of
    ||D_u(x) - D_u(y)|| / ||x - y||."""
    diffs = [a - b for a, b in zip(_columns(prob, x, theta), _columns(prob, y, theta))]
    u = np.ones(theta.size) / np.sqrt(theta.size)
    best = 0.0
    for _ in range(25):
        left, sing, right = np.linalg.svd(sum(w * D for w, D in zip(u, diffs)))
        best = max(best, float(sing[0]))
        grad = np.array([left[:, 0] @ D @ right[0] for D in diffs])
        if not np.any(grad):
            break
        u = grad / np.linalg.norm(grad)
    return best / float(np.linalg.norm(x - y))


def _ball_pairs(rng, xc, radius, count):
    """Pairs inside B(xc, radius): near-coincident (the derivative's limit) and distant."""
    n = xc.size
    for k in range(count):
        d = rng.standard_normal(n)
        x = xc + d / np.linalg.norm(d) * radius * rng.uniform(0.2, 1.0)
        e = rng.standard_normal(n)
        step = radius * (1e-4 if k % 2 == 0 else rng.uniform(0.1, 0.5))
        y = x + e / np.linalg.norm(e) * step
        if np.linalg.norm(y - xc) <= radius:
            yield x, y


def _balls(rng, n, theta):
    """(name, centre, radius): random centres, and centres far along the filter's kernel (the
    constant vector: every theta0 has zero-sum taps), where the psi'''' part of the bound
    dominates and the change of D_u is largest."""
    yield "random", 2 * rng.standard_normal(n), 1.0
    yield "random", 0.3 * rng.standard_normal(n), 0.1
    for level in (3.0, 30.0):
        yield "kernel", level * np.ones(n), 0.05


@pytest.mark.parametrize("name", sorted(CASES))
def test_ball_L_DB_bounds_the_measured_quotients(name, build_dir):
    """Every measured quotient ||D_u(x) - D_u(y)|| / (||x - y|| ||u||) at pairs inside the ball
    is <= the ball L_DB (globally it stays infinite). On the balls along the kernel the largest
    measured quotient reaches 1/20 of L_DB (measured: see the printed ratios; the rule pays
    ||K||^2 max_I ||K_I|| and the tap l1 norms for the local sums)."""
    problem, prob, theta0 = _case(name, build_dir)
    der = derive(problem)
    assert der.constants["L_DB"].expr == sp.oo
    rec = der.ball["constants"]["L_DB"]
    assert rec.domain == "ball" and "ball_xinf" in {s.name for s in rec.expr.free_symbols}
    rng = np.random.default_rng(3)
    n = prob.x_size
    for theta in (theta0, theta0 + 0.3 * rng.standard_normal(theta0.size)):
        assert prob.constants(theta)["L_DB"] == np.inf
        for kind, xc, radius in _balls(rng, n, theta):
            c = prob.local_constants(xc, theta, radius)
            assert c["domains"]["L_DB"] == "ball" and c["certified"] and np.isfinite(c["L_DB"])
            quot = max(_quotient(prob, theta, x, y) for x, y in _ball_pairs(rng, xc, radius, 8))
            assert quot <= c["L_DB"] * (1 + 1e-6), (name, kind, quot, c["L_DB"])
            if quot > 0:  # 0 where the atom saturates on the whole ball (log cosh: tanh = 1)
                RATIOS.setdefault(f"{name}, {kind} ball: L_DB / quotient", []).append(
                    c["L_DB"] / quot)
    kernel = RATIOS[f"{name}, kernel ball: L_DB / quotient"]
    assert min(kernel) <= 20.0, kernel


def test_audit_shows_the_ball_L_DB():
    """The audit lists L_DB = oo globally and its ball version with the tap rule and ball_xinf;
    fixed filters with learned weights (examples/foe_denoise.py's form) keep a global L_DB."""
    problem, data, _ = _from_file("filter1d", n=9)
    der = derive(problem)
    text = format_tree(der, compute_data_quantities(der, data))
    ball = text.split("L_DB (on the ball B(x, r) only) = ")[1].split("\n")[:2]
    assert "ball_xinf" in ball[0] and "theta in a learned filter's taps" in ball[1]
    assert "(L_DB on the ball B(x_eps, e) only)" in text
    fixed = _from_file("foe_small")[0]
    der2 = derive(fixed)
    assert der2.constants["L_DB"].expr != sp.oo and "L_DB" not in (der2.ball or {}).get(
        "constants", {})


def test_student_t_expert_keeps_L_DB_infinite(build_dir):
    """Student-t log(1 + t^2) has no sup|psi''''| in the atom table: no ball L_DB either (the
    rule needs it for the change of psi'''(K x) times dK_l x), so the correction stays off."""
    problem = learned2d("student")
    prob = build_problem(problem, build_dir).bind(**learned2d_data(seed=1))
    c = prob.local_constants(np.zeros(prob.x_size), THETA_STUDENT, 0.1)
    assert c["L_DB"] == np.inf and "L_DB" not in derive(problem).ball["constants"]


@pytest.mark.parametrize("name", ["filter1d", "logcosh2d", "tv_learned"])
def test_bounds_hold_against_tight_solves(name, build_dir):
    """The default hypergradient (fista: "tight" where the correction applies) and the corrected
    one (certificate="dwr", h_c and its bound) against direct solves at eps = delta = 1e-14, at
    rtol 1e-3, 1e-6, 1e-8 and two theta: every bound is >= the true error (plus the reference's
    own bound), and the ball around x_eps that the hypergradient certifies (radius e, it holds
    x*) has a finite L_DB, the constant the correction's cross term reads there."""
    problem, prob, theta0 = _case(name, build_dir)
    rng = np.random.default_rng(2)
    for theta in (theta0, theta0 + 0.3 * rng.standard_normal(theta0.size)):
        ref = prob.hypergradient(theta, lower="direct", adjoint="direct", eps=1e-14, delta=1e-14)
        assert np.isfinite(ref.bound) and ref.bound < 1e-9, ref.status
        for rtol in (1e-3, 1e-6, 1e-8):
            hg = prob.hypergradient(theta, lower="fista", adjoint="cg", rtol=rtol, max_iter=200000)
            assert hg.status == "ok" and hg.certified, hg.status
            assert np.isfinite(prob.local_constants(hg.x, theta, hg.e)["L_DB"])
            err = float(np.linalg.norm(hg.grad - ref.grad))
            assert err <= hg.bound + ref.bound, (name, rtol, hg.certificate, err, hg.bound)
            RATIOS.setdefault(f"{name}: default ({hg.certificate}) bound / true error",
                              []).append(hg.bound / max(err, 1e-300))
            dwr = prob.hypergradient(theta, lower="fista", adjoint="cg", rtol=rtol,
                                     certificate="dwr", max_iter=200000)
            err_c = float(np.linalg.norm(dwr.grad - ref.grad))
            assert err_c <= dwr.bound + ref.bound, (name, rtol, dwr.certificate, err_c, dwr.bound)


def test_report_ratios():
    """Prints the ratios (pytest -s): L_DB / largest measured quotient per problem and ball
    kind, and bound / true error of the default hypergradient."""
    for key, vals in sorted(RATIOS.items()):
        print(f"{key}: {min(vals):.3g} .. {max(vals):.3g} (median {np.median(vals):.3g})")
