"""Kernel speed against NumPy, measured in the same run (never in tests: machines are noisy).

    python benchmarks/bench_kernels.py [--m 20000 --n 2000 --repeat 15]

Prints the median time of one `lower_hvp` / `lower_grad` of ridge and l2-logistic regression
against NumPy's `A @ v` followed by `A.T @ w` (the two passes over A a BLAS-based library makes),
of `lower_hvp_pair` (two products in one pass) against one `lower_hvp`, and the cold and cached
`hypergen build` times of every example.
"""
import argparse
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
    args = parser.parse_args()
    kernels(args.m, args.n, args.repeat)
    build_times()
