"""The DWR certificate (docs/bounds.md 15) against E&R's and against an oracle-stopped solve.

    python benchmarks/bench_certificate.py            # every case
    python benchmarks/bench_certificate.py --quick    # small sizes
    python benchmarks/bench_certificate.py --cases logistic tv1d   # only these cases

For each case (problem, lower solver, adjoint CG) and rtol in {1e-3, 1e-6, 1e-8}:
* ER:  prob.hypergradient(theta, rtol=r, certificate="er"): its bound / true error, its work;
* DWR: prob.hypergradient(theta, rtol=r, certificate="dwr"): bound(h_c) / ||h_c - grad F||, and
  the plain h's bound (min of E&R's and |h - h_c| + bound(h_c)) / ||h - grad F||, its work;
* tight: prob.hypergradient(theta, rtol=r, certificate="tight") (the default's choice where it
  applies, docs/bounds.md 15.6): the plain h with |h - h_c| + bound(h_c) steered to the target;
  its bound / ||h - grad F||, its work, and its true error / target (how little it overshoots);
* auto: prob.hypergradient(theta, rtol=r), the default: the certificate it picked, its
  bound / true error and its work / the oracle's;
* oracle: the same solvers with eps = delta = tol down a ladder (factor 2, no certificate used)
  stopped at the first tol whose TRUE error is <= r ||grad F|| and stays so at the next two rungs
  (the robust rule of the prototype; not implementable: it reads the exact gradient).
A method whose status is not "ok" (e.g. a capped lower solve) is marked; medians skip it.
Work: E&R units (lower gradients + HVPs; the DWR's upper HVPs counted as HVPs) + cross products.
True errors below 1e-13 ||grad F|| (the rounding level of the reference) are floored there in
the ratios. The reference grad F: dense solves (numpy.linalg) with the problem's own kernels
(Newton with dense solves for x* where g is not quadratic).

Non-quadratic cases (docs/bounds.md 15.3, Corollary 15.3): the generated logistic example with
L_3, L_Hf from the data (tests/nonquadratic_kernels.GeneratedLogistic), and 1-D smoothed TV
denoising with the fidelity weight as hyperparameter (tests/nonquadratic_kernels.SmoothTV1D).
B not affine in x (Corollary 15.3 with cross_hvp and L_DB): the generated hypercleaning example
with 8 per-sample weights (c = 10, n = 21 or 51, m = 8, mv = 200, lambda = 1e-2), and 1-D smoothed
TV denoising with the TV weight e^t as hyperparameter (tests/nonquadratic_kernels.TV_WEIGHT).
A group atom with theta inside it: examples/tv2d.py (isotropic smoothed TV, theta = (log alpha,
log nu), 12 x 12 or 32 x 32; L_3 and L_DB from docs/constants.md 3.11). Theta in a learned
filter's taps: examples/learned_filter_1d.py (L_DB on the ball only, docs/constants.md 8.3).

More hyperparameters than the per-direction correction takes (the block correction,
docs/bounds.md 15.8, "tight" above 8): one weight per feature (examples/logistic_weights.py,
20 or 100 features) and hypercleaning with 40 per-sample weights.

Paper-scale hypercleaning (20000 weights, the component along h): benchmarks/bench_hypercleaning.py.
"""
import argparse
import math
import runpy
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "tests"))

from nonquadratic_kernels import (  # noqa: E402
    TV_WEIGHT,
    DenseGenerated,
    GeneratedLogistic,
    SmoothTV1D,
    tv_weight_data,
)
from nonquadratic_kernels import exact_hypergradient as newton_exact  # noqa: E402

from codegen import Problem  # noqa: E402
from codegen.hypergrad import hypergradient  # noqa: E402
from codegen.pipeline import build_problem  # noqa: E402

RTOLS = (1e-3, 1e-6, 1e-8)
FLOOR = 1e-13


def _bind(example: str, data: dict):
    ns = runpy.run_path(str(ROOT / "examples" / f"{example}.py"))
    problem = next(v for v in ns.values() if isinstance(v, Problem))
    return build_problem(problem, tempfile.mkdtemp(prefix="bench_cert_")).bind(**data), ns


def _ridge_data(m: int, n: int, p: int, ill: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    scales = np.logspace(0, -2, n) if ill else np.ones(n)
    x_true = rng.standard_normal(n)
    A = rng.standard_normal((m, n)) * scales
    Av = rng.standard_normal((p, n)) * scales
    return {"A": A, "b": A @ x_true + 0.5 * rng.standard_normal(m),
            "Av": Av, "bv": Av @ x_true + 0.5 * rng.standard_normal(p)}


def _hypergradient(k, theta, **options):
    """The certified hypergradient of a generated problem or of a plain kernel object."""
    return hypergradient(k, theta, **options)


def _exact(k, theta: np.ndarray) -> np.ndarray:
    """grad F from dense solves (g quadratic: x* = -A^{-1} grad g(0); else dense Newton)."""
    if not getattr(k, "is_quadratic", False):
        return newton_exact(k, theta)
    x0 = np.zeros(k.x_size)
    H = k.lower_hessian(x0, theta)
    xs = np.linalg.solve(H, -k.lower_grad(x0, theta))
    xs -= np.linalg.solve(H, k.lower_grad(xs, theta))  # one refinement step
    q = np.linalg.solve(H, k.upper_grad(xs, theta))
    q -= np.linalg.solve(H, k.lower_hvp(xs, theta, q) - k.upper_grad(xs, theta))
    return -k.cross_matrix(xs, theta).T @ q + k.upper_theta_grad(xs, theta)


def _work(hg) -> int:
    return int(hg.work["units"] + hg.work["cross"])


def _oracle(k, theta, lower, exact, rtol) -> int | None:
    target = rtol * np.linalg.norm(exact)
    rows = []
    tol = 1e-1
    while tol > 1e-15 and not (len(rows) >= 3 and all(ok for ok, _ in rows[-3:])):
        hg = _hypergradient(k, theta, lower=lower, adjoint="cg", eps=tol, delta=tol,
                            refine_iter=0, max_iter=100000)
        rows.append((np.linalg.norm(hg.grad - exact) <= target, _work(hg)))
        tol /= 2
    for i in range(len(rows)):
        if all(ok for ok, _ in rows[i:i + 3]):
            return rows[i][1]
    return None


def _ratio(bound: float, err: float, scale: float) -> float:
    return bound / max(err, FLOOR * scale)


def run_case(name: str, k, theta: np.ndarray, lower: str) -> list[dict]:
    exact = _exact(k, theta)
    scale = float(np.linalg.norm(exact))
    out = []
    for rtol in RTOLS:
        er = _hypergradient(k, theta, lower=lower, adjoint="cg", rtol=rtol, certificate="er",
                            max_iter=100000)
        dwr = _hypergradient(k, theta, lower=lower, adjoint="cg", rtol=rtol, certificate="dwr",
                             components=True, max_iter=100000)
        tight = _hypergradient(k, theta, lower=lower, adjoint="cg", rtol=rtol,
                               certificate="tight", max_iter=100000)
        auto = _hypergradient(k, theta, lower=lower, adjoint="cg", rtol=rtol, max_iter=100000)
        err_t = np.linalg.norm(tight.grad - exact)
        err_a = np.linalg.norm(auto.grad - exact)
        assert err_a <= auto.bound or err_a <= FLOOR * scale, (name, rtol, auto.bound, err_a)
        assert err_t <= tight.bound or err_t <= FLOOR * scale, (name, rtol, tight.bound, err_t)
        err_er = np.linalg.norm(er.grad - exact)
        err_c = np.linalg.norm(dwr.grad - exact)
        # where the correction does not apply, "dwr" reports E&R's h (no uncorrected fields)
        corrected = dwr.uncorrected_grad is not None
        plain_bound = dwr.uncorrected_bound if corrected else dwr.bound
        err_h = np.linalg.norm((dwr.uncorrected_grad if corrected else dwr.grad) - exact)
        for bound, err in ((er.bound, err_er), (dwr.bound, err_c), (plain_bound, err_h)):
            assert err <= bound or err <= FLOOR * scale, (name, rtol, bound, err)
        out.append({
            "case": name, "rtol": rtol, "oracle": _oracle(k, theta, lower, exact, rtol),
            "er_work": _work(er), "er_ratio": _ratio(er.bound, err_er, scale),
            "dwr_work": _work(dwr), "dwr_ratio": _ratio(dwr.bound, err_c, scale),
            "plain_ratio": _ratio(plain_bound, err_h, scale),
            "tight_work": _work(tight), "tight_ratio": _ratio(tight.bound, err_t, scale),
            "tight_status": tight.status, "tight_err": err_t / (rtol * scale),
            "er_status": er.status, "dwr_status": dwr.status,
            "auto_cert": auto.certificate, "auto_ratio": _ratio(auto.bound, err_a, scale),
            "auto_status": auto.status, "auto_work": _work(auto),
        })
    return out


def _quadratic_cases(quick: bool):
    m, n, p = (400, 100, 200) if quick else (2000, 500, 1000)
    ridge, _ = _bind("ridge", _ridge_data(m, n, p, ill=False))
    ill, _ = _bind("ridge", _ridge_data(m, n, p, ill=True))
    quad_ns = runpy.run_path(str(ROOT / "examples" / "quadratic.py"))
    quad, _ = _bind("quadratic", quad_ns["example_data"](m1=m, m2=m))
    yield "ridge cg", ridge, np.array([0.0]), "cg"
    yield "ridge gd", ridge, np.array([0.0]), "gd"
    yield "ridge-ill cg", ill, np.array([math.log(1e-2)]), "cg"
    yield "quadratic p=10 cg", quad, np.ones(10), "cg"
    yield "quadratic p=10 gd", quad, np.ones(10), "gd"


def _logistic_cases(quick: bool):
    m, n, p = (400, 100, 200) if quick else (2000, 500, 1000)
    log_ns = runpy.run_path(str(ROOT / "examples" / "logistic.py"))
    log_data = log_ns["example_data"](m=m, n=n, p=p)
    logistic, _ = _bind("logistic", log_data)
    wrapped = GeneratedLogistic(logistic, log_data)
    yield "logistic gd", wrapped, np.array([math.log(1e-2)]), "gd"
    yield "logistic newton", wrapped, np.array([math.log(1e-2)]), "newton"


def _tv1d_cases(quick: bool):
    tv = SmoothTV1D.generate(seed=0, n=100 if quick else 500, noise=0.2, beta=0.5, gamma=0.1)
    yield "tv1d gd", tv, np.array([1.0]), "gd"
    yield "tv1d newton", tv, np.array([1.0]), "newton"


def _hypercleaning_cases(quick: bool):
    """B not affine in x (cross_hvp, L_DB): per-sample weights on softmax cross-entropy (8
    weights: every component certified)."""
    hc_ns = runpy.run_path(str(ROOT / "examples" / "hypercleaning.py"))
    hc, _ = _bind("hypercleaning", hc_ns["example_data"](seed=0, c=10, n=21 if quick else 51,
                                                           m=8, mv=200, lam=1e-2))
    yield "hypercleaning gd", DenseGenerated(hc), np.linspace(-1.0, 1.0, 8), "gd"
    yield "hypercleaning newton", DenseGenerated(hc), np.linspace(-1.0, 1.0, 8), "newton"


def _weights_cases(quick: bool):
    """More hyperparameters than the per-direction correction takes (docs/bounds.md 15.8): one
    l2 weight per feature on logistic regression (examples/logistic_weights.py, B affine in x)
    and 40 per-sample weights on hypercleaning (B not affine: the cross_tvp kernel)."""
    m, n, p = (200, 20, 100) if quick else (1000, 100, 500)
    lw_ns = runpy.run_path(str(ROOT / "examples" / "logistic_weights.py"))
    lw, _ = _bind("logistic_weights", lw_ns["example_data"](seed=0, m=m, n=n, p=p,
                                                             informative=5))
    theta = np.linspace(-1.0, 1.0, n)
    yield "weights fista", DenseGenerated(lw), theta, "fista"
    yield "weights newton", DenseGenerated(lw), theta, "newton"
    hc_ns = runpy.run_path(str(ROOT / "examples" / "hypercleaning.py"))
    hc, _ = _bind("hypercleaning", hc_ns["example_data"](seed=0, c=10, n=21 if quick else 51,
                                                           m=40, mv=200, lam=1e-2))
    yield "weights-cleaning newton", DenseGenerated(hc), np.linspace(-1.0, 1.0, 40), "newton"


def _tv_weight_cases(quick: bool):
    """B not affine in x: a weight e^t on 1-D smoothed TV."""
    tvw = build_problem(TV_WEIGHT, tempfile.mkdtemp(prefix="bench_cert_")).bind(
        **tv_weight_data(seed=0, n=100 if quick else 500))
    yield "tv-weight gd", DenseGenerated(tvw), np.array([math.log(0.3)]), "gd"
    yield "tv-weight newton", DenseGenerated(tvw), np.array([math.log(0.3)]), "newton"


def _tv2d_cases(quick: bool):
    """examples/tv2d.py, isotropic smoothed TV (a group atom) with theta = (log alpha, log nu):
    L_3 and L_DB from the group atom's bounds (docs/constants.md 3.11)."""
    side = 12 if quick else 32
    tv2d, ns = _bind("tv2d", runpy.run_path(str(ROOT / "examples" / "tv2d.py"))["example_data"](
        seed=0, h=side, w=side))
    theta = np.array(ns["THETA0"])
    yield "tv2d gd", DenseGenerated(tv2d), theta, "gd"
    yield "tv2d newton", DenseGenerated(tv2d), theta, "newton"


def _learned_filter_cases(quick: bool):
    """examples/learned_filter_1d.py, theta = (log weight, 3 taps) inside a Charbonnier: L_DB is
    finite only on the ball around x_eps (docs/constants.md 8.3); piecewise-constant signals of
    tests/problems/filter1d.py, n = 32 or 128."""
    data = runpy.run_path(str(ROOT / "tests" / "problems" / "filter1d.py"))["example_data"](
        seed=0, n=32 if quick else 128)
    k, ns = _bind("learned_filter_1d", data)
    yield "learned-filter fista", DenseGenerated(k), np.array(ns["THETA0"]), "fista"


# (case names, builder): a builder runs only when --cases selects one of its names
GROUPS = (
    (("ridge cg", "ridge gd", "ridge-ill cg", "quadratic p=10 cg", "quadratic p=10 gd"),
     _quadratic_cases),
    (("logistic gd", "logistic newton"), _logistic_cases),
    (("tv1d gd", "tv1d newton"), _tv1d_cases),
    (("hypercleaning gd", "hypercleaning newton"), _hypercleaning_cases),
    (("weights fista", "weights newton", "weights-cleaning newton"), _weights_cases),
    (("tv-weight gd", "tv-weight newton"), _tv_weight_cases),
    (("tv2d gd", "tv2d newton"), _tv2d_cases),
    (("learned-filter fista",), _learned_filter_cases),
)


def cases(quick: bool, words=None):
    def wanted(name):
        return not words or any(word in name for word in words)

    for names, build in GROUPS:
        if any(wanted(name) for name in names):
            yield from (case for case in build(quick) if wanted(case[0]))


METHODS = ("er", "dwr", "tight")


def _row_text(row: dict) -> str:
    orc = row["oracle"]
    per_oracle = "".join(f"{row[m + '_work'] / orc:7.2f}" if orc else "      -" for m in METHODS)
    flags = "".join(f"  [{m}: {row[m + '_status']}]" for m in METHODS
                    if row[m + "_status"] != "ok")
    return (f"{row['case']:<20} {row['rtol']:6.0e} {orc or '-':>6} "
            + "".join(f"{row[m + '_work']:6d}" for m in METHODS) + per_oracle
            + f" {row['er_ratio']:8.3g} {row['dwr_ratio']:8.3g} {row['plain_ratio']:8.3g}"
            + f" {row['tight_ratio']:8.3g} {row['tight_err']:8.2g}"
            + f" {row['auto_cert']:>6} {row['auto_ratio']:8.3g}"
            + (f" {row['auto_work'] / orc:7.2f}" if orc else "       -") + flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cases", nargs="*", default=None,
                        help="only the cases whose name contains one of these words")
    args = parser.parse_args()
    rows = []
    print("work in units; b/err = bound / true error; err/tgt = tight's true error / target")
    print(f"{'case':<20} {'rtol':>6} {'oracle':>6} {'ER':>6}{'DWR':>6}{'tight':>6}"
          f"{'ER/o':>7}{'DWR/o':>7}{'tght/o':>7} {'ER b/e':>8} {'DWR b/e':>8} {'plain':>8}"
          f" {'tight':>8} {'err/tgt':>8} {'auto':>6} {'auto b/e':>8} {'auto/o':>7}")
    for name, k, theta, lower in cases(args.quick, args.cases):
        for row in run_case(name, k, theta, lower):
            rows.append(row)
            print(_row_text(row), flush=True)
    # medians over the rows where the method reached status "ok" (the target certified)
    for key, who in (("er_ratio", "er"), ("dwr_ratio", "dwr"), ("plain_ratio", "dwr"),
                     ("tight_ratio", "tight"), ("auto_ratio", "auto")):
        print(f"median {key}: "
              f"{np.median([r[key] for r in rows if r[who + '_status'] == 'ok']):.3g}")
    for who in (*METHODS, "auto"):
        ok = [r[who + "_work"] / r["oracle"] for r in rows
              if r["oracle"] and r[who + "_status"] == "ok"]
        print(f"median {who}_work/oracle: {np.median(ok):.3g}")


if __name__ == "__main__":
    main()
