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

from codegen.constants import derive
from codegen.pipeline import build_problem

PROBLEMS = Path(__file__).resolve().parent / "problems"
RATIOS: dict = {}


def _from_file(name, **sizes):
    ns = runpy.run_path(str(PROBLEMS / f"{name}.py"))
    return ns[name], ns["example_data"](seed=1, **sizes), np.array(ns["THETA0"])


CASES = {  # name -> (problem, data, theta0): every theta0 has zero-sum taps (constants in ker K)
    "filter1d": lambda: _from_file("filter1d", n=7),
    "foe_learned": lambda: _from_file("foe_learned", h=4, w=4),
    "logcosh2d": lambda: (learned2d("logcosh"), learned2d_data(seed=1), THETA_LEARNED2D),
    "pseudohuber2d": lambda: (learned2d("pseudohuber"), learned2d_data(seed=1), THETA_LEARNED2D),
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
            RATIOS.setdefault(f"{name} ({kind})", []).append(c["L_DB"] / quot)
    assert min(RATIOS[f"{name} (kernel)"]) <= 20.0, RATIOS[f"{name} (kernel)"]


def test_student_t_expert_keeps_L_DB_infinite(build_dir):
    """Student-t log(1 + t^2) has no sup|psi''''| in the atom table: no ball L_DB either (the
    rule needs it for the change of psi'''(K x) times dK_l x), so the correction stays off."""
    problem = learned2d("student")
    prob = build_problem(problem, build_dir).bind(**learned2d_data(seed=1))
    c = prob.local_constants(np.zeros(prob.x_size), THETA_STUDENT, 0.1)
    assert c["L_DB"] == np.inf and "L_DB" not in derive(problem).ball["constants"]


def test_report_ratios():
    """Prints L_DB / largest measured quotient per problem and ball kind (pytest -s)."""
    for key, vals in sorted(RATIOS.items()):
        print(f"{key}: L_DB / measured quotient {min(vals):.3g} .. {max(vals):.3g}")
