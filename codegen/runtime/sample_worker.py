"""The worker side of an executor: samples installed once per worker, their hypergradients run
where their data and warm starts already are.

A worker process (a `processes` pool member or a Dask worker) keeps the installed samples at
module level, so they outlive the tasks: by token, each a bound problem with the (x, q) of its
last run. The generated module reaches a worker pickled as its directory and is loaded from
there (`load_directory` reuses the extension the parent compiled; it does not compile again). A
task names its sample by token and says whether its x0 / q0 are that held (x, q) ("warm") or
come with the task; the parent keeps the arrays as well, so a sample whose worker is gone is
installed elsewhere and run again with explicit arrays (codegen/runtime/executors.py).
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import HypergenError
from ..hypergrad import HypergradientOptions, HypergradientResult, hypergradient

try:  # the parent's BLAS and OpenMP thread counts are set on the workers with threadpoolctl
    from threadpoolctl import ThreadpoolController, threadpool_info
except ImportError:  # pragma: no cover - it comes with the dask extra and scikit-learn
    ThreadpoolController = threadpool_info = None

if TYPE_CHECKING:  # annotations only: a worker gets its module by unpickling (no import edge)
    from .bound_problem import BoundProblem
    from .module import GeneratedModule

__all__ = ["MAX_ATTEMPTS", "ExecutorError", "SampleTask", "SampleMissing", "first_error",
           "install_samples", "forget_samples", "run_sample", "run_samples", "serve",
           "worker_label", "thread_counts", "tune_allocator"]


#: How often a sample may lose its worker within one call before the call fails by its name.
MAX_ATTEMPTS = 3


class ExecutorError(HypergenError, RuntimeError):
    """An executor could not be set up, or samples could not be computed (named)."""


class SampleMissing(HypergenError, LookupError):
    """The task's sample is not installed on this worker, or its held warm start is not the one
    the task refers to (the sample moved, or its worker was replaced): resend with arrays."""

    def __init__(self, token: str, worker: str, why: str):
        super().__init__(token, worker, why)
        self.token, self.worker, self.why = token, worker, why

    def __str__(self) -> str:
        return f"sample {self.token} {self.why} on worker {self.worker}"


def first_error(errors: dict[int, BaseException]) -> BaseException:
    """The error of the first failing sample, as the serial loop would have raised it, with a
    note naming the sample (Python 3.11+ shows notes under the message; the message is the
    serial one)."""
    sample = min(errors)
    exc = errors[sample]
    if hasattr(exc, "add_note") and not isinstance(exc, ExecutorError):
        exc.add_note(f"(sample {sample}, computed on a worker)")
    return exc


@dataclass(frozen=True)
class SampleTask:
    """One sample's share of a hypergradient, as sent to a worker.

    warm_x / warm_q: use the (x, q) the worker holds from the call numbered `warm_run`
    instead of x0 / q0 (which are then None: they do not travel). run: this call's number
    (never reused by the parent), kept with its (x, q) on the worker. threads: the parent's
    BLAS and OpenMP thread counts ({"blas": n, "openmp": m}), set here for the run: a dot
    product of 10^4 entries or more is summed in another order on another number of BLAS
    threads, and a kernel's OpenMP reduction (loops over 200000 iterations) on another number
    of OpenMP threads, and the bits change; Dask workers start with one thread of each."""

    index: int
    token: str
    theta: np.ndarray
    options: HypergradientOptions
    x0: np.ndarray | None
    q0: np.ndarray | None
    warm_x: bool
    warm_q: bool
    warm_run: int
    run: int
    threads: dict[str, int] | None = None


@dataclass
class _Installed:
    problem: BoundProblem
    run: int = -1
    x: np.ndarray | None = None
    q: np.ndarray | None = None


#: glibc's mallopt parameter numbers: the size from which malloc maps memory, and the free
#: space at the heap's top from which free gives memory back to the OS
M_MMAP_THRESHOLD = -3
M_TRIM_THRESHOLD = -1
#: 32 MiB: glibc's largest mmap threshold on 64-bit (4 MiB x sizeof(long)).
MMAP_THRESHOLD = 32 * 1024 * 1024

_SAMPLES: dict[str, _Installed] = {}
_LOCK = threading.Lock()  # a Dask worker may run tasks in threads
_CONTROLLER: list[Any] = []  # this process's threadpoolctl controller, made at the first task


def thread_counts() -> dict[str, int] | None:
    """The calling thread's BLAS and OpenMP thread counts ({"blas": n, "openmp": m}, for the
    libraries loaded), or None when threadpoolctl is not installed."""
    if threadpool_info is None:
        return None
    counts: dict[str, int] = {}
    for lib in threadpool_info():
        api = str(lib["user_api"])
        counts[api] = max(counts.get(api, 0), int(lib["num_threads"]))
    return counts


def _use_thread_counts(counts: dict[str, int] | None) -> None:
    """Run this thread's BLAS and OpenMP on the parent's counts (OpenMP's is per thread, and a
    Dask worker may run tasks on another thread: set at every task; it costs microseconds)."""
    if counts is None or ThreadpoolController is None:
        return
    if not _CONTROLLER:  # after the first install: the module's OpenMP runtime is loaded
        _CONTROLLER.append(ThreadpoolController())
    for api, count in counts.items():
        _CONTROLLER[0].limit(limits=count, user_api=api)


def worker_label() -> str:
    """This worker's name in messages: its Dask address, else host and process id."""
    try:
        from dask.distributed import get_worker
        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"{os.uname().nodename}:{os.getpid()}"


def tune_allocator() -> bool:
    """Dask's nanny starts its workers with MALLOC_TRIM_THRESHOLD_=65536 (to give memory back
    to the OS), and in glibc that also freezes the mmap threshold at 128 KiB: every vector of
    16384 or more doubles is then mapped and unmapped at each allocation, and the heap's top
    is given back and taken again at every free above 64 KiB. A 128 x 128 denoising
    hypergradient took 3.5x as long on such a worker (0.041 s against 0.012 s in the parent;
    0.017 s with the mmap threshold alone set). Both thresholds are set to glibc's largest mmap
    threshold on 64-bit (MMAP_THRESHOLD, 32 MiB): vectors below it come from the heap, and up
    to 32 MiB of free heap is kept per arena. Nothing is changed without the variable or
    outside Linux. True if set."""
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                    and libc.mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def install_samples(module: GeneratedModule, items: list[tuple[str, dict[str, Any]]]) -> str:
    """Bind each (token, data) of `items` to `module` and keep it under its token; returns the
    worker's label (where the samples now live). The module arrives pickled as its directory
    and is loaded from there when unpickled (GeneratedModule.__reduce__): once per batch."""
    bound = [(token, _Installed(module.bind(data))) for token, data in items]
    with _LOCK:
        if not _SAMPLES:
            tune_allocator()
        _SAMPLES.update(bound)
    return worker_label()


def forget_samples(tokens: list[str]) -> int:
    """Drop installed samples (the parent closed them); returns how many were here."""
    with _LOCK:
        return sum(_SAMPLES.pop(t, None) is not None for t in tokens)


def run_sample(task: SampleTask) -> HypergradientResult:
    """The sample's hypergradient at task.theta, exactly as the serial `hypergradient_samples`
    computes it (the same function, options and starting points), and its (x, q) kept here."""
    with _LOCK:
        held = _SAMPLES.get(task.token)
    if held is None:
        raise SampleMissing(task.token, worker_label(), "is not installed")
    x0, q0 = task.x0, task.q0
    if task.warm_x or task.warm_q:
        if held.run != task.warm_run:
            raise SampleMissing(task.token, worker_label(),
                                f"holds the warm start of run {held.run}, not {task.warm_run}")
        # copies: a solver that failed half-way must not leave the held start changed
        x0 = np.array(held.x) if task.warm_x else x0
        q0 = np.array(held.q) if task.warm_q else q0
    _use_thread_counts(task.threads)
    res = hypergradient(held.problem, task.theta, task.options, x0=x0, q0=q0)
    held.run, held.x, held.q = task.run, res.x, res.q
    return res


def run_samples(tasks: list[SampleTask]) -> list[HypergradientResult | Exception]:
    """run_sample for each task in turn (one Dask task per worker thread and call), each
    sample's error returned in its place, so that it does not lose the others' results."""
    outcomes: list[HypergradientResult | Exception] = []
    for task in tasks:
        try:
            outcomes.append(run_sample(task))
        except Exception as exc:  # noqa: BLE001 - the parent raises it, naming the sample
            outcomes.append(exc)
    return outcomes


def serve(connection: Connection) -> None:
    """A `processes` worker's loop: (kind, payload) requests in, ("ok" | "error", value) out,
    until "stop" or the parent's end of the pipe closes. An exception travels back as itself
    (when it pickles) with its traceback text, so the parent can name the sample."""
    handlers: dict[str, Callable[[Any], Any]] = {
        "install": lambda p: install_samples(*p), "run": run_sample, "forget": forget_samples}
    while True:
        try:
            kind, payload = connection.recv()
        except (EOFError, OSError):
            return
        if kind == "stop":
            return
        try:
            reply: tuple[str, Any] = ("ok", handlers[kind](payload))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent
            reply = ("error", (exc, traceback.format_exc()))
        try:
            connection.send(reply)
        except Exception as exc:  # noqa: BLE001 - an unpicklable exception: send its text
            connection.send(("error", (HypergenError(f"{type(exc).__name__}: {exc}"),
                                       traceback.format_exc())))
