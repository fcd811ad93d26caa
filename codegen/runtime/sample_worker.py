"""The worker side of an executor: samples installed once per worker, their hypergradients run
where their data and warm starts already are.

A worker process (a `processes` pool member or a Dask worker) keeps the installed samples at
module level, so they outlive the tasks: by token, each a bound problem with the large arrays of
its results (x, q and the lower gradient: SLOTS), by call number, until the parent drops them.
A result goes back to the parent without them (`slim`: a handle per array, codegen/runtime/
held.py), and the parent fetches one only when its caller reads it. The generated module reaches
a worker pickled as its directory and is loaded from there (`load_directory` reuses the
extension the parent compiled; it does not compile again). A task names its sample by token,
and its x0 / q0 either come with it or are `Held` references to arrays this worker holds; a
task sent again after its worker was lost carries `replay`, the earlier calls that made those
arrays, so the new worker computes them first, to the same bits (codegen/runtime/executors.py).
"""
from __future__ import annotations

import ctypes
import os
import pickle
import sys
import threading
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_info  # the parent's thread counts

from ..errors import HypergenError
from ..hypergrad import HypergradientOptions, HypergradientResult, hypergradient

if TYPE_CHECKING:  # annotations only: a worker gets its module by unpickling (no import edge)
    from .bound_problem import BoundProblem
    from .module import GeneratedModule

__all__ = ["MAX_ATTEMPTS", "SLOTS", "ExecutorError", "Held", "Pair", "Receive", "SampleTask",
           "SampleMissing", "first_error", "homes", "install_samples", "forget_samples", "run_sample",
           "run_samples", "fetch_arrays", "held_calls", "serve", "slim",
           "worker_label", "thread_controller", "thread_counts", "tune_allocator"]


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


def _nbytes(value: Any) -> int:
    """The bytes of a sample's array, or of a sparse matrix's stored entries and indices (a
    scipy.sparse matrix has no nbytes); 0 for a scalar."""
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    return sum(int(getattr(getattr(value, part, None), "nbytes", 0))
               for part in ("data", "indices", "indptr"))


def homes(data: list[dict[str, Any]], count: int) -> list[int]:
    """Each sample's home worker (0 to count - 1) when its data are first sent: the largest
    sample first, each to the worker with the fewest bytes of data so far (ties: the lower
    number). A sample's work grows with its size, and it never moves while its worker lives
    (its data and warm starts stay there), so this is the one chance to balance the workers;
    samples of one size go to worker s mod count."""
    sizes = [sum(_nbytes(value) for value in d.values()) for d in data]
    load = [0] * count
    out = [0] * len(data)
    for s in sorted(range(len(data)), key=lambda s: -sizes[s]):
        out[s] = min(range(count), key=lambda w: load[w])
        load[out[s]] += sizes[s]
    return out


def first_error(errors: dict[int, BaseException]) -> BaseException:
    """The error of the first failing sample, as the serial loop would have raised it, with a
    note naming the sample (Python 3.11+ shows notes under the message; the message is the
    serial one)."""
    sample = min(errors)
    exc = errors[sample]
    if hasattr(exc, "add_note") and not isinstance(exc, ExecutorError):
        exc.add_note(f"(sample {sample}, computed on a worker)")
    return exc


#: The arrays of a sample's result that stay on its worker, by slot number: the lower solution x,
#: the adjoint q and the lower solver's gradient (lower.x and adjoint.q are x and q themselves).
SLOTS = ("x", "q", "lower gradient")


@dataclass(frozen=True)
class Held:
    """An array the sample's worker holds: slot `slot` (SLOTS) of its result of call `run`."""

    run: int
    slot: int


@dataclass(frozen=True)
class SampleTask:
    """One sample's share of a hypergradient, as sent to a worker.

    x0 / q0: None, an array (it travels), or a `Held` reference to an array the worker holds.
    run: this call's number (never reused by the parent); the worker keeps the result's arrays
    under it. threads: the parent's BLAS and OpenMP thread counts ({"blas": n, "openmp": m}),
    set here for the run: a dot product of 10^4 entries or more is summed in another order on
    another number of BLAS threads, and a kernel's OpenMP reduction (loops over 200000
    iterations) on another number of OpenMP threads, and the bits change; Dask workers start
    with one thread of each. inline: a held array of at most this many bytes also travels back
    with the result (small problems get plain arrays, no fetch). drop: this sample's earlier
    calls whose arrays the parent no longer needs (dropped after the run). replay: the earlier
    calls (in order) that made the Held arrays this task starts from, run first where those
    arrays are missing (the sample's worker was lost): the same calls give the same bits."""

    index: int
    token: str
    theta: np.ndarray
    options: HypergradientOptions
    x0: Any
    q0: Any
    run: int
    threads: dict[str, int] | None = None
    inline: int = 0
    drop: tuple[int, ...] = ()
    replay: tuple[SampleTask, ...] = ()


#: A task to send first, and a function making the task to send again where the first found its
#: sample's worker lost (its `replay` filled in: made only when needed).
Pair = tuple[SampleTask, Callable[[], SampleTask]]

#: Called by a backend in the parent with (sample, its slim result) as each worker's results
#: arrive, while the other workers still compute.
Receive = Callable[[int, bytes], None]


@dataclass
class _Installed:
    problem: BoundProblem
    results: dict[int, tuple[np.ndarray | None, ...]] = field(default_factory=dict)


#: glibc's mallopt parameter numbers: the size from which malloc maps memory, and the free
#: space at the heap's top from which free gives memory back to the OS
M_MMAP_THRESHOLD = -3
M_TRIM_THRESHOLD = -1
#: 32 MiB: glibc's largest mmap threshold on 64-bit (4 MiB x sizeof(long)).
MMAP_THRESHOLD = 32 * 1024 * 1024

_SAMPLES: dict[str, _Installed] = {}
_LOCK = threading.Lock()  # a Dask worker may run tasks in threads
_CONTROLLER: list[Any] = []  # this process's threadpoolctl controller, made at the first task


def thread_controller() -> Any:
    """A threadpoolctl controller of the BLAS and OpenMP libraries loaded now. Finding the
    libraries walks every loaded shared object (0.7-2 ms, on the parent's path before any task
    leaves); reading their thread counts through a controller takes microseconds. An executor
    makes one when its samples are bound (NumPy's BLAS and the module's OpenMP runtime, the
    libraries its samples run on, are loaded by then)."""
    return ThreadpoolController()


def thread_counts(controller: Any = None) -> dict[str, int]:
    """The calling thread's BLAS and OpenMP thread counts ({"blas": n, "openmp": m}), for the
    libraries `controller` knows (default: those loaded now)."""
    counts: dict[str, int] = {}
    for lib in (threadpool_info() if controller is None else controller.info()):
        api = str(lib["user_api"])
        counts[api] = max(counts.get(api, 0), int(lib["num_threads"]))
    return counts


def _use_thread_counts(counts: dict[str, int] | None) -> None:
    """Run this thread's BLAS and OpenMP on the parent's counts (OpenMP's is per thread, and a
    Dask worker may run tasks on another thread: set at every task; it costs microseconds)."""
    if counts is None:  # a task made without them
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


def _start(held: _Installed, task: SampleTask, value: Any) -> Any:
    """x0 / q0 as the task gives it: a copy of a held array (a solver that failed half-way must
    not leave it changed), or the value itself."""
    if not isinstance(value, Held):
        return value
    arrays = held.results.get(value.run)
    if arrays is None or arrays[value.slot] is None:
        raise SampleMissing(task.token, worker_label(),
                            f"holds no {SLOTS[value.slot]} of call {value.run}")
    return np.array(arrays[value.slot])


def _slots(res: HypergradientResult) -> tuple[np.ndarray | None, ...]:
    """The result's held arrays, by slot."""
    grad = None if res.lower is None or isinstance(res.lower, list) else res.lower.grad
    return tuple(a if isinstance(a, np.ndarray) else None for a in (res.x, res.q, grad))


class _SlimPickler(pickle.Pickler):
    """Pickles a result with each held array replaced by (slot, shape, dtype, bytes or None,
    facts): the bytes only for arrays of at most `inline` bytes; facts are its 2-norm and
    whether it is all finite, which callers ask of x and q without needing the array."""

    def __init__(self, file: Any, arrays: tuple[np.ndarray | None, ...], inline: int):
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.slot_of = {id(a): n for n, a in reversed(list(enumerate(arrays))) if a is not None}
        self.arrays, self.inline = arrays, inline
        self.pids: dict[int, tuple[Any, ...]] = {}

    def persistent_id(self, obj: Any) -> Any:
        slot = self.slot_of.get(id(obj)) if isinstance(obj, np.ndarray) else None
        if slot is None or self.arrays[slot] is not obj:
            return None
        if slot not in self.pids:  # x is also lower.x: once
            numeric = obj.dtype.kind in "fc"
            facts = {"norm": float(np.linalg.norm(np.asarray(obj, dtype=np.float64)))
                     if obj.dtype.kind == "f" else None,
                     "all_finite": bool(np.all(np.isfinite(obj))) if numeric else None}
            self.pids[slot] = (slot, obj.shape, obj.dtype.str,
                               obj.tobytes() if obj.nbytes <= self.inline else None, facts)
        return self.pids[slot]


def slim(res: HypergradientResult, inline: int) -> bytes:
    """The result pickled without its held arrays (codegen/runtime/held.py loads it)."""
    import io
    buffer = io.BytesIO()
    _SlimPickler(buffer, _slots(res), inline).dump(res)
    return buffer.getvalue()


def _compute(held: _Installed, task: SampleTask) -> HypergradientResult:
    """The sample's hypergradient at task.theta, as the serial path computes it; its arrays
    kept under task.run."""
    x0, q0 = _start(held, task, task.x0), _start(held, task, task.q0)
    _use_thread_counts(task.threads)
    res = hypergradient(held.problem, task.theta, task.options, x0=x0, q0=q0)
    held.results[task.run] = _slots(res)
    return res


def run_sample(task: SampleTask) -> bytes:
    """The sample's hypergradient at task.theta, exactly as the serial `hypergradient_samples`
    computes it (the same function, options and starting points), slimmed (`slim`); first the
    replayed calls whose arrays are missing here, last the dropped calls' arrays forgotten."""
    with _LOCK:
        held = _SAMPLES.get(task.token)
    if held is None:
        raise SampleMissing(task.token, worker_label(), "is not installed")
    for earlier in task.replay:
        if earlier.run not in held.results:
            _compute(held, earlier)
    blob = slim(_compute(held, task), task.inline)
    for run in task.drop:
        held.results.pop(run, None)
    return blob


def fetch_arrays(items: list[tuple[str, int, int]]) -> list[np.ndarray | SampleMissing]:
    """The held arrays (token, call, slot) asked for, each a SampleMissing where it is not
    here (its worker was replaced, or the sample moved)."""
    out: list[np.ndarray | SampleMissing] = []
    for token, run, slot in items:
        with _LOCK:
            held = _SAMPLES.get(token)
        arrays = None if held is None else held.results.get(run)
        array = None if arrays is None else arrays[slot]
        out.append(array if array is not None else SampleMissing(
            token, worker_label(), f"holds no {SLOTS[slot]} of call {run}"))
    return out


def held_calls(tokens: list[str]) -> dict[str, list[int]]:
    """The calls whose arrays this worker holds, per installed sample of `tokens` (what the
    parent's results still refer to, and each sample's latest)."""
    with _LOCK:
        return {t: sorted(_SAMPLES[t].results) for t in tokens if t in _SAMPLES}


def run_samples(tasks: list[SampleTask]) -> list[bytes | Exception]:
    """run_sample for each task in turn (a worker's share of a call: one request to a
    `processes` worker; on a Dask worker, one call on its actor, a batch per worker thread),
    each sample's error returned in its place, so that it does not lose the others' results."""
    outcomes: list[bytes | Exception] = []
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
        "install": lambda p: install_samples(*p), "run": run_samples, "fetch": fetch_arrays,
        "forget": forget_samples}
    while True:
        try:
            raw = connection.recv_bytes()
        except (EOFError, OSError):
            return
        try:  # unpickled here, so that a request this worker cannot load goes back as an error
            kind, payload = ForkingPickler.loads(raw)
        except Exception as exc:  # noqa: BLE001 - a module whose directory changed, say
            connection.send(("error", (exc, traceback.format_exc())))
            continue
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
