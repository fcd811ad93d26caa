"""The default upper-level method "lbfgs" (codegen/learn/lbfgs.py), the options' validation and
the history plots, on NumPy kernels with exact solutions (tests/upper_kernels.py) and on the
paper quadratic (closed-form optimum). Run with -s for the measured errors."""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from upper_kernels import Logistic, Samples, exact_F, exact_grad, noisy_ridge, optimal_theta  # noqa: E402

from codegen.cli.optimize import join_negative_values  # noqa: E402
from codegen.learn import DEFAULT_METHOD, OptimizeError, OptimizeStatus, optimize  # noqa: E402
from codegen.learn.options import QuasiNewtonOptions  # noqa: E402

FTOL = QuasiNewtonOptions.ftol


@pytest.mark.parametrize("case,theta0", [("ridge", 2.0), ("ridge", -3.0), ("samples", 2.0),
                                         ("logistic", 2.0), ("logistic", -3.0)])
def test_default_reaches_known_optimum(case, theta0):
    k = {"ridge": lambda: noisy_ridge(0),
         "samples": lambda: Samples([noisy_ridge(0), noisy_ridge(3)]),
         "logistic": lambda: Logistic.generate(seed=0, m=80, d=6, pv=60)}[case]()
    t_star = optimal_theta(k)
    res = optimize(k, theta0, progress=False)
    F, F_star = exact_F(k, res.theta), exact_F(k, t_star)
    print(f"\n{case} from {theta0}: theta {res.theta[0]:.8f}, theta* {t_star:.8f}, "
          f"F - F* = {F - F_star:.2e}, work {res.work}, evaluations {len(res.history)}, "
          f"nit {res.nit}; {res.message}")
    assert res.method == DEFAULT_METHOD == "lbfgs"
    # it stops by its own rule, long before any cap
    assert res.status == OptimizeStatus.CONVERGED and res.success, res
    assert "ftol" in res.message and res.nit < 100
    # its certificate holds for the exact gradient at the returned point
    true_grad = float(np.linalg.norm(exact_grad(k, res.theta)))
    assert true_grad <= res.stationarity
    # ... and the rule's promise: F is within ftol |F| of F* (up to the model's estimate: a
    # factor 10 of margin, far below any tolerance that would hide a wrong answer)
    assert 0 <= F - F_star + 1e-15 and F - F_star <= 10 * FTOL * abs(F_star)
    # the value returned is certified: F lies in value +- value_error
    assert abs(res.value - F) <= res.value_error + 1e-15


def test_default_true_objective_never_increases():
    """The certified Armijo test: the point after j iterations (runs are deterministic, so
    max_iter=j replays the first j) has a true F no larger than the point after j - 1."""
    k = Logistic.generate(seed=0, m=80, d=6, pv=60)
    full = optimize(k, -3.0, progress=False)
    F = [exact_F(k, optimize(k, -3.0, max_iter=j, progress=False).theta)
         for j in range(1, full.nit + 1)]
    F = [exact_F(k, [-3.0])] + F
    print(f"\ntrue F along the accepted points: {F[0]:.8f} -> {F[-1]:.8f} in {full.nit} steps")
    assert full.nit >= 3
    for a, b in zip(F, F[1:]):
        assert b <= a, (a, b)


@pytest.mark.parametrize("case", ["ridge", "samples", "logistic"])
def test_ftol_is_a_relative_tolerance_on_F(case):
    """The rule's promise for looser ftol too: F - F* <= 10 ftol |F*| against the exact optimum
    (the model's estimate, a factor 10 of margin), and a looser ftol never stops later."""
    k = {"ridge": lambda: noisy_ridge(0),
         "samples": lambda: Samples([noisy_ridge(0), noisy_ridge(3)]),
         "logistic": lambda: Logistic.generate(seed=0, m=80, d=6, pv=60)}[case]()
    F_star = exact_F(k, optimal_theta(k))
    evaluations = []
    for ftol in (1e-3, 1e-5, 1e-7):
        res = optimize(k, -3.0, ftol=ftol, progress=False)
        gap = exact_F(k, res.theta) - F_star
        print(f"\n{case} ftol={ftol:g}: (F - F*)/|F*| = {gap / abs(F_star):.1e}, "
              f"{len(res.history)} evaluations")
        assert res.status == OptimizeStatus.CONVERGED and "ftol" in res.message
        assert -1e-15 <= gap <= 10 * ftol * abs(F_star)
        assert float(np.linalg.norm(exact_grad(k, res.theta))) <= res.stationarity
        evaluations.append(len(res.history))
    assert evaluations == sorted(evaluations)


def test_stopping_accuracy_is_never_stepped_from(build_dir, monkeypatch):
    """Near the end a trial point is solved only as far as the stopping rule needs (bound <=
    its absolute need, possibly above grad_rtol ||h||). Such a point either ends the run or is
    solved on to grad_rtol ||h|| at the same theta before any step leaves it; the run still
    reaches the optimum of a tight reference run, and its certificate holds for a tight
    hypergradient. Several settings, so that the path is met whatever the solvers do. The
    held factor is assembled from HVPs, not by the Gram product: with the product's price
    (13 stale steps at this size) the solves end so far below what the rule needs that none of
    these settings meets the path."""
    from conftest import built_example

    from codegen.hypergrad import preconditioners

    monkeypatch.setattr(preconditioners, "gram_at", lambda k, part: None)
    _, module, ns = built_example("logistic_weights", build_dir)
    prob = module.bind(**ns["example_data"](0, m=500, n=50, p=300))
    reference = prob.optimize(np.zeros(50), ftol=1e-12, progress=False)
    F_star = reference.value - reference.value_error
    stop_accuracy_points = 0
    for grad_rtol, ftol in ((0.03, 1e-6), (0.1, 1e-7), (0.01, 1e-8)):
        res = prob.optimize(np.zeros(50), grad_rtol=grad_rtol, ftol=ftol, progress=False)
        h = res.history
        loose = [i for i, e in enumerate(h) if e["bound"] > grad_rtol * e["grad_norm"]]
        for i in loose:
            assert i == len(h) - 1 or h[i + 1]["theta"] == h[i]["theta"], (i, h[i])
        stop_accuracy_points += len(loose)
        tight = prob.hypergradient(res.theta, rtol=1e-8)
        F = tight.value
        print(f"\nweights grad_rtol={grad_rtol:g} ftol={ftol:g}: (F - F*)/|F*| = "
              f"{(F - F_star) / abs(F_star):.1e}, points at the stopping accuracy {loose}, "
              f"{len(h)} evaluations; {res.message}")
        assert res.status == OptimizeStatus.CONVERGED
        assert float(np.linalg.norm(tight.grad)) - tight.bound <= res.stationarity
        assert F - F_star <= 10 * ftol * abs(F_star) + reference.value_error
    assert stop_accuracy_points > 0


def test_resolved_to_stop_at_the_same_theta(build_dir, monkeypatch):
    """A point whose ||h|| alone already meets the stopping rule, with only its bound in the
    way, is solved further at the same theta (`_tightened_to_stop`) instead of stepping on.
    Several settings of the small logistic example (seed, theta0, grad_rtol, ftol), so that
    the path is met whatever the solvers do (the scalar cubic steps usually end far below
    what the rule needs): at least one run ends on a re-solved entry at the last theta with a
    smaller bound; in every run the certificate holds against a tight hypergradient, and F is
    within the rule's promise of the optimum (bounded Brent on tight values). The runs hold no
    preconditioner: with the Hessian's factor a learning run holds at this size, the solves end
    so far below what the rule needs that none of 144 settings met the path."""
    import scipy.optimize
    from conftest import built_example

    from codegen.hypergrad import preconditioners

    monkeypatch.setattr(preconditioners, "FACTOR_MIN_DATA", math.inf)
    monkeypatch.setattr(preconditioners, "DEFLATION_MIN_DATA", math.inf)
    _, module, ns = built_example("logistic", build_dir)
    ended_on_resolve = 0
    for seed, theta0, grad_rtol, ftol in ((0, -6.0, 0.5, 1e-7), (2, -3.0, 0.75, 1e-7),
                                          (3, 0.0, 0.75, 1e-6), (1, 0.0, 0.5, 1e-7),
                                          (0, -6.0, 0.75, 1e-6), (3, -3.0, 0.5, 1e-6)):
        prob = module.bind(**ns["example_data"](seed, m=1000, n=50, p=300))
        res = prob.optimize(theta0, grad_rtol=grad_rtol, ftol=ftol, progress=False)
        last, before = res.history[-1], res.history[-2]
        if last["theta"] == before["theta"] and last["bound"] < before["bound"]:
            assert before["bound"] <= grad_rtol * before["grad_norm"]  # it steered already
            ended_on_resolve += 1
        ref = scipy.optimize.minimize_scalar(
            lambda t, prob=prob: prob.hypergradient([t], rtol=1e-10).value, bounds=(-12, 4),
            method="bounded", options=dict(xatol=1e-8))
        tight = prob.hypergradient(res.theta, rtol=1e-8)
        print(f"\nseed {seed} from {theta0}: (F - F*)/|F*| = "
              f"{(tight.value - ref.fun) / abs(ref.fun):.1e}, {len(res.history)} evaluations; "
              f"{res.message}")
        assert res.status == OptimizeStatus.CONVERGED, res.message
        assert float(np.linalg.norm(tight.grad)) - tight.bound <= res.stationarity
        assert tight.value - ref.fun <= 10 * ftol * abs(ref.fun)
    assert ended_on_resolve > 0


def _point(theta: float, value: float, slope: float, err: float = 0.0):
    """An evaluated point of codegen.learn.lbfgs with exact value and slope (no solves)."""
    from codegen.learn.lbfgs import Point

    return Point(np.array([theta]), None, np.array([slope]), abs(slope), 0.0, value, err,
                 0.0, 0.0, {})


def test_cubic_step_is_the_minimiser_of_the_cubic():
    """For a scalar theta the step is the minimiser of the cubic through the two points'
    values and slopes: exact for F = t^3/3 - t (minimiser t = 1) from t = 2 and t = 1.5,
    where the secant step on the slopes alone (t = 1.5 - 1.25 * 0.5 / 1.75) falls short.
    It falls back to the quasi-Newton step d where the values' errors blur the cubic, where
    the cubic has no minimiser (F = t^3 + t), for a vector theta, and when it would not be a
    descent step within [CUBIC_LOW, CUBIC_HIGH] times d."""
    from codegen.learn.lbfgs import _cubic_step

    def F(t):
        return t ** 3 / 3 - t, t * t - 1
    a, b = _point(2.0, *F(2.0)), _point(1.5, *F(1.5))
    secant = np.array([-1.25 * 0.5 / 1.75])
    step = _cubic_step(a, b, secant)
    assert step is not secant and abs(1.5 + step[0] - 1.0) <= 1e-12
    blurred = _point(1.5, *F(1.5), err=0.02 * 1.25 * 0.5)
    assert _cubic_step(a, blurred, secant) is secant
    for d in (np.array([-100.0]), np.array([-0.5 / 20]), np.array([0.3])):
        assert _cubic_step(a, b, d) is d        # the cubic 1/200 or 20 times d, or ascent
    assert _cubic_step(_point(1.0, 2.0, 4.0), _point(0.5, 0.625, 1.75), secant) is secant
    vector = _point(1.5, *F(1.5))
    vector.theta = np.array([1.5, 0.0])
    assert _cubic_step(a, vector, secant) is secant


def test_secant_warm_start_keeps_scalar_runs_exact(build_dir):
    """For a scalar theta every step continues the line of the last two points, so x and q start
    from the secant prediction (`Runner.predicted`); the run still ends at the exact optimum of
    the logistic example (bounded Brent on tight hypergen values as the reference) and its
    certificate holds against a tight hypergradient."""
    import scipy.optimize
    from conftest import built_example

    from codegen.learn.runner import Runner

    _, module, ns = built_example("logistic", build_dir)
    prob = module.bind(**ns["example_data"](0, m=400, n=30, p=200))
    calls = []
    original = Runner.predicted

    def counted(self, theta):
        x0, q0 = original(self, theta)
        calls.append(x0 is not self.x)
        return x0, q0
    Runner.predicted = counted
    try:
        res = prob.optimize(0.0, progress=False)
    finally:
        Runner.predicted = original
    ref = scipy.optimize.minimize_scalar(
        lambda t: prob.hypergradient([t], rtol=1e-10).value, bounds=(-12, 4), method="bounded",
        options=dict(xatol=1e-8))
    tight = prob.hypergradient(res.theta, rtol=1e-8)
    assert sum(calls) >= 2, calls
    assert res.status == OptimizeStatus.CONVERGED, res.message
    assert float(np.linalg.norm(tight.grad)) - tight.bound <= res.stationarity
    assert tight.value - ref.fun <= 10 * FTOL * abs(ref.fun)


def test_loop_asks_for_er_and_its_certificate_holds(build_dir):
    """The loops ask for E&R's certificate (`runner.LOOP_CERTIFICATE`, docs/framework.md 9.1)
    although the DWR correction applies to the logistic example; the default run's certified
    ||grad F|| bound at the returned theta holds against the tight certificate
    (docs/bounds.md 15.6: within a few times h's true error) at rtol 1e-8 (and atol 1e-3 of
    that bound), and against the
    DWR-corrected h_c with its product bound."""
    from conftest import built_example

    from codegen.hypergrad.correction import dwr_unavailable
    from codegen.learn.options import make_options
    from codegen.learn.runner import LOOP_CERTIFICATE, Runner

    _, module, ns = built_example("logistic", build_dir)
    prob = module.bind(**ns["example_data"](1, m=400, n=30, p=200))
    assert LOOP_CERTIFICATE == "er"
    assert dwr_unavailable(prob, np.array([-2.0])) is None      # a choice, not a fallback
    run = Runner(prob, 1, make_options(None, {"progress": False}), np.array([-np.inf]),
                 np.array([np.inf]))
    hg = run.hypergradient(np.array([-2.0]), 1e-2, 1e-2, rtol=0.25)
    assert hg.certificate == LOOP_CERTIFICATE and hg.bound <= 0.25 * np.linalg.norm(hg.grad)
    res = prob.optimize(0.0, progress=False)
    assert res.status == OptimizeStatus.CONVERGED, res.message
    # atol: a run may end where ||h|| is near 0 and rtol alone asks below the rounding floor
    atol = 1e-3 * res.stationarity
    tight = prob.hypergradient(res.theta, rtol=1e-8, atol=atol, certificate="tight",
                               adjoint="cg")
    dwr = prob.hypergradient(res.theta, rtol=1e-8, atol=atol, certificate="dwr", adjoint="cg")
    print(f"\nstationarity {res.stationarity:.3e}; tight |h| {np.linalg.norm(tight.grad):.3e} "
          f"+- {tight.bound:.1e}; dwr |h_c| {np.linalg.norm(dwr.grad):.3e} +- {dwr.bound:.1e}")
    assert (tight.certificate, tight.status, dwr.certificate, dwr.status) == (
        "tight", "ok", "dwr", "ok")
    assert float(np.linalg.norm(tight.grad)) - tight.bound <= res.stationarity
    assert float(np.linalg.norm(dwr.grad)) - dwr.bound <= res.stationarity


def test_warm_start_is_exact_on_a_quadratic_path():
    """For a scalar theta x and q start from the quadratic in theta through the last three
    solutions (`Runner.predicted`): exact when the path x(theta) is a quadratic, the secant
    (exact for a line only) while two are known, the last solution beyond MAX_EXTRAPOLATION
    times the last step; a vector theta starts from the last solution."""
    from codegen.learn.options import make_options
    from codegen.learn.runner import MAX_EXTRAPOLATION, Runner

    a, b, c = np.array([1.0, -2.0]), np.array([0.5, 3.0]), np.array([-1.0, 0.25])

    def path(t):
        return a + b * t + c * t * t

    def runner(thetas, size=1):
        run = Runner(object(), size, make_options(None, {}), np.full(size, -np.inf),
                     np.full(size, np.inf))
        for t in thetas:
            run.x, run.q = path(t), 2 * path(t)
            run._extend_trail(np.full(size, t))
        return run

    run = runner([0.0, -0.5, -2.0])
    x0, q0 = run.predicted(np.array([-3.0]))
    assert np.allclose(x0, path(-3.0), rtol=0, atol=1e-12)
    assert np.allclose(q0, 2 * path(-3.0), rtol=0, atol=1e-12)
    x0, _ = runner([-0.5, -2.0]).predicted(np.array([-3.0]))
    secant = path(-2.0) + (-1.0 / -1.5) * (path(-2.0) - path(-0.5))
    assert np.allclose(x0, secant, rtol=0, atol=1e-12)
    assert not np.allclose(x0, path(-3.0), rtol=0, atol=1e-3)
    assert run.predicted(np.array([-2.0 - 1.5 * (MAX_EXTRAPOLATION + 1)]))[0] is run.x
    vector = runner([0.0, -0.5, -2.0], size=2)
    assert vector.predicted(np.array([-3.0, -3.0]))[0] is vector.x


def test_paper_quadratic_known_optimum(build_dir):
    """theta in R^10, F(theta) = ||M D^+ (e - C theta) - b||^2: a least-squares problem whose
    Hessian has condition number about 1.6e8; its minimiser is lstsq's."""
    from conftest import built_example

    _, module, ns = built_example("quadratic", build_dir)
    d = ns["example_data"](0)
    prob = module.bind(**d)
    Dp = np.linalg.pinv(d["D"])
    A, r0 = d["M"] @ Dp @ d["C"], d["M"] @ Dp @ d["e"] - d["b"]
    t_star = np.linalg.lstsq(A, r0, rcond=None)[0]

    def F(t):
        return float(np.sum((r0 - A @ t) ** 2))

    res = prob.optimize(np.ones(10), progress=False)
    gap = F(res.theta) - F(t_star)
    true_grad = float(np.linalg.norm(2 * A.T @ (A @ res.theta - r0)))
    print(f"\npaper quadratic: F - F* = {gap:.2e} (F* = {F(t_star):.6g}), work {res.work}, "
          f"nit {res.nit}; {res.message}")
    assert res.status == "converged"
    assert true_grad <= res.stationarity
    assert -1e-12 <= gap <= 10 * FTOL * F(t_star)


def test_options_refused_by_name():
    k = noisy_ridge(0)
    cases = [
        (dict(method="gd", rho=0.5), "option 'rho' does not apply to method 'gd'.*'maid'"),
        (dict(method="maid", ftol=1e-6), "option 'ftol' does not apply to method 'maid'.*'lbfgs'"),
        (dict(rel_accuracy=0.1), "option 'rel_accuracy' does not apply to method 'lbfgs'"),
        (dict(method="lbfgs", foo=1), "unknown option 'foo' for method 'lbfgs'"),
        (dict(schedule="cubic"), "schedule applies to method='gd'"),
        (dict(ftol=-1.0), "ftol must be a positive number"),
        (dict(grad_rtol=1.5), "grad_rtol must be a number in \\(0, 1\\)"),
        (dict(memory=0), "memory must be an integer >= 1"),
        (dict(lower="nope"), "unknown lower solver 'nope'"),
        (dict(method="maid", rho=2.0), "rho must be a number in \\(0, 1\\)"),
        (dict(method="adam"), "unknown method 'adam'"),
    ]
    for kw, msg in cases:
        with pytest.raises(OptimizeError, match=msg):
            optimize(k, 0.0, progress=False, **kw)
    # valid calls of every method keep working unchanged
    for method, kw in (("gd", dict(step=1.0)), ("maid", dict(rho=0.5)),
                       ("lbfgsb", dict(rel_accuracy=0.2)), ("lbfgs", dict(memory=3))):
        assert optimize(k, 0.0, method=method, max_iter=3, progress=False, **kw).method == method


def test_theta0_number_fills_every_entry():
    k = Samples([noisy_ridge(1)])
    res = optimize(k, 0.5, method="gd", max_iter=2, progress=False)
    assert res.history[0]["theta"] == [0.5]
    assert list(join_negative_values(["optimize", "f.py", "--theta0", "-0.5,1"])) == \
        ["optimize", "f.py", "--theta0=-0.5,1"]


def test_gd_returns_last_iterate():
    """gd's steps are not certified: its result is where it went, not theta0."""
    k = noisy_ridge(0)
    res = optimize(k, 2.0, method="gd", step=1.0, eps0=0.1, delta0=0.1, max_iter=50,
                   progress=False)
    assert list(res.theta) == res.history[-1]["theta"] != res.history[0]["theta"]


def test_budget_stop_summary_has_no_nan():
    k = noisy_ridge(0)
    res = optimize(k, 2.0, method="maid", budget=320, lower="fista", adjoint="cg",
                   progress=False)
    assert res.status == "budget" and math.isnan(res.grad_norm)
    text = res.summary()
    assert "nan" not in text and "no hypergradient at the returned point" in text
    res = optimize(k, 2.0, budget=60, progress=False)
    assert res.status == "budget" and "nan" not in res.summary()
    assert "certified" in res.summary()


def test_plot_shows_certified_interval_and_theta(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    k = Samples([noisy_ridge(0), noisy_ridge(3)])
    res = optimize(k, 2.0, progress=False)
    fig = res.plot()
    value_ax, theta_ax, grad_ax = fig.axes[:3]
    assert value_ax.get_ylabel() == "F(theta)"
    assert any(type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")
               for c in value_ax.collections)             # the certified interval
    assert [line.get_label() for line in theta_ax.get_lines()] == ["theta[0]"]
    np.testing.assert_allclose(theta_ax.get_lines()[0].get_ydata(),
                               [e["theta"][0] for e in res.history])
    res.plot(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


POISSON = '''
import sympy as sp
from codegen import Problem

m, n, p = sp.symbols("m n p", integer=True, positive=True)
i, j, k = sp.Idx("i", m), sp.Idx("j", n), sp.Idx("k", p)
A, y = sp.IndexedBase("A", shape=(m, n)), sp.IndexedBase("y", shape=(m,))
Av, yv = sp.IndexedBase("Av", shape=(p, n)), sp.IndexedBase("yv", shape=(p,))
x = sp.IndexedBase("x", shape=(n,))
theta = sp.Symbol("theta")
za = sp.Sum(A[i, j] * x[j], (j, 0, n - 1))
zv = sp.Sum(Av[k, j] * x[j], (j, 0, n - 1))
poisson = Problem(
    name="poisson", x=x, theta=theta,
    lower=sp.Sum(sp.exp(za) - y[i] * za, (i, 0, m - 1)) / m
          + sp.exp(theta) / 2 * sp.Sum(x[j] ** 2, (j, 0, n - 1)),
    upper=sp.Sum(sp.exp(zv) - yv[k] * zv, (k, 0, p - 1)) / p,
)
'''


def test_exp_link_values_use_ball_constants(tmp_path):
    """Poisson regression (exp link): L_f = inf globally, finite on a ball. MAID's value test
    once used the global L_f and never moved theta ("accuracy floor ... and ;"); the
    values now use L_f on the ball that holds x_eps and x*, like the hypergradient."""
    import codegen

    (tmp_path / "poisson.py").write_text(POISSON)
    module = codegen.load(tmp_path / "poisson.py", out=tmp_path / "gen")
    rng = np.random.default_rng(0)
    w = 0.3 * rng.standard_normal(5)
    A, Av = rng.standard_normal((200, 5)) / 5 ** 0.5, rng.standard_normal((200, 5)) / 5 ** 0.5
    prob = module.bind(A=A, y=rng.poisson(np.exp(A @ w)).astype(float), Av=Av,
                       yv=rng.poisson(np.exp(Av @ w)).astype(float))
    assert math.isinf(prob.constants(0.0)["L_f"])
    for method in ("maid", None):
        res = prob.optimize(0.0, method=method, budget=20000, progress=False)
        print(f"\npoisson {res.method}: {res.status}, theta {res.theta[0]:.4f}, nit {res.nit}, "
              f"{res.certificate()}")
        assert res.success and res.nit > 3 and res.theta[0] < -1.0
        assert math.isfinite(res.value_error)
        assert res.stationarity < 1e-6


def test_sigterm_ends_a_run_like_ctrl_c():
    """SIGTERM during a run returns the result so far with status "interrupted",
    and the previous SIGTERM handler is back afterwards."""
    import signal

    k = noisy_ridge(0)
    before = signal.getsignal(signal.SIGTERM)

    def kill_at_third(entry):
        if entry["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    res = optimize(k, 2.0, method="maid", callback=kill_at_third, progress=False)
    assert res.status == OptimizeStatus.INTERRUPTED and "SIGTERM" in res.message
    assert len(res.history) >= 3 and np.all(np.isfinite(res.theta))
    assert signal.getsignal(signal.SIGTERM) is before


def test_run_past_the_rounding_floor_ends_at_the_accuracy_floor(build_dir):
    """ftol = 1e-30 with min_eps out of the way: the line search soon needs values below what
    floating point certifies. The run ends with "accuracy floor" (success, as min_eps's floor),
    never "failed", and its certificate holds for the exact gradient at the returned point."""
    from conftest import built_example
    _, module, ns = built_example("ridge", build_dir)
    data = ns["example_data"](seed=0, m=60, n=12, p=30)
    A, b, Av, bv = data["A"], data["b"], data["Av"], data["bv"]

    def exact_gradient(theta):
        alpha = np.exp(theta)
        H = A.T @ A + alpha * np.eye(A.shape[1])
        xs = np.linalg.solve(H, A.T @ b)
        return -(alpha * xs) @ np.linalg.solve(H, Av.T @ (Av @ xs - bv) / Av.shape[0])

    for lower in ("newton", "cg"):
        res = optimize(module.bind(**data), 1.0, lower=lower, ftol=1e-30, min_eps=1e-300,
                       progress=False)
        print(f"\n{lower}: {res.status}, stationarity {res.stationarity:.3g}; {res.message}")
        assert res.status == OptimizeStatus.ACCURACY_FLOOR and res.success, res
        assert "below what the solvers reach" in res.message
        assert abs(exact_gradient(res.theta[0])) <= res.stationarity < 1e-10
