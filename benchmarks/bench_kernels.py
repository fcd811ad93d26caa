"""Kernel speed against NumPy, measured in the same run (never in tests: machines are noisy).

    python benchmarks/bench_kernels.py [--m 20000 --n 2000 --repeat 15]

Prints the median time of one `lower_hvp` / `lower_grad` of ridge and l2-logistic regression
against NumPy's `A @ v` followed by `A.T @ w` (the two passes over A a BLAS-based library makes),
of `lower_hvp_pair` (two products in one pass) against one `lower_hvp`, the prepared HVP of
CSR logistic regression (`lower_hvp_apply`) against SciPy's `A @ v` + `A.T @ w`, and the cold
and cached `hypergen build` times of every example.
"""
import argparse
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def median_time(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kernels(m, n, repeat):
    import codegen

    rng = np.random.default_rng(0)
    A = rng.standard_normal((m, n))
    v, w, x = rng.standard_normal(n), rng.standard_normal(m), rng.standard_normal(n) * 0.01
    t_numpy = median_time(lambda: (A @ v, A.T @ w), repeat)
    print(f"m = {m}, n = {n}: NumPy A @ v + A.T @ w: {t_numpy * 1e3:.1f} ms "
          f"({2 * A.nbytes / t_numpy / 1e9:.1f} GB/s effective)")
    for name, data in [("ridge", dict(A=A, b=rng.standard_normal(m), Av=A[:10], bv=np.zeros(10))),
                       ("logistic", dict(A=A, y=np.sign(rng.standard_normal(m)), Av=A[:10],
                                         yv=np.ones(10)))]:
        prob = codegen.load(ROOT / "examples" / f"{name}.py").bind(**data)
        for kernel, args in [("lower_hvp", (x, 0.0, v)), ("lower_grad", (x, 0.0))]:
            t = median_time(lambda: getattr(prob, kernel)(*args), repeat)
            print(f"  {name}.{kernel}: {t * 1e3:.1f} ms = {t / t_numpy:.2f} x NumPy's two passes")
            if kernel == "lower_hvp":  # two products in one pass (docs/solvers.md 9)
                pair, u = prob.hvp_pair_at(x, 0.0), rng.standard_normal(n)
                t_pair = median_time(lambda: pair(v, u), repeat)
                print(f"  {name}.lower_hvp_pair: {t_pair * 1e3:.1f} ms = {t_pair / t:.2f} x one "
                      f"lower_hvp")


def sparse_kernels(m, n, density, repeat):
    """The prepared HVP of CSR logistic regression (`hvp_at`: lower_hvp_prepare once, then one
    lower_hvp_apply per product) against SciPy's two sparse passes."""
    import codegen

    ns = runpy.run_path(str(ROOT / "examples" / "logistic_sparse.py"))
    data = ns["example_data"](0, m=m, n=n, p=10, density=density)
    A, rng = data["A"], np.random.default_rng(1)
    v, w = rng.standard_normal(n), rng.standard_normal(m)
    t_scipy = median_time(lambda: (A @ v, A.T @ w), repeat)
    print(f"CSR m = {m}, n = {n}, nnz = {A.nnz}: SciPy A @ v + A.T @ w: {t_scipy * 1e3:.2f} ms")
    prob = codegen.load(ROOT / "examples" / "logistic_sparse.py").bind(**data)
    hvp = prob.hvp_at(0.01 * rng.standard_normal(n), 0.0)
    t = median_time(lambda: hvp(v), repeat)
    print(f"  logistic_sparse.lower_hvp_apply: {t * 1e3:.2f} ms = {t / t_scipy:.2f} x SciPy's "
          f"two passes")


# The example problem files (the other scripts in examples/ use them).
PROBLEMS = ("ridge", "logistic", "logistic_sparse", "quadratic", "tv1d", "tv2d", "hypercleaning")


def build_times():
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        for name in PROBLEMS:
            path = ROOT / "examples" / f"{name}.py"
            row = []
            for _ in range(2):
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "codegen", "build", str(path), "--out", out],
                               check=True, capture_output=True,
                               env={"HYPERGEN_CACHE_DIR": cache, "PATH": "/usr/bin:/bin",
                                    "PYTHONPATH": str(ROOT)})
                row.append(time.perf_counter() - start)
            print(f"  hypergen build {path.name}: cold {row[0]:.2f} s, cache hit {row[1]:.2f} s "
                  f"(whole process, including Python start-up and imports)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, default=20000)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--sparse", type=int, nargs=2, default=(20000, 100000),
                        metavar=("M", "N"), help="CSR logistic regression's size (density 0.1%%)")
    args = parser.parse_args()
    kernels(args.m, args.n, args.repeat)
    sparse_kernels(*args.sparse, 0.001, args.repeat)
    build_times()
