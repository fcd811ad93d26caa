"""Upper-level methods compared at equal work: the default certified L-BFGS, MAID, fixed-step GD,
HOAG-style schedules, SciPy's L-BFGS-B.

    python examples/compare_upper.py            # about 1-2 min
    python examples/compare_upper.py --quick    # about 20 s (budgets / 4)

Problems (examples/*.py, example_data(seed=0) unless said): ridge (theta = log alpha), logistic
(theta = log alpha), tv1d (theta = (log alpha, log nu), the 10 training signals of
paper_denoising.py through bind_samples). Every method starts at the problem's THETA0 and uses the
solvers "auto" chooses; the budget is in work units (lower gradients + HVPs, all samples).

  lbfgs     prob.optimize() with the library's defaults (certified L-BFGS; stops by its own rule,
            usually long before the budget);
  maid      prob.optimize(method="maid"), the library's defaults (eps0 = delta0 = 0.1, s0 = 0.1);
  gd        fixed step, fixed eps = delta = 1e-3 (E&R's experiments);
  gd-exp    fixed step, HOAG exponential schedule eps_k = delta_k = 0.1 * 0.9^k;
  gd-quad   fixed step, HOAG quadratic schedule eps_k = delta_k = 0.1 / (k + 1)^2;
  lbfgsb    prob.optimize(method="lbfgsb") (certified accuracy control, SciPy's line search).

The GD step is one per problem for all three GD variants, chosen once by a sweep of fixed-step GD
over {0.01, 0.1, 1, 10, 100} at the same budget: the smallest step whose true F is within 1e-6
(relative) of the sweep's best (python examples/compare_upper.py --sweep redoes it).

The values the methods see are inexact (f(x_eps)); the table and the figure use the TRUE objective
F(theta) at every recorded theta, by a tight lower solve (G/mu <= 1e-10, not counted as work).
F* is the best true value found by any method; "work to 1e-4" is the work at which a method's true
objective first came within 1e-4 * |F*| (relative) of F*, "-" if never.
Figure: figures/compare_upper.png (F - F* against work, log scale).
"""
import argparse
import math
import runpy
import sys
import time
from pathlib import Path

import numpy as np

try:
    import codegen
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import codegen
from codegen.hypergrad import solve_lower

HERE = Path(__file__).resolve().parent
FIG = HERE / "figures"
# problem -> (budget, GD step chosen by the sweep in --sweep)
PROBLEMS = {"ridge": (3000, 10.0), "logistic": (10000, 10.0), "tv1d": (60000, 1.0)}
METHODS = {
    "lbfgs": dict(method="lbfgs"),
    "maid": dict(method="maid"),
    "gd": dict(method="gd", eps0=1e-3, delta0=1e-3),
    "gd-exp": dict(method="gd", eps0=0.1, delta0=0.1, schedule="exponential"),
    "gd-quad": dict(method="gd", eps0=0.1, delta0=0.1, schedule="quadratic"),
    "lbfgsb": dict(method="lbfgsb"),
}
REL = 1e-4


def setup(name):
    ex = runpy.run_path(str(HERE / f"{name}.py"))
    mod = codegen.load(HERE / f"{name}.py")
    if name == "tv1d":
        prob = mod.bind_samples([ex["example_data"](seed=s) for s in range(10)])
    else:
        prob = mod.bind(**ex["example_data"](seed=0))
    return prob, ex["THETA0"]


def true_value(prob, theta):
    ks = list(prob.samples) if hasattr(prob, "samples") else [prob]
    vals = []
    for k in ks:
        r = solve_lower(k, theta, solver="fista", tol=1e-10, max_iter=200000)
        if not r.bound <= 1e-10:                            # e.g. nu -> 0: not certifiable
            return math.nan
        vals.append(float(k.upper_value(r.x, theta)))
    return float(np.mean(vals))


def true_curve(prob, history, max_points=150):
    """(work, true F) at the recorded thetas; at most max_points evaluated (evenly by index,
    always the last), the rest skipped."""
    idx = sorted(set(np.linspace(0, len(history) - 1, min(max_points, len(history)))
                     .round().astype(int)))
    pts = [(history[i]["work"], true_value(prob, np.asarray(history[i]["theta"]))) for i in idx]
    return [(w, v) for w, v in pts if math.isfinite(v)]


def sweep(prob, theta0, budget):
    out = {}
    for step in (0.01, 0.1, 1.0, 10.0, 100.0):
        r = prob.optimize(theta0, budget=budget, step=step, progress=False, max_iter=10 ** 6,
                          **METHODS["gd"])
        th = np.asarray(r.history[-1]["theta"])
        v = true_value(prob, th) if np.all(np.isfinite(th)) else math.nan
        out[step] = v if math.isfinite(v) else math.inf
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="budgets / 4")
    ap.add_argument("--sweep", action="store_true", help="redo the GD step sweep and use it")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.time()
    results = {}
    for name, (budget, step) in PROBLEMS.items():
        if a.quick:
            budget //= 4
        prob, theta0 = setup(name)
        if a.sweep:
            sw = sweep(prob, theta0, budget)
            best = min(sw.values())                        # the smallest step within 1e-6
            step = min(s for s, v in sw.items() if v <= best + 1e-6 * abs(best))
            print(f"{name}: GD step sweep (true F at the budget): "
                  + ", ".join(f"{s:g}: {v:.6g}" for s, v in sw.items()) + f" -> step {step:g}")
        for meth, kw in METHODS.items():
            ts = time.time()
            step_kw = {"step": step} if kw["method"] == "gd" else {}
            r = prob.optimize(theta0, budget=budget, progress=False, max_iter=10 ** 6,
                              **step_kw, **kw)
            curve = true_curve(prob, r.history)
            results[name, meth] = {"res": r, "curve": curve, "step": step, "budget": budget,
                                   "seconds": time.time() - ts}
    print(f"\nfinal TRUE upper objective F(theta) (tight lower solve), work to come within "
          f"{REL:g} (relative) of F* = the best found, and status")
    print("| problem | budget | GD step | method | final F | F - F* | work to 1e-4 | steps | "
          "status |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in PROBLEMS:
        Fstar = min(min(v for _, v in results[name, m]["curve"]) for m in METHODS)
        for meth in METHODS:
            R = results[name, meth]
            r, curve = R["res"], R["curve"]
            final = curve[-1][1]
            hit = next((w for w, v in curve if v - Fstar <= REL * abs(Fstar)), None)
            R["Fstar"] = Fstar
            print(f"| {name} | {R['budget']} | {R['step']:g} | {meth} | {final:.8g} | "
                  f"{final - Fstar:.2e} | {hit if hit is not None else '-'} | "
                  f"{len(r.history)} | {r.status} |")
    print("\nfinal theta per method:")
    for (name, meth), R in results.items():
        th = np.asarray(R["res"].history[-1]["theta"])
        print(f"  {name:8s} {meth:8s} theta = {np.array2string(th, precision=4)}  "
              f"({R['seconds']:.1f} s)")
    if not a.no_plot:
        plot(results)
    print(f"done in {time.time() - t0:.1f} s")


def plot(results):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: figure skipped")
        return
    FIG.mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, len(PROBLEMS), figsize=(4.6 * len(PROBLEMS), 3.9))
    styles = {"lbfgs": "C5-", "maid": "C0-", "gd": "C3:", "gd-exp": "C2--", "gd-quad": "C1-.", "lbfgsb": "C4-"}
    for ax, name in zip(axes, PROBLEMS):
        for meth in METHODS:
            R = results[name, meth]
            w, v = zip(*R["curve"])
            gap = np.maximum(np.array(v) - R["Fstar"], 1e-16 * max(abs(R["Fstar"]), 1))
            ax.semilogy(w, gap, styles[meth], marker=".", ms=3, lw=1.2, label=meth)
        ax.set_title(f"{name} (GD step {results[name, 'gd']['step']:g})", fontsize=10)
        ax.set_xlabel("work (lower gradients + HVPs)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("F(theta) - F*  (true objective)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(FIG / "compare_upper.png", dpi=100)
    plt.close(fig)
    print(f"figure written to {FIG / 'compare_upper.png'}")


if __name__ == "__main__":
    sys.exit(main())
