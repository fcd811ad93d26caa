"""Executors for many samples (docs/distributed.md, docs/interface.md section 4): the same
hypergradient, bound and value to the last bit whether the samples run here, on a pool of local
processes or on a Dask LocalCluster of 2 worker processes; warm starts kept on the workers; a
lost worker's samples recomputed, or named; a bad executor named; optimize() unchanged.

Each comparison is of the bytes of the float64 results (`_bits`), not of values within a
tolerance: the executors promise the serial numbers themselves.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import sys
import time
import weakref

import numpy as np
import pytest

from codegen.hypergrad import SolverError
from codegen.runtime.executors import ExecutorError

from support import ROOT, TINY, built_example, load_example

distributed = pytest.importorskip("dask.distributed")

SAMPLES = 4
PROBLEMS = ("ridge", "logistic", "tv2d")


def _bits(res) -> tuple:
    """The bytes of everything a hypergradient returns as numbers (mean and per sample)."""
    per_sample = tuple(np.asarray(r.x).tobytes() + np.asarray(r.q).tobytes()
                       + np.float64(r.bound).tobytes() for r in res.samples)
    return (res.grad.tobytes(), np.float64(res.bound).tobytes(),
            np.float64(res.apriori_bound).tobytes(), np.float64(res.value).tobytes(),
            tuple(sorted(res.work.items())), res.status, per_sample)


@pytest.fixture(scope="module")
def cluster():
    """2 Dask worker processes, 1 thread each (what CI runs)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cl:
        with distributed.Client(cl) as client:
            yield cl, client


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    """name -> (module, samples' data, theta0) for each example, at its tiny size."""
    out = {}
    build_dir = tmp_path_factory.mktemp("executors")
    for name in PROBLEMS:
        _, module, ns = built_example(name, build_dir)
        data = [ns["example_data"](seed=s, **TINY[name]) for s in range(SAMPLES)]
        out[name] = (module, data, np.atleast_1d(np.asarray(ns.get("THETA0", 0.0), float)))
    return out


@pytest.fixture(scope="module")
def bound(problems, cluster):
    """name -> {"serial", "processes", "dask"}: the same samples on each executor. Their x, q
    and lower gradients stay on the workers whatever their size (inline_bytes 0: these tiny
    problems' would otherwise come back with the results, docs/distributed.md 3)."""
    _, client = cluster
    out = {}
    for name, (module, data, _) in problems.items():
        out[name] = {"serial": module.bind_samples(data),
                     "processes": module.bind_samples(data, executor="processes", workers=2),
                     "dask": module.bind_samples(data, executor=client)}
        for executor in ("processes", "dask"):
            out[name][executor].executor.inline_bytes = 0
    yield out
    for by_executor in out.values():
        for prob in by_executor.values():
            prob.close()


@pytest.mark.parametrize("name", PROBLEMS)
def test_executors_give_the_serial_bits(name, problems, bound):
    _, _, theta = problems[name]
    probs = bound[name]
    assert probs["processes"].executor is not None and probs["dask"].executor is not None
    for kw in ({}, {"lower": "fista", "adjoint": "cg", "eps": 1e-6}, {"rtol": 1e-3}):
        want = probs["serial"].hypergradient(theta, **kw)
        assert want.status == "ok" and math.isfinite(want.bound)
        for executor in ("processes", "dask"):
            got = probs[executor].hypergradient(theta, **kw)
            assert _bits(got) == _bits(want), (executor, kw)


def test_a_scheduler_address_opens_and_closes_its_own_client(problems, cluster):
    cl, _ = cluster
    module, data, theta = problems["ridge"]
    want = module.bind_samples(data).hypergradient(theta)
    with module.bind_samples(data, executor=cl.scheduler_address) as prob:
        client = prob.executor.backend.client
        assert prob.executor.backend.owned
        assert _bits(prob.hypergradient(theta)) == _bits(want)
    assert client.status == "closed"


def test_a_client_that_connects_to_workers_directly_gives_the_serial_bits(problems, cluster):
    """The actor calls go straight to the workers when the Client does (direct_to_workers),
    through the scheduler's relay otherwise (the fixture's Client): both paths, the same bits."""
    cl, _ = cluster
    module, data, theta = problems["logistic"]
    want = module.bind_samples(data).hypergradient(theta, rtol=1e-6)
    with distributed.Client(cl, direct_to_workers=True) as client:
        assert client.direct_to_workers
        with module.bind_samples(data, executor=client) as prob:
            assert _bits(prob.hypergradient(theta, rtol=1e-6)) == _bits(want)


def test_warm_starts_stay_on_the_workers(problems, bound):
    """The second call starts from the first's (x, q): no x0 travels (warm_count), less work
    than a cold start, and the serial second call's bits."""
    _, _, theta = problems["logistic"]
    kw = {"lower": "fista", "adjoint": "cg"}
    serial = bound["logistic"]["serial"]
    first = serial.hypergradient(theta, **kw)
    cold = serial.hypergradient(theta + 0.1, **kw)
    second = serial.hypergradient(theta + 0.1, x0=first.x, q0=first.q, **kw)
    assert second.work["units"] < cold.work["units"]
    for executor in ("processes", "dask"):
        prob = bound["logistic"][executor]
        got_first = prob.hypergradient(theta, **kw)
        assert _bits(got_first) == _bits(first)
        got = prob.hypergradient(theta + 0.1, x0=got_first.x, q0=got_first.q, **kw)
        assert prob.executor.warm_count == SAMPLES, executor
        assert _bits(got) == _bits(second), executor
        changed = [np.array(x) for x in got.x]
        changed[2][0] += 1.0  # not what its worker holds: this one travels, the others do not
        again = prob.hypergradient(theta + 0.1, x0=changed, q0=got.q, **kw)
        assert prob.executor.warm_count == SAMPLES - 1
        again.x[1][0] += 1.0  # changed in place after it came back: the parent's copy sees it
        prob.hypergradient(theta + 0.1, x0=again.x, q0=again.q, **kw)
        assert prob.executor.warm_count == SAMPLES - 1


def test_a_killed_worker_process_has_its_samples_recomputed(problems):
    """Worker 0 dies holding its samples' x, q and lower gradients: read, they are computed
    again on worker 1 from the same starts (the serial bits); the next call, warm-started at
    them, runs there too; with no worker left the samples are named."""
    module, data, theta = problems["tv2d"]
    serial = module.bind_samples(data)
    want = serial.hypergradient(theta)
    with module.bind_samples(data, executor="processes", workers=2) as prob:
        prob.executor.inline_bytes = 0
        first = prob.hypergradient(theta)
        backend = prob.executor.backend
        victim = backend.pids[0]
        os.kill(victim, 9)
        time.sleep(0.2)
        assert np.asarray(first.lower[0].grad).tobytes() == want.lower[0].grad.tobytes()
        again = prob.hypergradient(theta, x0=first.x, q0=first.q)
        assert set(backend.home.values()) == {1}  # worker 0's samples moved to worker 1
        assert _bits(again) == _bits(serial.hypergradient(theta, x0=want.x, q0=want.q))
        os.kill(backend.pids[1], 9)
        time.sleep(0.2)
        with pytest.raises(ExecutorError, match=r"samples \[0, 1, 2, 3\] could not be computed: "
                                                r"no worker process is left"):
            prob.hypergradient(theta)


def test_a_long_warm_chain_is_cut_and_recomputed_after_a_loss(problems):
    """An upper-level run passes each result's x, q back: after MAX_REPLAY calls the parent
    fetches them (a lost sample is never computed again from further back than that, and the
    steps before are freed), and a
    worker killed at the end of a long chain costs nothing but time: the serial bits."""
    from codegen.runtime.held import MAX_REPLAY

    module, data, theta = problems["logistic"]
    kw = {"lower": "fista", "adjoint": "cg"}
    steps = [theta + 0.01 * k for k in range(MAX_REPLAY + 3)]
    serial = module.bind_samples(data)
    want = serial.hypergradient(steps[0], **kw)
    for th in steps[1:]:
        want = serial.hypergradient(th, x0=want.x, q0=want.q, **kw)
    with module.bind_samples(data, executor="processes", workers=2) as prob:
        prob.executor.inline_bytes = 0
        got = prob.hypergradient(steps[0], **kw)
        first_step = weakref.ref(got.x[0].made.step)
        for th in steps[1:-1]:
            got = prob.hypergradient(th, x0=got.x, q0=got.q, **kw)
            assert prob.executor.warm_count == SAMPLES
        assert max(r.x.made.step.depth for r in got.samples) <= MAX_REPLAY
        gc.collect()
        assert first_step() is None  # the steps before the cut are forgotten
        os.kill(prob.executor.backend.pids[1], 9)
        time.sleep(0.2)
        got = prob.hypergradient(steps[-1], x0=got.x, q0=got.q, **kw)
        assert _bits(got) == _bits(want)


def test_results_stay_on_the_workers_until_read(problems, bound, cluster):
    """x, q and the lower gradient stay on the workers: a result holds HeldArrays (shape known,
    nothing fetched), which read as the serial arrays; a result nobody refers to any more has
    its arrays dropped on its worker with the next call's tasks, one that is referred to keeps
    them (Dask: held_calls on each worker)."""
    from codegen.runtime.executors import HeldArray
    from codegen.runtime.sample_worker import held_calls

    _, client = cluster
    _, _, theta = problems["tv2d"]
    serial = bound["tv2d"]["serial"]
    want = serial.hypergradient(theta)
    for executor in ("processes", "dask"):
        prob = bound["tv2d"][executor]
        got = prob.hypergradient(theta)
        held = [got.x[0], got.q[0], got.lower[0].grad]
        assert all(isinstance(a, HeldArray) and not a.fetched for a in held)
        assert got.lower[0].x is got.x[0] and got.adjoint[0].q is got.q[0]
        assert held[0].shape == want.x[0].shape and held[0].dtype == want.x[0].dtype
        assert np.asarray(held[2]).tobytes() == want.lower[0].grad.tobytes()
        assert _bits(got) == _bits(want)
    del got, held
    prob = bound["tv2d"]["dask"]
    kept = prob.hypergradient(theta)
    runs = [prob.hypergradient(theta + 0.01 * k).x[0].made.run for k in (1, 2, 3)]
    on_workers: dict[str, list[int]] = {}
    for found in client.run(held_calls, prob.executor.tokens).values():
        on_workers.update(found)
    first_run = kept.x[0].made.run
    for token in prob.executor.tokens:
        # runs[0]'s arrays went with runs[2]'s tasks; runs[1]'s go with the next call's
        assert on_workers[token] == [first_run, runs[1], runs[2]], token
    # kept is the Dask problem's second call at theta (warm-started): the serial one's second
    # (it was compared with the first, which matched only when earlier tests had warmed both)
    assert _bits(kept) == _bits(serial.hypergradient(theta))


def test_a_held_array_reads_as_its_array(problems, bound):
    """Arithmetic, indexing, len, copies, pickling and NumPy functions on a HeldArray give
    what they give on the array itself; a call after close() is refused by name, while the
    results kept from before it stay readable."""
    import pickle

    module, data, theta = problems["ridge"]
    ref = bound["ridge"]["serial"].hypergradient(theta).x[1]
    with module.bind_samples(data, executor="processes", workers=2) as prob:
        prob.executor.inline_bytes = 0
        res = prob.hypergradient(theta)
    x = res.x[1]
    assert not x.fetched and len(x) == len(ref) and x.size == ref.size and x.ndim == ref.ndim
    assert x.norm == np.linalg.norm(ref) and x.all_finite is True and not x.fetched
    assert (x + 1.0).tobytes() == (ref + 1.0).tobytes()
    assert (2.0 * x - x).tobytes() == (2.0 * ref - ref).tobytes()
    assert x[0] == ref[0] and list(x) == list(ref)
    assert np.linalg.norm(x) == np.linalg.norm(ref)
    assert x.copy().tobytes() == ref.tobytes() and x.sum() == ref.sum()
    assert pickle.loads(pickle.dumps(x)).tobytes() == ref.tobytes()
    with pytest.raises(ExecutorError, match="is closed"):
        prob.hypergradient(theta)


def test_a_restarted_dask_cluster_has_the_samples_installed_again(problems, cluster):
    _, client = cluster
    module, data, theta = problems["tv2d"]
    serial = module.bind_samples(data)
    first = serial.hypergradient(theta)
    want = serial.hypergradient(theta + 0.05, x0=first.x, q0=first.q)
    with module.bind_samples(data, executor=client) as prob:
        prob.executor.inline_bytes = 0
        got_first = prob.hypergradient(theta)
        before = dict(prob.executor.backend.home)
        client.restart()  # every worker process is replaced: nothing installed survives
        # the restart cancelled the actors: a call to them is a loss at once, not an attempt to
        # reach a gone address (which waits out Dask's 30 s connect timeout)
        backend = prob.executor.backend
        replies = backend._call([(w, "thread_counts", ()) for w in sorted(backend.hosts)])
        assert len(replies) == 2 and all("is cancelled" in str(r) for r in replies), replies
        assert np.asarray(got_first.q[1]).tobytes() == first.q[1].tobytes()  # computed again
        got = prob.hypergradient(theta + 0.05, x0=got_first.x, q0=got_first.q)
        assert _bits(got) == _bits(want)
        assert set(prob.executor.backend.home.values()).isdisjoint(before.values())


def test_a_killed_dask_worker_has_its_samples_recomputed(problems):
    """A Dask worker process killed while it holds samples and their arrays: the call to its
    actor is lost, the samples are installed on a live worker, the arrays read are computed
    again there and the next call (warm-started at them) has the serial bits (its own cluster:
    the nanny replaces the killed process at another address; 2 threads per worker, so each
    worker's share runs as 2 batches on the actor's thread pool)."""
    module, data, theta = problems["tv2d"]
    serial = module.bind_samples(data)
    want = serial.hypergradient(theta)
    again = serial.hypergradient(theta, x0=want.x, q0=want.q)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                                  dashboard_address=None) as cl, distributed.Client(cl) as client:
        with module.bind_samples(data, executor=client) as prob:
            assert {host.threads for host in prob.executor.backend.hosts.values()} == {2}
            prob.executor.inline_bytes = 0
            first = prob.hypergradient(theta)
            victim = prob.executor.backend.home[0]
            os.kill(client.run(os.getpid, workers=[victim])[victim], 9)
            assert np.asarray(first.lower[0].grad).tobytes() == want.lower[0].grad.tobytes()
            got = prob.hypergradient(theta, x0=first.x, q0=first.q)
            assert _bits(got) == _bits(again)
            assert victim not in prob.executor.backend.home.values()


def test_samples_are_placed_by_size(bound):
    """A sample never moves while its worker lives, so the workers are balanced when the data
    are first sent: the largest sample first, each to the worker with the fewest bytes so far;
    samples of one size go round the workers in order."""
    from codegen.runtime.sample_worker import homes

    def sized(*counts):
        return [{"Y": np.zeros(n), "scale": 2.0} for n in counts]
    assert homes(sized(4, 4, 4, 4, 4), 2) == [0, 1, 0, 1, 0]
    assert homes(sized(1, 1, 1, 8, 1, 1, 1, 1, 1), 2) == [1, 1, 1, 0, 1, 1, 1, 1, 1]
    assert homes(sized(3, 5, 2, 4), 2) == [1, 0, 0, 1]  # 5 + 2 against 4 + 3
    assert homes(sized(7, 7), 3) == [0, 1]
    import scipy.sparse as sps  # counted by its stored entries and indices
    sparse = [{"A": sps.csr_array(np.eye(n))} for n in (2, 40, 3, 4)]
    assert homes(sparse, 2) == [1, 0, 1, 1]
    assert bound["ridge"]["processes"].executor.backend.home == {s: s % 2 for s in range(SAMPLES)}


def test_a_bad_executor_is_named(problems):
    module, data, _ = problems["ridge"]
    for bad, words in (("threads", "executor 'threads' is not an executor"),
                       (4, "executor 4 is not an executor"),
                       # not taken for a Dask address "host:port" (that waited 30 s to connect)
                       ("processes:4", "use executor='processes', workers=N")):
        with pytest.raises(ExecutorError, match=words):
            module.bind_samples(data, executor=bad)
    with pytest.raises(ExecutorError, match="workers must be a positive integer, got 0"):
        module.bind_samples(data, executor="processes", workers=0)
    with pytest.raises(ExecutorError, match="workers=2 is for executor='processes'"):
        module.bind_samples(data, workers=2)


def test_optimize_with_an_executor_is_the_serial_run(problems, bound):
    _, _, theta = problems["logistic"]
    runs = {executor: prob.optimize(theta, budget=400, progress=False)
            for executor, prob in bound["logistic"].items()}
    want = runs["serial"]
    assert len(want.history) > 2
    for executor in ("processes", "dask"):
        got = runs[executor]
        assert got.theta.tobytes() == want.theta.tobytes(), executor
        assert [(h["value"], h["bound"], h["work"]) for h in got.history] == \
            [(h["value"], h["bound"], h["work"]) for h in want.history], executor
        assert (got.status, got.work) == (want.status, want.work)


def test_cli_scheduler_processes_is_the_local_run(problems, tmp_path, capsys):
    from codegen.cli.main import main

    _, data, _ = problems["logistic"]
    np.savez(tmp_path / "samples.npz",
             **{f"{k}__{s}": v for s, d in enumerate(data) for k, v in d.items()})
    problem_file = str(ROOT / "examples" / "logistic.py")
    runs = {}
    for scheduler in ("local", "processes"):
        out = tmp_path / scheduler
        assert main(["optimize", problem_file, "--data", str(tmp_path / "samples.npz"),
                     "--budget", "300", "--no-progress", "--out", str(out),
                     "--scheduler", scheduler]) == 0
        runs[scheduler] = [{k: v for k, v in step.items() if k != "time"}
                           for step in json.loads((out / "history.json").read_text())["history"]]
    assert "samples on processes" in capsys.readouterr().out
    assert len(runs["local"]) > 1 and runs["processes"] == runs["local"]
    assert main(["optimize", problem_file, "--data", str(tmp_path / "samples.npz"),
                 "--out", str(tmp_path / "bad"), "--scheduler", "threads"]) == 2
    assert "executor 'threads' is not an executor" in capsys.readouterr().err
    assert main(["optimize", problem_file, "--data", str(tmp_path / "samples.npz"),
                 "--out", str(tmp_path / "early"), "--scheduler", "processes:2"]) == 2
    assert "--scheduler: executor 'processes:2'" in capsys.readouterr().err
    assert not (tmp_path / "early").exists()  # refused before building or writing anything


def test_an_interrupted_call_leaves_no_stale_reply(problems):
    """Ctrl-C while the workers compute: their late replies are dropped, never taken for the
    next call's results (which would be another theta's numbers)."""
    import signal
    import threading

    module, _, theta = problems["tv2d"]
    data = [load_example("tv2d").namespace["example_data"](seed=s, h=48, w=48)
            for s in range(SAMPLES)]
    kw = {"lower": "fista", "adjoint": "cg", "eps": 1e-10, "delta": 1e-10}
    want = module.bind_samples(data).hypergradient(theta + 0.3, **kw)
    armed = threading.Event()

    def interrupt(signum, frame):
        if armed.is_set():
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, interrupt)
    # The timer is cancelled (or waited for) before the default handler, which ends the
    # process, is restored: a call faster than its delay must not leave it pending.
    timer = threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        with module.bind_samples(data, executor="processes", workers=2) as prob:
            armed.set()
            timer.start()
            try:
                prob.hypergradient(theta, **kw)
                interrupted = False
            except KeyboardInterrupt:
                interrupted = True
            armed.clear()
            got = prob.hypergradient(theta + 0.3, **kw)
    finally:
        timer.cancel()
        if timer.ident is not None:
            timer.join()
        signal.signal(signal.SIGUSR1, previous)
    if not interrupted:
        pytest.skip("the call ended before the interrupt arrived")
    assert _bits(got) == _bits(want)


def test_the_allocator_is_tuned_only_under_dasks_trim_setting(monkeypatch):
    """Dask workers run with MALLOC_TRIM_THRESHOLD_ set, which freezes glibc's mmap threshold
    (vectors of 16384 doubles mapped at each allocation): tune_allocator sets the threshold
    there, and only there."""
    from codegen.runtime.sample_worker import tune_allocator

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert tune_allocator() is False
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert tune_allocator() is glibc


def test_a_worker_that_lost_its_samples_gets_them_again(problems, bound, cluster):
    """A Dask worker that no longer holds a sample (replaced at its address, or its memory
    cleared) answers SampleMissing; the sample is installed again and run from the explicit
    starting points, with the serial bits."""
    from codegen.runtime.sample_worker import forget_samples

    _, client = cluster
    _, _, theta = problems["logistic"]
    kw = {"lower": "fista", "adjoint": "cg"}
    serial = bound["logistic"]["serial"]
    first = serial.hypergradient(theta, **kw)
    want = serial.hypergradient(theta + 0.1, x0=first.x, q0=first.q, **kw)
    prob = bound["logistic"]["dask"]
    got_first = prob.hypergradient(theta, **kw)
    forgotten = client.run(forget_samples, prob.executor.tokens)
    assert sum(forgotten.values()) == SAMPLES
    got = prob.hypergradient(theta + 0.1, x0=got_first.x, q0=got_first.q, **kw)
    assert _bits(got) == _bits(want)


def test_dask_workers_run_with_the_parents_thread_counts(problems, bound, cluster):
    """Dask workers start with one BLAS and one OpenMP thread; a sum over many entries (a
    BLAS dot, a kernel's OpenMP reduction) changes its bits with the thread count, so each task
    sets the parent's counts on its worker thread."""
    from codegen.runtime.sample_worker import thread_counts

    _, client = cluster
    _, _, theta = problems["ridge"]
    prob = bound["ridge"]["dask"]
    prob.hypergradient(theta)
    parent = thread_counts()
    assert parent is not None and parent["blas"] >= 1
    backend = prob.executor.backend
    workers = sorted(backend.hosts)
    assert workers == sorted(client.nthreads())
    for worker, seen in zip(workers, backend._call([(w, "thread_counts", ()) for w in workers])):
        assert {api: seen[api] for api in parent} == parent, worker


def test_a_samples_own_error_is_the_serial_one(problems, bound):
    """An error of the sample itself (here x0 of the wrong length for sample 2) is raised as
    the serial loop raises it, whichever executor ran the sample."""
    _, _, theta = problems["logistic"]
    x0 = [np.zeros(3), np.zeros(3), np.zeros(7), np.zeros(3)]
    messages = set()
    for executor, prob in bound["logistic"].items():
        with pytest.raises(SolverError) as info:
            prob.hypergradient(theta, x0=x0)
        messages.add(str(info.value))
        if executor != "serial" and sys.version_info >= (3, 11):
            assert "(sample 2, computed on a worker)" in info.value.__notes__
    assert messages == {"x0 has 7 entries, the problem has x_size = 3"}


def test_large_tasks_and_results_flow_with_requests_pipelined(problems):
    """Two requests per worker may be outstanding (process_backend.PIPELINE_DEPTH), but one larger
    than AHEAD_BYTES waits for an idle worker: 8 samples of 256 x 256 with explicit x0 and q0
    (1 MB per task, 1.5 MB per result) complete with the serial bits. Sent ahead to a busy
    worker, such a task blocks the parent's write while the worker blocks writing its result
    (measured: the call hangs with AHEAD_BYTES unlimited; the alarm kills the workers, which
    unblocks the parent, and fails the test). The warm call after them (600-byte tasks) goes
    two ahead, with the serial bits too."""
    import signal

    from codegen.runtime.process_backend import AHEAD_BYTES, PIPELINE_DEPTH

    pids: list[int] = []

    def hung(signum, frame):
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        raise TimeoutError("the executor's call blocked (parent and worker both writing?)")

    assert PIPELINE_DEPTH >= 2
    module, _, theta = problems["tv2d"]
    data = [load_example("tv2d").namespace["example_data"](seed=s, h=256, w=256)
            for s in range(8)]
    serial = module.bind_samples(data)
    first = serial.hypergradient(theta)
    x0 = [x + 1e-3 for x in first.x]  # not what any worker holds: every task carries arrays
    want = serial.hypergradient(theta + 0.1, x0=x0, q0=first.q)
    warm_want = serial.hypergradient(theta + 0.2, x0=want.x, q0=want.q)
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        with module.bind_samples(data, executor="processes", workers=2) as prob:
            pids.extend(prob.executor.backend.pids)
            prob.hypergradient(theta)
            got = prob.hypergradient(theta + 0.1, x0=x0, q0=first.q)
            assert prob.executor.warm_count == 0 and x0[0].nbytes > AHEAD_BYTES
            assert _bits(got) == _bits(want)
            warm = prob.hypergradient(theta + 0.2, x0=got.x, q0=got.q)
            assert prob.executor.warm_count == 8
            assert _bits(warm) == _bits(warm_want)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_module_directory_rebuilt_for_another_problem_is_an_error_on_workers(tmp_path):
    """Workers load a module by its directory. After another problem of the same name was built
    into it (an edited file loaded again), a "processes" executor of the first module computed
    the second problem's numbers, status "ok". The directory's fingerprint travels with the
    module now, and the mismatch is an error that names the fix."""
    import codegen
    from codegen import HypergenError

    source = (ROOT / "examples" / "ridge.py").read_text()
    other = tmp_path / "ridge_other.py"
    other.write_text(source.replace("sp.exp(theta) / 2 * sp.Sum(x[j] ** 2",
                                    "sp.exp(3 * theta) / 2 * sp.Sum(x[j] ** 2"))
    assert other.read_text() != source
    out = tmp_path / "modules"
    first = codegen.load(ROOT / "examples" / "ridge.py", out=out)
    _, ns = load_example("ridge")
    data = [ns["example_data"](seed=s, **TINY["ridge"]) for s in range(2)]
    codegen.load(other, out=out)
    with pytest.raises(HypergenError, match="now holds another build of problem 'ridge'"):
        with first.bind_samples(data, executor="processes", workers=2) as prob:
            prob.hypergradient(0.0, rtol=1e-8)


_FORKED: dict = {}  # what a forked child inherits (a bound problem does not pickle)


def _forked_gradient(_):
    prob, x = _FORKED["prob"], _FORKED["x"]
    return prob.lower_grad(x, 0.0)


def test_a_fork_after_a_parallel_kernel_computes(build_dir):
    """A kernel ran an OpenMP parallel loop here (ridge, m n > 200000), then a user's `fork`
    Pool called one in the child: GNU libgomp's thread pool does not survive fork, and the
    child hung for ever. Children of a process that loaded a module run OpenMP at one thread."""
    import multiprocessing

    _, module, ns = built_example("ridge", build_dir)
    prob = module.bind(**ns["example_data"](seed=0, m=4000, n=200, p=50))
    x = np.ones(200)
    want = prob.lower_grad(x, 0.0)
    _FORKED.update(prob=prob, x=x)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.map_async(_forked_gradient, [0]).get(timeout=120)[0]
    _FORKED.clear()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
