"""The upper-level loop (codegen.learn, codegen.cli.optimize) on NumPy kernels with exact solutions
(tests/upper_kernels.py) and, for the command line, on the built ridge example.
Run with -s for the measured errors."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from upper_kernels import (  # noqa: E402
    Logistic, Samples, exact_F, exact_grad, noisy_ridge, optimal_theta,
)

from codegen.errors import HypergenError  # noqa: E402
from codegen.learn.options import QuasiNewtonOptions  # noqa: E402
from codegen.learn import (  # noqa: E402
    OptimizeError, optimize, parse_budget, parse_theta0, read_history,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ridge():
    k = noisy_ridge(0)
    return k, optimal_theta(k)


# Options per method; every one must land within TOL of the exact optimum from theta0 = 2, but
# "lbfgs", whose stopping rule is a relative tolerance on F: within 10 ftol |F*| of F*.
METHODS = {
    "lbfgs": {},
    "maid": {},
    "gd": dict(step=1.0, eps0=1e-3, delta0=1e-3, schedule="exponential"),
    "lbfgsb": {},
}
TOL = 1e-5


@pytest.mark.parametrize("method", list(METHODS))
def test_reaches_optimal_theta(ridge, method):
    k, t_star = ridge
    res = optimize(k, 2.0, method=method, max_iter=500, progress=False, **METHODS[method])
    err = abs(res.theta[0] - t_star)
    print(f"\n{method}: theta = {res.theta[0]:.10f}, theta* = {t_star:.10f}, error {err:.2e}, "
          f"F - F* = {exact_F(k, res.theta) - exact_F(k, t_star):.2e}, work {res.work}, "
          f"steps {len(res.history)}, status {res.status}")
    assert res.success, res
    if method == "lbfgs":      # theta to about sqrt(ftol): 7e-5 here, at (F - F*)/|F*| = 5e-10
        F_star = exact_F(k, [t_star])
        assert 0 <= exact_F(k, res.theta) - F_star <= 10 * QuasiNewtonOptions.ftol * abs(F_star)
    else:
        assert err < TOL
    assert res.value == pytest.approx(exact_F(k, res.theta), abs=1e-8)
    # the certified stationarity claim holds for the true gradient
    last = res.history[-1]
    assert abs(exact_grad(k, last["theta"])[0]) <= last["grad_norm"] + last["bound"] + 1e-15


def test_lbfgsb_box_bounds(ridge):
    k, t_star = ridge
    res = optimize(k, 3.0, method="lbfgsb", bounds=(1.0, 4.0), progress=False)
    assert res.theta[0] == pytest.approx(1.0, abs=1e-9)      # F increases beyond t* = 0.23
    assert all(1.0 <= e["theta"][0] <= 4.0 for e in res.history)
    res = optimize(k, -3.0, method="maid", bounds=[(-1.0, 0.1)], progress=False, max_iter=100)
    assert res.theta[0] == pytest.approx(0.1, abs=1e-6)      # projected steps stop at the box


def _distinct_steps(history):
    """Consecutive distinct points in the order visited (retries at one theta collapse)."""
    pts = []
    for e in history:
        if not pts or e["theta"] != pts[-1]:
            pts.append(e["theta"])
    return pts


@pytest.mark.parametrize("case", ["ridge", "logistic", "samples"])
def test_maid_never_increases_true_objective(case):
    k = {"ridge": lambda: noisy_ridge(0),
         "logistic": lambda: Logistic.generate(seed=0, m=80, d=6, pv=60),
         "samples": lambda: Samples([noisy_ridge(0), noisy_ridge(3)])}[case]()
    res = optimize(k, 2.0 if case != "logistic" else -3.0, method="maid", budget=3000,
                   progress=False)
    pts = _distinct_steps(res.history)
    F = [exact_F(k, t) for t in pts]
    print(f"\n{case}: {len(pts) - 1} accepted steps, F {F[0]:.6f} -> {F[-1]:.6f}, "
          f"status {res.status}")
    assert len(pts) > 3
    for a, b in zip(F, F[1:]):
        assert b <= a, (a, b)
    # the returned point is the last accepted one
    assert list(res.theta) == pts[-1]


def test_samples_reach_optimum():
    k = Samples([noisy_ridge(0), noisy_ridge(3)])
    t_star = optimal_theta(k)
    for method in ("maid", "lbfgsb"):
        res = optimize(k, 2.0, method=method, progress=False)
        err = abs(res.theta[0] - t_star)
        print(f"\nsamples {method}: error {err:.2e}, work {res.work}, status {res.status}")
        assert err < TOL


@pytest.mark.parametrize("method", ["maid", "gd", "lbfgsb"])
def test_keyboard_interrupt_returns_best(ridge, method):
    k, _ = ridge
    calls = []

    def cb(entry):
        calls.append(entry)
        if len(calls) == 6:
            raise KeyboardInterrupt

    res = optimize(k, 2.0, method=method, callback=cb, progress=False, **METHODS[method])
    assert res.status == "interrupted"
    assert len(res.history) >= 6
    recorded = [e for e in res.history if math.isfinite(e["value"])]
    best = min(recorded, key=lambda e: (e["value"] + e["value_error"], e["value"]))
    if method == "gd":             # gd returns its last iterate (its steps are not certified)
        best = res.history[-1]
    assert res.value + 0 == pytest.approx(best["value"])
    assert list(res.theta) == best["theta"]


def test_callback_stop_and_budgets(ridge):
    k, _ = ridge
    res = optimize(k, 2.0, method="gd", callback=lambda e: e["step"] >= 3, progress=False)
    assert res.status == "callback" and len(res.history) == 4
    for method in ("gd", "lbfgs"):  # np.True_ from a NumPy comparison stops too (it was ignored)
        res = optimize(k, 2.0, method=method, progress=False,
                       callback=lambda e: np.asarray(e["step"]) >= 1)
        assert res.status == "callback" and len(res.history) == 2, method
    res = optimize(k, 2.0, method="maid", budget=500, progress=False)
    assert res.status == "budget" and 500 <= res.work < 500 + 200
    res = optimize(k, 2.0, method="maid", budget="1e-3s", progress=False)
    assert res.status == "time"
    res = optimize(k, 2.0, method="gd", max_iter=7, progress=False)
    assert res.status == "max_iter" and len(res.history) == 7


def _strip_time(history):
    return [{key: v for key, v in e.items() if key != "time"} for e in history]


@pytest.mark.parametrize("method", ["lbfgs", "maid", "gd", "lbfgsb"])
def test_reproducible(ridge, method):
    k, _ = ridge
    runs = [optimize(k, 2.0, method=method, budget=1500, progress=False, **METHODS[method])
            for _ in range(2)]
    assert json.dumps(_strip_time(runs[0].history)) == json.dumps(_strip_time(runs[1].history))
    assert runs[0].status == runs[1].status and list(runs[0].theta) == list(runs[1].theta)


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, list):
            assert x == y
        elif isinstance(x, float) and math.isnan(x):
            assert math.isnan(y)
        else:
            assert x == y, (key, x, y)


def test_history_round_trip(tmp_path, ridge):
    k, _ = ridge
    # a budget-terminated MAID run ends on an accepted point without a hypergradient (nan cells)
    res = optimize(k, 2.0, method="maid", budget=320, lower="fista", adjoint="cg",
                   progress=False)
    assert res.status == "budget" and math.isnan(res.history[-1]["grad_norm"])
    assert list(res.theta) == res.history[-1]["theta"]
    for name in ("h.csv", "h.json"):
        path = getattr(res, "history_to_csv" if name.endswith("csv") else "history_to_json")(
            tmp_path / name)
        back = read_history(path)
        assert len(back) == len(res.history)
        for a, b in zip(res.history, back):
            _same(a, b)
    doc = json.loads((tmp_path / "h.json").read_text())      # strict JSON (no NaN tokens)
    assert doc["status"] == res.status and doc["work"] == res.work
    # several thetas: one column each
    k2 = Samples([noisy_ridge(1)])
    r2 = optimize(k2, 0.5, method="gd", max_iter=3, progress=False)
    r2.history_to_csv(tmp_path / "g.csv")
    assert "theta[0]" in (tmp_path / "g.csv").read_text().splitlines()[0]


def test_plot(tmp_path, ridge, monkeypatch):
    k, _ = ridge
    res = optimize(k, 2.0, method="gd", max_iter=5, progress=False)
    try:
        import matplotlib  # noqa: F401
        res.plot(tmp_path / "p.png")
        assert (tmp_path / "p.png").stat().st_size > 0
    except ImportError:
        pass
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install hypergen\[plot\]"):
        res.plot(tmp_path / "q.png")


def test_bad_inputs(ridge):
    k, _ = ridge
    with pytest.raises(OptimizeError, match="theta0 has 2 entries but the problem has 1"):
        optimize(k, [0.0, 1.0])
    with pytest.raises(OptimizeError, match="theta0 is not finite"):
        optimize(k, float("nan"))
    for bad in ("abc", "-5", 0, True, "5 minutes", float("inf")):
        with pytest.raises(OptimizeError, match="budget must be a positive number"):
            optimize(k, 0.0, budget=bad)
    with pytest.raises(OptimizeError, match="unknown method"):
        optimize(k, 0.0, method="adam")
    with pytest.raises(OptimizeError, match="schedule applies to method='gd'"):
        optimize(k, 0.0, method="maid", schedule="cubic")
    with pytest.raises(OptimizeError, match="unknown schedule"):
        optimize(k, 0.0, method="gd", schedule="linear")
    with pytest.raises(OptimizeError, match="bounds"):
        optimize(k, 0.0, method="lbfgsb", bounds=[(0, 1), (0, 1)])
    assert parse_budget("30s") == (None, 30.0) and parse_budget("5000") == (5000.0, None)
    assert list(parse_theta0(1.5, 3)) == [1.5] * 3 and list(parse_theta0("1,2", 2)) == [1, 2]
    assert issubclass(OptimizeError, HypergenError)


class _NoLf:
    """A ridge kernel that does not state L_f (taken as inf: values cannot be certified)."""

    def __init__(self, k):
        self.k = k

    def __getattr__(self, name):
        return getattr(self.k, name)

    def constants(self, theta):
        c = dict(self.k.constants(theta))
        del c["L_f"]
        return c


def test_uncertifiable_values_and_backprop(ridge):
    k, t_star = ridge
    for method in ("maid", "lbfgsb", "lbfgs"):  # the accuracy tests need a finite bound
        res = optimize(_NoLf(k), 2.0, method=method, progress=False)
        assert res.status == "failed" and "L_f = inf" in res.message, res
    # gd runs with adjoint="backprop" (no bound: inf in the history); MAID refuses it
    res = optimize(k, 2.0, method="gd", lower="gd", adjoint="backprop", max_iter=5,
                   progress=False)
    assert res.status == "max_iter" and math.isinf(res.history[-1]["bound"])
    with pytest.raises(OptimizeError, match="backprop"):
        optimize(k, 2.0, method="maid", lower="gd", adjoint="backprop")


# ----------------------------------------------------------------------------------------------
# the command line and the bound problem's method, on the built ridge example


@pytest.fixture(scope="module")
def ridge_module():
    from codegen.pipeline import load

    return load(os.path.join(ROOT, "examples", "ridge.py"))


def _args(tmp_path, data, **kw):
    ns = dict(file=os.path.join(ROOT, "examples", "ridge.py"), data=str(data), theta0=None,
              method="maid", budget=None, out=str(tmp_path / "out"), no_progress=True)
    ns.update(kw)
    return argparse.Namespace(**ns)


def _ridge_data(seed=0):
    rng = np.random.default_rng(seed)
    A, Av = rng.standard_normal((20, 15)), rng.standard_normal((25, 15))
    xt = rng.standard_normal(15)
    return {"A": A, "b": A @ xt + 2 * rng.standard_normal(20), "Av": Av,
            "bv": Av @ xt + 2 * rng.standard_normal(25)}


def test_bound_problem_optimize(ridge_module):
    d = _ridge_data()
    prob = ridge_module.bind(**d)
    res = prob.optimize(0.0, method="lbfgsb", progress=False)
    from upper_kernels import Ridge
    ref = Ridge(d["A"], d["b"], d["Av"], d["bv"])
    t_star = optimal_theta(ref)
    print(f"\ngenerated ridge lbfgsb: error {abs(res.theta[0] - t_star):.2e}")
    assert abs(res.theta[0] - t_star) < TOL
    both = ridge_module.bind_samples([d, _ridge_data(1)])
    res2 = both.optimize(0.0, method="maid", budget=800, progress=False)
    assert res2.status in ("budget", "converged") and len(res2.history) > 1


def test_cli_run(tmp_path, ridge_module, capsys):
    from codegen.cli.optimize import run_optimize

    d0, d1 = _ridge_data(0), _ridge_data(1)
    np.savez(tmp_path / "one.npz", **d0)
    assert run_optimize(_args(tmp_path, tmp_path / "one.npz", budget="3000")) == 0
    out = capsys.readouterr().out
    for word in ("theta", "value", "bound", "work", "time", "status"):
        assert word in out
    assert (tmp_path / "out" / "history.csv").exists()
    assert (tmp_path / "out" / "history.json").exists()
    hist = read_history(tmp_path / "out" / "history.json")
    assert hist and hist[-1]["work"] <= 3000 + 500
    # several samples: suffixed arrays, validation data shared
    np.savez(tmp_path / "two.npz", A__0=d0["A"], b__0=d0["b"], A__1=d1["A"], b__1=d1["b"],
             Av=d0["Av"], bv=d0["bv"])
    assert run_optimize(_args(tmp_path, tmp_path / "two.npz", method="lbfgsb", budget="2s",
                              theta0="0.5")) == 0
    assert "2 samples" in capsys.readouterr().out


def test_cli_errors(tmp_path, ridge_module):
    from codegen.cli.optimize import run_optimize

    d = _ridge_data()
    np.savez(tmp_path / "ok.npz", **d)
    np.savez(tmp_path / "missing.npz", A=d["A"], b=d["b"])
    np.savez(tmp_path / "shape.npz", **dict(d, b=d["b"][:-1]))
    np.savez(tmp_path / "extra.npz", **dict(d, C=d["b"]))
    np.savez(tmp_path / "gap.npz", A__0=d["A"], b__0=d["b"], A__2=d["A"], b__2=d["b"],
             Av=d["Av"], bv=d["bv"])
    cases = [
        (dict(data=tmp_path / "nope.npz"), "data file .*nope.npz not found"),
        (dict(data=tmp_path / "missing.npz"), "missing arrays Av, bv"),
        (dict(data=tmp_path / "shape.npz"), "b"),
        (dict(data=tmp_path / "extra.npz"), "unknown array C"),
        (dict(data=tmp_path / "gap.npz"), "without gaps"),
        (dict(data=tmp_path / "ok.npz", theta0="1,2"), "theta0 has 2 entries"),
        (dict(data=tmp_path / "ok.npz", theta0="one"), "theta0 must be a number"),
        (dict(data=tmp_path / "ok.npz", budget="lots"), "budget must be a positive number"),
        (dict(data=tmp_path / "ok.npz", file=tmp_path / "none.py"), "problem file"),
    ]
    for kw, msg in cases:
        data = kw.pop("data")
        with pytest.raises(HypergenError, match=msg) as info:
            run_optimize(_args(tmp_path, data, **kw))
        assert "\n" not in str(info.value)
        print(f"\n{str(info.value)}")
    from codegen.cli.main import main
    assert main(["optimize", os.path.join(ROOT, "examples", "ridge.py"), "--data",
                 str(tmp_path / "ok.npz"), "--budget", "x"]) == 2
    # a negative theta0 is a value, not an option; the default method runs
    assert main(["optimize", os.path.join(ROOT, "examples", "ridge.py"), "--data",
                 str(tmp_path / "ok.npz"), "--theta0", "-0.5", "--no-progress", "--out",
                 str(tmp_path / "neg")]) == 0
    assert read_history(tmp_path / "neg" / "history.json")[0]["theta"] == [-0.5]


def test_paper_quadratic_maid_with_cg_and_direct(build_dir):
    """MAID on the paper quadratic from theta = 1 (||grad F|| ~ 1e4): its accuracy schedule
    drives the adjoint CG to many residual replacements, whose a priori rate once overflowed a
    float (OverflowError out of optimize). Both solver pairs now run and cut the objective by
    two orders of magnitude."""
    from conftest import built_example

    _, module, ns = built_example("quadratic", build_dir)
    prob = module.bind(**ns["example_data"](0))
    start = float(prob.hypergradient(np.ones(10), lower="direct", adjoint="direct").value)
    # the default step (0.1 against a gradient of 1e4) backtracks down to the accuracy floor:
    # this run raised the OverflowError
    res = prob.optimize(np.ones(10), method="maid", lower="cg", adjoint="cg", max_iter=50,
                        progress=False)
    # MAID may stop where it started: its value is then the same f(x_eps) up to the rounding of
    # a fresh solve (2 ulp apart were seen on another machine), never above it by more
    assert res.status == "accuracy floor" and float(res.value) <= start * (1 + 1e-12)
    for lower, adjoint in (("cg", "cg"), ("direct", "direct")):
        res = prob.optimize(np.ones(10), method="maid", lower=lower, adjoint=adjoint, step=1e-5,
                            max_iter=100, progress=False)
        assert res.status in ("max_iter", "accuracy floor", "converged"), res.status
        assert res.iterations > 10 and float(res.value) < 0.01 * start, (lower, res.value, start)
