"""The DWR certificate on paper-scale data hypercleaning (docs/bounds.md 15.3, B not affine in x).

    python benchmarks/bench_hypercleaning.py                  # m = 20000, c = 10, n = 785
    python benchmarks/bench_hypercleaning.py --m 2000         # smaller, same shape otherwise

examples/hypercleaning.py with one weight sigmoid(theta_i) per training sample, lambda = 1e-3
(mu = 0.002), theta = 0, on SYNTHETIC data of MNIST's shape (MNIST is not available offline):
784 pixels in [0, 1] plus a bias column, c = 10 classes, each class a template of about 150 lit
pixels, samples the template with 30% of its pixels dropped and noise on the lit ones (mean
||a_i||^2 about 80, MNIST's is about 100), 10% of the training labels corrupted, mv = m/4 clean
validation samples. theta has m entries, above MAX_COMPONENTS: the certificate is the component
along u = h/||h|| (`components=False`, one forward and one dual solve; what a descent test reads,
docs/bounds.md 15.4). The vector bound: E&R's, and the block correction's (every component from
two solves, docs/bounds.md 15.8).

Reported, all in one process (time ratios only between runs of this process):
* reference: the plain hypergradient at eps = delta = 1e-11, whose E&R bound (certified)
  says how far every "true error" below may be off;
* certified: hypergradient(theta, lower="newton", adjoint="cg", rtol=r, certificate="dwr",
  components=False): directional bound / ||h||, bound / true error of u . h_c, time, work;
  E&R's vector bound / ||h|| of the same run;
* block: hypergradient(theta, lower="newton", adjoint="cg", rtol=r, certificate="block"): the
  vector bound / ||h||, bound / ||h - grad F||, time, work;
* E&R's vector certificate at rtol (default 0.1): bound / ||h||, bound / ||h - grad F||, time;
* uncertified: the plain hypergradient with eps = delta = tol down a ladder (factor 4), stopped
  at the first tol whose true error along its own h (what it would report) is at most the
  certified run's true error of u . h_c (of the vector, for E&R's rows; an oracle: it reads
  the reference): time and work. A true error below the reference's certified error is not
  resolved: the ratio is then given as a lower bound, bound / (error + reference's error).
"""
import argparse
import runpy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from codegen import Problem  # noqa: E402
from codegen.hypergrad import hypergradient  # noqa: E402
from codegen.pipeline import build_problem  # noqa: E402

#: The reference's tolerances: Newton and CG to these, E&R's bound certifies its error.
REF_TOL = 1e-11


def mnist_shaped(m: int, mv: int, c: int = 10, pixels: int = 784, seed: int = 0,
                 lam: float = 1e-3) -> dict:
    """Synthetic data of MNIST's shape and scale (see the module docstring)."""
    rng = np.random.default_rng(seed)
    lit = rng.random((c, pixels)) < 0.19
    templates = lit * rng.uniform(0.5, 1.0, (c, pixels))
    labels = rng.integers(0, c, size=m + mv)
    keep = rng.random((m + mv, pixels)) > 0.3
    feats = templates[labels] * keep
    feats = np.clip(feats + 0.15 * rng.standard_normal(feats.shape) * (feats > 0), 0.0, 1.0)
    feats = np.hstack([feats, np.ones((m + mv, 1))])
    noisy = labels[:m].copy()
    bad = rng.choice(m, size=m // 10, replace=False)
    noisy[bad] = (noisy[bad] + rng.integers(1, c, size=bad.size)) % c
    onehot = np.eye(c)
    return {"A": feats[:m], "Y": onehot[noisy], "Av": feats[m:], "Yv": onehot[labels[m:]],
            "lam": np.float64(lam)}


def bind(m: int, seed: int):
    ns = runpy.run_path(str(ROOT / "examples" / "hypercleaning.py"))
    problem = next(v for v in ns.values() if isinstance(v, Problem))
    module = build_problem(problem, tempfile.mkdtemp(prefix="bench_hc_"))
    return module.bind(**mnist_shaped(m, m // 4, seed=seed))


def _timed(prob, theta, **options):
    start = time.perf_counter()
    hg = hypergradient(prob, theta, lower="newton", adjoint="cg", components=False, **options)
    return hg, time.perf_counter() - start


def _units(hg) -> int:
    return int(hg.work.get("units", 0)) + int(hg.work.get("cross", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtols", type=float, nargs="*", default=[1e-1, 1e-2, 1e-3],
                        help="rtol of the DWR certificate along h")
    parser.add_argument("--er-rtols", type=float, nargs="*", default=[1e-1, 1e-2],
                        help="rtol of E&R's vector certificate")
    parser.add_argument("--block-rtols", type=float, nargs="*", default=[1e-1, 1e-2, 1e-3],
                        help="rtol of the block certificate (every component, two solves)")
    args = parser.parse_args()
    prob = bind(args.m, args.seed)
    theta = np.zeros(prob.theta_size)
    c = prob.constants(theta)
    print(f"m={args.m} c=10 n=785 (synthetic, MNIST-shaped): x has {prob.x_size} entries, "
          f"theta {prob.theta_size}; mu={c['mu']:.3g} L={c['L']:.3g} L_A={c['L_A']:.3g} "
          f"L_3={c['L_3']:.3g} L_DB={c['L_DB']:.3g} L_B={c['L_B']:.3g}")
    hg0, t0 = _timed(prob, theta, eps=1e-2, delta=1e-2)  # warms the constants and the caches
    ref, t_ref = _timed(prob, theta, eps=REF_TOL, delta=REF_TOL)
    exact, slack = ref.grad, ref.bound  # ||exact - grad F|| <= slack (E&R's, certified)
    print(f"warm-up {t0:.1f} s; reference (eps = delta = {REF_TOL:.0e}) {t_ref:.1f} s: "
          f"||h|| = {np.linalg.norm(exact):.4e}, its certified error <= {slack:.1e}")
    rows = []
    for rtol in args.rtols:
        hg, t_cert = _timed(prob, theta, rtol=rtol, certificate="dwr")
        d = hg.directional
        true_err = abs(d["value"] - float(d["direction"] @ exact))
        top = sorted(((v, k) for k, v in hg.correction_terms.items()), reverse=True)[:4]
        plain_err = abs(d["plain"] - float(d["direction"] @ exact))
        print(f"dwr rtol {rtol:.0e}: plain u . h: bound {d['plain_bound']:.3e}, true error "
              f"{plain_err:.3e} (+- {slack:.1e}); largest terms "
              + ", ".join(f"{k} {v:.1e}" for v, k in top) + f"; {hg.notes[-1][:170]}",
              flush=True)
        rows.append(("DWR, along h", rtol, d["bound"], float(np.linalg.norm(hg.grad)), true_err,
                     t_cert, _units(hg), _matched(prob, theta, exact, true_err, along_h=True)))
    for rtol in args.block_rtols:
        hg, t_cert = _timed(prob, theta, rtol=rtol, certificate="block")
        true_err = float(np.linalg.norm(hg.grad - exact))
        print(f"block rtol {rtol:.0e}: {hg.status}; {hg.notes[-1][:170]}", flush=True)
        rows.append(("block, vector", rtol, hg.bound, float(np.linalg.norm(hg.grad)), true_err,
                     t_cert, _units(hg), _matched(prob, theta, exact, true_err, along_h=False)))
    for rtol in args.er_rtols:
        hg, t_cert = _timed(prob, theta, rtol=rtol, certificate="er")
        true_err = float(np.linalg.norm(hg.grad - exact))
        rows.append(("E&R, vector", rtol, hg.bound, float(np.linalg.norm(hg.grad)), true_err,
                     t_cert, _units(hg), _matched(prob, theta, exact, true_err, along_h=False)))
    print("| certificate | rtol | bound / norm h | true error | bound / true error | "
          "certified s (units) | uncertified: tol, s (units) | time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rtol, bound, norm_h, err, t, units, found in rows:
        ratio = (f"{bound / err:.3g}" if err > slack
                 else f">= {bound / (err + slack):.3g} (error below the reference's slack)")
        unc = "not reached" if found is None else f"{found[0]:.1e}, {found[1]:.1f} ({found[2]})"
        ratio_t = "" if found is None else f"{t / found[1]:.2f}"
        print(f"| {name} | {rtol:.0e} | {bound / norm_h:.2e} | {err:.2e} | {ratio} | "
              f"{t:.1f} ({units}) | {unc} | {ratio_t} |")


def _matched(prob, theta, exact, target, along_h):
    """(tol, seconds, units, error) of the first plain hypergradient down the ladder
    eps = delta = tol (from 1e-1, factor 4) whose true error (along its own h, or of the
    vector) is at most `target`; None if none down to 1e-12."""
    tol = 1e-1
    while tol >= 1e-12:
        plain, seconds = _timed(prob, theta, eps=tol, delta=tol)
        diff = plain.grad - exact
        err = (abs(float(plain.grad @ diff)) / float(np.linalg.norm(plain.grad)) if along_h
               else float(np.linalg.norm(diff)))
        if err <= target:
            return tol, seconds, _units(plain), err
        tol /= 4
    return None

if __name__ == "__main__":
    main()
