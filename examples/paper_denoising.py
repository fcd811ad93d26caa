"""Learned smoothed-TV regulariser for 1-D denoising against tuned TV (docs/framework.md 10.3, small).

    python examples/paper_denoising.py            # about 15 s
    python examples/paper_denoising.py --quick    # about 5 s

Signals: examples/tv1d.py:example_data, 64 pixels, piecewise linear (4 segments), noise std 0.2
(x max(mean|signal|, 1)); 10 training signals (seeds 0..9) and 10 test signals (seeds 100..109).

Learned: examples/tv1d.py, g(x) = 1/2||x - y||^2 + alpha sum_i sqrt((x[i+1] - x[i])^2 + nu^2),
theta = (log alpha, log nu), upper = mean over the training signals of 1/2||x_i(theta) - x_i^true||^2
(`bind_samples`), learned with MAID (`prob.optimize(method="maid")`, FISTA lower, CG adjoint, the
library's defaults eps0 = delta0 = 0.1, s0 = 0.1) from tv1d.THETA0 (alpha = 0.1, nu = 0.05).
The paper learns an 8-parameter convex regulariser (two 3-tap kernels, E&R's icnn_regularizer);
this is the 2-parameter smoothed-TV member of that family.

Baseline: total variation, min_x 1/2||x - y||^2 + alpha TV(x), solved exactly per signal through its
dual min_{|p|_inf <= alpha} 1/2||y - D^T p||^2, x = y - D^T p (bounded least squares, SciPy's BVLS;
the duality gap is printed), alpha tuned on the training loss by a grid over
log10 alpha in [-3, 1] (81 points) refined by a second grid around the best (41 points).
(The paper tunes alpha by DFO-LS over [-5, 3] with PDHG.)

Losses are the upper objective: mean over signals of 1/2 sum_i (x_i - x_i^true)^2. The paper's
loss ||x - x^true||^2 in the discretised L2([0,1]) norm is this / 32 (printed too; the data
generators differ in detail, so only the comparison within each column is meaningful).
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
TRAIN_SEEDS = tuple(range(10))
TEST_SEEDS = tuple(range(100, 110))


def loss(X, Xt):
    """Mean over signals of 1/2 ||x - x_true||^2 (X, Xt: (..., signals, n))."""
    return 0.5 * np.sum((X - Xt) ** 2, axis=-1).mean(axis=-1)


def tv_denoise(Y, alphas):
    """Exact 1-D TV denoising for every (alpha, signal): returns X (len(alphas), signals, n) and
    the largest duality gap. The dual min_{|p|_inf <= alpha} 1/2||y - D^T p||^2 (x = y - D^T p,
    (D x)_i = x_{i+1} - x_i) is a bounded least-squares problem, solved by SciPy's BVLS."""
    from scipy.optimize import lsq_linear

    Y = np.atleast_2d(Y)
    n = Y.shape[-1]
    D = np.diff(np.eye(n), axis=0)                           # (n - 1, n)
    X = np.empty((len(alphas),) + Y.shape)
    gap = 0.0
    for a, alpha in enumerate(alphas):
        for s, y in enumerate(Y):
            r = lsq_linear(D.T, y, bounds=(-alpha, alpha), method="bvls", tol=1e-14)
            x = y - D.T @ r.x
            primal = 0.5 * np.sum((x - y) ** 2) + alpha * np.abs(D @ x).sum()
            dual = 0.5 * y @ y - 0.5 * np.sum((y - D.T @ r.x) ** 2)
            gap = max(gap, primal - dual)
            X[a, s] = x
    return X, gap


def tune_tv(Ytr, Xtr, coarse=81, fine=41):
    la = np.linspace(-3, 1, coarse)
    X, gap1 = tv_denoise(Ytr, 10 ** la)
    L = loss(X, Xtr)
    b = int(np.argmin(L))
    lo, hi = la[max(b - 1, 0)], la[min(b + 1, coarse - 1)]
    la2 = np.linspace(lo, hi, fine)
    X2, gap2 = tv_denoise(Ytr, 10 ** la2)
    L2 = loss(X2, Xtr)
    b2 = int(np.argmin(L2))
    return 10 ** la2[b2], (10 ** la, L), max(gap1, gap2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="budget 5000 units (about 5 s)")
    ap.add_argument("--budget", type=float, default=None,
                    help="MAID work units over all 10 signals (default 60000)")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    budget = a.budget or (5000 if a.quick else 60000)
    t0 = time.time()
    ex = runpy.run_path(str(HERE / "tv1d.py"))
    mod = codegen.load(HERE / "tv1d.py")
    train = [ex["example_data"](seed=s) for s in TRAIN_SEEDS]
    test = [ex["example_data"](seed=s) for s in TEST_SEEDS]
    Ytr, Xtr = np.array([d["y"] for d in train]), np.array([d["xt"] for d in train])
    Yte, Xte = np.array([d["y"] for d in test]), np.array([d["xt"] for d in test])
    print(f"1-D denoising: n = 64, {len(train)} training / {len(test)} test signals; "
          f"noisy input loss train {loss(Ytr, Xtr):.4f}, test {loss(Yte, Xte):.4f}")

    # learned smoothed TV: MAID on the mean training loss
    prob_tr = mod.bind_samples(train)
    theta0 = ex["THETA0"]
    res = prob_tr.optimize(theta0, method="maid", budget=budget, lower="fista", adjoint="cg",
                           progress=False)
    th = np.asarray(res.theta)
    last = [e for e in res.history if math.isfinite(e["grad_norm"])][-1]
    print(f"MAID: status {res.status} ({res.message}), {res.iterations} accepted steps, "
          f"work {res.work}, {res.seconds:.1f} s")
    print(f"  theta = (log alpha, log nu) = ({th[0]:.4f}, {th[1]:.4f}): alpha = "
          f"{math.exp(th[0]):.5g}, nu = {math.exp(th[1]):.4g}; last hypergradient ||h|| = "
          f"{last['grad_norm']:.3g}, bound {last['bound']:.3g}")

    def solve_all(data, theta, tol=1e-10):                    # tight lower solves at theta
        out = []
        for d in data:
            r = solve_lower(mod.bind(**d), theta, solver="fista", tol=tol, max_iter=10 ** 6)
            assert r.bound <= tol, r.status
            out.append(r.x)
        return np.array(out)

    Ltr_learn = loss(solve_all(train, th), Xtr)
    Lte_learn = loss(solve_all(test, th), Xte)
    L0_tr = loss(solve_all(train, np.array(theta0)), Xtr)

    # TV baseline
    alpha_tv, (grid_a, grid_L), gap = tune_tv(Ytr, Xtr)
    Xtv_tr, g1 = tv_denoise(Ytr, [alpha_tv])
    Xtv_te, g2 = tv_denoise(Yte, [alpha_tv])
    Ltr_tv, Lte_tv = float(loss(Xtv_tr, Xtr)[0]), float(loss(Xtv_te, Xte)[0])
    print(f"TV: alpha* = {alpha_tv:.5g} (grid over log10 alpha in [-3, 1] + refinement; largest "
          f"duality gap {max(gap, g1, g2):.1e})")
    # consistency: the smoothed problem with tiny nu at alpha* agrees with the TV solution
    Xs = solve_all(train, np.array([math.log(alpha_tv), math.log(1e-4)]), tol=1e-8)
    print(f"  check: smoothed TV with nu = 1e-4 (hypergen FISTA) vs exact TV at alpha*: "
          f"max |x difference| = {np.abs(Xs - Xtv_tr[0]).max():.2e}")

    print("\n| method | parameters | train loss | test loss | train / 32 | test / 32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| noisy input | - | {loss(Ytr, Xtr):.4f} | {loss(Yte, Xte):.4f} | "
          f"{loss(Ytr, Xtr) / 32:.4f} | {loss(Yte, Xte) / 32:.4f} |")
    print(f"| smoothed TV, theta0 | alpha = 0.1, nu = 0.05 | {L0_tr:.4f} | - | "
          f"{L0_tr / 32:.4f} | - |")
    print(f"| TV, alpha tuned by grid | alpha = {alpha_tv:.4g} | {Ltr_tv:.4f} | {Lte_tv:.4f} | "
          f"{Ltr_tv / 32:.4f} | {Lte_tv / 32:.4f} |")
    print(f"| smoothed TV learned (MAID) | alpha = {math.exp(th[0]):.4g}, nu = "
          f"{math.exp(th[1]):.3g} | {Ltr_learn:.4f} | {Lte_learn:.4f} | {Ltr_learn / 32:.4f} | "
          f"{Lte_learn / 32:.4f} |")
    print("paper (8-parameter convex regulariser, its own units): learned tol 1e-2 train 0.0567 / "
          "test 0.0552; TV alpha* = 0.02597 train 0.0601 / test 0.0558")

    if not a.no_plot:
        plot(res, grid_a, grid_L, alpha_tv, Ltr_tv, Ltr_learn, Xtr, Ytr, Xtv_tr[0],
             solve_all(train, th))
    print(f"done in {time.time() - t0:.1f} s")


def plot(res, grid_a, grid_L, alpha_tv, Ltr_tv, Ltr_learn, Xtr, Ytr, Xtv, Xlearn):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: figure skipped")
        return
    FIG.mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    w = [e["work"] for e in res.history]
    v = [e["value"] for e in res.history]
    axes[0].plot(w, v, ".-", label="MAID, learned smoothed TV")
    axes[0].axhline(Ltr_tv, color="k", ls="--", label=f"TV, tuned alpha = {alpha_tv:.3g}")
    axes[0].set_xlabel("work (lower gradients + HVPs, all 10 signals)")
    axes[0].set_ylabel("mean training loss")
    axes[0].legend(fontsize=8)
    axes[0].grid(True, alpha=0.3)
    axes[0].set_title("upper objective against work")
    axes[1].semilogx(grid_a, grid_L, "k-")
    axes[1].axvline(alpha_tv, color="k", ls=":")
    axes[1].set_xlabel("TV weight alpha")
    axes[1].set_ylabel("mean training loss")
    axes[1].set_title("TV baseline: grid search")
    axes[1].grid(True, alpha=0.3)
    t = (np.arange(Xtr.shape[1]) + 0.5) / Xtr.shape[1]
    axes[2].plot(t, Ytr[0], ".", color="0.6", ms=4, label="noisy")
    axes[2].plot(t, Xtr[0], "k-", lw=1.5, label="clean")
    axes[2].plot(t, Xtv[0], "C3--", label="TV")
    axes[2].plot(t, Xlearn[0], "C0-", label="learned smoothed TV")
    axes[2].set_title("training signal 0")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(FIG / "paper_denoising.png", dpi=100)
    plt.close(fig)
    print(f"figure written to {FIG / 'paper_denoising.png'}")


if __name__ == "__main__":
    sys.exit(main())
