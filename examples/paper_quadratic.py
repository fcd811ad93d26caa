"""Reproduce the quadratic experiment of the paper (docs/framework.md 10.1; Li, Gu & Huang 2022).

    python examples/paper_quadratic.py            # tables on stdout, PNGs in examples/figures/

g(x, theta) = ||C theta + D x - e||^2, f(x) = ||M x - b||^2, m1 = m2 = 1000, d = p = 10,
theta = (1, ..., 1), data from examples/quadratic.py:example_data(seed=0). Exact x* and the exact
hypergradient come from dense linear algebra (closed forms of 10.1); everything else goes through
codegen's solvers (`solve_lower`, `hypergradient`) exactly as a user would call them.

Runs
  (i)   ||x_k - x*|| of GD, HB, FISTA for k = 0..100 from x0 = 0, with the a posteriori bound
        ||grad g(x_k)||/mu and the a priori bound of docs/framework.md 5 (HB: C = 1, NOT rigorous);
  (ii)  hypergradient error of CG, GD, HB adjoints for 0..200 adjoint iterations from q0 = 0, with
        the a posteriori bound (docs/framework.md 7) and the a priori bound (docs/framework.md 6), at x_eps = x*
        and at x_eps from 20, 60, 100 HB iterations;
  (iii) budget 200 = N lower HB + (200 - N) adjoint iterations, N in {20, 40, 60, 80, 100}.

Every curve is produced by truncation: the solver is called with tolerance 0 and max_iter = k for
each k (the solvers are deterministic, so this is the k-th iterate of one long run). Two a priori
columns are printed: codegen's (rates of docs/framework.md 5: GD q^k ||r0||, CG 2 sqrt(kappa) q^k ||r0||,
HB q^k ||r0||, lower eps from the rate) and the authors' script form (GD (L/mu) q^k ||r0||, CG
2 kappa^(3/2) q^k ||r0||, HB (L/mu) q^k ||r0||, with the TRUE eps "for demonstration"), which is
what the paper's a priori numbers are.
"""
import math
import runpy
import sys
import time
from pathlib import Path

import numpy as np

try:
    import codegen
except ImportError:  # run from a checkout without installing: python examples/paper_quadratic.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import codegen
from codegen.hypergrad import hypergradient, solve_lower

HERE = Path(__file__).resolve().parent
FIG = HERE / "figures"

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # figures are optional
    plt = None

LOWER_ITERS = 100
ADJ_ITERS = 200
HB_LOWER = (20, 60, 100)
BUDGET = 200
BUDGET_N = (20, 40, 60, 80, 100)
ADJ = ("cg", "gd", "hb")
NAMES = {"gd": "GD", "hb": "HB", "fista": "FISTA", "cg": "CG"}


def setup(seed=0):
    example = runpy.run_path(str(HERE / "quadratic.py"))
    data = example["example_data"](seed=seed, m1=1000, m2=1000, d=10, p=10)
    prob = codegen.load(HERE / "quadratic.py").bind(**data)
    theta = np.ones(10)
    M, b, C, D, e = (data[key] for key in ("M", "b", "C", "D", "e"))
    Dp = np.linalg.pinv(D)
    x_star = Dp @ (e - C @ theta)
    grad_F = 2.0 * (M @ Dp @ C).T @ (b - M @ x_star)          # docs/framework.md 10.1 closed form
    # cross-check with -B^T A^{-1} grad f
    A, B, gf = 2 * D.T @ D, 2 * D.T @ C, 2 * M.T @ (M @ x_star - b)
    assert np.allclose(grad_F, -B.T @ np.linalg.solve(A, gf), rtol=1e-8)
    s = np.linalg.svd(D, compute_uv=False)
    exact = {"x_star": x_star, "grad_F": grad_F, "mu": 2 * s[-1] ** 2, "L": 2 * s[0] ** 2,
             "L_f": 2 * np.linalg.norm(M, 2) ** 2, "norm_B": np.linalg.norm(B, 2),
             "M": M, "b": b}
    return prob, theta, exact


def run_lower(prob, theta, exact):
    """(i): per k, true error, a posteriori G/mu, a priori (codegen's rate) for GD, HB, FISTA."""
    out = {}
    for solver in ("gd", "hb", "fista"):
        rows = []
        for k in range(LOWER_ITERS + 1):
            r = solve_lower(prob, theta, solver, tol=0.0, max_iter=k)
            assert r.iterations == k, (solver, k, r.status)
            rows.append((np.linalg.norm(r.x - exact["x_star"]), r.bound, r.apriori))
        out[solver] = np.array(rows)
    return out


def script_apriori(solver, k, r0, eps_true, c, norm_B_star):
    """The authors' script form of the a priori bound (docs/framework.md 5, 6; L_A = L_B = 0 here)."""
    kappa = c["L"] / c["mu"]
    q_gd = (kappa - 1) / (kappa + 1)
    q_hb = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    delta = {"gd": kappa * q_gd ** k, "hb": kappa * q_hb ** k,
             "cg": 2 * kappa ** 1.5 * q_hb ** k}[solver] * r0
    return norm_B_star / c["mu"] * delta + c["L_f"] * norm_B_star / c["mu"] * eps_true


def run_adjoint(prob, theta, exact, n_lower, adjoint, max_adj):
    """Hypergradient error for 0..max_adj adjoint iterations. n_lower None: x_eps = x* (CG lower
    solver warm-started at the dense x*, 0 iterations, so G is the round-off gradient at x*);
    otherwise n_lower HB iterations from 0."""
    if n_lower is None:
        kw = dict(lower="cg", x0=exact["x_star"], max_iter=0)
    else:
        kw = dict(lower="hb", max_iter=n_lower)
    rows, info = [], None
    for k in range(max_adj + 1):
        h = hypergradient(prob, theta, adjoint=adjoint, eps=0.0, delta=0.0,
                          adjoint_max_iter=k, **kw)
        assert h.adjoint.iterations == k and h.usable, (adjoint, k, h.status)
        eps_true = np.linalg.norm(h.x - exact["x_star"])
        rows.append((np.linalg.norm(h.grad - exact["grad_F"]), h.bound, h.apriori_bound,
                     script_apriori(adjoint, k, h.grad_f_norm, eps_true, h.constants,
                                    exact["norm_B"])))
        info = {"eps_true": eps_true, "e": h.e, "G": h.G, "norm_B": h.norm_B,
                "grad_f": h.grad_f_norm, "certified": h.certified,
                "apriori_rigorous": h.apriori_rigorous}
    return np.array(rows), info


def fmt(v):
    return f"{v:9.3g}"


def main():
    t0 = time.time()
    prob, theta, exact = setup()
    c = prob.constants(theta)
    print("Quadratic test problem (docs/framework.md 10.1): m1 = m2 = 1000, d = p = 10, seed 0, "
          "theta = ones")
    print(f"  codegen constants: mu = {c['mu']:.6g}, L = {c['L']:.6g}, kappa = "
          f"{c['L'] / c['mu']:.4g}, L_f = {c['L_f']:.6g}, L_A = {c['L_A']}, L_B = {c['L_B']}, "
          f"certified = {c['certified']}")
    print(f"  dense check:       mu = {exact['mu']:.6g}, L = {exact['L']:.6g}, "
          f"L_f = 2||M||^2 = {exact['L_f']:.6g}")
    print(f"  ||grad F(theta)|| = {np.linalg.norm(exact['grad_F']):.4g} (paper, legacy "
          "generator: 5.3e3), ||B||_2 = {:.4g}".format(exact["norm_B"]))

    # (i) lower level
    low = run_lower(prob, theta, exact)
    print("\n(i) lower-level error ||x_k - x*||: true / a posteriori G/mu / a priori "
          "(HB a priori: C = 1, not rigorous)")
    print(f"{'k':>4} " + " ".join(f"{NAMES[s] + ' ' + w:>9}" for s in low
                                  for w in ("true", "apost", "aprio")))
    for k in (0, 10, 20, 50, 60, 100):
        print(f"{k:4d} " + " ".join(fmt(v) for s in low for v in low[s][k]))
    print("  ratios at k = 50 (paper: FISTA apost ~1.03x, a priori ~70x; GD a priori tight, apost "
          "~15x; HB apost ~35x, HB a priori below the truth):")
    for s in low:
        t, ap, pr = low[s][50]
        print(f"    {NAMES[s]:5s} a posteriori / true = {ap / t:7.3g}   a priori / true = "
              f"{pr / t:7.3g}")

    # (ii) adjoint runs
    adj = {}
    infos = {}
    for n_lower in (None,) + HB_LOWER:
        for a in ADJ:
            adj[n_lower, a], infos[n_lower] = run_adjoint(prob, theta, exact, n_lower, a,
                                                          ADJ_ITERS)
    print("\n(ii) hypergradient error ||h - grad F||: true / a posteriori / a priori (codegen) / "
          "a priori (authors' script form, true eps)")
    for n_lower in (None,) + HB_LOWER:
        inf = infos[n_lower]
        lab = "x_eps = x* (exact)" if n_lower is None else f"x_eps from {n_lower} HB iterations"
        print(f"  {lab}: true eps = {inf['eps_true']:.3g}, G/mu = {inf['e']:.3g}, "
              f"||B(x_eps)||_F = {inf['norm_B']:.4g}, ||grad f(x_eps)|| = {inf['grad_f']:.4g}")
        print(f"  {'k':>4} {'adjoint':>7} {'true':>9} {'apost':>9} {'aprio':>9} {'aprio-ER':>9}")
        for k in (10, 11, 20, 50, 100, 200):
            for a in ADJ:
                print(f"  {k:4d} {NAMES[a]:>7} " + " ".join(fmt(v) for v in adj[n_lower, a][k]))
    holds = all(bool(np.all(d[:, 1] >= d[:, 0])) for d in adj.values()) and all(
        bool(np.all(low[s][:, 1] >= low[s][:, 0])) for s in low)
    print(f"  a posteriori bound >= true error at every lower and adjoint iterate: {holds}")
    print("  paper (x*): CG@10 true ~1e-11, apost 2e-9..3e-9, a priori 2.6e6; GD@100 17.7 / "
          "a priori 2.2e4 / apost 6.2e2; HB@50 1.8e-2 / a priori 0.26 / apost 0.64")
    print("  paper (20 HB): every adjoint floors at 54; apost 6.7e4, a priori (true eps) 2.0e3")

    # (iii) fixed budget
    print(f"\n(iii) budget {BUDGET} = N lower HB + ({BUDGET} - N) adjoint iterations: final "
          "error (a posteriori bound)")
    budget = {}
    print(f"{'N':>4} " + " ".join(f"{NAMES[a] + '-adjoint':>22}" for a in ADJ))
    for N in BUDGET_N:
        cells = []
        for a in ADJ:
            h = hypergradient(prob, theta, lower="hb", adjoint=a, eps=0.0, delta=0.0,
                              max_iter=N, adjoint_max_iter=BUDGET - N)
            err = np.linalg.norm(h.grad - exact["grad_F"])
            budget[N, a] = (err, h.bound)
            cells.append(f"{err:9.3g} ({h.bound:9.3g})")
        print(f"{N:4d} " + " ".join(f"{c_:>22}" for c_ in cells))
    print("  paper HB / CG: N=20 54 / 54; 40 0.12 / 0.12; 60 1.9e-4; 80 2.8e-7; "
          "100 1.1e-9 / 3.8e-10; GD best at N=40 (0.46), 17.7 at N=100")

    if plt is None:
        print("\nmatplotlib is not installed: figures skipped (pip install matplotlib)")
    else:
        plot(low, adj, infos, budget)
        print(f"\nfigures written to {FIG}/paper_quadratic_*.png")
    print(f"done in {time.time() - t0:.1f} s")


def plot(low, adj, infos, budget):
    FIG.mkdir(exist_ok=True)
    ks = np.arange(LOWER_ITERS + 1)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, s in zip(axes, low):
        ax.semilogy(ks, low[s][:, 0], "k-", label="true $\\|x_k - x^*\\|$")
        ax.semilogy(ks, low[s][:, 1], "b--", label="a posteriori $\\|\\nabla g\\|/\\mu$")
        ax.semilogy(ks, low[s][:, 2], "r:",
                    label="a priori" + (" (C = 1, not rigorous)" if s == "hb" else ""))
        ax.set_title(f"lower level: {NAMES[s]}")
        ax.set_xlabel("iteration k")
        ax.legend(fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("error")
    fig.tight_layout()
    fig.savefig(FIG / "paper_quadratic_lower.png", dpi=110)
    plt.close(fig)

    rows = (None,) + HB_LOWER
    ka = np.arange(ADJ_ITERS + 1)
    fig, axes = plt.subplots(len(rows), 3, figsize=(13, 3.1 * len(rows)), sharex=True)
    for i, n_lower in enumerate(rows):
        lab = "$x_\\varepsilon = x^*$" if n_lower is None else f"{n_lower} HB lower its"
        for j, a in enumerate(ADJ):
            ax = axes[i, j]
            d = adj[n_lower, a]
            ax.semilogy(ka, np.maximum(d[:, 0], 1e-300), "k-", label="true error")
            ax.semilogy(ka, d[:, 1], "b--", label="a posteriori")
            ax.semilogy(ka, d[:, 2], "r:", label="a priori (codegen)"
                        + (" [not rigorous]" if a == "hb" or n_lower else ""))
            ax.semilogy(ka, d[:, 3], "m-.", lw=0.8, label="a priori (script form, true eps)")
            ax.set_title(f"{NAMES[a]} adjoint, {lab}", fontsize=10)
            ax.grid(True, alpha=0.3)
            if i == len(rows) - 1:
                ax.set_xlabel("adjoint iteration")
            if j == 0:
                ax.set_ylabel("$\\|h - \\nabla F\\|$")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(FIG / "paper_quadratic_adjoint.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for a, style, col in zip(ADJ, ("o", "s", "^"), ("C0", "C2", "C3")):
        ax.semilogy(BUDGET_N, [budget[N, a][0] for N in BUDGET_N], style + "-", color=col,
                    label=f"{NAMES[a]} adjoint: true error")
        ax.semilogy(BUDGET_N, [budget[N, a][1] for N in BUDGET_N], style + "--", color=col,
                    alpha=0.45, mfc="none", label=f"{NAMES[a]} adjoint: a posteriori bound")
    ax.set_xlabel(f"N lower HB iterations (adjoint iterations = {BUDGET} - N)")
    ax.set_ylabel("final $\\|h - \\nabla F\\|$")
    ax.set_title(f"fixed budget of {BUDGET} iterations")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(FIG / "paper_quadratic_budget.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
