"""Many samples on several processes or machines: the parent's side (docs/distributed.md).

`bind_samples(samples, executor=...)` validates every sample here, then gives each one a home
worker and sends its data there once (`install`). A hypergradient then sends each worker only
theta, the options and, per sample, either its starting points or "the (x, q) you hold from run
r" when the caller's x0 / q0 are exactly what that worker returned last time (their bytes are
compared with the parent's copy of what it returned): the warm starts of an upper-level run stay
on the workers. Each worker runs
`hypergradient` on its samples (codegen/runtime/sample_worker.py), the same function with the
same arguments as the serial path, and the parent forms the mean in sample order
(`hypergradient_samples(..., per_sample=...)`), so the numbers are the serial ones bit for bit
(given the same NumPy / BLAS build on the workers; each task carries the parent's BLAS and
OpenMP thread counts, see `thread_counts`).

A sample whose worker is gone, or whose worker no longer holds it, is installed on a live worker
and run again there from the explicit arrays, which the parent keeps; after MAX_ATTEMPTS losses,
or with no worker left, the call raises ExecutorError naming the samples. A mean over the
samples that did finish is never returned.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import pickle
import threading
import uuid
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

import numpy as np

from ..hypergrad import HypergradientOptions, HypergradientResult
from .dask_backend import DaskBackend
from .sample_worker import (
    MAX_ATTEMPTS,
    ExecutorError,
    SampleMissing,
    SampleTask,
    first_error,
    serve,
    thread_counts,
)

__all__ = ["ExecutorError", "SampleExecutor", "ProcessBackend", "check_executor",
           "make_executor", "MAX_ATTEMPTS"]

_SERIAL = (None, "local")


class Backend(Protocol):
    """What runs the tasks: a pool of local processes, or a Dask cluster."""

    description: str

    def install(self, module: Any, items: list[tuple[int, str, dict[str, Any]]]) -> None: ...

    def run(self, pairs: list[tuple[SampleTask, SampleTask]]) -> list[HypergradientResult]: ...

    def close(self) -> None: ...


def is_address(value: Any) -> bool:
    """A Dask scheduler address: "tcp://host:port", "tls://...", "host:port"."""
    return isinstance(value, str) and ("://" in value or value.rsplit(":", 1)[-1].isdigit())


def check_executor(executor: Any, workers: int | None) -> None:
    """Refuse, before any sample is bound, an executor value that names no executor."""
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool)
                                or workers < 1):
        raise ExecutorError(f"workers must be a positive integer, got {workers!r}")
    if isinstance(executor, str) and executor.partition(":")[0] in ("processes", "local") \
            and executor not in ("processes", "local"):
        raise ExecutorError(
            f"executor {executor!r} is not an executor (nor a Dask scheduler address): for N "
            "worker processes use executor='processes', workers=N; 'local' is serial")
    if executor in _SERIAL or executor == "processes" or is_address(executor):
        if workers is not None and executor != "processes":
            raise ExecutorError(f"workers={workers} is for executor='processes' (the Dask "
                                f"cluster decides its own workers), got executor={executor!r}")
        return
    if type(executor).__name__ == "Client" and hasattr(executor, "submit"):
        return
    raise ExecutorError(
        f"executor {executor!r} is not an executor: use None or 'local' (serial), "
        "'processes' (local worker processes), a dask.distributed.Client, or a Dask scheduler "
        "address such as 'tcp://10.0.0.5:8786'")


def make_executor(executor: Any, module: Any, data: list[dict[str, Any]],
                  workers: int | None) -> SampleExecutor | None:
    """The executor bind_samples asked for, with every sample installed; None for serial."""
    check_executor(executor, workers)
    if executor in _SERIAL:
        return None
    backend: Backend
    if executor == "processes":
        count = min(len(data), workers or os.cpu_count() or 1)
        backend = ProcessBackend(count)
    else:
        backend = DaskBackend(executor)  # imports dask (an optional extra) only now
    try:
        return SampleExecutor(backend, module, data)
    except BaseException:
        backend.close()
        raise


def _snapshot(value: Any) -> np.ndarray | None:
    """The parent's own copy of an array a worker returned and holds (None: not an array). A
    copy, because the caller may change the returned array in place before passing it back."""
    return np.array(value) if isinstance(value, np.ndarray) else None


def _same_bits(value: Any, held: np.ndarray | None) -> bool:
    """Whether `value` is the held array bit for bit: dtype, shape and bytes. A byte comparison
    of 64 pairs of 16384 doubles costs about 0.5 ms; a blake2b digest of both sides cost 16 ms
    of the parent's time per call, a sixth of the executor's overhead at 64 samples of 128 x 128."""
    return (held is not None and isinstance(value, np.ndarray) and value.dtype == held.dtype
            and value.shape == held.shape and value.tobytes() == held.tobytes())


@dataclass
class _Held:
    """What the parent knows a sample's worker holds: the run number and copies of its (x, q)."""

    run: int = 0
    x: np.ndarray | None = None
    q: np.ndarray | None = None


@dataclass
class SampleExecutor:
    """The parent's bookkeeping for one BoundSamples: tokens, the held warm starts, the backend.

    warm_count: how many samples of the last call started from what their worker held (their
    x0 did not travel)."""

    backend: Backend
    module: Any
    data: list[dict[str, Any]]
    tokens: list[str] = field(init=False)
    held: list[_Held] = field(init=False)
    warm_count: int = 0
    _finalizer: Any = field(init=False, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)
    # run numbers are never reused: a task of an interrupted call that finishes late on its
    # worker leaves a run number the parent does not hold, so its (x, q) is never taken as warm
    _runs: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    def __post_init__(self) -> None:
        prefix = uuid.uuid4().hex[:12]
        self.tokens = [f"{prefix}-{s}" for s in range(len(self.data))]
        self.held = [_Held() for _ in self.data]
        self.backend.install(self.module, [(s, self.tokens[s], d) for s, d in
                                           enumerate(self.data)])
        self.data = []  # the backend keeps what it needs to install a sample again
        self._finalizer = weakref.finalize(self, self.backend.close)

    @property
    def description(self) -> str:
        return self.backend.description

    def per_sample(self, theta: np.ndarray, options: HypergradientOptions, x0: Any,
                   q0: Any) -> list[HypergradientResult]:
        """Each sample's hypergradient on its worker (hypergradient_samples' per_sample)."""
        with self._lock:  # one call at a time: the held warm starts are per call
            threads, run = thread_counts(), next(self._runs)
            pairs = [self._tasks(s, theta, options, None if x0 is None else x0[s],
                                 None if q0 is None else q0[s], threads, run)
                     for s in range(len(self.held))]
            self.warm_count = sum(warm.warm_x for warm, _ in pairs)
            results = self.backend.run(pairs)
            for (task, _), res in zip(pairs, results):
                self.held[task.index] = _Held(task.run, _snapshot(res.x), _snapshot(res.q))
            return results

    def _tasks(self, s: int, theta: np.ndarray, options: HypergradientOptions, x0: Any,
               q0: Any, threads: dict[str, int] | None,
               run: int) -> tuple[SampleTask, SampleTask]:
        """(the task to send first, the task with explicit arrays to send again elsewhere)."""
        held = self.held[s]
        warm_x, warm_q = _same_bits(x0, held.x), _same_bits(q0, held.q)
        full = SampleTask(s, self.tokens[s], theta, options, x0, q0, False, False, held.run,
                          run, threads)
        warm = SampleTask(s, self.tokens[s], theta, options, None if warm_x else x0,
                          None if warm_q else q0, warm_x, warm_q, held.run, run,
                          threads)
        return warm, full

    def close(self) -> None:
        """Stop the worker processes (or leave a Client that was passed in, closing only one
        this executor opened) and forget the installed samples."""
        self._finalizer()


def _start_context() -> Any:
    """"forkserver" where there is one (a server process imports hypergen once; each worker is
    a fork of it: a pool starts in a fraction of a second), else "spawn". Neither forks the
    caller, whose threads and locks a fork would copy mid-use."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([serve.__module__])
    return context


#: Requests one worker may have outstanding (sent, reply not read yet): with 2, the next task
#: already waits in the worker's pipe when it sends a reply, so it does not sit idle while the
#: parent reads the reply (a 128 x 128 tv2d result is 395 KB) and sends the next request.
PIPELINE_DEPTH = 2

#: The largest request sent while another is outstanding. A worker reads requests only between
#: tasks and the parent reads replies only between its sends, so a request larger than the
#: socket's buffer (about 200 KB on Linux) sent to a busy worker could block both sides, each
#: writing while the other writes: install requests and tasks with explicit x0 / q0 wait until
#: their worker is idle. A task with the warm start held is about 600 bytes.
AHEAD_BYTES = 16 * 1024


@dataclass
class _Item:
    """A request queued for one worker process: install samples, or run one task; `request`
    holds its pickled bytes once made (kept while it waits for an idle worker)."""

    kind: str  # "install" | "run" | "stale" (a reply to drop: its call was interrupted)
    samples: list[int]
    task: SampleTask | None = None
    full: SampleTask | None = None
    request: bytes | None = None


@dataclass
class _Process:
    """One worker process: its queue of requests to send, and `sent`, the requests sent whose
    replies are still to be read (in order: a worker answers its requests one by one)."""

    process: Any
    connection: Connection
    queue: deque[_Item] = field(default_factory=deque)
    sent: deque[_Item] = field(default_factory=deque)
    alive: bool = True


class ProcessBackend:
    """A pool of local worker processes (forked from a server process that imported hypergen,
    or spawned; each loads the module from its directory). Sample s lives on worker s mod n,
    and moves only when its worker dies. Requests to one worker go one at a time, in order,
    over its own pipe, up to PIPELINE_DEPTH of them outstanding."""

    def __init__(self, count: int):
        context = _start_context()
        self.workers: list[_Process] = []
        for _ in range(count):
            parent_end, child_end = context.Pipe(duplex=True)
            process = context.Process(target=serve, args=(child_end,), daemon=True,
                                      name="hypergen-sample-worker")
            process.start()
            child_end.close()  # the parent sees EOF when the child dies
            self.workers.append(_Process(process, parent_end))
        self.description = f"processes ({count} workers)"
        self.module: Any = None
        self.items: dict[int, tuple[str, dict[str, Any]]] = {}
        self.home: dict[int, int] = {}

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (a test kills one to see its samples recomputed)."""
        return [int(w.process.pid) for w in self.workers]

    def install(self, module: Any, items: list[tuple[int, str, dict[str, Any]]]) -> None:
        self.module = module
        for s, token, data in items:
            self.items[s] = (token, data)
            self.home[s] = s % len(self.workers)
        for position, worker in enumerate(self.workers):
            mine = [s for s, _, _ in items if self.home[s] == position]
            if mine:
                worker.queue.append(_Item("install", mine))
        self._drive({})

    def run(self, pairs: list[tuple[SampleTask, SampleTask]]) -> list[HypergradientResult]:
        for warm, full in pairs:
            self.workers[self.home[warm.index]].queue.append(
                _Item("run", [warm.index], warm, full))
        results: dict[int, HypergradientResult] = {}
        self._drive(results)
        return [results[warm.index] for warm, _ in pairs]

    def _drive(self, results: dict[int, HypergradientResult]) -> None:
        """_exchange, and after an interruption (Ctrl-C, an error) the requests still out
        marked stale: their replies are read and dropped before the next call's, so a late
        reply can never be taken for a result of another theta."""
        try:
            self._exchange(results)
        except BaseException:
            for worker in self.workers:
                worker.queue.clear()
                worker.sent = deque(_Item("stale", item.samples) for item in worker.sent)
            raise

    def _exchange(self, results: dict[int, HypergradientResult]) -> None:
        """Send each worker its queue, up to PIPELINE_DEPTH requests outstanding, until every
        queue is empty; move the requests of a worker that died; raise the first sample's
        error."""
        errors: dict[int, BaseException] = {}
        attempts: dict[int, int] = {}
        while True:
            for worker in self.workers:
                self._fill(worker, attempts, errors)
            busy = [w for w in self.workers if w.sent]
            if not busy:
                break
            ready = wait([w.connection for w in busy] + [w.process.sentinel for w in busy])
            for worker in busy:
                if worker.connection in ready or worker.process.sentinel in ready:
                    self._receive(worker, results, attempts, errors)
        if errors:
            raise first_error(errors)

    def _fill(self, worker: _Process, attempts: dict[int, int],
              errors: dict[int, BaseException]) -> None:
        """Send the worker's queued requests while fewer than PIPELINE_DEPTH are outstanding;
        one larger than AHEAD_BYTES waits until the worker has none outstanding."""
        while worker.alive and worker.queue and len(worker.sent) < PIPELINE_DEPTH:
            item = worker.queue[0]
            if errors and item.kind == "run":
                worker.queue.popleft()  # a sample failed: the call raises; do not start more
                continue
            if item.request is None:
                payload: Any = ((self.module, [self.items[s] for s in item.samples])
                                if item.kind == "install" else item.task)
                item.request = pickle.dumps((item.kind, payload), pickle.HIGHEST_PROTOCOL)
            if worker.sent and len(item.request) > AHEAD_BYTES:
                return
            worker.queue.popleft()
            worker.sent.append(item)
            try:
                worker.connection.send_bytes(item.request)
            except (OSError, EOFError):
                self._lost(worker, attempts, errors)
                return

    def _receive(self, worker: _Process, results: dict[int, HypergradientResult],
                 attempts: dict[int, int], errors: dict[int, BaseException]) -> None:
        try:
            status, value = pickle.loads(worker.connection.recv_bytes())
        except (OSError, EOFError):
            self._lost(worker, attempts, errors)
            return
        item = worker.sent.popleft()
        if item.kind == "stale":
            return
        if status == "ok":
            if item.kind == "run":
                results[item.samples[0]] = value
            return
        exc, text = value
        if isinstance(exc, SampleMissing) and item.full is not None:
            worker.queue.extendleft([_Item("run", item.samples, item.full, item.full),
                                     _Item("install", item.samples)])
            return
        if isinstance(exc, BaseException):
            errors[item.samples[0]] = exc
        else:
            errors[item.samples[0]] = ExecutorError(f"sample {item.samples[0]}: {text}")

    def _lost(self, worker: _Process, attempts: dict[int, int],
              errors: dict[int, BaseException]) -> None:
        """worker died: its requests go to the live workers, from explicit arrays."""
        worker.alive = False
        pending = list(worker.sent) + list(worker.queue)
        worker.sent, worker.queue = deque(), deque()
        live = [p for p, w in enumerate(self.workers) if w.alive]
        runs = [item for item in pending if item.kind == "run"]
        dead = self.workers.index(worker)
        moved = sorted(s for s, home in self.home.items() if home == dead)
        for item in runs:
            attempts[item.samples[0]] = attempts.get(item.samples[0], 0) + 1
        failed = [s for s in moved if attempts.get(s, 0) >= MAX_ATTEMPTS or not live]
        if failed:
            why = ("no worker process is left" if not live else
                   f"they lost their worker process {MAX_ATTEMPTS} times")
            errors[failed[0]] = ExecutorError(
                f"samples {failed} could not be computed: {why} (exit code "
                f"{worker.process.exitcode}); no partial mean is returned")
            return
        for n, s in enumerate(moved):
            self.home[s] = live[n % len(live)]
            self.workers[self.home[s]].queue.append(_Item("install", [s]))
        for item in runs:
            full = item.full or item.task
            self.workers[self.home[item.samples[0]]].queue.append(
                _Item("run", item.samples, full, full))

    def close(self) -> None:
        for worker in self.workers:
            if worker.alive:
                try:
                    worker.connection.send_bytes(pickle.dumps(("stop", None)))
                except (OSError, EOFError):
                    pass
        for worker in self.workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.terminate()
            worker.connection.close()
            worker.alive = False
