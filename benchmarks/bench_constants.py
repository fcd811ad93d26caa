"""Data constants against the first hypergradient of a fresh bind.

l2-logistic regression (examples/logistic.py) at m x n (default 20000 x 2000, validation m/4),
`prob.hypergradient(theta, rtol=1e-6)` with defaults. For each method of ||K||^2 the script binds
afresh, times the data constants (`prob.constants`, which computes every data quantity a
constant reads) and then the first hypergradient, and prints the constants' share of the total,
the work units and the certified bound. Contenders run in turns (`--repeat` rounds), medians:

- "blocks" (the default thresholds): block sums (blocks of 32 rows) above the Gram limit;
- "blocks128": blocks of 128 rows (4x the cost, tighter);
- "gram": the whole Gram matrix as before this change (GRAM_FLOP_LIMIT raised to 1e11: the
  Cholesky certificate at 2000 columns);
- "frobenius": blocks of one row, i.e. ||K||_F^2, to show what a loose constant costs the solve.

With `--lower fista` (adjoint "cg") the first-order solver asks the bind to tighten block-sum
||K||^2 by the Gram matrix (docs/constants.md 4): its time is then in the hypergradient column.

- "eigvalsh64": below the Gram limits, eigvalsh of the float64 Gram as before the float32 Gram
  and the certificate (docs/constants.md 4); "cholesky64": the certificate on the float64 Gram.

    python benchmarks/bench_constants.py [--size 20000 2000] [--repeat 3] [--lower fista]
                                         [--profile] [--threads N] [--contenders NAME ...]

(--contenders last: default blocks blocks128 gram frobenius; at 10000 x 500:
--contenders eigvalsh64 cholesky64 blocks, "blocks" then being the default path.)
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

from timing import set_threads_from_argv  # noqa: E402

THREADS = set_threads_from_argv()

import cProfile  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from logistic import THETA0, example_data  # noqa: E402

import codegen  # noqa: E402
from codegen.constants.evaluation import spectral  # noqa: E402

SETTINGS = {"blocks": {},
            "blocks128": {"BLOCK_ROWS": 128},
            "gram": {"GRAM_FLOP_LIMIT": 1.0e11},
            "frobenius": {"BLOCK_ROWS": 1},
            "eigvalsh64": {"CERTIFY_SIDE": 10 ** 9, "GRAM32_MIN_FLOPS": math.inf},
            "cholesky64": {"GRAM32_MIN_FLOPS": math.inf}}


def one_run(module, data, settings: dict, profile: bool, solvers: dict) -> dict:
    """A fresh bind under `settings` (spectral module constants): seconds of constants and of the
    first hypergradient, its work and bound, the methods and values of the data quantities."""
    saved = {k: getattr(spectral, k) for k in settings}
    for k, v in settings.items():
        setattr(spectral, k, v)
    prof = cProfile.Profile() if profile else None
    try:
        prob = module.bind(**data)
        if prof:
            prof.enable()
        t0 = time.perf_counter()
        c = prob.constants(THETA0)
        t1 = time.perf_counter()
        hg = prob.hypergradient(THETA0, rtol=1e-6, **solvers)
        t2 = time.perf_counter()
        if prof:
            prof.disable()
    finally:
        for k, v in saved.items():
            setattr(spectral, k, v)
    quantities = prob._prepared_constants()["quantities"]
    return {"constants": t1 - t0, "hypergradient": t2 - t1, "units": hg.work["units"],
            "bound": hg.bound, "L_A": c["L_A"], "L_f": c["L_f"], "profile": prof,
            "quantities": {k: (q["value"], q.get("flops", 0), q["method"])
                           for k, q in quantities.items() if k.startswith(("normsq", "rowmax"))}}


def main() -> None:
    argv = sys.argv
    m, n = (int(argv[argv.index("--size") + 1]), int(argv[argv.index("--size") + 2])) \
        if "--size" in argv else (20000, 2000)
    repeat = int(argv[argv.index("--repeat") + 1]) if "--repeat" in argv else 3
    solvers = {"lower": argv[argv.index("--lower") + 1], "adjoint": "cg"} if "--lower" in argv \
        else {}
    module = codegen.load(str(ROOT / "examples" / "logistic.py"))
    data = example_data(0, m=m, n=n, p=m // 4)
    names = argv[argv.index("--contenders") + 1:] if "--contenders" in argv else [
        "blocks", "blocks128", "gram", "frobenius"]
    runs: dict = {name: [] for name in names}
    for _ in range(repeat):
        for name in names:
            runs[name].append(one_run(module, data, SETTINGS[name], "--profile" in argv, solvers))
            time.sleep(0.25)
    print(f"logistic {m} x {n} (validation {m // 4}), rtol=1e-6, {solvers or 'default solvers'}, "
          f"threads {THREADS}, {repeat} fresh binds each, medians; load {os.getloadavg()}")
    print(f"{'method':10} {'constants s':>11} {'hypergrad s':>11} {'share':>6} {'units':>6} "
          f"{'L_A':>9} {'L_f':>9} {'bound':>9}")
    for name, rs in runs.items():
        const = statistics.median(r["constants"] for r in rs)
        hyper = statistics.median(r["hypergradient"] for r in rs)
        share = statistics.median(r["constants"] / (r["constants"] + r["hypergradient"]) for r in rs)
        units = statistics.median(r["units"] for r in rs)
        print(f"{name:10} {const:11.3f} {hyper:11.3f} {share:6.1%} {units:6.0f} "
              f"{rs[0]['L_A']:9.4g} {rs[0]['L_f']:9.4g} {rs[0]['bound']:9.3g}")
    for name, rs in runs.items():
        for key, (value, flops, method) in rs[0]["quantities"].items():
            print(f"  {name:10} {key:10} {value:12.6g} {flops:9.3g} flops  {method[:80]}")
    if "--profile" in argv:
        for name, rs in runs.items():
            print(f"--- {name}: constants + first hypergradient, by cumulative time")
            pstats.Stats(rs[-1]["profile"]).sort_stats("cumulative").print_stats(12)


if __name__ == "__main__":
    main()
