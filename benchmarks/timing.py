"""Timing shared by the benchmarks: thread counts, contenders timed in turns, the machine line.

Import this module before NumPy or JAX: `set_threads_from_argv()` has to set the thread
variables before those libraries start their thread pools, which is why NumPy is imported only
inside `machine()`.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

#: Seconds between two contenders' turns: long enough for the previous one's idle worker threads
#: to stop spinning (OpenBLAS spins about 0.1 s after a call) and give the core back.
SETTLE = 0.25
#: Seconds of untimed calls before each timed sample, and the least length of a sample (at least
#: one call each): a contender's caches and thread pools are then as warm as in a loop of its own.
WARM = 0.02


def set_threads_from_argv(argv: list | None = None) -> str:
    """--threads N (default 1; 0 = the libraries' defaults) for BLAS, OpenMP and XLA. It must act
    before NumPy/JAX start their thread pools; returns N as given."""
    argv = sys.argv if argv is None else argv
    n = argv[argv.index("--threads") + 1] if "--threads" in argv else "1"
    if n != "0":
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = n
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                                   + ("false" if n == "1" else "true")).strip()
    return n


def interleaved_times(calls: dict, repeat: int, warm: float = WARM, warmup: bool = True,
                      settle: float = SETTLE) -> dict:
    """{label: (median seconds per call, first-call seconds, last result)} of zero-argument
    calls timed in turns: one warm-up call each (the first call: JIT compilation; skipped with
    warmup=False, first-call seconds are then nan), then `repeat` rounds in which each
    contender, `settle` seconds after the previous one's turn, makes untimed calls for `warm`
    seconds and then one timed sample: the mean of as many calls as fill `warm` seconds (at
    least one; timeit's loops, for calls far shorter than the clock's noise). warm=0 times
    exactly one call per round (end-to-end runs of seconds, where a repeat doubles the cost).
    Load from other processes on the machine then slows every contender of a round alike, not
    just the one whose block of repeats it happened to hit; no worker thread of another
    contender still spins on a core (OpenBLAS's spin for about 0.1 s after a call and made
    hypergen's ridge 2000 x 500 take 2x); and each sample is as warm as a loop of its own
    (caches, and thread pools that would otherwise have gone to sleep: JAX's costs 0.1 ms on
    the quadratic)."""
    first = {label: float("nan") for label in calls}
    results: dict = {}
    times: dict = {label: [] for label in calls}
    if warmup:
        for label, fn in calls.items():
            start = time.perf_counter()
            results[label] = fn()
            first[label] = time.perf_counter() - start
    for _ in range(repeat):
        for label, fn in calls.items():
            time.sleep(settle)
            if warm > 0:
                sample(fn, warm)  # untimed
            seconds, count, results[label] = sample(fn, warm)
            times[label].append(seconds / count)
    return {label: (statistics.median(times[label]), first[label], results[label])
            for label in calls}


def sample(fn: Callable[[], Any], least: float) -> tuple:
    """Call fn until `least` seconds have passed, at least once: (seconds, calls, last result)."""
    count, start = 0, time.perf_counter()
    while True:
        out = fn()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= least:
            return elapsed, count, out


def median_time(fn: Callable[[], Any], repeat: int) -> tuple:
    """(median seconds, first-call seconds, last result) with the first call as warm-up."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), first, out


def machine() -> tuple:
    """(CPU model, cores, seconds of one NumPy A @ v at 20000 x 2000, GB/s it streams): the
    line that lets a reader compare runs on different machines. NumPy is imported here, not at
    module top, so that set_threads_from_argv can act before it loads."""
    import numpy as np

    try:
        model = next(line.split(":", 1)[1].strip() for line in
                     subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                     if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        model = platform.processor() or "unknown"
    A = np.random.default_rng(0).standard_normal((20000, 2000))
    v = np.ones(2000)
    t, _, _ = median_time(lambda: A @ v, 15)
    return model, os.cpu_count(), t, 20000 * 2000 * 8 / t / 1e9


def fresh_memory() -> str:
    """How this machine pays for fresh memory: the seconds of a NumPy copy of 40 MB into newly
    allocated pages (the copy `bind` makes of the learning benchmark's data; measured after a
    process has allocated and freed much memory, since a fresh process finds huge pages), NumPy's
    madvise-hugepage setting and the kernel's THP defrag mode. With defrag "madvise" and no free
    huge page, the first touch of NumPy's madvised pages stalls on compaction (numpy#31590): a
    copy then takes 0.3-0.5 s instead of 0.01-0.02 s, and NUMPY_MADVISE_HUGEPAGE=0 avoids it."""
    import numpy as np

    try:
        from numpy._core.multiarray import _get_madvise_hugepage
        madvise = "on" if _get_madvise_hugepage() else "off"
    except ImportError:
        madvise = "?"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/defrag") as fh:
            defrag = fh.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        defrag = "?"
    a = np.ones(5_000_000)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        a.copy()
        times.append(time.perf_counter() - start)
    return (f"a 40 MB copy into fresh memory {statistics.median(times):.3f} s (NumPy madvise "
            f"hugepage {madvise}, THP defrag {defrag})")

