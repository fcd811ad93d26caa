"""Data hypercleaning at small scale (docs/framework.md 10.2; Yang, Ji & Liang 2021; E&R's grid).

    python examples/paper_hypercleaning.py            # about 3-4 min on 2 cores
    python examples/paper_hypercleaning.py --quick    # about 30 s (smaller m, budget, grid)

Problem examples/hypercleaning.py on scikit-learn's bundled 8x8 digits (example_data(source=
"digits")): pixels / 16 plus a bias column (n = 65), c = 10 classes, m training samples with 10% of
their labels corrupted to (y + U{1..9}) mod 10, mv clean validation samples, lambda = 1e-3 (mu =
0.002). One weight sigmoid(theta_j) per training sample, theta_0 = 0, W_0 = 0.

As in the paper: fixed-step gradient descent on theta (`prob.optimize(method="gd")`), eps and delta
fixed per run, the lower solve warm-started from the previous W, the adjoint cold (q_0 = 0), a
fixed budget of work units (lower gradients + Hessian-vector products). Grid: lower {GD, HB, FISTA}
x adjoint {GD, HB, CG} x (eps, delta) in {0.1, 0.01}^2 = 36 runs, two at a time (--jobs).

Scale against the paper: m = 500 (paper 20,000 MNIST images), mv = 500 (paper 5,000), budget
20,000 units (paper 100,000), step 100 (paper 10; tuned once on FISTA/CG at (0.1, 0.1): step 10
reaches 0.314 at the budget, 100 reaches 0.274, 1000 0.268; 100 keeps the runs budget-bound so the
solvers' costs show, as in the paper).

||B|| in the a posteriori bound: the library takes the Frobenius norm from p = m cross JVPs per
hypergradient (codegen.hypergrad.bounds.cross_norm) unless the problem object has a structural
`cross_norm_bound`; m JVPs each reading all of A cost O(m^2 n c), which dominates the wall time
here. This script supplies the exact closed form through that hook (B's column j is
sigmoid'(theta_j)/m (softmax(W a_j) - y_j) a_j^T, so ||B||_F^2 is one pass over A); it is checked
against the JVP value at start-up. --jvp-norm uses the library's default instead.

Reported: the final validation loss per run (table like docs/framework.md 10.2), the paper's two
findings checked on it, and the samples flagged as corrupted (sigmoid(theta_j) < 0.5) against the
truly corrupted ones (precision / recall). Figure: figures/paper_hypercleaning.png.
"""
import argparse
import itertools
import multiprocessing as mp
import re
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
from codegen.hypergrad import cross_norm

HERE = Path(__file__).resolve().parent
FIG = HERE / "figures"
LOWERS = ("gd", "hb", "fista")
ADJOINTS = ("gd", "hb", "cg")
TOLS = ((0.1, 0.01), (0.1, 0.1), (0.01, 0.01), (0.01, 0.1))   # (eps, delta), the paper's rows
NAMES = {"gd": "GD", "hb": "HB", "fista": "FISTA", "cg": "CG"}
# The paper's final objective after 100k work (docs/framework.md 10.2), lower/adjoint -> row.
PAPER = {("gd", "cg"): (.5254, .5142, .5641, .5637), ("gd", "hb"): (.5539, .5332, .5652, .5643),
         ("hb", "cg"): (.4413, None, .4737, .4548), ("hb", "hb"): (.5415, .4976, .5429, .5144),
         ("fista", "cg"): (.4784, .4553, .5242, .5201),
         ("fista", "hb"): (.5441, .5161, .5493, .5430)}


def load_data(seed, m, mv):
    """The data dict and the boolean mask of truly corrupted training samples."""
    ex = runpy.run_path(str(HERE / "hypercleaning.py"))
    data = ex["example_data"](seed=seed, source="digits", m=m, mv=mv)
    # example_data's first draw is the permutation of the digits; redo it for the clean labels.
    from sklearn.datasets import load_digits
    labels = load_digits().target
    order = np.random.default_rng(seed).permutation(labels.size)[: m + mv]
    corrupted = data["Y"].argmax(axis=1) != labels[order[:m]]
    assert corrupted.sum() == int(0.1 * m), corrupted.sum()
    return data, corrupted


def structural_norm_B(A, Y):
    """||B(W, theta)||_F in closed form, B = d/dtheta grad_W g (an upper bound on ||B||_2)."""
    m, c, n = A.shape[0], Y.shape[1], A.shape[1]
    norm_a = np.linalg.norm(A, axis=1)

    def bound(x, theta):
        W = np.asarray(x, dtype=float).reshape(c, n)
        z = A @ W.T
        z -= z.max(axis=1, keepdims=True)
        P = np.exp(z)
        P /= P.sum(axis=1, keepdims=True)
        s = 1.0 / (1.0 + np.exp(-np.asarray(theta, dtype=float)))
        col = s * (1.0 - s) / m * np.linalg.norm(P - Y, axis=1) * norm_a
        return float(np.sqrt(col @ col)) * (1.0 + 1e-12)     # margin for rounding
    return bound


_STATE = {}


def _init(seed, m, mv, jvp_norm):
    data, corrupted = load_data(seed, m, mv)
    prob = codegen.load(HERE / "hypercleaning.py").bind(**data)
    if not jvp_norm:
        prob.cross_norm_bound = structural_norm_B(data["A"], data["Y"])
    _STATE.update(prob=prob, corrupted=corrupted)


def run_one(args):
    lower, adjoint, eps, delta, budget, step = args
    prob, corrupted = _STATE["prob"], _STATE["corrupted"]
    t0 = time.time()
    res = prob.optimize(0.0, method="gd", budget=budget, lower=lower, adjoint=adjoint,
                        eps0=eps, delta0=delta, step=step, progress=False, record_theta=True,
                        max_iter=10 ** 6)
    last = res.history[-1]
    theta = np.asarray(last["theta"])
    flagged = theta < 0.0                                    # sigmoid(theta_j) < 1/2
    tp = int(np.sum(flagged & corrupted))
    curve = [(e["work"], e["value"]) for e in res.history]
    return {"lower": lower, "adjoint": adjoint, "eps": eps, "delta": delta,
            "final": last["value"], "initial": res.history[0]["value"], "steps": len(res.history),
            "work": res.work, "status": res.status, "flagged": int(flagged.sum()), "tp": tp,
            "precision": tp / max(int(flagged.sum()), 1), "recall": tp / int(corrupted.sum()),
            "seconds": time.time() - t0, "curve": curve, "notes": res.notes}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="m = 200, budget 4000, CG/HB/GD "
                    "adjoints with FISTA and GD lower only (about 30 s)")
    ap.add_argument("--m", type=int, default=None, help="training samples (default 500)")
    ap.add_argument("--mv", type=int, default=500, help="validation samples (default 500)")
    ap.add_argument("--budget", type=float, default=None, help="work units (default 20000)")
    ap.add_argument("--step", type=float, default=100.0, help="upper GD step (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--jvp-norm", action="store_true",
                    help="||B|| from m cross JVPs (the library default; slow)")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    m = a.m or (200 if a.quick else 500)
    budget = a.budget or (4000 if a.quick else 20000)
    lowers = ("gd", "fista") if a.quick else LOWERS
    t0 = time.time()

    # check the structural ||B|| against the library's JVP Frobenius norm at a random point
    _init(a.seed, m, a.mv, a.jvp_norm)
    prob, corrupted = _STATE["prob"], _STATE["corrupted"]
    rng = np.random.default_rng(1)
    th = rng.standard_normal(m)
    x = 0.01 * rng.standard_normal(prob.x_size if hasattr(prob, "x_size") else 650)
    if not a.jvp_norm:
        jvp, _ = cross_norm(type("K", (), {"cross_jvp": prob.cross_jvp})(), x, th)
        ours = prob.cross_norm_bound(x, th)
        assert abs(ours - jvp) <= 1e-10 * jvp, (ours, jvp)
        print(f"||B||_F closed form {ours:.12g} = {m} cross JVPs {jvp:.12g}")
    print(f"hypercleaning on digits: m = {m} (corrupted {corrupted.sum()}), mv = {a.mv}, "
          f"budget {budget:g} units, upper GD step {a.step:g}, {a.jobs} processes")

    tasks = [(lo, ad, eps, delta, budget, a.step) for (eps, delta) in TOLS
             for lo, ad in itertools.product(lowers, ADJOINTS)]
    ctx = mp.get_context("fork")
    with ctx.Pool(a.jobs, initializer=_init, initargs=(a.seed, m, a.mv, a.jvp_norm)) as pool:
        results = pool.map(run_one, tasks, chunksize=1)
    R = {(r["lower"], r["adjoint"], r["eps"], r["delta"]): r for r in results}
    print(f"initial validation loss {results[0]['initial']:.4f} (paper, MNIST: 0.5689)\n")

    pairs = list(itertools.product(lowers, ADJOINTS))
    print("final validation loss (lower/adjoint); paper's value in brackets where it has one")
    print(f"{'eps, delta':>11} " + " ".join(f"{NAMES[lo] + '/' + NAMES[ad]:>15}"
                                           for lo, ad in pairs))
    for ti, (eps, delta) in enumerate(TOLS):
        cells = []
        for lo, ad in pairs:
            p = PAPER.get((lo, ad), (None,) * 4)[ti]
            cells.append(f"{R[lo, ad, eps, delta]['final']:.4f}"
                         + (f" [{p:.4f}]" if p is not None else " " * 9))
        print(f"{eps:>5g}, {delta:<4g} " + " ".join(f"{c:>15}" for c in cells))
    print("\nupper steps taken in the budget")
    print(f"{'eps, delta':>11} " + " ".join(f"{NAMES[lo] + '/' + NAMES[ad]:>15}"
                                           for lo, ad in pairs))
    for eps, delta in TOLS:
        print(f"{eps:>5g}, {delta:<4g} " + " ".join(f"{R[lo, ad, eps, delta]['steps']:>15d}"
                                                  for lo, ad in pairs))

    # the paper's findings
    print("\nfinding 1: adjoint CG better than HB better than GD (median final loss over the "
          "lower solvers and tolerances)")
    med = {ad: float(np.median([R[lo, ad, e, d]["final"] for lo in lowers for e, d in TOLS]))
           for ad in ADJOINTS}
    print("  " + ", ".join(f"{NAMES[ad]} {med[ad]:.4f}" for ad in ADJOINTS)
          + "   (paper: CG 0.514 < HB 0.543 < GD 0.568)")
    order_ok = sum(R[lo, "cg", e, d]["final"] <= R[lo, "hb", e, d]["final"]
                   <= R[lo, "gd", e, d]["final"] for lo in lowers for e, d in TOLS)
    print(f"  CG <= HB <= GD in {order_ok} of {len(lowers) * len(TOLS)} (lower, eps, delta) "
          "cells")
    print("finding 2: looser tolerances better at fixed work")
    n_eps = sum(R[lo, ad, 0.1, d]["final"] <= R[lo, ad, 0.01, d]["final"]
                for lo, ad in pairs for d in (0.1, 0.01))
    n_del = sum(R[lo, ad, e, 0.1]["final"] <= R[lo, ad, e, 0.01]["final"]
                for lo, ad in pairs for e in (0.1, 0.01))
    n_pairs = len(pairs) * 2
    print(f"  eps 0.1 beats 0.01 in {n_eps} of {n_pairs}; delta 0.1 beats 0.01 in {n_del} of "
          f"{n_pairs} (paper: every CG and HB pairing, both)")

    print(f"\ncorrupted-sample detection (flagged = sigmoid(theta_j) < 0.5; {corrupted.sum()} "
          "truly corrupted): flagged / precision / recall")
    print(f"{'eps, delta':>11} " + " ".join(f"{NAMES[lo] + '/' + NAMES[ad]:>15}"
                                           for lo, ad in pairs))
    for eps, delta in TOLS:
        print(f"{eps:>5g}, {delta:<4g} " + " ".join(
            f"{r['flagged']:>4d} {r['precision']:.2f} {r['recall']:.2f}"
            for r in (R[lo, ad, eps, delta] for lo, ad in pairs)))
    kinds = {}
    for r in results:
        for note in r["notes"]:                              # one line per kind of note
            kinds.setdefault(re.split(r"[(:]", note)[0].strip(), set()).add(
                f"{NAMES[r['lower']]}/{NAMES[r['adjoint']]}")
    for kind, runs in sorted(kinds.items()):
        print(f"note '{kind}' in runs {', '.join(sorted(runs))}")
    if not a.no_plot:
        plot(R, lowers, m, budget, a.step)
    print(f"done in {time.time() - t0:.1f} s")


def plot(R, lowers, m, budget, step):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: figure skipped")
        return
    FIG.mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, len(TOLS), figsize=(4.2 * len(TOLS), 3.8), sharey=True)
    colors = {"cg": "C0", "hb": "C2", "gd": "C3"}
    styles = {"gd": ":", "hb": "--", "fista": "-"}
    for ax, (eps, delta) in zip(axes, TOLS):
        for lo in lowers:
            for ad in ADJOINTS:
                w, v = zip(*R[lo, ad, eps, delta]["curve"])
                ax.plot(w, v, styles[lo], color=colors[ad], lw=1.2,
                        label=f"{NAMES[lo]}/{NAMES[ad]}")
        ax.set_title(f"eps = {eps:g}, delta = {delta:g}", fontsize=10)
        ax.set_xlabel("work (lower gradients + HVPs)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("validation loss f(x_eps)")
    axes[0].legend(fontsize=7, title="lower/adjoint", title_fontsize=7)
    fig.suptitle(f"hypercleaning, digits, m = {m}: upper GD step {step:g}, budget {budget:g}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(FIG / "paper_hypercleaning.png", dpi=100)
    plt.close(fig)
    print(f"figure written to {FIG / 'paper_hypercleaning.png'}")


if __name__ == "__main__":
    sys.exit(main())
