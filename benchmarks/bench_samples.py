"""One hypergradient over many samples: serial against worker processes and a Dask LocalCluster.

    python benchmarks/bench_samples.py                    # 16 and 64 samples of 128 x 128
    python benchmarks/bench_samples.py --samples 64 --repeat 3 --workers 2
    python benchmarks/bench_samples.py --quick            # 8 samples of 32 x 32, a smoke run

Problem: 2-D smoothed-TV denoising (examples/tv2d.py) at its THETA0, one lower-level problem
per image; the images are 128 x 128 crops of scikit-image's photographs (camera, moon, coins,
astronaut in grey, ...) at random offsets, with Gaussian noise of std 0.1 (seed 0). Each timed
call is one cold hypergradient, `prob.hypergradient(theta)` (lower and adjoint "auto": Newton
and CG here), over all samples: serial (this process), executor="processes" (`--workers`
spawned processes) and a Dask LocalCluster of `--workers` processes with one thread each,
configured as a cluster that runs only hypergen (DEDICATED, unless --dask-defaults: Dask's
event loops wake every 20 ms in the scheduler, each worker and each nanny, and its profiler
samples every worker thread every 10 ms; an idle LocalCluster of 2 workers took 74-92 ms of
CPU per second that way, 19-23 ms with DEDICATED, docs/distributed.md 5), each executor against
serial with only its own workers alive (the processes first, the cluster started after them).
Contenders are timed in turns (timing.interleaved_times: a warm-up call each, then --repeat
rounds, one call per round, median), BLAS and OpenMP on --threads threads (default 1: a worker
per core).

Printed: the setup (bind_samples: spawning and installing), the median seconds per hypergradient
and the ratio serial / executor, and whether the executor's result has the serial bits
(gradient, bound, value, per-sample x and q); then each contender's CPU seconds per call
(Linux: /proc schedstat, every thread, so other jobs' load does not enter it): this process
(for Dask with the LocalCluster's scheduler, nannies and the client), the workers, and the
workers' sum against the serial call's; the seconds to read every x and q after one call (they stay
on the workers until read, docs/distributed.md 3); then the "ceiling": --workers bare
processes, no executor, each computing its share of the samples serially, started together (what the
machine allows; timed after the contenders, not interleaved with them). Then what travels per
sample: the data sent once, the task sent per hypergradient with the warm start on the worker
and with explicit arrays, the result returned (x, q and the lower gradient stay on the worker)
and what it would be with them; and the parent's cost per task, from 64 samples of 8 x 8
(almost no work).
The goal: at least 1.7x faster than serial with 2 workers at 64 samples.
"""
from __future__ import annotations

import argparse
import os
import pickle
import queue
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_times, machine, set_threads_from_argv  # noqa: E402

THREADS = set_threads_from_argv()

import numpy as np  # noqa: E402

import codegen  # noqa: E402
from codegen.runtime.sample_worker import Held, SampleTask, slim  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
THETA0 = np.array([np.log(0.1), np.log(0.05)])  # examples/tv2d.py's THETA0
PHOTOS = ("camera", "moon", "coins", "astronaut", "coffee", "page", "text", "brick")
#: Dask settings for a cluster that runs only hypergen (docs/distributed.md 5): no statistical
#: profiler (it samples every worker thread every 10 ms), the event loops' tick every 200 ms
#: instead of 20 (it only measures how late the loop runs), no work stealing (hypergen sends
#: no Dask tasks to steal), the system monitor (the dashboard's CPU and memory plots) every
#: 2 s instead of 0.5 and the nannies' memory check every 0.5 s instead of 0.1.
DEDICATED = {"distributed.worker.profile.enabled": False,
             "distributed.admin.tick.interval": "200ms",
             "distributed.scheduler.work-stealing": False,
             "distributed.admin.system-monitor.interval": "2s",
             "distributed.worker.memory.monitor-interval": "500ms"}


def photographs() -> list[np.ndarray]:
    """scikit-image's photographs as grey values on [0, 1], each at least 128 x 128."""
    from skimage import color, data
    out = []
    for name in PHOTOS:
        img = np.asarray(getattr(data, name)(), dtype=float)
        if img.ndim == 3:
            img = color.rgb2gray(img[..., :3] / 255.0)
        elif img.max() > 1.0:
            img = img / 255.0
        out.append(img)
    return out


def image_samples(count: int, size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` crops of size x size at random offsets, with their noisy copies (std 0.1)."""
    rng = np.random.default_rng(seed)
    photos = photographs()
    samples = []
    for s in range(count):
        img = photos[s % len(photos)]
        r, c = rng.integers(0, img.shape[0] - size + 1), rng.integers(0, img.shape[1] - size + 1)
        clean = np.ascontiguousarray(img[r:r + size, c:c + size])
        samples.append({"Y": clean + 0.1 * rng.standard_normal(clean.shape), "Xt": clean})
    return samples


def bits(res) -> tuple:
    return (res.grad.tobytes(), np.float64(res.bound).tobytes(), np.float64(res.value).tobytes(),
            tuple(np.asarray(r.x).tobytes() + np.asarray(r.q).tobytes() for r in res.samples))


def cpu_seconds(pid: int) -> float:
    """CPU seconds of every thread of process `pid` so far (Linux /proc schedstat, in ns; nan
    elsewhere)."""
    try:
        return sum(int((task / "schedstat").read_text().split()[0])
                   for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, ValueError, IndexError):
        return float("nan")


def executor_pids(prob, client) -> tuple[list[int], list[int]]:
    """(the executor's worker processes, their nannies where they are other processes: a
    LocalCluster's nannies live in this process, with its scheduler)."""
    if client is None:
        return prob.executor.backend.pids, []
    workers = sorted(client.run(os.getpid).values())
    parents = {int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
               for p in workers}
    return workers, sorted(parents - {os.getpid()})


def metered(fn, pids: list[int], into: list):
    """fn, appending each call's CPU seconds of `pids` (this process first) to `into`."""
    def call():
        before = [cpu_seconds(p) for p in pids]
        out = fn()
        into.append([cpu_seconds(p) - b for p, b in zip(pids, before)])
        return out
    return call


def compare(module, label: str, executor, count: int, size: int, workers: int,
            repeat: int) -> None:
    """Serial against one executor, in turns: a line each (setup, median seconds per
    hypergradient, ratio, same bits, then the time to read every x and q), then the CPU
    seconds per call of each process (medians over the timed calls)."""
    data = image_samples(count, size)
    start = time.perf_counter()
    probs = {"serial": module.bind_samples(data),
             label: module.bind_samples(data, executor=executor,
                                        workers=workers if executor == "processes" else None)}
    setup = {"serial": 0.0, label: time.perf_counter() - start}
    worker_pids, nanny_pids = executor_pids(probs[label], None if label != "dask" else executor)
    pids = {"serial": [os.getpid()], label: [os.getpid()] + worker_pids + nanny_pids}
    cpu: dict = {name: [] for name in probs}
    try:
        timed = interleaved_times({name: metered(lambda p=p: p.hypergradient(THETA0),
                                                 pids[name], cpu[name])
                                   for name, p in probs.items()}, repeat, warm=0.0)
        read = read_seconds(probs[label])
    finally:
        for p in probs.values():
            p.close()
    serial_seconds, _, ref = timed["serial"]
    assert ref.status == "ok", ref.status
    for name, (seconds, _, res) in timed.items():
        same = "-" if name == "serial" else ("yes" if bits(res) == bits(ref) else "NO")
        print(f"{count:>7} {name:>10} {setup[name]:>9.2f} {seconds:>9.3f} "
              f"{serial_seconds / seconds:>7.2f}x {same:>9}"
              + (f"   (then reading every x and q: {read:.3f} s)" if name == label else ""))
    serial_cpu = float(np.median([c[0] for c in cpu["serial"][1:]]))
    per = np.median(np.array(cpu[label][1:]), axis=0)  # the warm-up call left out
    mine = per[1:1 + len(worker_pids)]
    nannies = f", nannies {1e3 * per[1 + len(worker_pids):].sum():.0f} ms" if nanny_pids else ""
    print(f"{count:>7} {'cpu':>10}   per call: serial {1e3 * serial_cpu:.0f} ms; {label}: "
          f"this process {1e3 * per[0]:.1f} ms, workers "
          f"{' + '.join(f'{1e3 * c:.0f}' for c in mine)} ms = {mine.sum() / serial_cpu:.3f} x "
          f"serial{nannies}")


def read_seconds(prob) -> float:
    """Seconds to read every sample's x and q of a fresh result (fetched from the workers,
    where they stay until read): what a caller that wants them all pays on top."""
    res = prob.hypergradient(THETA0)
    start = time.perf_counter()
    for arrays in (res.x, res.q):
        for a in arrays:
            np.asarray(a)
    return time.perf_counter() - start


def _share(rank: int, workers: int, count: int, size: int, repeat: int, barrier, out) -> None:
    """One bare process of `ceiling`: every workers-th sample, serially, in rounds in step. In
    the Dask phase it inherits the MALLOC_TRIM_THRESHOLD_ the LocalCluster set in this process's
    environment, and tunes the allocator as the executors' workers do (docs/distributed.md 1)."""
    from codegen.runtime.sample_worker import tune_allocator
    tune_allocator()
    module = codegen.load(str(ROOT / "examples" / "tv2d.py"))
    prob = module.bind_samples(image_samples(count, size)[rank::workers])
    prob.hypergradient(THETA0)
    times = []
    for _ in range(repeat):
        barrier.wait()
        start = time.perf_counter()
        prob.hypergradient(THETA0)
        times.append(time.perf_counter() - start)
    out.put(times)


def ceiling(count: int, size: int, workers: int, repeat: int) -> float:
    """The machine's own limit, no executor at all: `workers` independent processes, each the
    serial hypergradient of its share of the samples, started together (a barrier per round);
    the median over rounds of the slowest share. Two processes on two cores that share caches,
    memory bandwidth or a host with other guests take longer than one alone."""
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(workers), context.Queue()
    procs = [context.Process(target=_share, args=(r, workers, count, size, repeat, barrier, out))
             for r in range(workers)]
    for p in procs:
        p.start()
    rounds: list = []
    while len(rounds) < workers:  # a process that died (an exception, the OOM killer) is named
        try:
            rounds.append(out.get(timeout=1.0))
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"a ceiling process failed (exit codes {failed})") from None
    for p in procs:
        p.join()
    return float(np.median(np.max(rounds, axis=0)))


def traffic(module, size: int) -> None:
    """Bytes per sample: data (once), task (warm / explicit, per hypergradient), result."""
    data = image_samples(1, size)
    prob = module.bind_samples(data)
    res = prob.hypergradient(THETA0)
    opts = codegen.hypergrad.HypergradientOptions.make(None, lower=res.lower_solver,
                                                       adjoint=res.adjoint_solver)
    threads = {"blas": 1, "openmp": 1}
    warm = SampleTask(0, "token", THETA0, opts, Held(1, 0), Held(1, 1), 2, threads)
    full = SampleTask(0, "token", THETA0, opts, res.x[0], res.q[0], 2, threads)
    sizes = {"data, sent once": pickle.dumps(prob.samples[0].data),
             "task, warm start held": pickle.dumps(warm),
             "task, x0 and q0 sent": pickle.dumps(full),
             "result returned": slim(res.samples[0], 0),
             "result with x, q, grad": pickle.dumps(res.samples[0])}
    print(f"\nbytes per sample at {size} x {size} ({size * size} unknowns):")
    for what, blob in sizes.items():
        print(f"  {what:<24} {len(blob):>10,}")


def overhead(module, client, workers: int, count: int = 64) -> None:
    """The parent's wall time per task when the tasks do almost nothing (8 x 8 images)."""
    data = image_samples(count, 8)
    print(f"\ncost per task, {count} samples of 8 x 8 (median of 5 calls; overhead = wall time "
          f"minus serial / {workers}, per sample):")
    serial = 0.0
    for label, executor in (("serial", None), ("processes", "processes"), ("dask", client)):
        with module.bind_samples(data, executor=executor,
                                 workers=workers if executor == "processes" else None) as prob:
            prob.hypergradient(THETA0)
            times = []
            for _ in range(5):
                start = time.perf_counter()
                prob.hypergradient(THETA0)
                times.append(time.perf_counter() - start)
        per_sample = float(np.median(times)) / count
        serial = serial or per_sample
        extra = "" if executor is None else \
            f", overhead {1e3 * (per_sample - serial / workers):.2f} ms"
        print(f"  {label:>10} {1e3 * per_sample:>8.2f} ms per sample{extra}")


def load() -> str:
    """The 1, 5 and 15 minute load averages (other jobs on the machine slow every contender)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", default="16,64", help="comma-separated sample counts")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", default="1", help="BLAS and OpenMP threads per process (0: the libraries' defaults)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dask-defaults", action="store_true",
                    help="start the LocalCluster with Dask's default settings (profiler on, "
                         "20 ms ticks, ...), not DEDICATED (docs/distributed.md 5)")
    args = ap.parse_args()
    counts = [8] if args.quick else [int(s) for s in args.samples.split(",")]
    size = 32 if args.quick else args.size
    import dask
    from dask.distributed import Client, LocalCluster

    model, cores, t_mv, gbs = machine()
    print(f"machine: {model}, {cores} cores, BLAS/OpenMP threads {THREADS}; A @ v (20000 x 2000) "
          f"{1e3 * t_mv:.1f} ms = {gbs:.1f} GB/s")
    module = codegen.load(str(ROOT / "examples" / "tv2d.py"))
    print(f"tv2d, {size} x {size} images, {args.workers} workers; one cold hypergradient "
          f"at THETA0, median of {args.repeat}\n")
    print(f"{'samples':>7} {'executor':>10} {'setup s':>9} {'seconds':>9} {'ratio':>8} "
          f"{'same bits':>9}")

    def with_ceiling(label: str, executor) -> None:
        for count in counts:
            compare(module, label, executor, count, size, args.workers, args.repeat)
            bare = ceiling(count, size, args.workers, max(args.repeat, 3))
            print(f"{count:>7} {'ceiling':>10} {'':>9} {bare:>9.3f}   ({args.workers} bare "
                  "processes, each its share serially: the machine's limit)")
    # each executor with only its own workers alive: an idle LocalCluster alongside (its
    # scheduler thread here, its workers and nannies) took the processes executor from 1.9x
    # to 1.6-1.7x at 64 samples (docs/distributed.md 5)
    print(f"load average {load()}")
    with_ceiling("processes", "processes")
    # the nannies hand this process's Dask configuration to the worker processes they start
    with dask.config.set({} if args.dask_defaults else DEDICATED), \
            LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                         dashboard_address=None) as cluster, Client(cluster) as client:
        seen = client.run(lambda: [dask.config.get(key) for key in DEDICATED])
        print(f"load average {load()}; workers' settings: "
              + ", ".join(f"{key.rsplit('.', 2)[-2]}.{key.rsplit('.', 1)[-1]} {value}"
                          for key, value in zip(DEDICATED, next(iter(seen.values())))))
        with_ceiling("dask", client)
        print(f"load average {load()}")
        traffic(module, size)
        overhead(module, client, args.workers)


if __name__ == "__main__":  # the "processes" workers are spawned: they import this file
    main()
