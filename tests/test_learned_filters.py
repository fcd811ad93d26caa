"""Learned filters: theta-dependent linear operators inside smooth experts (docs/constants.md 8).

(a) the bank of 3 fixed 3 x 3 filters with learned weights (tests/problems/foe_small.py) builds
    without allow_uncertified, every constant certified and finite;
(b) kernels against the unrolled SymPy oracle (tests/oracle.py) at tiny sizes;
(c) the filter norm bounds (frequency response, l1) against the exact norm of the operator;
(d) every constant against measured eigenvalues and Lipschitz quotients (constant >= measured;
    the ratios are printed by test_report_ratios, run with -s);
(e) L_B of a learned filter: the measured quotient grows along the filter's kernel, the ball
    constant holds on its ball;
(f) the hypergradient's bound against tight solves over a sweep of eps / rtol and theta;
(g) a non-convex expert (Student-t) is accepted only where mu(theta) > 0, the condition shown;
(h) the audit shows the filter rules and the ball constants.
"""
import runpy
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

from codegen import Problem
from codegen.constants import compute_data_quantities, derive, evaluate, evaluate_local, format_tree
from codegen.constants.evaluation.spectral import filter_gain_sq
from codegen.errors import ProblemError
from codegen.pipeline import build_problem

from oracle import Oracle

PROBLEMS = Path(__file__).resolve().parent / "problems"
RATIOS: dict = {}


def _problem_file(name):
    ns = runpy.run_path(str(PROBLEMS / f"{name}.py"))
    return ns[name], ns


def learned2d(atom="logcosh"):
    """One learned 2 x 2 filter with a learned log weight, theta 2-D (one row per filter):
    th[0, :] = (log w, c_00, c_01, c_10, c_11)."""
    h, w = sp.symbols("h w", integer=True, positive=True)
    i, j, a, b = sp.symbols("i j a b", integer=True)
    X, Y, Xt = (sp.IndexedBase(s, shape=(h, w)) for s in ("X", "Y", "Xt"))
    th = sp.IndexedBase("th", shape=(1, 5))
    u = sp.Sum(th[0, 1 + 2 * a + b] * X[i + a, j + b], (a, 0, 1), (b, 0, 1))
    phi = {"logcosh": sp.log(sp.cosh(u)),
           "student": sp.log(1 + u ** 2),
           "pseudohuber": sp.Rational(1, 5) * (sp.sqrt(1 + (5 * u) ** 2) - 1)}[atom]
    return Problem(
        name=f"learned2d_{atom}", x=X, theta=th,
        lower=sp.Sum((X[i, j] - Y[i, j]) ** 2, (i, 0, h - 1), (j, 0, w - 1)) / 2
        + sp.exp(th[0, 0]) * sp.Sum(phi, (i, 0, h - 2), (j, 0, w - 2)),
        upper=sp.Sum((X[i, j] - Xt[i, j]) ** 2, (i, 0, h - 1), (j, 0, w - 1)) / 2)


def learned2d_data(seed: int = 0, h: int = 4, w: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    xt = np.add.outer(np.linspace(0, 1, h), np.linspace(-1, 1, w) ** 2)
    return {"Y": xt + 0.2 * rng.standard_normal((h, w)), "Xt": xt}


THETA_LEARNED2D = np.array([np.log(0.3), 1.0, -1.0, 0.5, -0.5])
CASES = {  # name -> (problem, data function, theta0, tiny sizes for the oracle)
    "foe_small": lambda: (_problem_file("foe_small")[0],
                          _problem_file("foe_small")[1]["example_data"],
                          np.array(_problem_file("foe_small")[1]["THETA0"]), dict(h=4, w=4)),
    "filter1d": lambda: (_problem_file("filter1d")[0], _problem_file("filter1d")[1]["example_data"],
                         np.array(_problem_file("filter1d")[1]["THETA0"]), dict(n=5)),
    "learned2d": lambda: (learned2d(), learned2d_data, THETA_LEARNED2D, dict(h=3, w=3)),
    # a non-convex (Student-t) expert where mu(theta) = 1 - e^th0 ||c||^2/4 > 0
    "student2d": lambda: (learned2d("student"), learned2d_data, THETA_STUDENT, dict(h=3, w=3)),
}
THETA_STUDENT = np.array([np.log(0.1), 0.5, -0.5, 0.3, -0.3])
SIZES = {"foe_small": dict(h=5, w=4), "filter1d": dict(n=7), "learned2d": dict(h=4, w=5),
         "student2d": dict(h=4, w=5)}
_BUILT: dict = {}


def case(name, build_dir, tiny=False):
    """(problem, bound problem, data, theta0); the module built once per session, bound to the
    test sizes (or to the oracle's tiny sizes)."""
    if name not in _BUILT:
        problem, make_data, theta0, tiny_sizes = CASES[name]()
        module = build_problem(problem, build_dir)
        _BUILT[name] = {}
        for key, sizes in ((False, SIZES[name]), (True, tiny_sizes)):
            data = make_data(seed=1, **sizes)
            _BUILT[name][key] = (problem, module.bind(**data), data, theta0)
    return _BUILT[name][tiny]


def _thetas(theta0, rng, count=3):
    return [theta0] + [theta0 + 0.4 * rng.standard_normal(theta0.size) for _ in range(count - 1)]


# -- (a) the goal problem builds certified ---------------------------------------------------
def test_filter_bank_builds_certified_and_finite(build_dir):
    problem, prob, data, theta0 = case("foe_small", build_dir)
    der = derive(problem)  # no allow_uncertified
    assert der.status == "certified" and der.mu_check == "proved"
    assert all(r.certified for r in der.constants.values()) and der.ball == {}
    for theta in (theta0, theta0 + 2.0, theta0 - 3.0):
        c = prob.constants(theta)
        assert c["certified"], c
        assert all(np.isfinite(c[k]) for k in ("mu", "L", "L_A", "L_B", "L_f"))
        assert c["mu"] == pytest.approx(1.0, rel=1e-11)
    # the larger image of the example engineer: no dense operator is formed (filter taps only)
    big = _problem_file("foe_small")[1]["example_data"](seed=0, h=128, w=128)
    q = compute_data_quantities(der, big)
    assert not any(k.startswith("normsq_") for k in q)
    assert np.isfinite(evaluate(der, theta0, q)["L"])


# -- (b) kernels against the oracle ----------------------------------------------------------
@pytest.mark.parametrize("name", ["foe_small", "filter1d", "learned2d"])
def test_kernels_match_unrolled_sympy(name, build_dir):
    problem, prob, data, theta0 = case(name, build_dir, tiny=True)
    oracle = Oracle(problem, data)
    rng = np.random.default_rng(3)
    n, p = prob.x_size, prob.theta_size
    for theta in _thetas(theta0, rng, 2)[1:]:
        x = rng.standard_normal(n)
        calls = {"lower_value": (), "lower_grad": (), "lower_hvp": (rng.standard_normal(n),),
                 "cross_vjp": (rng.standard_normal(n),), "cross_jvp": (rng.standard_normal(p),),
                 "upper_value": (), "upper_grad": ()}
        for kernel, extra in calls.items():
            got = np.atleast_1d(getattr(prob, kernel)(x, theta, *extra))
            want = np.atleast_1d(np.asarray(getattr(oracle, kernel)(x, theta, *extra), dtype=float))
            err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300)
            assert err <= 1e-10, f"{name}.{kernel}: relative error {err:.2e}"


# -- (c) filter norms ------------------------------------------------------------------------
def _valid_conv_matrix(taps, shape):
    """The dense in-bounds ('valid') filter on an image of `shape` (1-D or 2-D)."""
    taps = np.atleast_2d(taps) if len(shape) == 2 else taps[None, :]
    shape2 = shape if len(shape) == 2 else (1,) + tuple(shape)
    kh, kw = taps.shape
    rows = []
    for i in range(shape2[0] - kh + 1):
        for j in range(shape2[1] - kw + 1):
            img = np.zeros(shape2)
            img[i:i + kh, j:j + kw] = taps
            rows.append(img.ravel())
    return np.array(rows)


@pytest.mark.parametrize("seed", range(4))
def test_filter_gain_bounds_the_operator_norm(seed):
    rng = np.random.default_rng(seed)
    for dims, ks in ((1, (5,)), (2, (3, 3)), (2, (2, 4))):
        taps = rng.standard_normal(ks)
        if seed % 2:
            taps -= taps.mean()  # zero mean, as learned FoE filters are
        shifts = np.array(list(np.ndindex(*ks)))
        gain = filter_gain_sq(shifts, taps.ravel())
        l1sq = np.sum(np.abs(taps)) ** 2
        # the exact sup of |c^|^2 on a much finer grid, and the norm of sections of the filter
        fine = np.abs(np.fft.fftn(taps, s=(512,) * dims, axes=tuple(range(dims)))) ** 2
        assert fine.max() <= gain <= fine.max() * 1.02 and gain <= l1sq * (1 + 1e-15)
        K = _valid_conv_matrix(taps, (40,) if dims == 1 else (14, 15))
        normsq = np.linalg.norm(K, 2) ** 2
        assert normsq <= gain
        RATIOS.setdefault("filter ||K||^2: l1^2 / frequency bound", []).append(l1sq / gain)
        RATIOS.setdefault("filter ||K||^2: frequency bound / exact (section)", []).append(
            gain / normsq)


# -- (d) constants against measured eigenvalues and Lipschitz quotients ----------------------
def _pairs(rng, n, count):
    """Pairs at the scales where the atoms' curvature (responses ~ 0) and third derivative
    (responses ~ nu/2) peak, and at a large scale; close and distant pairs."""
    yield np.zeros(n), 1e-6 * rng.standard_normal(n)
    for k in range(count):
        x = (1.5, 0.05, 0.01)[k % 3] * rng.standard_normal(n)
        yield x, x + rng.choice([1e-4, 1e-2, 1.0]) * np.abs(x).max() * rng.standard_normal(n)


@pytest.mark.parametrize("name", ["foe_small", "filter1d", "learned2d", "student2d"])
def test_constants_hold_against_measurements(name, build_dir):
    problem, prob, data, theta0 = case(name, build_dir)
    rng = np.random.default_rng(11)
    n = prob.x_size
    for theta in _thetas(theta0, rng):
        c = prob.constants(theta)
        assert c["certified"]
        lmin, lmax, qa, qb = np.inf, 0.0, 0.0, 0.0
        for x, y in _pairs(rng, n, 12):
            Hx, Hy = prob.lower_hessian(x, theta), prob.lower_hessian(y, theta)
            ev = np.linalg.eigvalsh(Hx)
            lmin, lmax = min(lmin, ev[0]), max(lmax, ev[-1])
            d = np.linalg.norm(x - y)
            qa = max(qa, np.linalg.norm(Hx - Hy, 2) / d)
            Bx, By = prob.cross_matrix(x, theta), prob.cross_matrix(y, theta)
            qb = max(qb, np.linalg.norm(Bx - By, 2) / d)
        assert c["mu"] <= lmin * (1 + 1e-12) and lmax <= c["L"] * (1 + 1e-12)
        assert qa <= c["L_A"] * (1 + 1e-9)
        assert qb <= c["L_B"] * (1 + 1e-9)
        assert c["L_f"] >= 1.0  # f = 1/2 ||x - xt||^2: grad f is exactly 1-Lipschitz
        RATIOS.setdefault(f"{name}: measured lambda_min / mu", []).append(lmin / c["mu"])
        RATIOS.setdefault(f"{name}: L / measured lambda_max", []).append(c["L"] / lmax)
        RATIOS.setdefault(f"{name}: L_A / measured quotient", []).append(c["L_A"] / qa)
        if np.isfinite(c["L_B"]):
            RATIOS.setdefault(f"{name}: L_B / measured quotient", []).append(c["L_B"] / qb)


# -- (e) L_B of a learned filter: infinite globally, certified on the ball --------------------
@pytest.mark.parametrize("name", ["filter1d", "learned2d", "student2d"])
def test_learned_filter_cross_constant_on_the_ball(name, build_dir):
    problem, prob, data, theta0 = case(name, build_dir)
    der = derive(problem)
    assert der.constants["L_B"].expr == sp.oo and der.ball["constants"]["L_B"].domain == "ball"
    assert "ball_xinf" in der.ball["constants"]["L_B"].rule
    rng = np.random.default_rng(5)
    n = prob.x_size
    # B's quotient grows along the kernel of K_theta: a filter with zero-sum taps kills constants
    theta = theta0.copy()
    growth = []
    for t in (1.0, 1e2, 1e4):
        x = rng.standard_normal(n) * 0.3 + t
        v = rng.standard_normal(n)
        v *= 1e-3 / np.linalg.norm(v)
        growth.append(np.linalg.norm(prob.cross_matrix(x + v, theta) - prob.cross_matrix(x, theta), 2)
                      / np.linalg.norm(v))
    assert growth[2] > 100 * growth[0]
    for theta in _thetas(theta0, rng):
        for radius in (0.1, 1.0, 5.0):
            xc = rng.standard_normal(n) * 2
            c = prob.local_constants(xc, theta, radius)
            assert c["domains"]["L_B"] == "ball" and np.isfinite(c["L_B"]) and c["certified"]
            quot = 0.0
            for _ in range(10):
                pts = []
                for _ in range(2):
                    d = rng.standard_normal(n)
                    pts.append(xc + d / np.linalg.norm(d) * radius * rng.uniform(0.5, 1.0))
                if rng.uniform() < 0.5:  # a near-coincident pair (the derivative's limit)
                    pts[1] = pts[0] + 1e-4 * (xc - pts[0])
                quot = max(quot, np.linalg.norm(prob.cross_matrix(pts[0], theta)
                                                - prob.cross_matrix(pts[1], theta), 2)
                           / np.linalg.norm(pts[0] - pts[1]))
            assert quot <= c["L_B"] * (1 + 1e-9)
            RATIOS.setdefault(f"{name}: ball L_B / measured quotient", []).append(c["L_B"] / quot)


# -- (f) bounds against tight solves ---------------------------------------------------------
CHECKS = {"count": 0, "held": 0}


@pytest.mark.parametrize("name", ["foe_small", "learned2d", "filter1d", "student2d"])
def test_hypergradient_bound_holds_against_tight_solves(name, build_dir):
    problem, prob, data, theta0 = case(name, build_dir)
    rng = np.random.default_rng(2)
    for theta in _thetas(theta0, rng):
        ref = prob.hypergradient(theta, lower="direct", adjoint="direct", eps=1e-14, delta=1e-14)
        assert np.isfinite(ref.bound) and ref.bound < 1e-9, ref.status
        runs = [dict(eps=e, delta=e) for e in (1e-1, 1e-3, 1e-6)] + [dict(rtol=r) for r in (1e-1, 1e-4)]
        for opts in runs:
            hg = prob.hypergradient(theta, lower="fista", adjoint="cg", max_iter=100000, **opts)
            assert hg.certified and np.isfinite(hg.bound), hg.status
            err = np.linalg.norm(hg.grad - ref.grad)
            CHECKS["count"] += 1
            CHECKS["held"] += bool(err <= hg.bound + ref.bound)
            assert err <= hg.bound + ref.bound, (name, opts, err, hg.bound)
            RATIOS.setdefault(f"{name}: hypergradient bound / true error", []).append(
                hg.bound / max(err, 1e-300))


# -- (g) a non-convex expert ------------------------------------------------------------------
def test_nonconvex_expert_only_where_mu_is_positive():
    problem = learned2d("student")
    der = derive(problem)
    mu = der.constants["mu"]
    assert der.mu_check == "theta" and mu.theta_region.startswith("where ")
    assert "-exp(th[0, 0])*Min(" in mu.theta_region
    assert mu.theta_region.endswith(" > 0 (checked at evaluate)")
    data = learned2d_data(1)
    q = compute_data_quantities(der, data)
    # psi'' of log(1 + t^2) >= -1/4: mu = 1 - e^th0 (||c||_1)^2 / 4
    ok = np.array([np.log(0.1), 0.5, -0.5, 0.5, -0.5])
    c = evaluate(der, ok, q)
    assert c["mu"] == pytest.approx(1 - 0.1 * 4 / 4, rel=1e-10) and c["certified"]
    # measured: the Hessian's smallest eigenvalue over points is never below mu
    oracle = Oracle(problem, data)
    rng = np.random.default_rng(0)
    worst = min(np.linalg.eigvalsh(np.asarray(oracle.hessian(rng.standard_normal(20), ok),
                                              dtype=float))[0] for _ in range(5))
    assert c["mu"] <= worst
    bad = np.array([np.log(2.0), 0.5, -0.5, 0.5, -0.5])
    with pytest.raises(ProblemError, match=r"mu = .*exp\(th\[0, 0\]\).* = -?[0-9.e+-]+ <= 0 at th\[0, 0\] "
                                           r"= 0.693147, th\[0, 1\] = 0.5, .*certified strongly convex there"):
        evaluate(der, bad, q)
    # without the data term nothing makes mu positive: refused at build, naming the terms
    h, w = sp.symbols("h w", integer=True, positive=True)
    i, j, a, b = sp.symbols("i j a b", integer=True)
    X, Xt = sp.IndexedBase("X", shape=(h, w)), sp.IndexedBase("Xt", shape=(h, w))
    th = sp.IndexedBase("th", shape=(4,))
    u = sp.Sum(th[2 * a + b] * X[i + a, j + b], (a, 0, 1), (b, 0, 1))
    with pytest.raises(ProblemError, match="not provably positive|refuted"):
        derive(Problem(name="student_only", x=X, theta=th,
                       lower=sp.Sum(sp.log(1 + u ** 2), (i, 0, h - 2), (j, 0, w - 2))
                       + sp.Sum(Xt[i, j] * X[i, j], (i, 0, h - 1), (j, 0, w - 1)),
                       upper=sp.Sum((X[i, j] - Xt[i, j]) ** 2, (i, 0, h - 1), (j, 0, w - 1))))


def test_mu_rounded_down_through_cancellation():
    """mu = 1 - e^theta (Student-t expert) near the edge of its region: the evaluated mu never
    exceeds the exact value (mpmath), although 1 - e^theta cancels."""
    import mpmath

    n = sp.Symbol("n", integer=True, positive=True)
    i = sp.Symbol("i", integer=True)
    x, y = sp.IndexedBase("x", shape=(n,)), sp.IndexedBase("y", shape=(n,))
    t = sp.Symbol("t")
    der = derive(Problem(name="student_edge", x=x, theta=t,
                         lower=sp.Sum((x[i] - y[i]) ** 2, (i, 0, n - 1)) / 2
                         + sp.exp(t) * sp.Sum(sp.log(1 + (x[i + 1] - x[i]) ** 2), (i, 0, n - 2)),
                         upper=sp.Sum((x[i] - y[i]) ** 2, (i, 0, n - 1))))
    q = compute_data_quantities(der, {"y": np.zeros(4)})
    refused = 0
    for theta in -np.logspace(-14, -2, 40):
        exact = 1 - mpmath.exp(mpmath.mpf(float(theta)))
        try:
            mu = evaluate(der, theta, q)["mu"]
        except ProblemError:  # within the rounding margin of 0: refused (conservative)
            assert exact < 1e-11
            refused += 1
            continue
        assert 0 < mu <= exact
    assert 0 < refused < 10


def test_written_out_data_taps_are_a_filter():
    """Taps written out term by term (no inner Sum) are the same filter as the Sum form: same
    bound, no dense operator."""
    n = sp.Symbol("n", integer=True, positive=True)
    i, k = sp.symbols("i k", integer=True)
    x, y = sp.IndexedBase("x", shape=(n,)), sp.IndexedBase("y", shape=(n,))
    c = sp.IndexedBase("c", shape=(3,))
    t = sp.Symbol("t")

    def problem(u):
        return Problem(name="taps", x=x, theta=t, upper=sp.Sum((x[i] - y[i]) ** 2, (i, 0, n - 1)),
                       lower=sp.Sum((x[i] - y[i]) ** 2, (i, 0, n - 1)) / 2
                       + sp.exp(t) * sp.Sum(sp.log(sp.cosh(u)), (i, 0, n - 3)))

    data = {"y": np.zeros(30), "c": np.array([1.0, -2.0, 0.5])}
    values = []
    for u in (sp.Sum(c[k] * x[i + k], (k, 0, 2)), c[0] * x[i] + c[1] * x[i + 1] + c[2] * x[i + 2]):
        der = derive(problem(u))
        assert der.operators == {}
        values.append(evaluate(der, 0.3, compute_data_quantities(der, data)))
    assert values[0] == values[1]
    K = _valid_conv_matrix(data["c"], (30,))
    assert values[0]["L"] >= 1 + np.exp(0.3) * np.linalg.norm(K, 2) ** 2


def test_pseudo_huber_and_unsupported_forms():
    der = derive(learned2d("pseudohuber"))
    assert der.status == "certified" and der.constants["L"].expr != sp.oo
    # theta times a data operator (not a filter with numeric taps): refused, pointing at the
    # supported syntax
    n, m = sp.symbols("n m", integer=True, positive=True)
    i, j = sp.symbols("i j", integer=True)
    x, y = sp.IndexedBase("x", shape=(n,)), sp.IndexedBase("y", shape=(n,))
    A, th = sp.IndexedBase("A", shape=(m, n)), sp.IndexedBase("th", shape=(2,))
    prob = Problem(name="theta_times_data", x=x, theta=th,
                   lower=sp.Sum((x[j] - y[j]) ** 2, (j, 0, n - 1)) / 2
                   + sp.Sum(sp.sqrt(sp.Sum((th[0] + A[i, j]) * x[j], (j, 0, n - 1)) ** 2 + 1),
                            (i, 0, m - 1)),
                   upper=sp.Sum((x[j] - y[j]) ** 2, (j, 0, n - 1)))
    with pytest.raises(ProblemError, match="not a filter sum_s"):
        derive(prob)


def test_isotropic_tv_of_learned_differences():
    """A group atom sqrt(u_1^2 + u_2^2 + nu^2) over two learned filters: certified, and every
    constant (L_B on its ball) against the oracle's Hessians and cross derivatives."""
    h, w = sp.symbols("h w", integer=True, positive=True)
    i, j = sp.symbols("i j", integer=True)
    X, Y = sp.IndexedBase("X", shape=(h, w)), sp.IndexedBase("Y", shape=(h, w))
    th = sp.IndexedBase("th", shape=(4,))
    u1 = th[0] * X[i, j] + th[1] * X[i + 1, j]
    u2 = th[2] * X[i, j] + th[3] * X[i, j + 1]
    problem = Problem(name="tv_learned", x=X, theta=th,
                      lower=sp.Sum((X[i, j] - Y[i, j]) ** 2, (i, 0, h - 1), (j, 0, w - 1)) / 2
                      + sp.Sum(sp.sqrt(u1 ** 2 + u2 ** 2 + sp.Rational(1, 4)),
                               (i, 0, h - 2), (j, 0, w - 2)),
                      upper=sp.Sum((X[i, j] - Y[i, j]) ** 2, (i, 0, h - 1), (j, 0, w - 1)))
    der = derive(problem)
    assert der.status == "certified" and der.constants["L_B"].expr == sp.oo
    assert "stacked filters" in format_tree(der)
    rng = np.random.default_rng(4)
    data = {"Y": rng.standard_normal((3, 3))}
    q = compute_data_quantities(der, data)
    oracle = Oracle(problem, data)
    for theta, scale in ((np.array([-1.0, 1.0, -1.0, 1.0]), 1.0), (rng.standard_normal(4), 1.0),
                         (np.array([-1.0, 1.0, -1.0, 1.0]), 0.2)):
        xc, r = scale * rng.standard_normal(9), scale  # 0.2: responses where the atom's derivatives peak
        c = evaluate_local(der, theta, q, xc, r, data)
        assert c["certified"] and c["domains"]["L_B"] == "ball" and np.isfinite(c["L_B"])
        pts = [xc + r * rng.uniform(0.3, 1) * d / np.linalg.norm(d)
               for d in rng.standard_normal((8, 9))]
        H = [np.asarray(oracle.hessian(p, theta), dtype=float) for p in pts]
        B = [np.asarray(oracle.cross(p, theta), dtype=float) for p in pts]
        ev = [np.linalg.eigvalsh(m) for m in H]
        assert c["mu"] <= min(e[0] for e in ev) and max(e[-1] for e in ev) <= c["L"]
        qa = max(np.linalg.norm(H[a] - H[b], 2) / np.linalg.norm(pts[a] - pts[b])
                 for a in range(8) for b in range(a))
        qb = max(np.linalg.norm(B[a] - B[b], 2) / np.linalg.norm(pts[a] - pts[b])
                 for a in range(8) for b in range(a))
        assert qa <= c["L_A"] and qb <= c["L_B"]
        RATIOS.setdefault("isotropic TV of learned filters: L_A / measured", []).append(c["L_A"] / qa)
        RATIOS.setdefault("isotropic TV of learned filters: ball L_B / measured", []).append(
            c["L_B"] / qb)


# -- (h) the audit ---------------------------------------------------------------------------
def test_audit_shows_filter_rules_and_ball_constants():
    problem, ns = _problem_file("filter1d")
    der = derive(problem)
    data = ns["example_data"](n=9)
    text = format_tree(der, compute_data_quantities(der, data))
    assert "filter (in-bounds convolution section)" in text and "Young" in text
    assert "only on a ball" in text and "L_B (on the ball" in text and "ball_xinf" in text
    fixed, ns2 = _problem_file("foe_small")
    der2 = derive(fixed)
    text2 = format_tree(der2, compute_data_quantities(der2, ns2["example_data"]()))
    assert "frequency response" in text2 and "Kf[0, 1, 2] = " in text2
    c = evaluate_local(der, ns["THETA0"], compute_data_quantities(der, data), data["y"], 0.5, data)
    assert c["domains"]["L_B"] == "ball" and np.isfinite(c["L_B"])


def test_report_ratios():
    """Print constant / measured ratios (run with -s)."""
    for key, vals in RATIOS.items():
        print(f"\n{key}: median {np.median(vals):.3g} [{min(vals):.3g}, {max(vals):.3g}]")
    if CHECKS["count"]:
        print(f"\nbound >= true error in {CHECKS['held']} of {CHECKS['count']} checks")
